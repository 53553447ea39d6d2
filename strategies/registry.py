"""The rule registry: every aggregation rule, one line each, and how to build one.

A rule is one module of ``strategies/`` that declares its ``RuleSpec`` next to its math
(strategies/rule_spec.py says what a spec holds). Adding a rule is that module plus one line
in ``RULES`` below; the run-config keys, ``fl-sim merge`` flags and YAML parameters, the Flower
strategy and the rule tables are derived from the specs.

The same ``make_rule`` serves a Flower round and ``fl-sim merge``, so a name means the same
arithmetic everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fl_sim.errors import ConfigError
from strategies import cclip, dare, fedavg, fedgma, fednova, median, ties
from strategies.fednova import A_NORMS
from strategies.median import MEDIAN_MODES
from strategies.rule import Rule, client_weights
from strategies.rule_spec import KnobInfo, RuleInputs, RuleKnobs, RuleSpec

RULES: dict[str, RuleSpec] = {
    spec.name: spec
    for spec in (
        fedavg.TASK_ARITHMETIC,
        fedavg.FEDAVG,
        fednova.SPEC,
        fedgma.SPEC,
        median.SPEC,
        cclip.SPEC,
        ties.SPEC,
        dare.SPEC,
    )
}
RULE_NAMES = tuple(RULES)
# what a compare experiment runs by default: the paper's rules
PAPER_RULES = ("task_arithmetic", "fedavg", "fednova", "fedgma", "median", "cclip")


def rule_spec(name: str) -> RuleSpec:
    """The spec registered as ``name``, or a one-line ConfigError listing the rules."""
    if name not in RULES:
        raise ConfigError(
            f"unknown aggregation rule {name!r}; choose one of {', '.join(RULE_NAMES)}"
        )
    return RULES[name]


def all_knob_infos() -> list[KnobInfo]:
    """Every rule's knobs, in registry order (the run-config keys they define are unique)."""
    return [info for spec in RULES.values() for info in spec.knob_infos()]


def default_knobs() -> dict[str, RuleKnobs]:
    """Rule name → its knobs at their defaults."""
    return {name: spec.default_knobs() for name, spec in RULES.items()}


@dataclass(frozen=True, init=False)
class RuleConfig:
    """One rule with its knobs, for one aggregation: name, p_t, ‖a_t‖₁ and the rule's knobs.

    ``RuleConfig("cclip", tau_c=5.0, iters=2)`` builds the knobs from field names;
    ``RuleConfig("cclip", knobs=CClipKnobs(...))`` takes them as they are. Knobs are validated
    here, by the rule's knob dataclass.
    """

    name: str
    weights: tuple[float, ...] | None  # p_t before normalisation; None = uniform
    a_norm: tuple[float, ...] | None  # ‖a_t‖₁ per client (fednova; w_t for every rule)
    knobs: RuleKnobs
    seed: int

    def __init__(
        self,
        name: str,
        weights: Sequence[float] | None = None,
        a_norm: Sequence[float] | None = None,
        knobs: RuleKnobs | None = None,
        seed: int | None = None,
        **values: object,
    ) -> None:
        spec = rule_spec(name)
        if knobs is None:
            knobs = spec.knobs.from_values(values)
        elif values:
            raise ConfigError(f"{name}: give knobs= or knob values, not both")
        elif not isinstance(knobs, spec.knobs):
            raise ConfigError(f"{name}: knobs must be {spec.knobs.__name__}, got {knobs!r}")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "weights", None if weights is None else tuple(weights))
        object.__setattr__(self, "a_norm", None if a_norm is None else tuple(a_norm))
        object.__setattr__(self, "knobs", knobs)
        # seeded rules (dare): the seed of this aggregation, by default the rule's seed knob
        object.__setattr__(self, "seed", int(getattr(knobs, "seed", 0) if seed is None else seed))

    @property
    def spec(self) -> RuleSpec:
        return RULES[self.name]


def make_rule(
    config: RuleConfig, num_clients: int, center: Mapping[str, torch.Tensor] | None = None
) -> Rule:
    """Build the rule ``config.name`` for T = ``num_clients`` clients (``center``: cclip's v₀)."""
    spec = config.spec
    p = client_weights(num_clients, config.weights)
    if spec.weighting == "uniform" and config.weights is not None:
        raise ConfigError(
            f"{spec.name} uses uniform weights p_t = 1/T; drop the weights "
            "(or use fedavg with weights and a server learning rate)"
        )
    if spec.weighting == "unweighted" and config.weights is not None:
        raise ConfigError(f"{spec.name} is unweighted ({spec.formula}); drop the weights")
    a_norm = None if config.a_norm is None else torch.tensor(config.a_norm, dtype=torch.float64)
    inputs = RuleInputs(
        weights=p, knobs=config.knobs, a_norm=a_norm, center=center, seed=config.seed
    )
    return spec.build(inputs)


def server_lr_for_lambda(name: str, lam: float, num_clients: int) -> float:
    """β from the paper's λ: λT for the rules whose paper form sums task vectors, else λ."""
    return lam * (num_clients if rule_spec(name).paper_scale == "sum" else 1)


def rule_table() -> str:
    """The rules as a Markdown table (README, ``--help``): name, A, knobs, λ ↦ β, paper.

    Knobs are given as run-config key (``fl-sim merge`` flag); every rule also takes the run's
    p_t (``weighting`` / ``--weights``, unless it is uniform or unweighted) and β or λ."""
    lines = [
        "| rule | A(Δ₁..Δ_T) | knobs: run-config key (merge flag) | paper λ ↦ β | paper |",
        "|---|---|---|---|---|",
    ]
    for spec in RULES.values():
        knobs = [f"`{i.key}` (`{i.flag}`)" for i in spec.knob_infos()]
        if spec.uses_lambda:
            knobs.insert(0, "`lambda` (`--lambda`)")
        if spec.needs_a_norm:
            knobs.append("`a-norm` (`--a-norm`, `--train-meta`)")
        if spec.weighting != "weighted":
            knobs.append("p_t = 1/T only" if spec.weighting == "uniform" else "ignores p_t")
        scale = "β = λT" if spec.paper_scale == "sum" else "β = λ"
        formula = spec.formula.replace("|", "\\|")  # a Markdown cell
        lines.append(
            f"| `{spec.name}` | {formula} | {', '.join(knobs) or '—'} | {scale} "
            f"| {spec.title}, {spec.paper} |"
        )
    return "\n".join(lines) + "\n"


__all__ = [
    "A_NORMS",
    "MEDIAN_MODES",
    "PAPER_RULES",
    "RULES",
    "RULE_NAMES",
    "RuleConfig",
    "all_knob_infos",
    "default_knobs",
    "make_rule",
    "rule_spec",
    "rule_table",
    "server_lr_for_lambda",
]
