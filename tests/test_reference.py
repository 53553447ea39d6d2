"""The plain-PyTorch reference loop (fl_sim/federation/reference.py) against docs/design.md's
identities.

Each expected model is computed here independently of the loop and of strategies/: centralised
gradient descent with torch.autograd, and θ₀ + λ Σ_t τ_t from separately fine-tuned clients.
"""

from __future__ import annotations

import math

import pytest
import torch

from clients.knobs import TrainingKnobs, client_knobs
from clients.local_training import fine_tune
from fl_sim.errors import ConfigError
from fl_sim.federation.reference import run_reference
from fl_sim.suites.base import task_loss
from fl_sim.suites.toy import ToySuite
from strategies.registry import RuleConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def suite() -> ToySuite:
    return ToySuite(num_tasks=3, examples_per_task=128, seed=1)


def assert_states_close(actual, expected, atol=1e-6):
    assert list(actual) == list(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=atol, msg=name)


def test_multi_round_fedavg_with_one_full_batch_step_is_centralised_gradient_descent(suite):
    """docs/design.md identity 5: K_t = 1, full batch, equal η, n_t, β = 1 → GD on Σ_t L_t / T."""
    eta, rounds, T = 0.5, 3, suite.num_tasks
    knobs = client_knobs(T, lr=eta, local_steps=1)
    run = run_reference(
        suite, knobs, RuleConfig("fedavg"), num_rounds=rounds, server_lr=1.0, full_batch=True
    )

    model = suite.build_model()
    params = list(model.backbone.parameters())
    for _ in range(rounds):
        loss = sum(
            task_loss(model, t, task.train_x, task.train_y) / T
            for t, task in enumerate(suite.tasks)
        )
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= eta * g
    expected = {f"backbone.{name}": p.detach() for name, p in model.backbone.named_parameters()}
    assert_states_close(run.state, expected)
    assert len(run.history) == rounds + 1
    assert [record.round for record in run.history] == [0, 1, 2, 3]


@pytest.mark.parametrize("rule", ["fedavg", "task_arithmetic"])
def test_task_arithmetic_equals_one_shot_fedavg(suite, rule):
    """One round, p_t = 1/T, β = λT: θ₀ + λ Σ_t τ_t with τ_t fine-tuned independently."""
    lam, T = 0.4, suite.num_tasks
    knobs = client_knobs(T, lr="0.1,0.3,0.2", local_steps="5,10,20", batch_size=16, seed=3)
    run = run_reference(suite, knobs, RuleConfig(rule), num_rounds=1, server_lr=lam * T)

    theta0 = suite.initial_state()
    task_vectors = [fine_tune(suite, t, theta0, knobs[t], round_index=1).update for t in range(T)]
    expected = {
        name: theta0[name] + lam * sum(tau[name] for tau in task_vectors) for name in theta0
    }
    assert_states_close(run.state, expected)


def test_fedavg_with_example_weights_weights_clients_by_n_t():
    suite = ToySuite(num_tasks=3, examples_per_task=[64, 128, 32], seed=2)
    knobs = client_knobs(3, lr=0.2, local_steps=6, batch_size=16)
    run = run_reference(
        suite, knobs, RuleConfig("fedavg"), num_rounds=1, server_lr=1.0, weighting="examples"
    )
    theta0 = suite.initial_state()
    updates = [fine_tune(suite, t, theta0, knobs[t], round_index=1).update for t in range(3)]
    p = [64 / 224, 128 / 224, 32 / 224]
    expected = {
        name: theta0[name] + sum(p_t * u[name] for p_t, u in zip(p, updates, strict=True))
        for name in theta0
    }
    assert_states_close(run.state, expected)
    assert [c["num-examples"] for c in run.history[1].clients] == [64, 128, 32]


@pytest.mark.parametrize("a_norm_kind", ["lr-sum", "steps"])
def test_fednova_equals_fedavg_when_training_is_homogeneous(suite, a_norm_kind):
    knobs = client_knobs(suite.num_tasks, lr=0.1, local_steps=8, optimizer="sgd-momentum")
    common = {"num_rounds": 2, "server_lr": 1.0, "a_norm_kind": a_norm_kind}
    fedavg = run_reference(suite, knobs, RuleConfig("fedavg"), **common)
    fednova = run_reference(suite, knobs, RuleConfig("fednova"), **common)
    assert_states_close(fednova.state, fedavg.state, atol=1e-7)


def test_fednova_differs_from_fedavg_when_steps_are_heterogeneous(suite):
    knobs = client_knobs(suite.num_tasks, lr=0.1, local_steps=8, preset="steps-hetero")
    assert [k.local_steps for k in knobs] == [2, 9, 16]
    fedavg = run_reference(suite, knobs, RuleConfig("fedavg"), num_rounds=1, server_lr=1.0)
    fednova = run_reference(suite, knobs, RuleConfig("fednova"), num_rounds=1, server_lr=1.0)
    gap = max(float((fednova.state[n] - fedavg.state[n]).abs().max()) for n in fedavg.state)
    assert gap > 1e-3
    assert fednova.history[1].rule_summary["a_norm"] == pytest.approx([0.2, 0.9, 1.6])


def test_cclip_with_infinite_radius_equals_fedavg_over_rounds(suite):
    """From any center v₀ (the previous round's A), one step with τ_c = ∞ is FedAvg."""
    knobs = client_knobs(suite.num_tasks, lr=0.2, local_steps=4)
    fedavg = run_reference(suite, knobs, RuleConfig("fedavg"), num_rounds=3, server_lr=0.5)
    cclip = run_reference(
        suite, knobs, RuleConfig("cclip", tau_c=math.inf), num_rounds=3, server_lr=0.5
    )
    assert_states_close(cclip.state, fedavg.state)
    clipped = run_reference(
        suite, knobs, RuleConfig("cclip", tau_c=0.05), num_rounds=2, server_lr=1.0
    )
    scales = clipped.history[2].rule_summary["clip_scales_per_iteration"][0]
    assert all(0 < s < 1 for s in scales)


def test_history_records_every_task_and_client(suite):
    knobs = [TrainingKnobs(lr=0.5, local_steps=20, seed=t) for t in range(suite.num_tasks)]
    run = run_reference(suite, knobs, RuleConfig("fedavg"), num_rounds=2, server_lr=1.0)
    first, last = run.history[0], run.history[-1]
    assert first.clients == [] and len(last.clients) == suite.num_tasks
    assert len(last.test_accuracy) == len(last.val_loss) == suite.num_tasks
    assert sum(last.test_loss) < sum(first.test_loss)
    assert all(c["loss-after"] < c["loss-before"] for c in last.clients)


def test_reference_rejects_bad_arguments(suite):
    knobs = client_knobs(suite.num_tasks, lr=0.1, local_steps=1)
    with pytest.raises(ConfigError, match="knobs for 2 clients"):
        run_reference(suite, knobs[:2], RuleConfig("fedavg"), num_rounds=1, server_lr=1.0)
    with pytest.raises(ConfigError, match="weighting"):
        run_reference(
            suite, knobs, RuleConfig("fedavg"), num_rounds=1, server_lr=1.0, weighting="size"
        )
    with pytest.raises(ConfigError, match="a-norm"):
        run_reference(
            suite, knobs, RuleConfig("fednova"), num_rounds=1, server_lr=1.0, a_norm_kind="k"
        )
