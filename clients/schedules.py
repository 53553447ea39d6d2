"""Learning-rate schedules: a client's η⁽⁰⁾..η⁽ᴷ⁻¹⁾ for its K local steps.

With base rate η, K steps and W warm-up steps, step k = 0..K−1 uses

    constant:       η⁽ᵏ⁾ = η
    linear:         η⁽ᵏ⁾ = η · (1 − k/K)                      (reaches 0 at step K, never used)
    cosine:         η⁽ᵏ⁾ = η · ½ (1 + cos(π k/K))             (reaches 0 at step K)
    warmup-cosine:  η⁽ᵏ⁾ = η · (k+1)/W                         for k < W,
                    η⁽ᵏ⁾ = η · ½ (1 + cos(π (k−W)/(K−W)))     for k ≥ W

so every rate is > 0 and Σ_k η⁽ᵏ⁾ (FedNova's ‖a_t‖₁ with plain SGD) follows from the list.
"""

from __future__ import annotations

import math

from fl_sim.errors import ConfigError

SCHEDULES = ("constant", "linear", "cosine", "warmup-cosine")


def _is_whole(value: object) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value == int(value)
    )


def check_schedule(schedule: str, lr: float, steps: int, warmup_steps: int = 0) -> None:
    """Raise a one-line ConfigError for a schedule that ``learning_rates`` cannot build."""
    if schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {lr} (set lr)")
    if not _is_whole(steps) or steps < 1:
        raise ConfigError(f"local-steps must be an integer ≥ 1, got {steps} (set local-steps)")
    if not _is_whole(warmup_steps) or warmup_steps < 0:
        raise ConfigError(
            f"warmup-steps must be an integer ≥ 0, got {warmup_steps} (set warmup-steps)"
        )
    if warmup_steps > 0 and schedule != "warmup-cosine":
        raise ConfigError(
            f"warmup-steps={warmup_steps} only applies to schedule warmup-cosine, "
            f"not {schedule!r} (set warmup-steps = 0 or schedule = warmup-cosine)"
        )
    if warmup_steps > steps:
        raise ConfigError(
            f"warmup-steps={warmup_steps} exceeds local-steps={steps} "
            "(use fewer warm-up steps or more local steps)"
        )


def learning_rates(schedule: str, lr: float, steps: int, warmup_steps: int = 0) -> list[float]:
    """η⁽⁰⁾..η⁽ᴷ⁻¹⁾ of ``schedule`` with base rate ``lr`` over K = ``steps`` (module docstring)."""
    check_schedule(schedule, lr, steps, warmup_steps)
    K, W = int(steps), int(warmup_steps)
    if schedule == "constant":
        return [float(lr)] * K
    if schedule == "linear":
        return [lr * (1.0 - k / K) for k in range(K)]
    if schedule == "cosine":
        return [lr * 0.5 * (1.0 + math.cos(math.pi * k / K)) for k in range(K)]
    warmup = [lr * ((k + 1) / W) for k in range(W)]
    return warmup + [lr * 0.5 * (1.0 + math.cos(math.pi * k / (K - W))) for k in range(K - W)]
