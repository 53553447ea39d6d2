"""A client's local fine-tuning (clients/local_training.py) on the toy task suite.

Claims: fine-tuning is reproducible bit for bit, it lowers the task's training loss and raises
its test accuracy, and it moves only the federated backbone (the heads are frozen and never
travel).
"""

from __future__ import annotations

import pytest
import torch

from clients.knobs import TrainingKnobs
from clients.local_training import fine_tune
from fl_sim.errors import CheckpointError, ConfigError
from fl_sim.suites.base import FEDERATED_PREFIX, evaluate, federated_state, load_federated_state
from fl_sim.suites.registry import make_suite
from fl_sim.suites.toy import ToySuite

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def suite() -> ToySuite:
    return ToySuite(num_tasks=3, seed=0)


def theta_plus(state, update):
    return {name: state[name] + update[name] for name in state}


def test_toy_suite_is_deterministic_in_its_seed(suite):
    again = ToySuite(num_tasks=3, seed=0)
    other = ToySuite(num_tasks=3, seed=1)
    for a, b, c in zip(suite.tasks, again.tasks, other.tasks, strict=True):
        assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
        assert not torch.equal(a.train_x, c.train_x)
    for a, b in zip(
        suite.build_model().state_dict().values(),
        again.build_model().state_dict().values(),
        strict=True,
    ):
        assert torch.equal(a, b)


def test_building_a_model_leaves_the_global_rng_alone(suite):
    before = torch.get_rng_state()
    ToySuite(num_tasks=2, seed=5).build_model()
    suite.build_model(seed=3)
    assert torch.equal(before, torch.get_rng_state())


def test_federated_state_is_the_backbone_only_and_heads_are_frozen(suite):
    model = suite.build_model()
    state = federated_state(model)
    assert list(state) == [
        "backbone.0.weight",
        "backbone.0.bias",
        "backbone.2.weight",
        "backbone.2.bias",
    ]
    assert all(not p.requires_grad for p in model.heads.parameters())
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_fine_tune_is_bit_identical_when_repeated(suite):
    theta0 = suite.initial_state()
    knobs = TrainingKnobs(lr=0.1, local_steps=15, optimizer="sgd-momentum", batch_size=16, seed=4)
    first = fine_tune(suite, 1, theta0, knobs, round_index=2)
    second = fine_tune(suite, 1, theta0, knobs, round_index=2)
    for name in first.update:
        assert torch.equal(first.update[name], second.update[name])
    assert first.loss_after == second.loss_after
    other_round = fine_tune(suite, 1, theta0, knobs, round_index=3)
    assert not torch.equal(
        first.update["backbone.0.weight"], other_round.update["backbone.0.weight"]
    )


@pytest.mark.parametrize(
    "knobs",
    [
        TrainingKnobs(lr=0.5, local_steps=50),
        TrainingKnobs(lr=0.05, local_steps=50, optimizer="sgd-momentum", schedule="cosine"),
        TrainingKnobs(lr=1e-2, local_steps=50, optimizer="adamw", weight_decay=1e-2),
    ],
    ids=["sgd", "sgd-momentum", "adamw"],
)
def test_fine_tuning_improves_every_task(suite, knobs):
    theta0 = suite.initial_state()
    for t, task in enumerate(suite.tasks):
        result = fine_tune(suite, t, theta0, knobs)
        assert result.loss_after < 0.7 * result.loss_before
        before = suite.build_model()
        after = suite.build_model()
        load_federated_state(after, theta_plus(theta0, result.update))
        assert evaluate(after, task)[1] > evaluate(before, task)[1]
        assert evaluate(before, task, "train")[0] == pytest.approx(result.loss_before)


def test_fine_tune_moves_only_the_backbone_and_reports_its_work(suite):
    theta0 = suite.initial_state()
    knobs = TrainingKnobs(lr=0.2, local_steps=8, schedule="linear")
    result = fine_tune(suite, 0, theta0, knobs)
    assert list(result.update) == list(theta0)
    assert all(name.startswith(FEDERATED_PREFIX) for name in result.update)
    assert all(delta.abs().sum() > 0 for delta in result.update.values())
    assert result.num_examples == suite.tasks[0].num_train == 256
    assert result.local_steps == 8 and result.a_norm_steps == 8.0
    assert result.learning_rates == pytest.approx([0.2 * (1 - k / 8) for k in range(8)])
    assert result.a_norm_lr_sum == pytest.approx(sum(result.learning_rates))
    assert result.a_norm_exact is True
    assert (
        fine_tune(suite, 0, theta0, TrainingKnobs(0.01, 2, optimizer="adamw")).a_norm_exact is False
    )
    # the heads the client trained with are the ones every party rebuilds
    heads = suite.build_model().heads.state_dict()
    for name, tensor in suite.build_model().heads.state_dict().items():
        assert torch.equal(tensor, heads[name])


def test_full_batch_single_step_is_one_gradient_step(suite):
    theta0 = suite.initial_state()
    result = fine_tune(suite, 2, theta0, TrainingKnobs(lr=0.3, local_steps=1), full_batch=True)
    model = suite.build_model()
    task = suite.tasks[2]
    loss = torch.nn.functional.cross_entropy(model(task.train_x, 2), task.train_y)
    grads = torch.autograd.grad(loss, list(model.backbone.parameters()))
    for (name, delta), g in zip(result.update.items(), grads, strict=True):
        torch.testing.assert_close(delta, -0.3 * g, msg=name)


def test_loading_a_state_of_another_shape_names_the_tensor(suite):
    state = suite.initial_state()
    model = make_suite("toy", num_tasks=3, hidden=8).build_model()
    with pytest.raises(CheckpointError, match=r"backbone\.0\.weight"):
        load_federated_state(model, state)
    with pytest.raises(CheckpointError, match="missing"):
        load_federated_state(model, {})
    with pytest.raises(ConfigError, match="unknown task suite 'mnist'"):
        make_suite("mnist")
