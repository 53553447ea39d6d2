"""Sharded Hugging Face weights: ``--max-shard-size`` and the streamed, sharded writer.

A model of at most one shard is written as ``model.safetensors``; a larger one as
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes}, "weight_map": {tensor: shard file}}``), exactly as
``transformers``' ``save_pretrained`` does, so ``from_pretrained`` and ``open_checkpoint`` read it
back. Shards are filled greedily in tensor order: a tensor starts a new shard when it would push
the current one past the limit, and a tensor larger than the limit gets a shard of its own.
Tensors still stream one at a time: each shard is a ``write_safetensors`` of the next tensors.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from fl_sim.checkpoints.model_checkpoint import SAFETENSORS_INDEX
from fl_sim.checkpoints.safetensors_io import write_safetensors
from fl_sim.errors import ConfigError
from fl_sim.outputs import write_atomically

DEFAULT_MAX_SHARD_SIZE = "5GB"
WEIGHTS_NAME = "model.safetensors"
# Hugging Face's units (transformers' convert_file_size_to_int): GB = 10⁹ bytes, GiB = 2³⁰.
SIZE_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*")

TensorSpec = tuple[str, torch.dtype, tuple[int, ...]]


def parse_shard_size(value: str | int) -> int:
    """Bytes from ``5GB``, ``500MB``, ``10KB``, ``2GiB`` or a plain byte count (> 0)."""
    fix = "use e.g. 5GB, 500MB, 10KB, 2GiB or a number of bytes"
    if isinstance(value, bool):
        raise ConfigError(f"--max-shard-size must be a size, got {value!r} ({fix})")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(str(value))
        unit = match.group(2).upper() if match else None
        if match is None or unit not in SIZE_UNITS:
            raise ConfigError(f"--max-shard-size {str(value)[:40]!r} is not a size ({fix})")
        size = math.floor(float(match.group(1)) * SIZE_UNITS[unit])
    if size < 1:
        raise ConfigError(f"--max-shard-size must be at least 1 byte, got {str(value)[:40]!r}")
    return size


def tensor_bytes(spec: TensorSpec) -> int:
    _, dtype, shape = spec
    return math.prod(shape) * dtype.itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int) -> list[list[TensorSpec]]:
    """Cut ``specs`` (in order) into shards of at most ``max_shard_size`` bytes each, greedily;
    a tensor larger than the limit is a shard alone."""
    shards: list[list[TensorSpec]] = [[]]
    filled = 0
    for spec in specs:
        size = tensor_bytes(spec)
        if shards[-1] and filled + size > max_shard_size:
            shards.append([])
            filled = 0
        shards[-1].append(spec)
        filled += size
    return shards


def shard_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def write_model_weights(
    folder: str | os.PathLike[str],
    tensors: Iterable[tuple[str, torch.Tensor]],
    specs: Sequence[TensorSpec],
    metadata: dict[str, str] | None = None,
    max_shard_size: int | None = None,
) -> list[Path]:
    """Stream ``tensors`` (in ``specs`` order) into ``folder`` as ``model.safetensors`` or, when
    they exceed ``max_shard_size`` bytes, as shards and their index; return the files written.

    ``folder`` is meant to be a temp folder that ``atomic_output`` renames once complete, so a
    reader never sees some shards without the others.
    """
    folder = Path(folder)
    total = sum(tensor_bytes(spec) for spec in specs)
    if max_shard_size is None or total <= max_shard_size:
        write_safetensors(folder / WEIGHTS_NAME, tensors, specs, metadata)
        return [folder / WEIGHTS_NAME]
    shards = plan_shards(specs, max_shard_size)
    stream = iter(tensors)
    written: list[Path] = []
    weight_map: dict[str, str] = {}
    for index, shard in enumerate(shards, start=1):
        name = shard_name(index, len(shards))
        write_safetensors(folder / name, itertools.islice(stream, len(shard)), shard, metadata)
        written.append(folder / name)
        weight_map.update((spec[0], name) for spec in shard)
    leftover = next(stream, None)
    if leftover is not None:
        raise ValueError(f"write_model_weights: got tensor {leftover[0]!r} after every spec")
    index_text = json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
        indent=2,
    )
    write_atomically(folder / SAFETENSORS_INDEX, index_text + "\n")
    written.append(folder / SAFETENSORS_INDEX)
    return written
