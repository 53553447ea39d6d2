"""Data heterogeneity (docs/design.md): mixing, Dirichlet label skew with a shared head, and the
suite keys that carry them (and the model, data paths, federated layers) to every party.

Fast: toy suite, no Ray; the ServerApp and the real ClientApp meet through tests/helpers.py's
InProcessGrid.
"""

from __future__ import annotations

import json

import helpers
import pytest
import torch
from flwr.app import ConfigRecord
from helpers import InProcessGrid

import fl_sim.suites.registry as tasks_module
from clients.client_app import suite_config_of, suite_from_config
from clients.knobs import TrainingKnobs
from clients.local_training import fine_tune, generator_seed, make_optimizer, minibatches
from fl_sim.config.run_config import RunConfig
from fl_sim.errors import ConfigError
from fl_sim.federation.reference import run_reference
from fl_sim.federation.server_app import run_federation
from fl_sim.suites.base import (
    SHARED_HEAD_PREFIX,
    evaluate,
    federated_state,
    load_federated_state,
    task_loss,
)
from fl_sim.suites.partition import dirichlet_partition, label_entropy, mixing_subset
from fl_sim.suites.registry import SUITE_DEFAULTS, build_suite, make_suite
from fl_sim.suites.shared_head import SharedHeadSuite
from fl_sim.suites.toy import ToySuite
from strategies.registry import RuleConfig

pytestmark = pytest.mark.usefixtures("one_thread")

T = 3
KNOBS = TrainingKnobs(lr=0.05, local_steps=6, batch_size=16)
BASE = {**helpers.BASE, "local-steps": 6, "update-cache": False, "diagnostic-batch": 64}


def config(**values: object) -> RunConfig:
    return RunConfig.from_mapping({**BASE, **values})


def legacy_fine_tune(suite, t, theta, knobs, round_index):
    """fine_tune as it was before training groups: task t's training split alone."""
    task = suite.tasks[t]
    model = suite.build_model(suite.seed)
    load_federated_state(model, theta)
    model.train()
    optimizer = make_optimizer(knobs, [p for p in model.backbone.parameters() if p.requires_grad])
    generator = torch.Generator().manual_seed(generator_seed(knobs.seed, round_index))
    batches = minibatches(task.num_train, knobs.batch_size, generator)
    for _ in range(knobs.local_steps):
        index = next(batches)
        optimizer.zero_grad(set_to_none=True)
        task_loss(model, t, task.train_x[index], task.train_y[index]).backward()
        optimizer.step()
    after = federated_state(model)
    return {name: after[name] - theta[name] for name in theta}, evaluate(model, task, "train")[0]


# ---------------------------------------------------------------------------------------------
# mixing
# ---------------------------------------------------------------------------------------------


def test_mixing_zero_is_bit_identical_to_training_on_the_own_task_alone():
    suite = make_suite("toy", num_tasks=T, seed=0, mixing=0.0)
    theta0 = suite.initial_state()
    for t in range(T):
        [group] = suite.training_groups(t)
        assert group.task_index == t and group.x is suite.tasks[t].train_x
        result = fine_tune(suite, t, theta0, KNOBS, round_index=2)
        update, loss_after = legacy_fine_tune(suite, t, theta0, KNOBS, round_index=2)
        for name in update:
            assert torch.equal(result.update[name], update[name]), name
        assert result.loss_after == loss_after
        assert result.num_examples == suite.tasks[t].num_train


def test_mixing_one_gives_every_client_the_same_data_and_so_the_same_update():
    suite = make_suite("toy", num_tasks=T, seed=0, mixing=1.0)
    union = sum(task.num_train for task in suite.tasks)
    first = suite.training_groups(0)
    assert [g.task_index for g in first] == list(range(T))
    for t in range(T):
        groups = suite.training_groups(t)
        assert suite.num_examples(t) == union
        for mine, theirs in zip(groups, first, strict=True):
            assert mine.task_index == theirs.task_index
            assert torch.equal(mine.x, theirs.x) and torch.equal(mine.y, theirs.y)
    theta0 = suite.initial_state()
    updates = [fine_tune(suite, t, theta0, KNOBS, round_index=1) for t in range(T)]
    assert all(u.num_examples == union for u in updates)
    for other in updates[1:]:
        for name, delta in updates[0].update.items():
            assert torch.equal(other.update[name], delta)


