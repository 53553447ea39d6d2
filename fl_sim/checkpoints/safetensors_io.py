"""A strict, zero-copy safetensors reader and a streaming, atomic safetensors writer.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian u64 ``N``, ``N``
bytes of JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the data buffer; ``data_offsets`` are relative to the buffer's start.

The reader trusts nothing in the header: every length and offset is checked against the file
before a byte of tensor data is touched, so a corrupt or hostile file raises ``CheckpointError``
instead of crashing or allocating gigabytes. Tensors are views into a read-only ``mmap``.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from fl_sim.errors import CheckpointError
from fl_sim.outputs import atomic_path

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Headers longer than this are refused (the reference implementation uses the same limit)."""

_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U64": "uint64",
    "U32": "uint32",
    "U16": "uint16",
    "U8": "uint8",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}
# Only the dtypes this torch build has (float8 and wide unsigned ints are recent additions).
DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}
_DTYPE_CODES: dict[torch.dtype, str] = {dtype: code for code, dtype in DTYPES.items()}


@dataclass(frozen=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


def _reject_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"key {duplicate!r} appears twice")
    return dict(pairs)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _excerpt(value: object, limit: int = 60) -> str:
    """A header value for an error message, cut so a hostile header cannot flood the terminal."""
    try:
        text = json.dumps(value)
    except ValueError:  # an int too long to print
        return "[...]"
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def _parse_header(
    raw: bytes, path: Path, data_size: int
) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Validate the JSON header against a data buffer of ``data_size`` bytes."""
    not_safetensors = f"checkpoint {path} is not a safetensors file"
    fix = "the file is corrupt or truncated; re-download or re-save it"
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{not_safetensors}: its header is not valid JSON ({reason})"
        ) from None
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{not_safetensors}: its header is a JSON {type(header).__name__}, not an object"
        )

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise CheckpointError(
            f"checkpoint {path}: header lies about __metadata__: it must map str to str ({fix})"
        )

    entries: dict[str, _Entry] = {}
    for name, info in header.items():
        lies = f"checkpoint {path}: header lies about tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise CheckpointError(f"{lies}: it needs dtype, shape and data_offsets ({fix})")
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if code not in DTYPES:
            raise CheckpointError(
                f"{lies}: unknown dtype {code!r} (fl-sim reads {', '.join(DTYPES)}; "
                "convert the checkpoint to one of them)"
            )
        if not isinstance(shape, list) or not all(_is_int(dim) and dim >= 0 for dim in shape):
            raise CheckpointError(
                f"{lies}: shape {_excerpt(shape)} is not a list of non-negative ints ({fix})"
            )
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
        ) or not (0 <= offsets[0] <= offsets[1] <= data_size):
            raise CheckpointError(
                f"{lies}: data_offsets {_excerpt(offsets)} are not [begin, end] with "
                f"0 <= begin <= end <= {data_size}, the data size ({fix})"
            )
        dtype = DTYPES[code]
        needed = math.prod(shape) * dtype.itemsize
        if offsets[1] - offsets[0] != needed:
            # A product of huge dims may not even print (int max str digits): cap it.
            needs = str(needed) if needed <= data_size else f"more than the {data_size} data bytes"
            raise CheckpointError(
                f"{lies}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes but "
                f"{code} {_excerpt(shape)} needs {needs} ({fix})"
            )
        entries[name] = _Entry(dtype, tuple(shape), offsets[0], offsets[1])

    previous_name, previous_end = "", 0
    for name, entry in sorted(entries.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < previous_end:
            raise CheckpointError(
                f"checkpoint {path}: header lies about tensor {name!r}: its data "
                f"[{entry.begin}, {entry.end}] overlaps tensor {previous_name!r} ({fix})"
            )
        if entry.end > previous_end:
            previous_name, previous_end = name, entry.end
    return entries, metadata


class SafetensorsFile:
    """One ``.safetensors`` file, header validated on open, tensors served from a read-only mmap.

    ``get`` returns zero-copy views: callers must treat them as read-only (writing into one
    faults, the pages are mapped ``PROT_READ``). Views stay valid after ``close()``: the mapping
    lives until the last view is freed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        try:
            file = open(self.path, "rb")  # noqa: SIM115 (closed below; the mmap outlives it)
        except OSError as err:
            raise CheckpointError(
                f"checkpoint {self.path} cannot be opened ({err.strerror}; check the path)"
            ) from None
        with file:
            file_size = os.fstat(file.fileno()).st_size
            if file_size < 8:
                raise CheckpointError(
                    f"checkpoint {self.path} is not a safetensors file: it is {file_size} bytes, "
                    "shorter than the 8-byte header length"
                )
            header_size = int.from_bytes(file.read(8), "little")
            if header_size > file_size - 8:
                raise CheckpointError(
                    f"checkpoint {self.path} is not a safetensors file: header lies about its "
                    f"length ({header_size} bytes, but only {file_size - 8} follow the length)"
                )
            if header_size > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"checkpoint {self.path} is not a safetensors file: its header is "
                    f"{header_size} bytes, over the {MAX_HEADER_BYTES}-byte limit"
                )
            self._entries, self.metadata = _parse_header(
                file.read(header_size), self.path, file_size - 8 - header_size
            )
            self._data_start = 8 + header_size
            # mmap keeps its own descriptor, so the file object can close now.
            self._mmap: mmap.mmap | None = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        self._order = [
            name
            for name, _ in sorted(
                self._entries.items(), key=lambda item: (item[1].begin, item[1].end)
            )
        ]

    def keys(self) -> list[str]:
        """Tensor names in the order of their data in the file."""
        return list(self._order)

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, name: str) -> _Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {name!r}") from None

    def dtype(self, name: str) -> torch.dtype:
        return self._entry(name).dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def nbytes(self, name: str) -> int:
        entry = self._entry(name)
        return entry.end - entry.begin

    def get(self, name: str) -> torch.Tensor:
        """The tensor ``name`` as a read-only view into the mapping (a copy if misaligned)."""
        entry = self._entry(name)
        if self._mmap is None:
            raise ValueError(f"{self.path} is closed")
        numel = math.prod(entry.shape)
        if numel == 0:
            return torch.empty(entry.shape, dtype=entry.dtype)
        offset = self._data_start + entry.begin
        with warnings.catch_warnings():
            # torch warns that the mmap is not writable; read-only is exactly what we want.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            if offset % entry.dtype.itemsize == 0:
                flat = torch.frombuffer(self._mmap, dtype=entry.dtype, count=numel, offset=offset)
                return flat.view(entry.shape)
            # torch.frombuffer accepts a misaligned offset and returns a misaligned tensor,
            # which kernels assume never happens: copy into a fresh, aligned tensor instead.
            raw = torch.frombuffer(
                self._mmap, dtype=torch.uint8, count=entry.end - entry.begin, offset=offset
            )
        aligned = torch.empty(entry.shape, dtype=entry.dtype)
        aligned.view(-1).view(torch.uint8).copy_(raw)
        return aligned

    def release(self, name: str) -> None:
        """Unmap the pages of tensor ``name`` from this process (they stay in the page cache).

        Read-only file pages count in RSS once touched; a streamed merge releases each tensor
        after its last pass, so peak memory follows the largest tensor, not the whole model.
        Views of the tensor stay valid: a later read faults the pages back in.
        """
        entry = self._entry(name)
        if self._mmap is None or entry.end == entry.begin:
            return
        start = (self._data_start + entry.begin) // mmap.PAGESIZE * mmap.PAGESIZE
        stop = self._data_start + entry.end
        self._mmap.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        """Drop the mapping; it is unmapped once no view returned by ``get`` is alive."""
        # Never mmap.close(): torch.frombuffer does not pin the buffer, so closing would unmap
        # pages that live views still point at (a segfault on the next read).
        self._mmap = None

    def __enter__(self) -> SafetensorsFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


