"""Torch tensors ⇄ Flower ``ArrayRecord``, with no copy on the way in where possible.

Flower stores each array as ``.npy`` bytes; ``Array.numpy()`` parses them with ``np.load``,
which copies. ``record_to_tensors`` reads the small ``.npy`` header itself and wraps the payload
with ``np.frombuffer``: a read-only view of the message's bytes, no copy. The server only reads
updates (the aggregation engine copies chunks into its own buffers), so views are enough there;
a client that trains asks for ``writable=True`` copies.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fl_sim.errors import CheckpointError


def array_to_tensor(array: Array, *, writable: bool = False) -> torch.Tensor:
    """One Flower ``Array`` as a CPU tensor: a view of its bytes, or a copy with ``writable``."""
    if writable:
        return torch.from_numpy(np.array(array.numpy(), copy=True))
    stream = io.BytesIO(array.data[:4096] if len(array.data) > 4096 else array.data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        else:
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
    except ValueError:  # an unusual header (e.g. longer than 4 KiB): let NumPy parse it all
        return torch.from_numpy(np.array(array.numpy(), copy=True))
    if fortran_order or dtype.hasobject:
        return torch.from_numpy(np.ascontiguousarray(array.numpy()))
    count = int(np.prod(shape, dtype=np.int64))
    values = np.frombuffer(array.data, dtype=dtype, count=count, offset=stream.tell())
    with warnings.catch_warnings():
        # the view is read-only: torch warns once that writing to it would be undefined
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(values.reshape(shape))


def record_to_tensors(record: ArrayRecord, *, writable: bool = False) -> dict[str, torch.Tensor]:
    """Every array of ``record`` by name (see ``array_to_tensor``)."""
    return {name: array_to_tensor(array, writable=writable) for name, array in record.items()}


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """An ``ArrayRecord`` of CPU copies of ``tensors`` (names kept, order kept)."""
    record = ArrayRecord()
    for name, tensor in tensors.items():
        if tensor.dtype == torch.bfloat16:
            raise CheckpointError(
                f"tensor {name!r} is bfloat16, which Flower's NumPy arrays cannot carry "
                "(keep federated weights in float32 or float16)"
            )
        record[name] = Array(tensor.detach().cpu().contiguous().numpy())
    return record