def test_mixing_half_adds_floor_half_of_every_other_task_the_same_subset_for_all():
    sizes = [100, 51, 30]
    suite = ToySuite(num_tasks=T, examples_per_task=sizes, seed=0)
    suite.mixing = 0.5
    for t in range(T):
        groups = suite.training_groups(t)
        assert [g.task_index for g in groups] == list(range(T))
        expected = [n if s == t else n // 2 for s, n in enumerate(sizes)]
        assert [g.size for g in groups] == expected
        assert suite.num_examples(t) == sum(expected)
        result = fine_tune(suite, t, suite.initial_state(), KNOBS, round_index=1)
        assert result.num_examples == sum(expected)
    # task 0's shared half: the same rows for clients 1 and 2, in their original order
    a, b = suite.training_groups(1)[0], suite.training_groups(2)[0]
    assert torch.equal(a.x, b.x)
    index = mixing_subset(100, 0.5, 0, 0)
    assert torch.equal(index, index.sort().values) and len(set(index.tolist())) == 50
    assert torch.equal(a.x, suite.tasks[0].train_x[index])
    assert set(mixing_subset(100, 0.2, 0, 0).tolist()) <= set(
        mixing_subset(100, 0.5, 0, 0).tolist()
    )


def test_mixed_batch_loss_is_the_mean_over_examples_each_by_its_own_head():
    from fl_sim.suites.base import batch_loss

    suite = make_suite("toy", num_tasks=T, seed=0, mixing=0.5)
    groups = suite.training_groups(1)
    offsets = [0]
    for g in groups[:-1]:
        offsets.append(offsets[-1] + g.size)
    index = torch.tensor([0, 5, offsets[1] + 3, offsets[2] + 1, 7])
    model = suite.build_model()
    per_example = []
    for i in index.tolist():
        g = max(k for k, start in enumerate(offsets) if start <= i)
        group = groups[g]
        logits = model(group.x[i - offsets[g]].unsqueeze(0), group.task_index)
        per_example.append(torch.nn.functional.cross_entropy(logits, group.y[i - offsets[g]][None]))
    expected = torch.stack(per_example).mean()
    torch.testing.assert_close(batch_loss(model, groups, offsets, index), expected)


# ---------------------------------------------------------------------------------------------
# Dirichlet label skew
# ---------------------------------------------------------------------------------------------


def mean_client_entropy(labels, parts, num_classes):
    return sum(label_entropy(labels[p], num_classes) for p in parts) / len(parts)


@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0, 100.0])
def test_dirichlet_partition_is_a_deterministic_partition(alpha):
    labels = torch.randint(0, 10, (600,), generator=torch.Generator().manual_seed(1))
    parts = dirichlet_partition(labels, 6, alpha, seed=3)
    assert len(parts) == 6 and all(len(p) > 0 for p in parts)
    assert sorted(torch.cat(parts).tolist()) == list(range(600))  # disjoint and covering
    again = dirichlet_partition(labels, 6, alpha, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again, strict=True))
    other = dirichlet_partition(labels, 6, alpha, seed=4)
    assert not all(torch.equal(a, b) for a, b in zip(parts, other, strict=True))
    if alpha == 0:  # IID: equal sizes
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = torch.randint(0, 10, (2000,), generator=torch.Generator().manual_seed(0))
    entropy = {
        alpha: mean_client_entropy(labels, dirichlet_partition(labels, 8, alpha, seed=0), 10)
        for alpha in (0.1, 1.0, 100.0)
    }
    assert entropy[0.1] < entropy[1.0] < entropy[100.0]
    assert entropy[100.0] > 0.95 * label_entropy(labels, 10)  # ≈ the task's own label mix
    assert entropy[0.1] < 0.6 * label_entropy(labels, 10)


def test_dirichlet_partition_with_more_clients_than_examples_is_a_config_error():
    with pytest.raises(ConfigError, match="cannot split 3 training examples over 4 clients"):
        dirichlet_partition(torch.tensor([0, 1, 0]), 4, 1.0, seed=0)


# ---------------------------------------------------------------------------------------------
# shared head
# ---------------------------------------------------------------------------------------------


def shared_suite(alpha=0.5, clients=T) -> SharedHeadSuite:
    return build_suite(
        config(
            **{"shared-head": True, "dirichlet-alpha": alpha, "num-tasks": clients}
        ).suite_config()
    )  # type: ignore[return-value]


def test_shared_head_federates_the_head_and_trains_it():
    suite = shared_suite()
    assert isinstance(suite, SharedHeadSuite)
    assert [t.name for t in suite.eval_tasks] == ["toy0"] and suite.num_tasks == T
    assert sum(task.num_train for task in suite.tasks) == suite.task.num_train
    model = suite.build_model()
    state = federated_state(model)
    head_keys = {k for k in state if k.startswith(SHARED_HEAD_PREFIX)}
    assert head_keys == {"heads.0.weight", "heads.0.bias"}
    assert len(model.heads) == 1 and all(p.requires_grad for p in model.heads.parameters())
    torch.testing.assert_close(
        state["heads.0.weight"], make_suite("toy", num_tasks=1).build_model().heads[0].weight
    )
    result = fine_tune(suite, 1, suite.initial_state(), KNOBS, round_index=1)
    assert set(result.update) == set(state)
    assert result.update["heads.0.weight"].abs().max() > 0  # the head moved
    assert result.num_examples == suite.tasks[1].num_train
    for t in range(T):  # every client's val/test is the whole task's
        assert torch.equal(suite.tasks[t].test_y, suite.task.test_y)


