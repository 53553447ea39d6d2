"""The default experiment (`fl-sim run` with no arguments), reduced so that CI can afford it.

Same suite (digits), model (vit-digits), preset (lr-hetero) and every rule, one-shot and
multi-round, but 3 tasks, 10 local steps and 2 rounds. It must write every result file and plot,
and its one-shot task_arithmetic and fedavg rows must agree: the identity inside the experiment.
"""

from __future__ import annotations

import json
import os

import pytest

from fl_sim.cli.main import main

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


@pytest.mark.slow
def test_reduced_default_experiment_writes_results_and_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FL_SIM_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "results"
    argv = ["run", "--no-progress", "--set", f"results-dir={out}", "--set", "num-tasks=3"]
    argv += ["--set", "local-steps=10", "--set", "multi-rounds=2"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "task_arithmetic" in table and "multi-round" in table

    summary = json.loads((out / "experiment.json").read_text())
    rules = ["task_arithmetic", "fedavg", "fednova", "fedgma", "median", "cclip"]
    assert [(r["rule"], r["mode"]) for r in summary["rows"]] == [
        *((rule, "one-shot") for rule in rules),
        *((rule, "multi-round") for rule in rules),
    ]
    rows = {(r["rule"], r["mode"]): r for r in summary["rows"]}
    ta, fedavg = rows["task_arithmetic", "one-shot"], rows["fedavg", "one-shot"]
    assert ta["beta"] == pytest.approx(fedavg["beta"])
    assert ta["test_accuracy"] == fedavg["test_accuracy"]
    assert ta["lambda"] == pytest.approx(ta["beta"] / 3)
    # fine-tune once, merge many: only the first one-shot run trained
    assert ta["trained_clients"] == 3
    assert all(rows[rule, "one-shot"]["trained_clients"] == 0 for rule in rules[1:])
    assert (out / "experiment.csv").read_text().count("\n") == 1 + len(rules) * 2
    for name in (
        "normalized_accuracy_one-shot.png",
        "normalized_accuracy_multi-round.png",
        "accuracy_vs_rounds.png",
        "accuracy_vs_beta.png",
        "effective_weights.png",
    ):
        assert (out / "plots" / name).stat().st_size > 1000, name
    for rule in rules:
        for mode in ("one-shot", "multi-round"):
            run = json.loads((out / mode / rule / "results.json").read_text())
            assert run["status"] == "completed"
            assert (out / mode / rule / "global_model.safetensors").exists()
    assert summary["rows"][0]["chi_square"] > 0  # lr-hetero: training is heterogeneous
