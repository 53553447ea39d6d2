"""‖a_t‖₁: client t's effective number of local steps (FedNova, Wang et al., NeurIPS 2020).

FedNova writes a client's update as a weighted sum of the stochastic gradients g_j it computed,

    Δ_t = −Σ_j a_j g_j,        ‖a_t‖₁ = Σ_j a_j.

Plain SGD (θ ← θ − η_k g_k):  a_j = η_j,  so ‖a_t‖₁ = Σ_k η_k.

SGD with momentum μ as PyTorch runs it (dampening 0, not Nesterov):
b_0 = g_0, b_k = μ b_{k−1} + g_k, θ ← θ − η_k b_k. Unrolled, b_k = Σ_{j≤k} μ^{k−j} g_j, so

    a_j = Σ_{k≥j} η_k μ^{k−j},      ‖a_t‖₁ = Σ_k η_k (1 − μ^{k+1}) / (1 − μ),

which with a constant η is η/(1−μ) · (K − μ(1−μ^K)/(1−μ)) (docs/design.md).

AdamW rescales each coordinate by its own second-moment estimate, so no a_t exists; we use
Σ_k η_k and flag it ``exact = False`` so results can say so. Weight decay is a term of the loss
here and does not change a_t.

``kind = "steps"`` ignores all of this and counts ‖a_t‖₁ = K_t, as the paper's code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fl_sim.errors import ConfigError
from strategies.fednova import A_NORMS as A_NORM_KINDS  # the kinds FedNova reads

OPTIMIZERS = ("sgd", "sgd-momentum", "adamw")


@dataclass(frozen=True)
class ANorm:
    """‖a_t‖₁ and whether it is exact for the optimizer (False for AdamW's lr-sum)."""

    value: float
    exact: bool


def check_optimizer(optimizer: str, momentum: float) -> None:
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if not (0.0 <= momentum < 1.0):
        raise ConfigError(f"momentum must be in [0, 1), got {momentum} (set momentum)")


def gradient_coefficients(
    learning_rates: Sequence[float], optimizer: str, momentum: float = 0.0
) -> list[float]:
    """a_0..a_{K−1} with Δ = −Σ_j a_j g_j (SGD and SGD-momentum; AdamW: η_j, not exact)."""
    check_optimizer(optimizer, momentum)
    eta = [float(x) for x in learning_rates]
    if optimizer != "sgd-momentum":
        return eta
    # a_j = η_j + μ a_{j+1}, from the last step back
    a = [0.0] * len(eta)
    following = 0.0
    for j in range(len(eta) - 1, -1, -1):
        following = eta[j] + momentum * following
        a[j] = following
    return a


def a_norm_of(
    kind: str, learning_rates: Sequence[float], optimizer: str, momentum: float = 0.0
) -> ANorm:
    """‖a_t‖₁ counted as ``kind`` ("steps": K_t; "lr-sum": the module docstring's formula)."""
    if kind not in A_NORM_KINDS:
        raise ConfigError(f"unknown a-norm {kind!r}; choose one of {', '.join(A_NORM_KINDS)}")
    check_optimizer(optimizer, momentum)
    if len(learning_rates) == 0:
        raise ConfigError("a-norm needs at least one local step (set local-steps ≥ 1)")
    if kind == "steps":
        return ANorm(float(len(learning_rates)), exact=True)
    if optimizer == "sgd-momentum":
        # Σ_k η_k (1 − μ^{k+1})/(1 − μ), with (1 − μ^{k+1})/(1 − μ) = Σ_{i≤k} μ^i kept as a
        # running sum so that μ = 0 needs no special case
        value, geometric = 0.0, 0.0
        for eta in learning_rates:
            geometric = 1.0 + momentum * geometric
            value += float(eta) * geometric
        return ANorm(value, exact=True)
    return ANorm(float(sum(float(eta) for eta in learning_rates)), exact=optimizer == "sgd")


def a_norm(
    kind: str, learning_rates: Sequence[float], optimizer: str, momentum: float = 0.0
) -> float:
    """‖a_t‖₁ as a number; see ``a_norm_of`` for whether it is exact."""
    return a_norm_of(kind, learning_rates, optimizer, momentum).value
