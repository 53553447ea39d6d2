"""Training-heterogeneity knobs: how each client t fine-tunes (docs/design.md, "Heterogeneity").

Every knob of ``client_knobs`` takes, for T clients,

- a scalar: the same value for every client (``lr=1e-3``);
- one value per client, as a list or a comma string (``lr="1e-3,2e-3,4e-3"``);
- a range spread over the clients in order (numeric knobs only):
  ``"log:A:B"`` log-spaced, A·(B/A)^{t/(T−1)}, and ``"lin:A:B"`` linear, A + (B−A)·t/(T−1);
  integer knobs (``local_steps``, ``batch_size``, ``warmup_steps``) are rounded half up.
  With T = 1 a range gives A.

A named preset spreads the scalar base values ``lr`` = η and ``local_steps`` = K instead:

    homogeneous:   η_t = η,                                 K_t = K
    lr-hetero:     η_t = η · 4^{2t/(T−1) − 1}  (η/4 .. 4η, log-spaced),   K_t = K
    steps-hetero:  η_t = η,   K_t = round(⌈K/4⌉ + (2K − ⌈K/4⌉) · t/(T−1))  (⌈K/4⌉ .. 2K)
    both:          η_t and K_t as above, both increasing with t

(T = 1: η_t = η, K_t = K). Client t's seed is ``seed + t``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from clients.a_norm import OPTIMIZERS, check_optimizer
from clients.schedules import SCHEDULES, check_schedule
from fl_sim.errors import ConfigError

PRESETS = ("homogeneous", "lr-hetero", "steps-hetero", "both")
LR_SPREAD = 4.0  # lr-hetero: η/4 .. 4η

# knob attribute → its flat kebab-case config key (what a Flower ConfigRecord carries)
CONFIG_KEYS = {
    "lr": "lr",
    "local_steps": "local-steps",
    "schedule": "schedule",
    "warmup_steps": "warmup-steps",
    "optimizer": "optimizer",
    "momentum": "momentum",
    "weight_decay": "weight-decay",
    "batch_size": "batch-size",
    "seed": "seed",
}


def _is_int(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(value)
        and value == int(value)
    )


@dataclass(frozen=True)
class TrainingKnobs:
    """How one client fine-tunes; validated on construction, then trusted."""

    lr: float
    local_steps: int
    schedule: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "sgd"  # sgd | sgd-momentum | adamw
    momentum: float = 0.9  # used by sgd-momentum only
    weight_decay: float = 0.0
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("lr", "local_steps", "warmup_steps", "momentum", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                key = CONFIG_KEYS[name]
                raise ConfigError(f"{key} must be a number, got {value!r} (set {key})")
        for name in ("schedule", "optimizer"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a name, got {getattr(self, name)!r}")
        check_schedule(self.schedule, self.lr, self.local_steps, self.warmup_steps)
        check_optimizer(self.optimizer, self.momentum)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(
                f"weight-decay must be a finite number ≥ 0, got {self.weight_decay} "
                "(set weight-decay)"
            )
        if not _is_int(self.batch_size) or self.batch_size < 1:
            raise ConfigError(
                f"batch-size must be an integer ≥ 1, got {self.batch_size!r} (set batch-size)"
            )
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be an integer ≥ 0, got {self.seed!r} (set seed)")
        # normalise numeric types so equal knobs compare and serialise equal
        for name in ("lr", "momentum", "weight_decay"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("local_steps", "warmup_steps", "batch_size", "seed"):
            object.__setattr__(self, name, int(getattr(self, name)))


def knobs_to_config(knobs: TrainingKnobs) -> dict[str, int | float | str]:
    """The knobs as flat kebab-case keys ("lr", "local-steps", ...) for a Flower ConfigRecord."""
    return {CONFIG_KEYS[name]: value for name, value in asdict(knobs).items()}


def knobs_from_config(config: Mapping[str, object]) -> TrainingKnobs:
    """Inverse of ``knobs_to_config``; other keys are ignored, missing optional ones default."""
    for required in ("lr", "local-steps"):
        if required not in config:
            raise ConfigError(f"client config lacks {required!r} (the server must send it)")
    kwargs = {name: config[key] for name, key in CONFIG_KEYS.items() if key in config}
    return TrainingKnobs(**kwargs)


# ---------------------------------------------------------------------------------------------
# One value per client from a scalar, a list, a comma string or a range
# ---------------------------------------------------------------------------------------------


def _parse_scalar(knob: str, text: str, kind: type) -> object:
    if kind is str:
        return text.strip()
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(
            f"{knob}: cannot read {text!r} as a number (give a number, a comma list, "
            "or a range log:START:STOP / lin:START:STOP)"
        ) from None
    if not math.isfinite(value):
        raise ConfigError(f"{knob}: {text!r} is not a finite number (give finite numbers)")
    if kind is int:
        if value != int(value):
            raise ConfigError(f"{knob}: {text!r} is not an integer (give whole numbers)")
        return int(value)
    return value


def _range(knob: str, text: str, num_clients: int, kind: type) -> list:
    parts = text.split(":")
    if len(parts) != 3:
        raise ConfigError(
            f"{knob}: malformed range {text!r}; write log:START:STOP or lin:START:STOP"
        )
    spacing = parts[0].strip()
    start, stop = (float(_parse_scalar(knob, p, float)) for p in parts[1:])
    if spacing == "log" and not (start > 0 and stop > 0):
        raise ConfigError(f"{knob}: a log range needs START and STOP > 0, got {text!r}")
    fractions = [t / (num_clients - 1) if num_clients > 1 else 0.0 for t in range(num_clients)]
    if spacing == "log":
        values = [start * (stop / start) ** f for f in fractions]
    else:
        values = [start + (stop - start) * f for f in fractions]
    return [math.floor(v + 0.5) for v in values] if kind is int else values


def per_client(knob: str, value: object, num_clients: int, kind: type = float) -> list:
    """``value`` spread to one entry per client (module docstring); ``knob`` names errors."""
    if isinstance(value, str):
        text = value.strip()
        if kind is not str and text.split(":")[0].strip() in ("log", "lin") and ":" in text:
            return _range(knob, text, num_clients, kind)
        if "," in text:
            value = [_parse_scalar(knob, part, kind) for part in text.split(",")]
        else:
            return [_parse_scalar(knob, text, kind)] * num_clients
    if isinstance(value, (list, tuple)):
        if len(value) != num_clients:
            raise ConfigError(
                f"{knob}: got {len(value)} values for {num_clients} clients (give one per client)"
            )
        return list(value)
    return [value] * num_clients


def _single(knob: str, value: object, preset: str) -> object:
    if isinstance(value, (list, tuple)) or (
        isinstance(value, str) and ("," in value or ":" in value)
    ):
        raise ConfigError(
            f"preset {preset!r} spreads one base {knob}; give a single {knob}, got {value!r} "
            "(or drop the preset)"
        )
    return value


def lr_spread(lr: float, num_clients: int) -> list[float]:
    """lr-hetero's η_t = η · 4^{2t/(T−1) − 1}: log-spaced from η/4 to 4η."""
    if num_clients == 1:
        return [float(lr)]
    return [lr * LR_SPREAD ** (2 * t / (num_clients - 1) - 1) for t in range(num_clients)]