def _header_bytes(
    specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    metadata: dict[str, str] | None,
) -> tuple[bytes, dict[str, int]]:
    """The padded header and each tensor's offset in the data buffer.

    Data is laid out by descending itemsize (as the reference writer does), so with a header
    padded to 8 bytes every tensor is aligned and the reader can serve zero-copy views.
    """
    names = [name for name, _, _ in specs]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"write_safetensors: tensor {duplicate!r} appears twice in specs")
    if "__metadata__" in names:
        raise ValueError("write_safetensors: '__metadata__' is reserved, not a tensor name")
    for name, dtype, shape in specs:
        if dtype not in _DTYPE_CODES:
            raise ValueError(f"write_safetensors: tensor {name!r} has unsupported dtype {dtype}")
        if not all(_is_int(dim) and dim >= 0 for dim in shape):
            raise ValueError(f"write_safetensors: tensor {name!r} has bad shape {shape}")
    if metadata is not None and not all(
        isinstance(key, str) and isinstance(value, str) for key, value in metadata.items()
    ):
        raise ValueError("write_safetensors: metadata must map str to str")

    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offsets: dict[str, int] = {}
    position = 0
    for name, dtype, shape in sorted(specs, key=lambda spec: -spec[1].itemsize):
        size = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": _DTYPE_CODES[dtype],
            "shape": list(shape),
            "data_offsets": [position, position + size],
        }
        offsets[name] = position
        position += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return raw, offsets


