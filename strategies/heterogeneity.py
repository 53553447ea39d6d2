"""Training-heterogeneity diagnostics (docs/design.md), written into every result.

    w_t = p_t ‖a_t‖₁ / Σ_i p_i ‖a_i‖₁          (the weights FedAvg effectively optimises with)
    χ²(p‖w) = Σ_t (p_t − w_t)² / w_t           (0 when training is homogeneous)

With heterogeneous local steps or learning rates, FedAvg — and so Task Arithmetic — minimises
Σ_t w_t L_t instead of Σ_t p_t L_t (Wang et al. 2020); FedNova undoes the re-weighting.
"""

from __future__ import annotations

from collections.abc import Sequence


def effective_weights(weights: Sequence[float], a_norm: Sequence[float]) -> list[float]:
    """w_t = p_t ‖a_t‖₁ / Σ_i p_i ‖a_i‖₁ (exactly p_t when every ‖a_t‖₁ is the same)."""
    if len(set(a_norm)) == 1:
        return list(weights)
    scaled = [p * a for p, a in zip(weights, a_norm, strict=True)]
    total = sum(scaled)
    return [s / total for s in scaled]


def chi_square(weights: Sequence[float], effective: Sequence[float]) -> float:
    """χ²(p‖w) = Σ_t (p_t − w_t)² / w_t; clients with w_t = 0 and p_t = 0 contribute 0."""
    total = 0.0
    for p, w in zip(weights, effective, strict=True):
        if w > 0:
            total += (p - w) ** 2 / w
        elif p > 0:
            return float("inf")
    return total
