"""The digits suite and its self-pre-trained vit-digits model, offline.

Claims: the suite is built from data that ships with scikit-learn, with fixed disjoint splits in
its seed and a pre-training pool that no task's val or test image is in; θ₀'s features beat
chance on every task; θ₀ is cached, reused without pre-training again, and rebuilt when the file
is corrupt.
"""

from __future__ import annotations

import json

import pytest
import torch

from fl_sim.errors import ConfigError
from fl_sim.suites import digits_data, vit_digits
from fl_sim.suites.base import FEDERATED_PREFIX, evaluate, federated_state
from fl_sim.suites.digits import DigitsSuite, linear_probe_accuracy
from fl_sim.suites.registry import make_suite

NUM_TASKS = 8
# a smaller, faster pre-training than the default, same code path (the key differs, so the
# default's cache is never touched)
SPEC = vit_digits.ViTDigitsSpec(
    hidden_size=32, pretrain_steps=200, pretrain_batch_size=64, pretrain_lr=5e-3
)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fl-sim-cache")


pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.fixture(scope="module")
def suite(cache_dir, module_one_thread) -> DigitsSuite:
    vit_digits.forget_memory()
    suite = DigitsSuite(num_tasks=NUM_TASKS, seed=0, spec=SPEC, cache_dir=cache_dir)
    suite.build_model()
    return suite


def test_suite_is_registered_and_builds_offline(monkeypatch, cache_dir):
    monkeypatch.setenv("FL_SIM_CACHE", str(cache_dir))
    built = make_suite("digits", num_tasks=2, seed=0)
    assert isinstance(built, DigitsSuite) and built.num_tasks == 2
    assert [t.name for t in built.tasks] == ["identity-digit", "rot90-parity"]
    assert vit_digits.default_cache_dir() == cache_dir
    with pytest.raises(ConfigError, match="num_tasks"):
        make_suite("digits", num_tasks=9)


def test_same_seed_gives_identical_tasks_and_another_seed_other_splits(suite):
    again = DigitsSuite(num_tasks=NUM_TASKS, seed=0, spec=SPEC, cache_dir=suite.cache_dir)
    other = DigitsSuite(num_tasks=NUM_TASKS, seed=1, spec=SPEC, cache_dir=suite.cache_dir)
    for a, b, c in zip(suite.tasks, again.tasks, other.tasks, strict=True):
        for split in ("train", "val", "test"):
            assert torch.equal(a.split(split)[0], b.split(split)[0])
            assert torch.equal(a.split(split)[1], b.split(split)[1])
        assert not torch.equal(a.test_x, c.test_x)
        assert a.train_x.shape == (649, 1, 8, 8) and a.train_x.dtype == torch.float32
        assert a.test_y.dtype == torch.int64 and int(a.test_y.max()) < a.num_classes
        assert sorted(a.test_y.unique().tolist()) == list(range(a.num_classes))


def test_splits_are_disjoint_and_the_pretraining_pool_holds_no_task_image(suite):
    pool = set(digits_data.pretrain_indices(1797).tolist())
    for seed in (0, 1, 7):
        index = {k: set(v.tolist()) for k, v in digits_data.task_indices(1797, seed).items()}
        assert not index["train"] & index["val"]
        assert not index["train"] & index["test"]
        assert not index["val"] & index["test"]
        assert not pool & (index["train"] | index["val"] | index["test"])
        assert len(pool) + sum(map(len, index.values())) == 1797
    assert {k: len(v) for k, v in suite.source_indices.items()} == {
        "train": 649,
        "val": 179,
        "test": 251,
    }


def test_tasks_differ_in_domain_and_label(suite):
    domains = {task.domain for task in suite.task_specs}
    labels = {task.label for task in suite.task_specs}
    assert len(domains) == NUM_TASKS and len(labels) >= 6
    # same source images, different inputs
    assert not torch.equal(suite.tasks[0].train_x, suite.tasks[1].train_x)


def test_pretrained_vit_beats_chance_on_every_task(suite):
    chance = [1 / task.num_classes for task in suite.tasks]
    probe = linear_probe_accuracy(suite)
    assert all(acc > c + 0.1 for acc, c in zip(probe, chance, strict=True)), probe
    model = suite.build_model()
    zero_shot = [evaluate(model, task)[1] for task in suite.tasks]
    assert sum(zero_shot) / NUM_TASKS > sum(chance) / NUM_TASKS + 0.1, zero_shot


def test_model_is_deterministic_and_only_the_backbone_is_federated(suite):
    before = torch.get_rng_state()
    a, b = suite.build_model(), suite.build_model(0)
    assert torch.equal(before, torch.get_rng_state())
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    state = federated_state(a)
    assert state and all(key.startswith(FEDERATED_PREFIX + "vit.") for key in state)
    assert not any(p.requires_grad for p in a.heads.parameters())
    features = a.backbone(suite.tasks[0].test_x[:5])
    assert torch.allclose(features.norm(dim=1), torch.ones(5), atol=1e-5)


def test_cache_is_reused_without_pretraining_again(suite):
    first = vit_digits.pretrained(SPEC, 0, suite.cache_dir)
    mtime = first.path.stat().st_mtime_ns
    vit_digits.forget_memory()
    again = vit_digits.pretrained(SPEC, 0, suite.cache_dir)
    assert again.source == "disk" and again.path.stat().st_mtime_ns == mtime
    for name, tensor in first.state.items():
        assert torch.equal(tensor, again.state[name]), name
    sidecar = json.loads(first.path.with_suffix(".json").read_text())
    assert sidecar["key"] == first.key and sidecar["key_material"]["seed"] == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "sidecar"])
def test_corrupt_cache_is_rebuilt_and_verified(suite, damage):
    good = vit_digits.pretrained(SPEC, 0, suite.cache_dir)
    payload = good.path.read_bytes()
    if damage == "flip":
        broken = bytearray(payload)
        broken[len(broken) // 2] ^= 0xFF
        good.path.write_bytes(bytes(broken))
    elif damage == "truncate":
        good.path.write_bytes(payload[: len(payload) // 3])
    else:
        good.path.with_suffix(".json").write_text("{not json")
    vit_digits.forget_memory()
    rebuilt = vit_digits.pretrained(SPEC, 0, suite.cache_dir)
    assert rebuilt.source == "pretrained"
    for name, tensor in good.state.items():  # pre-training is bit-reproducible
        assert torch.equal(tensor, rebuilt.state[name]), name
    assert rebuilt.path.read_bytes() == payload
    vit_digits.forget_memory()
    assert vit_digits.pretrained(SPEC, 0, suite.cache_dir).source == "disk"


def test_a_cache_for_another_spec_is_not_used(suite):
    other = vit_digits.ViTDigitsSpec(hidden_size=32, pretrain_steps=201, pretrain_batch_size=64)
    a = vit_digits.pretrained(SPEC, 0, suite.cache_dir)
    key = vit_digits.cache_key(vit_digits.key_material(other, 0, "x"))
    assert key != a.key
    assert vit_digits.cache_key(vit_digits.key_material(SPEC, 1, "x")) != vit_digits.cache_key(
        vit_digits.key_material(SPEC, 0, "x")
    )
