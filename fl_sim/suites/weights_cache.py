"""A pre-trained θ₀ cached on disk: made once per content key, verified on every read.

    <stem>.safetensors   the tensors (safetensors, the key in its metadata)
    <stem>.json          {"key", "key_material", "weights_sha256", "pretrain_seconds"}
    <stem>.lock          an exclusive flock while one process reads or makes the pair

A file whose key or SHA-256 does not match, or that cannot be read, is made again (with a
warning), never trusted. Both files are written atomically (temp file, fsync, rename), the
tensors first, so a reader never sees a sidecar for weights that are not there yet.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fl_sim.outputs import read_json, write_atomically, write_json

try:  # POSIX; elsewhere parallel first runs may pre-train more than once (still correct)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CachedWeights:
    tensors: dict[str, torch.Tensor]
    path: Path  # <stem>.safetensors
    source: str  # "disk" | "pretrained"
    pretrain_seconds: float  # as recorded when the tensors were made


def cached_weights(
    directory: Path,
    stem: str,
    key: str,
    key_material: Mapping[str, object],
    make: Callable[[], dict[str, torch.Tensor]],
    what: str,
) -> CachedWeights:
    """The tensors of ``key`` from directory/<stem>.safetensors if they verify, else ``make()``
    (timed) written there with its sidecar; ``what`` names the cache in warnings."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / f"{stem}.safetensors"
    sidecar = weights.with_suffix(".json")
    with locked(directory / f"{stem}.lock"):
        verified = read_verified(weights, sidecar, key, what)
        if verified is not None:
            tensors, meta = verified
            return CachedWeights(tensors, weights, "disk", float(meta.get("pretrain_seconds", 0)))
        start = time.perf_counter()
        tensors = make()
        seconds = time.perf_counter() - start
        payload = save_safetensors(tensors, metadata={"key": key})
        write_atomically(weights, payload, fsync=True)
        meta = {
            "key": key,
            "key_material": dict(key_material),
            "weights_sha256": hashlib.sha256(payload).hexdigest(),
            "pretrain_seconds": round(seconds, 3),
        }
        write_json(sidecar, meta, sort_keys=True, fsync=True)
        return CachedWeights(tensors, weights, "pretrained", seconds)


def read_verified(
    weights: Path, sidecar: Path, key: str, what: str
) -> tuple[dict[str, torch.Tensor], dict[str, object]] | None:
    """(tensors, sidecar) if both files exist and match ``key`` and the recorded SHA-256."""
    if not (weights.is_file() and sidecar.is_file()):
        return None
    try:
        meta = read_json(sidecar)
        payload = weights.read_bytes()
        if meta.get("key") != key:  # type: ignore[union-attr]
            _log.warning("%s cache %s has another key: pre-training again", what, weights)
            return None
        if meta.get("weights_sha256") != hashlib.sha256(payload).hexdigest():  # type: ignore[union-attr]
            _log.warning("%s cache %s fails its SHA-256: pre-training again", what, weights)
            return None
        return load_safetensors(payload), meta  # type: ignore[return-value]
    except (OSError, ValueError, AttributeError) as error:
        _log.warning("%s cache %s unreadable (%s): pre-training again", what, weights, error)
        return None


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive flock on ``path`` (created if missing) for the block."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
