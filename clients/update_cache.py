"""Fine-tune once, merge many: a content-addressed cache of client updates Δ_t.

A client's round is a pure function of what it starts from and how it trains: the task suite
(name, kwargs, seed; the model's identity and bytes; task t's training data), the task index t,
the client's knobs, the round index r (it seeds the minibatches), the full-batch flag and the
global weights θʳ. The cache key is the SHA-256 of exactly that (``update_key``), so six one-shot
rules, a λ/β grid and the first round of every multi-round run from θ₀ train each client once.
The aggregation rule is not in the key: Δ_t does not depend on it.

On disk, under ``<cache-dir>/updates/``:

- ``<key>.safetensors``: Δ_t (float tensors) and θ_t's integer buffers, as ``fine_tune`` returns;
- ``<key>.json``: the ``LocalResult`` figures (n_t, K_t, η_t⁽ᵏ⁾, ‖a_t‖₁, losses), the key, what
  went into it, and the SHA-256 of the safetensors file.

Each file is written atomically (temp file, then ``os.replace``), the weights first, so a JSON
file means a complete entry. An entry that is missing, unreadable, of another key, fails its
SHA-256 or does not fit θʳ is ignored: the client trains and overwrites it. Two clients writing
the same key write the same bytes, so concurrent runs are safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

import fl_sim
from clients.knobs import TrainingKnobs, knobs_to_config
from clients.local_training import LocalResult, fine_tune
from fl_sim.outputs import read_json, write_atomically, write_json
from fl_sim.suites.base import TaskSuite
from fl_sim.suites.lora_settings import ADAPTER_KEYS, adapter_enabled

CACHE_VERSION = 1  # bump when local training changes what it returns for the same inputs
_log = logging.getLogger(__name__)


SUITE_INPUTS = "suite-inputs"  # <cache-dir>/suite-inputs: a suite's stored inputs (pretrained.py)


def suite_inputs_dir(cache_dir: str | os.PathLike | None) -> Path:
    """<cache-dir>/suite-inputs, resolved on this node as the update cache is."""
    return resolve_cache_dir(cache_dir) / SUITE_INPUTS


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """``cache-dir``; '' or None: the user cache dir vit-digits uses ($FL_SIM_CACHE, ...)."""
    if cache_dir is None or not str(cache_dir).strip():
        from fl_sim.suites.vit_digits import default_cache_dir

        return default_cache_dir()
    return Path(cache_dir).expanduser()


# ---------------------------------------------------------------------------------------------
# The key
# ---------------------------------------------------------------------------------------------


def hash_tensors(tensors: Mapping[str, torch.Tensor], hasher: hashlib._Hash | None = None) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in sorted name order."""
    hasher = hasher or hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        hasher.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.dtype == torch.bfloat16:  # NumPy has no bfloat16: hash the raw 16-bit words
            tensor = tensor.view(torch.int16)
        hasher.update(np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8).data)
    return hasher.hexdigest()


_IDENTITIES: weakref.WeakKeyDictionary[TaskSuite, dict[str, object]] = weakref.WeakKeyDictionary()


def suite_identity(suite: TaskSuite) -> dict[str, object]:
    """What the suite's model and data are, by description and by content (once per suite).

    The description names the model the way its own cache does (vit-digits: its cache key; toy:
    its parameters; pre-trained encoders: their spec); the content hashes cover everything else:
    the whole model of ``build_model`` (θ₀, frozen parts, heads) and every task's training split.
    """
    if suite in _IDENTITIES:
        return _IDENTITIES[suite]
    model = suite.build_model()
    identity = {
        "class": f"{type(suite).__module__}.{type(suite).__qualname__}",
        "model": _model_description(suite),
        "model_sha256": hash_tensors(model.state_dict()),
        "train_sha256": [
            hash_tensors({"x": task.train_x, "y": task.train_y}) for task in suite.tasks
        ],
    }
    _IDENTITIES[suite] = identity
    return identity


def _model_description(suite: TaskSuite) -> object:
    suite = getattr(suite, "base_suite", suite)  # shared-head: the suite it splits a task of
    if suite.name == "digits":
        from fl_sim.suites.vit_digits import pretrained

        key = pretrained(suite.spec, suite.seed, suite.cache_dir).key  # type: ignore[attr-defined]
        return {"vit-digits-key": key, "heads": suite.heads_kind}  # type: ignore[attr-defined]
    if suite.name == "toy":
        return {
            "dim": suite.dim,  # type: ignore[attr-defined]
            "hidden": suite.hidden,  # type: ignore[attr-defined]
            "logit_scale": suite.logit_scale,  # type: ignore[attr-defined]
            "num_classes": [task.num_classes for task in suite.tasks],
            "examples": [task.num_train for task in suite.tasks],
        }
    pretrained_model = getattr(suite, "pretrained", None)
    if pretrained_model is not None:
        return {
            "model": str(pretrained_model.spec),
            "federated_layers": getattr(suite, "federated_layers", None),
        }
    return None


