"""Round checkpoints: a multi-round run can be killed and resumed with identical results.

After every finished round r the ServerApp writes ``results-dir/checkpoint/round.safetensors``
(atomically: a temp file, then ``os.replace``). It holds θʳ, the strategy's tensors under
``STRATEGY_PREFIX`` (cclip's v₀) and, in its ``__metadata__``, one JSON document: the round r,
the strategy's state (round records, failures, cclip's τ_c), the RunRecorder's (evaluations,
fine-tuned figures, client files, β search, diagnostics) and the config. That one file is the
commit point, so a kill at any moment leaves either round r−1's checkpoint or round r's.
``round.json`` next to it is a readable copy of the same JSON (not read back). Both are strict
JSON (fl_sim/outputs.py: a non-finite float such as an infinite χ² or τ_c is "inf"); reading the
checkpoint turns those strings back into floats, and the config is compared in that encoding.

Client training depends only on (seed, round, θʳ), so rounds r+1..R from θʳ give the same
models as an uninterrupted run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_sim.checkpoints.safetensors_io import SafetensorsFile, save_tensors
from fl_sim.config.run_config import RunConfig
from fl_sim.errors import ConfigError
from fl_sim.outputs import dumps_json, from_strict_json, to_strict_json

CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "round.safetensors"
STRATEGY_PREFIX = "__fl_sim_strategy__/"
METADATA_KEY = "fl-sim-checkpoint"
FORMAT = 1
# keys that may differ between the interrupted run and its resumption (they change no result)
RESUME_FREE_KEYS = ("resume", "results-dir", "client-num-cpus", "client-num-gpus")


@dataclass
class RoundCheckpoint:
    round: int
    theta: dict[str, torch.Tensor]
    strategy_state: dict[str, object]
    strategy_tensors: dict[str, torch.Tensor]
    recorder_state: dict[str, object]


def checkpoint_path(results_dir: str | Path) -> Path:
    return Path(results_dir) / CHECKPOINT_DIR / CHECKPOINT_FILE


def write_checkpoint(
    results_dir: str | Path,
    server_round: int,
    theta: Mapping[str, torch.Tensor],
    strategy_state: tuple[dict[str, object], dict[str, torch.Tensor]],
    recorder_state: Mapping[str, object],
    config: RunConfig,
    *,
    json_default: Callable[[object], object] | None = None,
    write_text: Callable[[Path, str], None] | None = None,
) -> Path:
    """θʳ and the run's state after ``server_round``, atomically (module docstring)."""
    state, tensors = strategy_state
    document = {
        "format": FORMAT,
        "round": server_round,
        "strategy": state,
        "recorder": dict(recorder_state),
        "config": config.to_mapping(),
    }
    text = dumps_json(document, indent=None, default=json_default)
    path = checkpoint_path(results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    clash = [name for name in theta if name.startswith(STRATEGY_PREFIX)]
    if clash:
        raise ConfigError(f"checkpoint: model tensor {clash[0]!r} uses a reserved name prefix")
    payload = {name: tensor.detach().cpu() for name, tensor in theta.items()}
    payload.update({STRATEGY_PREFIX + name: t.detach().cpu() for name, t in tensors.items()})
    save_tensors(path, payload, metadata={METADATA_KEY: text})
    if write_text is not None:
        write_text(path.parent / "round.json", dumps_json(document, default=json_default) + "\n")
    return path


def read_checkpoint(results_dir: str | Path, config: RunConfig) -> RoundCheckpoint | None:
    """The last finished round's checkpoint for ``config`` (None when there is none)."""
    path = checkpoint_path(results_dir)
    if not path.exists():
        return None
    with SafetensorsFile(path) as file:
        text = file.metadata.get(METADATA_KEY)
        if text is None:
            raise ConfigError(f"resume: {path} is not an fl-sim round checkpoint (no metadata)")
        try:
            document = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"resume: {path} has unreadable metadata ({error})") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise ConfigError(f"resume: {path} has an unknown checkpoint format")
        theta: dict[str, torch.Tensor] = {}
        tensors: dict[str, torch.Tensor] = {}
        for name in file:
            tensor = file.get(name).clone()
            if name.startswith(STRATEGY_PREFIX):
                tensors[name.removeprefix(STRATEGY_PREFIX)] = tensor
            else:
                theta[name] = tensor
    # both as written (strict JSON: an infinite tau-c is "inf" on both sides)
    saved = {
        k: to_strict_json(v) for k, v in document["config"].items() if k not in RESUME_FREE_KEYS
    }
    wanted = {
        k: to_strict_json(v) for k, v in config.to_mapping().items() if k not in RESUME_FREE_KEYS
    }
    changed = sorted(
        k for k in wanted.keys() | saved.keys() if not _same(wanted.get(k), saved.get(k))
    )
    if changed:
        key = changed[0]
        raise ConfigError(
            f"resume: the checkpoint in {path.parent} was written with {key} = "
            f"{saved.get(key)!r}, this run has {wanted.get(key)!r} (resume with the same "
            "config, or start afresh in another results-dir)"
        )
    return RoundCheckpoint(
        round=int(document["round"]),
        theta=theta,
        strategy_state=from_strict_json(document["strategy"]),  # type: ignore[arg-type]
        strategy_tensors=tensors,
        recorder_state=from_strict_json(document["recorder"]),  # type: ignore[arg-type]
    )


def _same(a: object, b: object) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


__all__ = [
    "CHECKPOINT_DIR",
    "RoundCheckpoint",
    "checkpoint_path",
    "read_checkpoint",
    "write_checkpoint",
]
