"""Rule names → rules, and the one place their knobs are checked.

The same ``make_rule`` serves a Flower round and ``fl-sim merge``, so a name means the same
arithmetic everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fl_sim.errors import ConfigError
from strategies.cclip import CClip
from strategies.fedavg import FedAvg, TaskArithmetic
from strategies.fedgma import FedGMA
from strategies.fednova import A_NORMS, FedNova
from strategies.median import MEDIAN_MODES, Median
from strategies.rule import Rule, client_weights

RULE_NAMES = ("task_arithmetic", "fedavg", "fednova", "fedgma", "median", "cclip")


@dataclass(frozen=True)
class RuleConfig:
    """The knobs of every rule, with DESIGN.md's names; unused knobs are ignored by a rule."""

    name: str
    weights: Sequence[float] | None = None  # p_t before normalisation; None = uniform
    a_norm: Sequence[float] | None = None  # ‖a_t‖₁ per client (fednova)
    rho: float = 0.5  # fedgma
    median_mode: str = "mean"  # median
    tau_c: float | None = None  # cclip
    iters: int = 1  # cclip's L

    def __post_init__(self) -> None:
        if self.name not in RULE_NAMES:
            raise ConfigError(
                f"unknown aggregation rule {self.name!r}; choose one of {', '.join(RULE_NAMES)}"
            )
        if self.median_mode not in MEDIAN_MODES:
            raise ConfigError(
                f"median-mode must be one of {', '.join(MEDIAN_MODES)}, got {self.median_mode!r}"
            )


def make_rule(
    config: RuleConfig, num_clients: int, center: Mapping[str, torch.Tensor] | None = None
) -> Rule:
    """Build the rule ``config.name`` for T = ``num_clients`` clients (``center``: cclip's v₀)."""
    p = client_weights(num_clients, config.weights)
    if config.name == "task_arithmetic" and config.weights is not None:
        raise ConfigError(
            "task_arithmetic uses uniform weights p_t = 1/T; drop the weights "
            "(or use fedavg with weights and a server learning rate)"
        )
    if config.name == "median" and config.weights is not None:
        raise ConfigError("median is unweighted (coordinate-wise median of Δ_t); drop the weights")
    if config.name == "fedavg":
        return FedAvg(p)
    if config.name == "task_arithmetic":
        return TaskArithmetic(p)
    if config.name == "fednova":
        if config.a_norm is None:
            raise ConfigError(
                "fednova needs each client's local steps K_t or learning-rate sum Σ η "
                "(give --train-meta META.json or put fl_sim_meta.json in each model folder)"
            )
        return FedNova(p, config.a_norm)
    if config.name == "fedgma":
        return FedGMA(p, config.rho)
    if config.name == "median":
        return Median(p, config.median_mode)
    if config.tau_c is None:
        raise ConfigError(
            "cclip needs a clipping radius tau_c > 0 in the units of ‖Δ_t‖₂ (set --tau-c; "
            "merge_report.json lists every task vector's norm)"
        )
    return CClip(p, config.tau_c, config.iters, center)


__all__ = ["A_NORMS", "MEDIAN_MODES", "RULE_NAMES", "RuleConfig", "make_rule"]
