"""Fine-tune once, merge many: the client update cache (clients/update_cache.py), without Ray.

The federation runs drive the real ClientApp and ServerApp in-process (``InProcessGrid`` from
tests/test_federation.py).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from helpers import InProcessGrid, config

from clients.local_training import fine_tune
from clients.update_cache import UpdateCache, cached_fine_tune, key_material, update_key
from fl_sim.federation.server_app import run_federation
from fl_sim.suites.registry import make_suite

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache", "task_identity")
T = 3
SUITE_CONFIG = {"task-suite": "toy", "num-tasks": T, "suite-seed": 0}


@pytest.fixture
def suite():
    return make_suite("toy", num_tasks=T, seed=0)


TRAINING_VARIES = (
    "cached",
    "train_seconds",
    "client_seconds",
    "wait_seconds",
    "busy_seconds",
)


def comparable(results: dict) -> dict:
    """results.json without what may differ between two identical runs (times, folders, cache)."""
    drop = {"timings", "update_cache", "evaluation_cache", "config", "files"}
    kept = {k: v for k, v in results.items() if k not in drop}
    kept["rounds"] = [
        {k: v for k, v in entry.items() if k not in ("timings", "update_cache")}
        | (
            {"training": {k: v for k, v in entry["training"].items() if k not in TRAINING_VARIES}}
            if "training" in entry
            else {}
        )
        for entry in results["rounds"]
    ]
    return kept


def test_a_second_identical_one_shot_run_trains_nothing_and_is_bit_identical(
    tmp_path,
):
    cache = str(tmp_path / "cache")
    first = run_federation(
        InProcessGrid(T), config(results_dir=str(tmp_path / "a"), cache_dir=cache)
    )
    second = run_federation(
        InProcessGrid(T), config(results_dir=str(tmp_path / "b"), cache_dir=cache)
    )
    assert first["rounds"][1]["update_cache"] == {"trained": T, "cached": 0}
    assert second["rounds"][1]["update_cache"] == {"trained": 0, "cached": T}
    assert second["update_cache"]["trained"] == 0 and second["update_cache"]["cached"] == T
    assert len(list((tmp_path / "cache" / "updates").glob("*.safetensors"))) == T
    for name in ("global_model.safetensors", "clients/client_1.safetensors"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert comparable(first) == comparable(second)


def test_multi_round_run_reuses_round_one_of_a_one_shot_run(tmp_path):
    cache = str(tmp_path / "cache")
    run_federation(InProcessGrid(T), config(results_dir=str(tmp_path / "a"), cache_dir=cache))
    results = run_federation(
        InProcessGrid(T),
        config(results_dir=str(tmp_path / "b"), cache_dir=cache, num_rounds=2, strategy="median"),
    )
    assert [r["update_cache"] for r in results["rounds"][1:]] == [
        {"trained": 0, "cached": T},  # from θ₀ with the same knobs: the rule does not matter
        {"trained": T, "cached": 0},  # from θ¹: new weights
    ]


def test_update_cache_off_writes_nothing(tmp_path):
    cache = tmp_path / "cache"
    results = run_federation(
        InProcessGrid(T),
        config(results_dir=str(tmp_path / "a"), cache_dir=str(cache), update_cache=False),
    )
    assert results["rounds"][1]["update_cache"] == {"trained": T, "cached": 0}
    assert results["update_cache"]["enabled"] is False
    assert not cache.exists()


def key_for(suite, **changes):
    """The cache key of client 1, round 1, from θ₀, with ``changes`` to one input."""
    knobs = changes.pop("knobs", config().client_knobs()[1])
    arguments = {
        "suite": suite,
        "suite_config": SUITE_CONFIG,
        "task_index": 1,
        "knobs": knobs,
        "server_round": 1,
        "full_batch": False,
        "global_state": suite.initial_state(),
        **changes,
    }
    return update_key(key_material(**arguments))


def test_a_change_of_any_input_misses_the_cache(suite):
    base = key_for(suite)
    assert key_for(suite) == base  # deterministic
    knobs = config().client_knobs()[1]
    theta = suite.initial_state()
    name = next(iter(theta))
    nudged = {**theta, name: theta[name].clone()}
    nudged[name].view(-1)[0] += 1e-6
    other_seed = make_suite("toy", num_tasks=T, seed=1)
    changed = {
        "lr": key_for(suite, knobs=replace(knobs, lr=knobs.lr * 2)),
        "local steps": key_for(suite, knobs=replace(knobs, local_steps=knobs.local_steps + 1)),
        "client seed": key_for(suite, knobs=replace(knobs, seed=knobs.seed + 1)),
        "optimizer": key_for(suite, knobs=replace(knobs, optimizer="adamw")),
        "round": key_for(suite, server_round=2),
        "task": key_for(suite, task_index=2),
        "full batch": key_for(suite, full_batch=True),
        "global weights": key_for(suite, global_state=nudged),
        "suite seed": key_for(
            other_seed,
            suite_config={**SUITE_CONFIG, "suite-seed": 1},
            global_state=other_seed.initial_state(),
        ),
        "suite kwargs": key_for(suite, suite_config={**SUITE_CONFIG, "num-tasks": 4}),
    }
    assert base not in changed.values()
    assert len(set(changed.values())) == len(changed)


def test_cached_update_is_the_trained_update(tmp_path, suite):
    cache = UpdateCache(tmp_path)
    knobs = config().client_knobs()[0]
    theta = suite.initial_state()
    fresh, hit = cached_fine_tune(
        cache, suite, SUITE_CONFIG, 0, theta, knobs, full_batch=False, round_index=1
    )
    again, hit_again = cached_fine_tune(
        cache, suite, SUITE_CONFIG, 0, theta, knobs, full_batch=False, round_index=1
    )
    assert (hit, hit_again) == (False, True)
    for name in fresh.update:
        assert torch.equal(fresh.update[name], again.update[name])
    assert fresh.metrics() == again.metrics()
    assert fresh.learning_rates == again.learning_rates
    reference = fine_tune(suite, 0, theta, knobs, round_index=1)
    assert all(torch.equal(reference.update[n], again.update[n]) for n in reference.update)


@pytest.mark.parametrize("damage", ["weights-bytes", "weights-truncated", "json", "other-key"])
def test_a_corrupted_cache_entry_is_recomputed_and_overwritten(tmp_path, suite, damage):
    cache = UpdateCache(tmp_path)
    knobs = config().client_knobs()[0]
    theta = suite.initial_state()

    def run():
        return cached_fine_tune(
            cache, suite, SUITE_CONFIG, 0, theta, knobs, full_batch=False, round_index=1
        )

    fresh, _ = run()
    [weights] = list(cache.folder.glob("*.safetensors"))
    sidecar = weights.with_suffix(".json")
    if damage == "weights-bytes":
        payload = bytearray(weights.read_bytes())
        payload[-5] ^= 0xFF  # one flipped byte in the data: the SHA-256 catches it
        weights.write_bytes(bytes(payload))
    elif damage == "weights-truncated":
        weights.write_bytes(weights.read_bytes()[:40])
    elif damage == "json":
        sidecar.write_text("{not json")
    else:
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**meta, "key": "0" * 64}))
    recomputed, hit = run()
    assert not hit
    assert all(torch.equal(fresh.update[n], recomputed.update[n]) for n in fresh.update)
    _, hit_after = run()  # overwritten with a good entry
    assert hit_after