def key_material(
    suite: TaskSuite,
    suite_config: Mapping[str, object],
    task_index: int,
    knobs: TrainingKnobs,
    server_round: int,
    full_batch: bool,
    global_state: Mapping[str, torch.Tensor],
) -> dict[str, object]:
    """Everything Δ_t depends on; its canonical JSON's SHA-256 is the cache key.

    The LoRA keys (``adapter``, ``lora-*``, ``adapter-federation``) are in it when
    ``adapter = "lora"``, so a LoRA run never reuses a full fine-tuning Δ_t (nor one of another
    rank, α, target set or federation mode); with ``adapter = "none"`` they are left out, so
    full fine-tuning keys are those of before LoRA existed.
    """
    identity = suite_identity(suite)
    lora = adapter_enabled(suite_config)
    return {
        "cache_version": CACHE_VERSION,
        "fl_sim": fl_sim.__version__,
        "torch": torch.__version__,
        "suite": suite.name,
        "suite_config": {
            key: suite_config[key]
            for key in sorted(suite_config)
            if lora or key not in ADAPTER_KEYS
        },
        "suite_seed": suite.seed,
        "model": {k: identity[k] for k in ("class", "model", "model_sha256")},
        "task": task_index,
        # mixing > 0: the client also trains on (seeded subsets of) every other task's data
        "task_train_sha256": identity["train_sha256"]
        if suite.mixing > 0
        else identity["train_sha256"][task_index],  # type: ignore[index]
        "knobs": knobs_to_config(knobs),
        "round": int(server_round),
        "full_batch": bool(full_batch),
        "global_sha256": hash_tensors(global_state),
    }


def update_key(material: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class UpdateCache:
    """``<root>/updates/<key>.safetensors`` + ``<key>.json``; see the module docstring."""

    def __init__(self, root: str | os.PathLike | None) -> None:
        self.folder = resolve_cache_dir(root) / "updates"

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.folder / f"{key}.safetensors", self.folder / f"{key}.json"

    def load(self, key: str, global_state: Mapping[str, torch.Tensor]) -> LocalResult | None:
        """The cached LocalResult for ``key``, or None (missing, corrupt or not fitting θʳ)."""
        weights, sidecar = self.paths(key)
        if not sidecar.is_file():
            return None
        try:
            meta = read_json(sidecar)  # strict JSON: "inf"/"nan" strings back to floats
            payload = weights.read_bytes()
            if meta.get("key") != key:
                raise ValueError("the entry holds another key")
            if meta.get("update_sha256") != hashlib.sha256(payload).hexdigest():
                raise ValueError("the weights fail their SHA-256")
            update = load_safetensors(payload)
            _check_fits(update, global_state)
            update = {name: update[name] for name in global_state}  # θʳ's order, as trained
            return LocalResult(update=update, **meta["result"])
        except (OSError, ValueError, KeyError, TypeError) as error:  # safetensors: ValueError
            _log.warning("update cache entry %s ignored (%s): training again", sidecar, error)
            return None

    def store(self, key: str, result: LocalResult, material: Mapping[str, object]) -> None:
        """Write the entry (weights, then the JSON that completes it), each atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        weights, sidecar = self.paths(key)
        payload = save_safetensors({n: t.contiguous() for n, t in result.update.items()})
        write_atomically(weights, payload)
        figures = {k: v for k, v in asdict(result).items() if k != "update"}
        meta = {
            "key": key,
            "update_sha256": hashlib.sha256(payload).hexdigest(),
            "result": figures,
            "material": dict(material),
        }
        write_json(sidecar, meta, indent=1, sort_keys=True)


def _check_fits(update: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]):
    if set(update) != set(global_state):
        raise ValueError("its tensors are not the model's")
    for name, tensor in update.items():
        own = global_state[name]
        if tuple(tensor.shape) != tuple(own.shape) or tensor.dtype != own.dtype:
            raise ValueError(f"tensor {name!r} does not fit the model")


def cached_fine_tune(
    cache: UpdateCache | None,
    suite: TaskSuite,
    suite_config: Mapping[str, object],
    task_index: int,
    global_state: Mapping[str, torch.Tensor],
    knobs: TrainingKnobs,
    *,
    full_batch: bool,
    round_index: int,
) -> tuple[LocalResult, bool]:
    """(``fine_tune``'s result, whether it came from the cache); no cache: always trains."""

    def train() -> LocalResult:
        return fine_tune(
            suite, task_index, global_state, knobs, full_batch=full_batch, round_index=round_index
        )

    if cache is None:
        return train(), False
    material = key_material(
        suite, suite_config, task_index, knobs, round_index, full_batch, global_state
    )
    key = update_key(material)
    found = cache.load(key, global_state)
    if found is not None:
        return found, True
    result = train()
    try:
        cache.store(key, result, material)
    except OSError as error:  # a read-only or full disk costs speed, not the run
        _log.warning("update cache: cannot write %s (%s)", cache.folder, error)
    return result, False


__all__ = [
    "CACHE_VERSION",
    "UpdateCache",
    "cached_fine_tune",
    "hash_tensors",
    "key_material",
    "resolve_cache_dir",
    "suite_identity",
    "update_key",
]
