"""The text suite: real standard-library prose, all-MiniLM-L6-v2 as θ₀, top layers federated.

Claims: the suite builds offline with fixed, disjoint, deduplicated splits; θ₀'s frozen probe
heads beat chance on every task; the federated state is exactly the federated layers and
round-trips; a client's fine-tuning step moves only those tensors.
"""

from __future__ import annotations

import pytest
import torch

from clients.knobs import TrainingKnobs
from clients.local_training import fine_tune
from fl_sim.errors import ConfigError
from fl_sim.suites.base import SPLITS, evaluate, federated_state, load_federated_state
from fl_sim.suites.pretrained import chance_accuracy
from fl_sim.suites.registry import make_suite
from fl_sim.suites.stdlib_text import TEXT_TASKS, text_tasks

SMALL = {"train_per_class": 12, "eval_per_class": 10, "max_tokens": 32}


pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.fixture(scope="module")
def suite():
    return make_suite("text", model="minilm", **SMALL)


@pytest.fixture(scope="module")
def model(suite):
    return suite.build_model()


def test_text_tasks_are_deterministic_deduplicated_and_disjoint_across_all_tasks():
    first = text_tasks(list(TEXT_TASKS), seed=3, train_per_class=30, eval_per_class=15)
    again = text_tasks(list(TEXT_TASKS), seed=3, train_per_class=30, eval_per_class=15)
    other = text_tasks(list(TEXT_TASKS), seed=4, train_per_class=30, eval_per_class=15)
    assert [(t.texts, t.labels) for t in first] == [(t.texts, t.labels) for t in again]
    assert [t.texts for t in first] != [t.texts for t in other]
    assert [t.name for t in first] == list(TEXT_TASKS)
    seen = {split: set() for split in ("head", *SPLITS)}
    for task in first:
        for split in seen:
            texts = task.texts[split]
            assert len(texts) == len(set(texts)) == len(task.labels[split]) > 0
            assert all(0 < len(text) <= 256 for text in texts)
            assert set(task.labels[split]) == set(range(len(task.classes)))  # every class
            seen[split] |= set(texts)
    # no task's val or test text is in any task's train split; the heads' texts are in none
    splits = list(seen)
    for i, split in enumerate(splits):
        for other_split in splits[i + 1 :]:
            assert not seen[split] & seen[other_split], (split, other_split)


def test_text_suite_builds_offline_with_the_requested_tasks(suite):
    assert [task.name for task in suite.tasks] == list(TEXT_TASKS)
    meta = suite.metadata()
    assert meta["corpus"]["python"].count(".") == 1
    assert meta["model"] == "minilm"
    for task in suite.tasks:
        x, y = task.split("train")  # cached: the frozen prefix's output + the mask channel
        assert x.dtype == torch.float32 and x.shape[1] <= SMALL["max_tokens"]
        assert x.shape[2] == 384 + 1 and set(x[..., -1].unique().tolist()) <= {0.0, 1.0}
        assert len(y) == SMALL["train_per_class"] * task.num_classes
    three = make_suite("text", num_tasks=3, **SMALL)
    assert [task.name for task in three.tasks] == list(TEXT_TASKS)[:3]


def test_theta0_probe_heads_beat_chance_on_every_text_task(suite, model):
    for task in suite.tasks:
        _, val_accuracy = evaluate(model, task, "val")
        _, test_accuracy = evaluate(model, task, "test")
        chance = max(
            chance_accuracy(task.val_y, task.num_classes),
            chance_accuracy(task.test_y, task.num_classes),
        )
        assert (val_accuracy + test_accuracy) / 2 > chance + 0.05, task.name


def test_federated_state_is_exactly_the_top_layers_and_round_trips(suite, model):
    state = federated_state(model)
    layers = {name.split(".")[3] for name in state}
    assert all(name.startswith("backbone.encoder.layer.") for name in state)
    assert layers == {"4", "5"}  # federated_layers = 2 of MiniLM's 6
    federated = {id(p) for p in model.backbone.parameters()}
    frozen = [p for p in model.encoder.parameters() if id(p) not in federated]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert sum(t.numel() for t in state.values()) == 2 * 1_774_464  # two BERT layers of width 384

    shifted = {name: tensor + 0.01 for name, tensor in state.items()}
    other = suite.build_model()
    load_federated_state(other, shifted)
    for name, tensor in federated_state(other).items():
        torch.testing.assert_close(tensor, shifted[name], rtol=0, atol=0)
    # and the encoder the model runs is the one that was loaded
    weight = other.encoder.model.encoder.layer[5].output.dense.weight
    torch.testing.assert_close(weight, shifted["backbone.encoder.layer.5.output.dense.weight"])


def test_fine_tune_step_moves_only_the_federated_layers(suite, model):
    theta0 = federated_state(model)
    before = {k: v.clone() for k, v in suite.build_model().encoder.state_dict().items()}
    knobs = TrainingKnobs(lr=1e-3, local_steps=1, optimizer="adamw", batch_size=8)
    result = fine_tune(suite, 3, theta0, knobs, round_index=1)
    assert set(result.update) == set(theta0)
    assert all(torch.isfinite(delta).all() for delta in result.update.values())
    assert any(delta.abs().max() > 0 for delta in result.update.values())
    again = fine_tune(suite, 3, theta0, knobs, round_index=1)  # no dropout: deterministic
    for name in result.update:
        assert torch.equal(result.update[name], again.update[name]), name
    # θ₀'s template, the frozen layers and the heads are untouched
    after = suite.build_model()
    for name, tensor in after.encoder.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    for head, fresh in zip(model.heads, after.heads, strict=True):
        assert torch.equal(head.weight, fresh.weight)


def test_text_suite_rejects_bad_knobs_in_one_line():
    with pytest.raises(ConfigError, match=r"unknown model spec 'bert'.*minilm, hf:PATH"):
        make_suite("text", model="bert")
    with pytest.raises(ConfigError, match="num_tasks=9"):
        make_suite("text", num_tasks=9)
    with pytest.raises(ConfigError, match="unknown text task 'sentiment'"):
        make_suite("text", tasks=["sentiment"], **SMALL)
    with pytest.raises(
        ConfigError, match=r"federated_layers must be 'all' or an integer in 1\.\.6"
    ):
        make_suite("text", federated_layers=7, **SMALL)
