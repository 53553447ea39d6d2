"""A streaming round's replies on disk: one safetensors file per reply, read back memory-mapped.

The non-linear rules (median, fedgma, cclip, ties, dare) need every client's Δ_t of a tensor at
once, and round 1's diagnostics (each client's θ₀ + Δ_t, saved and evaluated) need each Δ_t
alone. A streaming server (strategies/flower_strategy.py, ``server-streaming``) therefore writes
each validated reply to ``<scratch>/round-<r>/client_<t>.safetensors`` as it arrives (atomically:
a temp file, then ``os.replace``), drops the reply, and at the end of the round hands the files to
the one aggregation engine (strategies/streaming.py ``aggregate_model``), which reads them
memory-mapped one tensor name at a time and releases each tensor's pages after its last pass.
The bytes on disk are the bytes the client sent, so the aggregate is bit-identical to the
in-memory path. ``remove`` deletes the round's files, whether the round succeeded or failed.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from fl_sim.checkpoints.safetensors_io import SafetensorsFile, write_safetensors


class SpilledUpdate(Mapping[str, torch.Tensor]):
    """Δ_t of one client as a read-only mapping over its spill file (zero-copy views)."""

    def __init__(self, file: SafetensorsFile) -> None:
        self.file = file

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.file.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.file.keys())  # the order the client sent its tensors in

    def __len__(self) -> int:
        return len(self.file)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        """(name, Δ_t[name]) in file order; each tensor's pages are released once the next one
        is asked for, so one pass over the update (the recorder's θ₀ + Δ_t) keeps one tensor
        of it resident, not the whole file. A released view stays valid (read back on use)."""
        previous = None
        for name in self.file:
            if previous is not None:
                self.file.release(previous)
            yield name, self.file.get(name)
            previous = name
        if previous is not None:
            self.file.release(previous)

    def release(self, name: str) -> None:
        """Unmap tensor ``name``'s pages from this process (strategies/streaming.py)."""
        self.file.release(name)


class SpillFolder:
    """One round's spill files under ``root`` (a fresh temporary folder when ``root`` is None)."""

    def __init__(self, root: str | Path | None, server_round: int) -> None:
        if root is None or str(root) == "":
            self._temporary: Path | None = Path(tempfile.mkdtemp(prefix="fl-sim-spill-"))
            self.folder = self._temporary / f"round-{server_round}"
        else:
            self._temporary = None
            self.folder = Path(root) / f"round-{server_round}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.paths: dict[int, Path] = {}

    def write(self, t: int, update: Mapping[str, torch.Tensor]) -> Path:
        """Client t's Δ_t to ``client_<t>.safetensors``, atomically; returns its path."""
        path = self.folder / f"client_{t}.safetensors"
        specs = [(name, tensor.dtype, tuple(tensor.shape)) for name, tensor in update.items()]
        write_safetensors(path, update.items(), specs)
        self.paths[t] = path
        return path

    def open(self, t: int) -> SpilledUpdate:
        """Client t's Δ_t, memory-mapped."""
        return SpilledUpdate(SafetensorsFile(self.paths[t]))

    def files(self) -> list[Path]:
        """Every file now in the round's folder (temp files of an interrupted write included)."""
        return sorted(self.folder.iterdir()) if self.folder.is_dir() else []

    def remove(self) -> None:
        """Delete the round's files and its folder (and the temporary root, if one was made).
        Open mappings stay readable until their last view is freed (POSIX unlink)."""
        shutil.rmtree(self.folder, ignore_errors=True)
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # the scratch root, once no round uses it
                self.folder.parent.rmdir()
        self.paths.clear()


__all__ = ["SpillFolder", "SpilledUpdate"]
