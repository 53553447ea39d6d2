"""FedNova (Wang et al., "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
Optimization", NeurIPS 2020), the paper's remedy for training heterogeneity in merging.

    A(Δ₁..Δ_T) = τ_eff · Σ_t p_t Δ_t / ‖a_t‖₁,        τ_eff = Σ_t p_t ‖a_t‖₁

‖a_t‖₁ counts client t's effective local steps: K_t (``a-norm = "steps"``, as the paper's code)
or Σ_k η_t⁽ᵏ⁾ (``a-norm = "lr-sum"``, the default, which also normalises learning rates).
FedNova is linear in the updates with c_t = τ_eff p_t / ‖a_t‖₁, and equals FedAvg when every
client's ‖a_t‖₁ is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fl_sim.errors import ConfigError
from strategies.fedavg import fedavg
from strategies.rule import Chunk, Rule
from strategies.rule_spec import RuleInputs, RuleKnobs, RuleSpec

A_NORMS = ("lr-sum", "steps")


def check_a_norm(a_norm: object, num_clients: int) -> torch.Tensor:
    """‖a_t‖₁ as a float64 tensor, validated: one finite positive value per client."""
    a = torch.as_tensor(a_norm, dtype=torch.float64).flatten()
    if a.numel() != num_clients:
        raise ConfigError(
            f"fednova: got {a.numel()} a-norm values for {num_clients} clients "
            "(give each client's steps K_t or learning-rate sum, e.g. with --train-meta)"
        )
    if not torch.isfinite(a).all() or (a <= 0).any():
        raise ConfigError(f"fednova: every ‖a_t‖₁ must be finite and > 0, got {a.tolist()}")
    return a


def fednova_coefficients(weights: torch.Tensor, a_norm: torch.Tensor) -> torch.Tensor:
    """c_t = τ_eff · p_t / ‖a_t‖₁ with τ_eff = Σ_t p_t ‖a_t‖₁ (so A = Σ_t c_t Δ_t)."""
    tau_eff = (weights * a_norm).sum()
    return tau_eff * weights / a_norm


def fednova(
    deltas: torch.Tensor | list[torch.Tensor], weights: torch.Tensor, a_norm: torch.Tensor
) -> torch.Tensor:
    """A = τ_eff · Σ_t p_t Δ_t / ‖a_t‖₁."""
    return fedavg(deltas, fednova_coefficients(weights, a_norm))


class FedNova(Rule):
    """FedNova's normalised average; linear, so the merge engine may fuse it."""

    name = "fednova"

    def __init__(self, weights: torch.Tensor, a_norm: object) -> None:
        super().__init__(weights)
        self.a_norm = check_a_norm(a_norm, weights.numel())
        self.coefficients = fednova_coefficients(weights, self.a_norm)

    def aggregate(self, chunk: Chunk, deltas: torch.Tensor) -> torch.Tensor:
        return fedavg(deltas, self.coefficients)

    def linear_coefficients(self) -> torch.Tensor:
        return self.coefficients

    def summary(self) -> dict[str, object]:
        return {
            "a_norm": self.a_norm.tolist(),
            "tau_eff": float((self.weights * self.a_norm).sum()),
            "coefficients": self.coefficients.tolist(),
        }


@dataclass(frozen=True)
class FedNovaKnobs(RuleKnobs):
    """FedNova's only input besides Δ_t is each client's ‖a_t‖₁ (the run's ``a-norm`` kind)."""


def _build(inputs: RuleInputs) -> FedNova:
    if inputs.a_norm is None:
        raise ConfigError(
            "fednova needs each client's local steps K_t or learning-rate sum Σ η "
            "(give --train-meta META.json or put fl_sim_meta.json in each model folder)"
        )
    return FedNova(inputs.weights, inputs.a_norm)


SPEC = RuleSpec(
    name="fednova",
    title="FedNova",
    paper="Wang et al., NeurIPS 2020",
    formula="τ_eff · Σ_t p_t Δ_t / ‖a_t‖₁,  τ_eff = Σ_t p_t ‖a_t‖₁",
    knobs=FedNovaKnobs,
    build=_build,
    linear=True,
    paper_scale="mean",
    needs_a_norm=True,
)