def steps_spread(local_steps: int, num_clients: int) -> list[int]:
    """steps-hetero's K_t: linear from ⌈K/4⌉ to 2K, rounded half up."""
    if num_clients == 1:
        return [int(local_steps)]
    low, high = math.ceil(local_steps / 4), 2 * local_steps
    return [
        math.floor(low + (high - low) * t / (num_clients - 1) + 0.5) for t in range(num_clients)
    ]


def client_knobs(
    num_clients: int,
    *,
    lr: float | str | Sequence[float],
    local_steps: int | str | Sequence[int],
    schedule: str | Sequence[str] = "constant",
    warmup_steps: int | str | Sequence[int] = 0,
    optimizer: str | Sequence[str] = "sgd",
    momentum: float | str | Sequence[float] = 0.9,
    weight_decay: float | str | Sequence[float] = 0.0,
    batch_size: int | str | Sequence[int] = 32,
    seed: int = 0,
    preset: str | None = None,
) -> list[TrainingKnobs]:
    """One TrainingKnobs per client t = 0..T−1 (module docstring for values and presets)."""
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise ConfigError(f"need at least one client, got {num_clients!r}")
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    T = num_clients
    if preset is None:
        lrs = per_client("lr", lr, T, float)
        steps = per_client("local-steps", local_steps, T, int)
    else:
        base_lr = per_client("lr", _single("lr", lr, preset), 1, float)[0]
        base_steps = per_client("local-steps", _single("local-steps", local_steps, preset), 1, int)[
            0
        ]
        # validate the bases before spreading them
        TrainingKnobs(lr=base_lr, local_steps=base_steps)
        lrs = lr_spread(base_lr, T) if preset in ("lr-hetero", "both") else [base_lr] * T
        steps = (
            steps_spread(base_steps, T) if preset in ("steps-hetero", "both") else [base_steps] * T
        )
    columns = {
        "lr": lrs,
        "local_steps": steps,
        "schedule": per_client("schedule", schedule, T, str),
        "warmup_steps": per_client("warmup-steps", warmup_steps, T, int),
        "optimizer": per_client("optimizer", optimizer, T, str),
        "momentum": per_client("momentum", momentum, T, float),
        "weight_decay": per_client("weight-decay", weight_decay, T, float),
        "batch_size": per_client("batch-size", batch_size, T, int),
    }
    if not _is_int(seed) or seed < 0:
        raise ConfigError(f"seed must be an integer ≥ 0, got {seed!r} (set seed)")
    knobs = []
    for t in range(T):
        try:
            knobs.append(TrainingKnobs(**{k: v[t] for k, v in columns.items()}, seed=seed + t))
        except ConfigError as error:
            raise ConfigError(f"client {t}: {error}") from None
    return knobs


__all__ = [
    "CONFIG_KEYS",
    "OPTIMIZERS",
    "PRESETS",
    "SCHEDULES",
    "TrainingKnobs",
    "client_knobs",
    "knobs_from_config",
    "knobs_to_config",
    "per_client",
]
