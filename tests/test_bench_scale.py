"""benchmarks/bench_scale.py: its inputs, its projection, its memory sampling and one real point."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_scale", REPO / "benchmarks/bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_generated_tasks_are_deterministic_balanced_local_tasks(bench, tmp_path):
    from fl_sim.suites.local_data import read_local_tasks

    paths = bench.write_tasks(tmp_path / "a", 3, rows=30)
    again = bench.write_tasks(tmp_path / "b", 3, rows=30)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    assert len({p.read_bytes() for p in paths}) == 3  # each task its own words
    tasks, modality = read_local_tasks(paths)
    assert modality == "text" and len(tasks) == 3
    for task in tasks:
        assert task.classes == ("no", "yes")
        labels = [label for split in task.labels.values() for label in split]
        assert len(labels) == 30
        assert sum(labels) * 2 == len(labels)  # "yes" = 1: balanced


def test_projection_is_a_line_through_the_last_two_points_else_per_client_copies(bench):
    update = 0.25  # GiB
    assert bench.projected_gib([(8, 4.0), (16, 6.0)], 32, update) == pytest.approx(10.0)
    # the last two: 2 GiB over 8 clients, so 48 more clients add 12 GiB
    last_two = bench.projected_gib([(2, 1.0), (8, 4.0), (16, 6.0)], 64, update)
    assert last_two == pytest.approx(18.0)
    one = bench.projected_gib([(8, 4.0)], 16, update)
    assert one == pytest.approx(4.0 + bench.COPIES_PER_CLIENT * update * 8)
    none = bench.projected_gib([], 4, update)
    assert none == pytest.approx(bench.COPIES_PER_CLIENT * 4 * update + bench.BASE_GIB)


def test_tree_pss_counts_a_child_process(bench):
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; b = bytearray(200 * 2**20); sys.stdin.read()"],
        stdin=subprocess.PIPE,
    )
    try:
        own = bench.tree_pss(child.pid)[0]
        deadline = time.monotonic() + 30
        while own < 200 * 2**20 and time.monotonic() < deadline:  # until the child's bytearray
            time.sleep(0.1)
            own = bench.tree_pss(child.pid)[0]
        assert own >= 200 * 2**20
        parent_total, largest = bench.tree_pss(os.getpid())
        assert largest >= 200 * 2**20  # the child is this process's largest descendant
        assert parent_total > own  # this process and the child
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait(timeout=30)


def test_the_bert_base_shaped_folder_loads_as_a_text_model(bench, tmp_path):
    from fl_sim.suites.encoders import load_pretrained

    tiny = {**bench.BASE_SHAPE, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 2, "intermediate_size": 64}  # fmt: skip
    folder = bench.write_base_model(tmp_path / "bert", seed=0, shape=tiny)
    model = load_pretrained(f"hf:{folder}")
    x = model.prepare(["river stone light", "green paper"])
    assert x.shape[0] == 2
    assert model.encoder.features(x).shape == (2, 32)


def test_table_reports_ratios_to_the_first_point_and_skips(bench):
    def point(model, clients, params, seconds, memory):
        rounds = [
            {"round": r, "round_seconds": seconds * (2 if r == 1 else 1),
             "aggregation_seconds": 0.1, "evaluation_seconds": 0.2,
             "client_seconds_sum": seconds, "client_seconds_max": 1.0,
             "train_seconds_sum": 0.5, "clients": clients}
            for r in (1, 2)
        ]  # fmt: skip
        return {"model": model, "clients": clients, "federated_parameters": params,
                "rounds": rounds, "peak_tree_pss_gib": memory, "peak_used_rise_gib": memory,
                "driver_peak_rss_gib": memory / 2}  # fmt: skip

    points = [
        point("minilm", 2, 1_000_000, 2.0, 2.0),
        point("minilm", 8, 1_000_000, 6.0, 5.0),
        {"model": "base", "clients": 64, "skipped": "projected 99 GiB"},
    ]
    text = bench.table(points)
    row = next(line for line in text.splitlines() if line.startswith("minilm    8"))
    assert row.split()[-3:] == ["4.0", "3.00", "2.50"]  # work ×, time ×, memory ×
    assert "skipped: projected 99 GiB" in text


@pytest.mark.slow
def test_one_real_point_runs_a_federation_and_measures_it(bench, tmp_path):
    """minilm, T = 2, 2 rounds through fl-sim's simulation, in a child process."""
    data = bench.write_tasks(tmp_path / "data", 2, rows=20)
    spec = {"model": "minilm", "clients": 2, "rounds": 2, "local_steps": 1, "batch_size": 2,
            "data_paths": [str(p) for p in data], "results_dir": str(tmp_path / "run")}  # fmt: skip
    figures = bench.measure_point(spec, timeout=600, limit_gib=20)
    assert figures["federated_parameters"] == figures["base_parameters"] > 20_000_000
    assert [r["round"] for r in figures["rounds"]] == [1, 2]
    for entry in figures["rounds"]:
        assert entry["clients"] == 2
        assert entry["round_seconds"] > entry["aggregation_seconds"] > 0
        assert entry["client_seconds_sum"] >= entry["train_seconds_sum"] > 0
    assert figures["peak_tree_pss_gib"] > figures["peak_worker_pss_gib"] > 0
    assert figures["driver_peak_rss_gib"] > 0.3
    json.dumps(figures)  # what --json writes
