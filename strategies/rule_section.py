"""The rule section of a run: which rule, its knobs, β or λ, p_t, and the β/λ search.

    θʳ⁺¹ = θʳ + β · A(Δ₁..Δ_T),    task_arithmetic: β = λT

It is read from the same flat run-config keys as every other section (fl_sim/config): its own
(``strategy``, ``num-rounds``, ``server-lr``, ``lambda``, ``weighting``, ``server-lr-grid``,
``lambda-grid``, ``search-*``) and every registered rule's knobs (``rho``, ``tau-c``,
``ties-density``..., strategies/registry.py), so that a compare experiment can run every rule
with its own knobs. The Flower strategy receives this section and nothing else of the run config.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from fl_sim.errors import ConfigError
from strategies.registry import RULE_NAMES, RuleConfig, default_knobs, rule_spec
from strategies.rule_spec import RuleKnobs
from strategies.server_step import SearchSettings, ServerLrCandidate, parse_grid

WEIGHTINGS = ("uniform", "examples")
SEARCH_TEST = ("selected", "every")  # where a β search evaluates the test split


def _setting(default: object, key: str, help: str, kind: str) -> object:
    """A field read from the flat run-config ``key`` (see fl_sim/config/keys.py)."""
    return field(default=default, metadata={"key": key, "help": help, "kind": kind})


@dataclass(frozen=True)
class RuleSection:
    """The rule's part of the run config, validated on construction."""

    strategy: str = _setting(
        "fedavg", "strategy", f"aggregation rule A: {', '.join(RULE_NAMES)}", "str"
    )
    num_rounds: int = _setting(1, "num-rounds", "R, federated rounds (1 = one-shot merging)", "int")
    server_lr: float = _setting(
        1.0,
        "server-lr",
        "β, the server step: θʳ⁺¹ = θʳ + β·A (every rule but task_arithmetic)",
        "float",
    )
    lam: float = _setting(
        0.3,
        "lambda",
        "task_arithmetic's λ: θ₀ + λ Σ_t τ_t, run as fedavg with p_t = 1/T and β = λT",
        "float",
    )
    weighting: str = _setting(
        "uniform", "weighting", "client weights p_t: uniform (1/T) or examples (∝ n_t)", "str"
    )
    server_lr_grid: str = _setting(
        "",
        "server-lr-grid",
        "β search (num-rounds = 1, every rule but task_arithmetic): a comma list of β; the "
        "server computes A once, evaluates θ₀ + β·A for each β on the val split and keeps "
        "the best mean normalised val accuracy (test is never used to select); '' = off",
        "grid",
    )
    lambda_grid: str = _setting(
        "",
        "lambda-grid",
        "λ search for task_arithmetic (num-rounds = 1): a comma list of λ, each run as "
        "β = λT and selected on the val split as server-lr-grid; '' = off",
        "grid",
    )
    search_extend: bool = _setting(
        True,
        "search-extend",
        "β/λ search: while the best β on val is the smallest (largest) tried, also try half "
        "(twice) it, up to search-max-extensions times per end; a β still at an end is "
        "flagged (selected_on_bound in results.json, * in the tables)",
        "bool",
    )
    search_max_extensions: int = _setting(
        6,
        "search-max-extensions",
        "β/λ search: the most halvings below and doublings above the grid (a bound of a "
        "factor 2^k beyond each end)",
        "int",
    )
    search_refine: int = _setting(
        2,
        "search-refine",
        "β/λ search: after extending, this many bisection steps in log β between the best "
        "β and its neighbours (on val; 0 = off)",
        "int",
    )
    search_test: str = _setting(
        "selected",
        "search-test",
        "β/λ search: evaluate the test split at the selected β only (selected; the search "
        "reads val alone, so test costs one model) or at every β tried (every: the "
        "beta_search rows' test columns, reported, never used to select)",
        "str",
    )
    paper_defaults: bool = _setting(
        False,
        "paper-defaults",
        "the paper's authors' choices where fl-sim's defaults differ: a-norm = steps, "
        "median-mode = lower (strategies/paper_defaults.py); each key given explicitly wins",
        "bool",
    )
    # every registered rule's knobs (rule name → its RuleKnobs), keys from the registry
    knobs: Mapping[str, RuleKnobs] = field(default_factory=default_knobs)

    def __post_init__(self) -> None:
        if self.strategy not in RULE_NAMES:
            raise ConfigError(
                f"unknown strategy {self.strategy!r}; choose one of {', '.join(RULE_NAMES)}"
            )
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(
                f"unknown weighting {self.weighting!r}; choose one of {', '.join(WEIGHTINGS)}"
            )
        if self.num_rounds < 1:
            raise ConfigError(
                f"num-rounds must be an integer ≥ 1, got {self.num_rounds} (set num-rounds)"
            )
        for key, value, fix in (("server-lr", self.server_lr, 1), ("lambda", self.lam, 0.3)):
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(
                    f"{key} must be a finite number > 0, got {value} (set {key}={fix})"
                )
        for key, count in (
            ("search-max-extensions", self.search_max_extensions),
            ("search-refine", self.search_refine),
        ):
            if count < 0:
                raise ConfigError(f"{key} must be an integer ≥ 0, got {count} (set {key}=2)")
        if self.search_test not in SEARCH_TEST:
            raise ConfigError(
                f"unknown search-test {self.search_test!r}; choose one of {', '.join(SEARCH_TEST)}"
            )
        missing = sorted(set(RULE_NAMES) - set(self.knobs))
        if missing:
            raise ConfigError(f"rule section: no knobs for {', '.join(missing)}")
        self._check_search()
        self.check_usable(self.strategy)

    def _check_search(self) -> None:
        self.server_lr_candidates()
        self.lambda_candidates()
        if not self.searches_server_lr:
            return
        if self.num_rounds != 1:
            raise ConfigError(
                f"server-lr-grid / lambda-grid select β on round 1 of a one-shot run, but "
                f"num-rounds = {self.num_rounds} (set num-rounds=1 or drop the grid)"
            )
        uses_lambda = rule_spec(self.strategy).uses_lambda
        if uses_lambda and self.server_lr_grid.strip():
            raise ConfigError(
                f"{self.strategy} searches λ, not β: use lambda-grid (β = λT), not server-lr-grid"
            )
        if not uses_lambda and self.lambda_grid.strip():
            raise ConfigError(
                f"lambda-grid is task_arithmetic's λ; {self.strategy} searches β: "
                "use server-lr-grid"
            )

    def check_usable(self, name: str) -> None:
        """A one-line error when rule ``name`` cannot run with these knobs and this weighting."""
        spec = rule_spec(name)
        if self.weighting == "examples" and spec.weighting != "weighted":
            raise ConfigError(
                f"{name} is unweighted; drop weighting=examples "
                "(or use strategy=fedavg with weighting=examples)"
            )
        self.knobs[name].check_runnable()

    # -- what the strategy asks -----------------------------------------------------------------

    @property
    def rule_knobs(self) -> RuleKnobs:
        """The knobs of ``strategy``."""
        return self.knobs[self.strategy]

    def rule_config(
        self, weights: list[float] | None, a_norm: list[float] | None, server_round: int
    ) -> RuleConfig:
        """The RuleConfig of one round: p_t (None = uniform), ‖a_t‖₁, the rule's knobs and, for
        seeded rules, the seed of this round (the rule's seed knob + the round index − 1)."""
        knobs = self.rule_knobs
        seed = int(getattr(knobs, "seed", 0)) + server_round - 1
        return RuleConfig(self.strategy, weights, a_norm, knobs=knobs, seed=seed)

    def server_lr_for(self, num_clients: int) -> float:
        """β for a round with ``num_clients`` replies (task_arithmetic: λT)."""
        if rule_spec(self.strategy).uses_lambda:
            return self.lam * num_clients
        return self.server_lr

    def server_lr_candidates(self) -> list[float]:
        """The β grid (``server-lr-grid``); [] when the search is off."""
        return parse_grid("server-lr-grid", self.server_lr_grid)

    def lambda_candidates(self) -> list[float]:
        """The λ grid (``lambda-grid``, task_arithmetic); [] when the search is off."""
        return parse_grid("lambda-grid", self.lambda_grid)

    def search_candidates(self, num_clients: int) -> list[ServerLrCandidate]:
        """The β grid of round 1, [] = no search (task_arithmetic: β = λT per λ)."""
        if rule_spec(self.strategy).uses_lambda:
            return [ServerLrCandidate(lam * num_clients, lam) for lam in self.lambda_candidates()]
        return [ServerLrCandidate(beta) for beta in self.server_lr_candidates()]

    def search_settings(self) -> SearchSettings:
        """How the search goes beyond its grid (strategies/server_step.py)."""
        return SearchSettings(self.search_extend, self.search_max_extensions, self.search_refine)

    @property
    def searches_server_lr(self) -> bool:
        """True when round 1 picks β (or λ) on the val split."""
        return bool(self.server_lr_grid.strip() or self.lambda_grid.strip())


__all__ = ["WEIGHTINGS", "RuleSection"]