def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Iterable[tuple[str, torch.Tensor]],
    specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Stream ``tensors`` (in ``specs`` order) to ``path`` without holding them all in memory.

    The header is written first from ``specs``; each arriving tensor must match its spec's name,
    dtype and shape and goes straight to disk. The file appears at ``path`` only when complete
    (temp file in the same folder, then ``os.replace``); on any error the temp file is removed.
    """
    path = Path(path)
    specs = [(name, dtype, tuple(shape)) for name, dtype, shape in specs]
    header, offsets = _header_bytes(specs, metadata)
    data_start = 8 + len(header)
    data_size = sum(math.prod(shape) * dtype.itemsize for _, dtype, shape in specs)

    with atomic_path(path) as temp:  # fl_sim/outputs.py: os.replace on success
        # os.open with 0o666 so the final file gets the usual umask-derived permissions.
        descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "wb") as file:
            file.write(len(header).to_bytes(8, "little"))
            file.write(header)
            received = 0
            for name, tensor in tensors:
                if received == len(specs):
                    raise ValueError(
                        f"write_safetensors: got tensor {name!r} after all {len(specs)} specs"
                    )
                want_name, want_dtype, want_shape = specs[received]
                if (name, tensor.dtype, tuple(tensor.shape)) != (want_name, want_dtype, want_shape):
                    raise ValueError(
                        f"write_safetensors: tensor #{received} is {name!r} {tensor.dtype} "
                        f"{list(tensor.shape)} but its spec is {want_name!r} {want_dtype} "
                        f"{list(want_shape)}"
                    )
                if tensor.numel() > 0:
                    data = tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8)
                    file.seek(data_start + offsets[name])
                    file.write(memoryview(data.numpy()))
                received += 1
            if received != len(specs):
                raise ValueError(
                    f"write_safetensors: got {received} tensors but specs name {len(specs)} "
                    f"(first missing: {specs[received][0]!r})"
                )
            file.truncate(data_start + data_size)  # trailing zero-size tensors write nothing
            file.flush()
            os.fsync(file.fileno())


def save_tensors(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a dict of tensors to ``path`` atomically (``write_safetensors`` with its specs)."""
    specs = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in tensors.items()]
    write_safetensors(path, tensors.items(), specs, metadata)
