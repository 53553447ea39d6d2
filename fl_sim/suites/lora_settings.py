"""LoRA clients' settings: the run-config keys and their checks (light: no torch, no peft).

``adapter = "lora"`` makes every party build the suite's model with LoRA adapters (Hu et al.,
arXiv 2106.09685, through ``peft``) on the target modules of the federated part
(fl_sim/suites/lora.py): a target's weight W is frozen and the client trains

    W' = W + (α/r) · B · A,    A ∈ ℝ^{r×n} (A₀ from a fixed seed),  B ∈ ℝ^{m×r} (B₀ = 0)

``adapter-federation`` says what is federated: ``dense``, the weights W of the target modules
(the client sends ΔW = (α/r)·B·A under W's name), or ``adapter``, A and B themselves (FedIT:
A and B are aggregated separately; the global model is W₀ + (α/r)·B·A).

The keys travel with the suite keys (fl_sim/suites/registry.py) because they change the model
every party builds and what is federated: the ClientApp, the server's evaluation and the update
cache all key on them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from fl_sim.errors import ConfigError

ADAPTERS = ("none", "lora")
FEDERATIONS = ("dense", "adapter")
NO_ADAPTER_SUITES = ("toy", "quadratic")  # no transformer model to put adapters on
ADAPTER_DEFAULTS: dict[str, bool | int | float | str] = {
    "adapter": "none",
    "lora-rank": 8,
    "lora-alpha": 16.0,
    "lora-dropout": 0.0,
    "lora-target-modules": "",
    "adapter-federation": "dense",
}
ADAPTER_KEYS = tuple(ADAPTER_DEFAULTS)
_SUFFIX = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


@dataclass(frozen=True)
class LoraSettings:
    """r, α, dropout, target-module suffixes (empty: the model family's default) and mode."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ()
    federation: str = "dense"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(
                f"lora-rank must be an integer ≥ 1, got {self.rank!r} (set lora-rank=8)"
            )
        if not (_is_number(self.alpha) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(
                f"lora-alpha must be a finite number > 0, got {self.alpha!r} (set lora-alpha=16)"
            )
        if not (_is_number(self.dropout) and 0 <= self.dropout < 1):
            raise ConfigError(
                f"lora-dropout must be a number in [0, 1), got {self.dropout!r} "
                "(set lora-dropout=0)"
            )
        for target in self.targets:
            if not _SUFFIX.match(target):
                raise ConfigError(
                    f"lora-target-modules: {target!r} is not a module-name suffix (write names "
                    'such as "query,value" or "q_proj,v_proj")'
                )
        if self.federation not in FEDERATIONS:
            raise ConfigError(
                f"unknown adapter-federation {self.federation!r}; choose one of "
                f"{', '.join(FEDERATIONS)}"
            )
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))

    @property
    def scaling(self) -> float:
        """α/r, the factor of B·A in W' = W + (α/r)·B·A."""
        return self.alpha / self.rank


def _is_number(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def adapter_enabled(config: Mapping[str, object]) -> bool:
    """Whether the suite keys ask for LoRA clients (``adapter = "lora"``)."""
    return config.get("adapter", "none") == "lora"


def parse_targets(text: str) -> tuple[str, ...]:
    """``lora-target-modules`` as suffixes: comma separated, blanks dropped, order kept."""
    return tuple(dict.fromkeys(part.strip() for part in str(text).split(",") if part.strip()))


def lora_settings(config: Mapping[str, object]) -> LoraSettings | None:
    """The LoRA settings of the suite keys, or None with ``adapter = "none"``; one-line errors.

    Checks what needs no model (the model-dependent checks, such as a target module that matches
    nothing, run when the suite is built: fl_sim/suites/lora.py).
    """
    adapter = config.get("adapter", "none")
    if adapter not in ADAPTERS:
        raise ConfigError(f"unknown adapter {adapter!r}; choose one of {', '.join(ADAPTERS)}")
    if adapter == "none":
        return None
    suite = str(config.get("task-suite", ""))
    if suite in NO_ADAPTER_SUITES:
        raise ConfigError(
            f"adapter=lora needs a suite with a transformer model (digits, text, local, ...); "
            f"task-suite={suite} has none (drop adapter or change task-suite)"
        )
    if bool(config.get("shared-head", False)):
        raise ConfigError(
            "adapter=lora trains adapters only and a shared head would stay frozen: drop "
            "shared-head or adapter"
        )
    values = {key: config.get(key, default) for key, default in ADAPTER_DEFAULTS.items()}
    targets = values["lora-target-modules"]
    if not isinstance(targets, str):
        raise ConfigError(
            f"lora-target-modules must be a comma list of names, got {targets!r} "
            '(set lora-target-modules="query,value")'
        )
    return LoraSettings(
        rank=values["lora-rank"],  # type: ignore[arg-type]
        alpha=values["lora-alpha"],  # type: ignore[arg-type]
        dropout=values["lora-dropout"],  # type: ignore[arg-type]
        targets=parse_targets(targets),
        federation=str(values["adapter-federation"]),
    )


__all__ = [
    "ADAPTERS",
    "ADAPTER_DEFAULTS",
    "ADAPTER_KEYS",
    "FEDERATIONS",
    "LoraSettings",
    "adapter_enabled",
    "lora_settings",
    "parse_targets",
]
