"""FedGMA (Tenison et al., "Gradient Masked Averaging for Federated Learning", TMLR 2023):
average only where the clients' update signs agree.

    S_j = |Σ_t p_t sign(Δ_t,j)|,   M_j = 1 if S_j ≥ ρ else S_j,   A = M ⊙ Σ_t p_t Δ_t

ρ ∈ [0, 1]; ρ = 0 gives M = 1, i.e. FedAvg. The summary holds the histogram of S over every
merged coordinate (10 bins on [0, 1]) and the fraction of coordinates that were damped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fl_sim.errors import ConfigError
from strategies.fedavg import fedavg
from strategies.rule import Chunk, Rule, as_stacked
from strategies.rule_spec import RuleKnobs, RuleSpec, knob

AGREEMENT_BINS = 10
# Σ_t p_t sign(Δ_t,j) is a float sum; S_j that equals ρ up to its rounding counts as agreeing.
AGREEMENT_ROUNDING = 1e-6


def check_rho(rho: float) -> float:
    if not 0.0 <= rho <= 1.0:
        raise ConfigError(f"fedgma: rho must be in [0, 1], got {rho} (set --rho, e.g. 0.5)")
    return float(rho)


def sign_agreement(deltas: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """S_j = |Σ_t p_t sign(Δ_t,j)| ∈ [0, 1]."""
    delta = as_stacked(deltas)
    return fedavg(torch.sign(delta), weights).abs_()


def gradient_mask(agreement: torch.Tensor, rho: float) -> torch.Tensor:
    """M_j = 1 where S_j ≥ ρ, else S_j.

    As min(max(S_j, [S_j ≥ ρ]), 1): 0 ≤ S_j ≤ 1 up to the rounding of Σ_t p_t, so the max gives
    1 where kept and S_j elsewhere, and the min keeps M_j = 1 where that rounding put S_j a hair
    above 1. The same values as ``torch.where``, ≈ 20× faster on the CPU (no bool gather).
    """
    keep = torch.ge(agreement, rho - AGREEMENT_ROUNDING, out=torch.empty_like(agreement))
    return torch.maximum(agreement, keep).clamp_(max=1.0)


def fedgma(
    deltas: torch.Tensor | list[torch.Tensor], weights: torch.Tensor, rho: float
) -> torch.Tensor:
    """A = M ⊙ Σ_t p_t Δ_t with the sign-agreement mask M of threshold ρ."""
    delta = as_stacked(deltas)
    return fedavg(delta, weights) * gradient_mask(sign_agreement(delta, weights), rho)


class FedGMA(Rule):
    name = "fedgma"

    def __init__(self, weights: torch.Tensor, rho: float) -> None:
        super().__init__(weights)
        self.rho = check_rho(rho)
        self.histogram = torch.zeros(AGREEMENT_BINS, dtype=torch.float64)
        self.damped = 0
        self.coordinates = 0

    def aggregate(self, chunk: Chunk, deltas: torch.Tensor) -> torch.Tensor:
        agreement = sign_agreement(deltas, self.weights)
        mask = gradient_mask(agreement, self.rho)
        self.histogram += torch.histc(agreement.float(), AGREEMENT_BINS, 0.0, 1.0).cpu().double()
        self.damped += int((mask < 1).sum())
        self.coordinates += agreement.numel()
        return fedavg(deltas, self.weights).mul_(mask)

    def summary(self) -> dict[str, object]:
        edges = torch.linspace(0, 1, AGREEMENT_BINS + 1).tolist()
        return {
            "rho": self.rho,
            "sign_agreement_histogram": {
                "bin_edges": [round(e, 6) for e in edges],
                "counts": [int(c) for c in self.histogram.tolist()],
            },
            "damped_fraction": self.damped / max(self.coordinates, 1),
        }


@dataclass(frozen=True)
class FedGMAKnobs(RuleKnobs):
    rho: float = knob(0.5, "fedgma: sign-agreement threshold ρ ∈ [0, 1]", key="rho")

    def check(self) -> None:
        if not 0.0 <= self.rho <= 1.0:  # also rejects NaN
            raise self.error("rho", f"must be in [0, 1], got {self.rho}", 0.5)


SPEC = RuleSpec(
    name="fedgma",
    title="FedGMA",
    paper="Tenison et al., TMLR 2023",
    formula="M ⊙ Σ_t p_t Δ_t,  M_j = 1 if |Σ_t p_t sign(Δ_t,j)| ≥ ρ else that agreement",
    knobs=FedGMAKnobs,
    build=lambda inputs: FedGMA(inputs.weights, inputs.knobs.rho),
    linear=False,
    paper_scale="sum",
)
