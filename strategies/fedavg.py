"""FedAvg (McMahan et al., 2017) and Task Arithmetic (Ilharco et al., 2023) as one rule.

    A(Δ₁..Δ_T) = Σ_t p_t Δ_t,            θʳ⁺¹ = θʳ + β · A

Task Arithmetic, θ = θ₀ + λ Σ_t τ_t, is one round of it from θ₀ with p_t = 1/T and β = λT,
since then Δ_t = θ_t − θ₀ = τ_t (Tao et al., "Task Arithmetic Through The Lens Of One-Shot
Federated Learning", arXiv 2411.18607).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fl_sim.errors import ConfigError
from strategies.rule import Chunk, Rule, as_stacked
from strategies.rule_spec import RuleKnobs, RuleSpec


def fedavg(deltas: torch.Tensor | list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """A = Σ_t p_t Δ_t over the clients' same-named tensors (``deltas[t]`` is Δ_t)."""
    delta = as_stacked(deltas)
    p = weights.to(device=delta.device, dtype=delta.dtype)
    return torch.tensordot(p, delta, dims=1)


def task_arithmetic_server_lr(lam: float, num_clients: int) -> float:
    """β = λT: the server step at which one-shot FedAvg with p_t = 1/T is Task Arithmetic."""
    return lam * num_clients


class FedAvg(Rule):
    """FedAvg's A = Σ_t p_t Δ_t; linear, so the merge engine may fuse it with θ₀ + β·A."""

    name = "fedavg"

    def aggregate(self, chunk: Chunk, deltas: torch.Tensor) -> torch.Tensor:
        return fedavg(deltas, self.weights)

    def linear_coefficients(self) -> torch.Tensor:
        return self.weights


class TaskArithmetic(FedAvg):
    """FedAvg with p_t = 1/T; the caller sets β = λT (``task_arithmetic_server_lr``)."""

    name = "task_arithmetic"

    def __init__(self, weights: torch.Tensor) -> None:
        uniform = torch.full_like(weights, 1.0 / weights.numel())
        if not torch.allclose(weights, uniform, rtol=0, atol=1e-12):
            raise ConfigError(
                "task_arithmetic uses uniform weights p_t = 1/T; drop --weights "
                "(or use --method fedavg with --weights and --server-lr)"
            )
        super().__init__(uniform)


@dataclass(frozen=True)
class FedAvgKnobs(RuleKnobs):
    """FedAvg has no knobs of its own (β and p_t are the run's)."""


@dataclass(frozen=True)
class TaskArithmeticKnobs(RuleKnobs):
    """Task Arithmetic has no knobs of its own (λ is the run's ``lambda``)."""


FEDAVG = RuleSpec(
    name="fedavg",
    title="FedAvg",
    paper="McMahan et al., AISTATS 2017",
    formula="Σ_t p_t Δ_t",
    knobs=FedAvgKnobs,
    build=lambda inputs: FedAvg(inputs.weights),
    linear=True,
    paper_scale="sum",
)
TASK_ARITHMETIC = RuleSpec(
    name="task_arithmetic",
    title="Task Arithmetic",
    paper="Ilharco et al., ICLR 2023",
    formula="Σ_t Δ_t / T with β = λT, i.e. θ₀ + λ Σ_t τ_t",
    knobs=TaskArithmeticKnobs,
    build=lambda inputs: TaskArithmetic(inputs.weights),
    linear=True,
    paper_scale="sum",
    weighting="uniform",
    mergekit="task_arithmetic",
    uses_lambda=True,
)