def test_shared_head_federation_in_process_runs_and_writes_results(tmp_path, task_identity):
    cfg = config(
        **{
            "shared-head": True,
            "dirichlet-alpha": 0.3,
            "server-lr": 1.0,
            "results-dir": str(tmp_path / "run"),
        }
    )
    results = run_federation(InProcessGrid(T), cfg)
    assert results["status"] == "completed" and results["failures"] == []
    written = json.loads((tmp_path / "run" / "results.json").read_text())
    assert written["tasks"] == ["toy0"] and len(written["clients"]) == T
    suite = build_suite(cfg.suite_config())
    assert written["num_examples"] == [task.num_train for task in suite.tasks]
    # one evaluation task, normalised by the mean of the clients' own fine-tuned accuracy
    clients = written["finetuned_clients"]["val"]
    mean_own = sum(clients[str(t)]["accuracy"] for t in range(T)) / T
    assert written["finetuned"]["0"]["accuracy"] == pytest.approx(mean_own)
    [task] = written["rounds"][1]["tasks"]
    assert task["normalized_accuracy"] == pytest.approx(task["accuracy"] / mean_own)
    csv_lines = (tmp_path / "run" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * 2  # rounds 0 and 1, val and test, one task
    assert written["diagnostics"]["round_0"]["zeta_square"] > 0
    # and the same merge as the plain-PyTorch reference loop on the same suite
    reference = run_reference(
        suite, cfg.client_knobs(), RuleConfig("fedavg"), num_rounds=1, server_lr=1.0
    )
    assert task["accuracy"] == pytest.approx(reference.history[1].val_accuracy[0])


# ---------------------------------------------------------------------------------------------
# the suite keys reach every party
# ---------------------------------------------------------------------------------------------


def test_suite_keys_round_trip_through_the_message_to_the_client():
    cfg = config(**{"shared-head": True, "dirichlet-alpha": 0.5, "mixing": 0.25, "seed": 2})
    record = ConfigRecord(cfg.suite_config())
    assert suite_config_of(record) == cfg.suite_config()
    client = suite_from_config(record)
    server = build_suite(cfg.suite_config())
    assert client.mixing == server.mixing == 0.25
    assert all(torch.equal(a, b) for a, b in zip(client.partition, server.partition, strict=True))
    # an older server's three keys still build a suite, with the defaults for the rest
    assert set(SUITE_DEFAULTS) == set(cfg.suite_config())
    old = ConfigRecord({"task-suite": "toy", "num-tasks": 2, "suite-seed": 0})
    assert suite_from_config(old).mixing == 0.0


def test_model_data_paths_and_federated_layers_reach_the_suite(monkeypatch):
    seen = {}

    class Recorder(ToySuite):
        def __init__(self, **kwargs):
            seen.update(kwargs)
            super().__init__(num_tasks=kwargs["num_tasks"], seed=kwargs["seed"])

    monkeypatch.setitem(tasks_module.SUITES, "local", Recorder)
    cfg = config(
        **{
            "task-suite": "local",
            "num-tasks": 2,
            "data-paths": "/data/a.csv, /data/b/",
            "model": "hf:/models/bert",
            "federated-layers": 3,
        }
    )
    assert cfg.suite.federated_layers == "3"
    suite_from_config(ConfigRecord(cfg.suite_config()))
    assert seen == {
        "seed": 0,
        "num_tasks": 2,
        "paths": ["/data/a.csv", "/data/b/"],
        "model": "hf:/models/bert",
        "federated_layers": 3,
    }


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"data-paths": "a.csv"}, "data-paths is for task-suite=local"),
        ({"task-suite": "local"}, "task-suite=local needs data-paths"),
        ({"task-suite": "local", "data-paths": "a.csv"}, "data-paths names 1 tasks but num-tasks"),
        ({"model": "minilm"}, "task-suite=toy takes model ''"),
        ({"task-suite": "digits", "model": "minilm"}, "task-suite=digits takes model"),
        ({"task-suite": "text", "model": "clip:/x"}, "task-suite=text takes model"),
        ({"federated-layers": 2}, "federated-layers is for the text and local suites"),
        ({"task-suite": "text", "federated-layers": "top"}, "federated-layers must be"),
        ({"mixing": 1.5}, "mixing must be a number in [0, 1], got 1.5"),
        ({"dirichlet-alpha": 0.5}, "set shared-head=true"),
        ({"dirichlet-task": 1}, "set shared-head=true"),
        ({"shared-head": True, "dirichlet-alpha": -1}, "dirichlet-alpha must be a finite number"),
        (
            {"shared-head": True, "task-suite": "digits", "dirichlet-task": 8},
            "dirichlet-task must be a task index < 8 of the digits suite",
        ),
        ({"task-suite": "mnist"}, "unknown task-suite 'mnist'"),
    ],
)
def test_bad_suite_combinations_are_one_line_config_errors(values, message):
    with pytest.raises(ConfigError) as error:
        config(**values)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
