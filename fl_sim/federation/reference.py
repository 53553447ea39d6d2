"""The plain-PyTorch reference loop: one-shot and multi-round FL with no Flower and no Ray.

    θ¹ = θ₀
    for r = 1..R:
        Δ_t = fine_tune(client t from θʳ)            for every client t = 1..T
        θʳ⁺¹ = θʳ + β · A(Δ₁..Δ_T)                    (strategies/, the same rule code as Flower)

With R = 1, p_t = 1/T and β = λT this is Task Arithmetic, θ₀ + λ Σ_t τ_t (arXiv 2411.18607).
It is the independent side of the Flower equivalence tests and the speed baseline. Rounds are
numbered from 1, as Flower's ``server_round``, and client t's minibatches in round r are seeded
from (knobs[t].seed, r) in both, so the two give the same Δ_t.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from clients.a_norm import A_NORM_KINDS
from clients.knobs import TrainingKnobs
from clients.local_training import LocalResult, fine_tune
from fl_sim.errors import ConfigError
from fl_sim.suites.base import TaskSuite, evaluate, load_federated_state
from strategies.cclip import next_center
from strategies.registry import RuleConfig, make_rule
from strategies.streaming import AggregationOptions, TensorPlan, aggregate_model

WEIGHTINGS = ("uniform", "examples")


@dataclass
class RoundRecord:
    """The global model after round ``round`` (0: θ₀) on every evaluation task (the clients'
    tasks; shared-head: the one task), and the clients' reports."""

    round: int
    test_loss: list[float]
    test_accuracy: list[float]
    val_loss: list[float]
    val_accuracy: list[float]
    clients: list[dict[str, int | float | bool]] = field(default_factory=list)
    rule_summary: dict[str, object] = field(default_factory=dict)


@dataclass
class ReferenceRun:
    state: dict[str, torch.Tensor]  # the final global federated state θᴿ⁺¹
    history: list[RoundRecord]  # history[0] is θ₀, history[r] the model after round r


def evaluate_state(
    suite: TaskSuite, state: dict[str, torch.Tensor], round_index: int
) -> RoundRecord:
    model = suite.build_model()
    load_federated_state(model, state)
    test = [evaluate(model, task, "test") for task in suite.eval_tasks]
    val = [evaluate(model, task, "val") for task in suite.eval_tasks]
    return RoundRecord(
        round_index,
        [x[0] for x in test],
        [x[1] for x in test],
        [x[0] for x in val],
        [x[1] for x in val],
    )


def round_rule_config(
    rule: RuleConfig,
    results: Sequence[LocalResult],
    a_norm_kind: str,
    weighting: str,
    round_index: int = 1,
) -> RuleConfig:
    """The round's RuleConfig: p_t from ``weighting``, ‖a_t‖₁ from the clients' reports, and for
    seeded rules (dare) the seed of round r: the rule's seed + r − 1, as the Flower strategy."""
    changes: dict[str, object] = {}
    if rule.spec.seeded:
        changes["seed"] = rule.seed + round_index - 1
    if weighting == "examples":
        if rule.weights is not None:
            raise ConfigError("give either weights or weighting = 'examples', not both")
        changes["weights"] = [r.num_examples for r in results]
    if rule.spec.needs_a_norm:
        steps = a_norm_kind == "steps"
        changes["a_norm"] = [r.a_norm_steps if steps else r.a_norm_lr_sum for r in results]
    return dataclasses.replace(rule, **changes)


def run_reference(
    suite: TaskSuite,
    knobs: Sequence[TrainingKnobs],
    rule: RuleConfig,
    *,
    num_rounds: int,
    server_lr: float,
    a_norm_kind: str = "lr-sum",
    weighting: str = "uniform",
    full_batch: bool = False,
) -> ReferenceRun:
    """R = ``num_rounds`` rounds of FL over the suite's tasks, client t with ``knobs[t]``."""
    T = suite.num_tasks
    if len(knobs) != T:
        raise ConfigError(f"got knobs for {len(knobs)} clients, the suite has {T} tasks")
    if num_rounds < 1:
        raise ConfigError(f"num-rounds must be ≥ 1, got {num_rounds}")
    if a_norm_kind not in A_NORM_KINDS:
        raise ConfigError(
            f"unknown a-norm {a_norm_kind!r}; choose one of {', '.join(A_NORM_KINDS)}"
        )
    if weighting not in WEIGHTINGS:
        raise ConfigError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if not server_lr > 0:
        raise ConfigError(f"server-lr β must be > 0, got {server_lr}")

    state = suite.initial_state()  # θ₀
    plans = [TensorPlan(name, tuple(x.shape), x.dtype) for name, x in state.items()]
    history = [evaluate_state(suite, state, 0)]
    previous_A = None  # cclip's center v₀: the previous round's A
    for r in range(1, num_rounds + 1):
        results = [
            fine_tune(suite, t, state, knobs[t], full_batch=full_batch, round_index=r)
            for t in range(T)
        ]
        config = round_rule_config(rule, results, a_norm_kind, weighting, r)
        center = previous_A if rule.spec.carries_center else None
        aggregator = make_rule(config, T, center=center)
        merged = aggregate_model(
            aggregator,
            plans,
            state.__getitem__,
            [result.update.__getitem__ for result in results],
            AggregationOptions(server_lr=server_lr, inputs="updates"),
        )
        new_state = {name: theta.clone() for name, theta in merged}  # yielded views are reused
        previous_A = next_center(state, new_state, server_lr)  # A = (θʳ⁺¹ − θʳ)/β, as Flower
        state = new_state
        record = evaluate_state(suite, state, r)
        record.clients = [result.metrics() for result in results]
        record.rule_summary = aggregator.summary()
        history.append(record)
    return ReferenceRun(state=state, history=history)
