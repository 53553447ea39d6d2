"""β (λ) selection on validation data, never test; results on both splits. No Ray."""

from __future__ import annotations

import csv

import pytest
import torch
from helpers import InProcessGrid, assert_states_close, config
from safetensors.torch import load_file

from fl_sim.errors import ConfigError
from fl_sim.federation.server_app import RunRecorder, run_federation
from fl_sim.suites.registry import make_suite
from strategies.server_step import ServerLrCandidate

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache", "task_identity")
T = 3


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"server-lr-grid": "0.5,1", "num-rounds": 2}, "num-rounds = 2 (set num-rounds=1"),
        (
            {"server-lr-grid": "0.5,1", "strategy": "task_arithmetic"},
            "task_arithmetic searches λ, not β: use lambda-grid",
        ),
        ({"lambda-grid": "0.1,0.3"}, "lambda-grid is task_arithmetic's λ; fedavg searches β"),
        ({"server-lr-grid": "0.5,abc"}, "server-lr-grid: cannot read 'abc' as a number"),
        ({"lambda-grid": "0.1,-1", "strategy": "task_arithmetic"}, "finite number > 0, got -1.0"),
        ({"server-lr-grid": "1,1"}, "lists a value twice"),
        ({"diagnostic-batch": -1}, "diagnostic-batch must be an integer ≥ 0"),
    ],
)
def test_bad_search_config_is_a_one_line_config_error(values, message):
    with pytest.raises(ConfigError) as error:
        config(**{k.replace("-", "_"): v for k, v in values.items()})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_a_number_is_a_grid_of_one():
    assert config(server_lr_grid=2).rule.server_lr_candidates() == [2.0]
    assert config(server_lr_grid=" 0.5, 1 ,2").rule.server_lr_candidates() == [0.5, 1.0, 2.0]
    assert config().rule.server_lr_candidates() == []


def test_beta_search_keeps_the_best_val_beta_and_equals_a_run_with_that_beta(
    tmp_path,
):
    grid = [0.3, 1.0, 3.0]
    searched = run_federation(
        InProcessGrid(T),
        config(server_lr_grid=",".join(map(str, grid)), results_dir=str(tmp_path / "search")),
    )
    search = searched["beta_search"]
    assert [row["beta"] for row in search] == grid
    assert all(row["lambda"] is None for row in search)
    best = max(search, key=lambda row: row["val_mean_normalized_accuracy"])
    assert searched["selected_beta"] == best["beta"]
    # the round's model is θ₀ + β*·A: the same as a plain run with server-lr = β*
    plain = run_federation(
        InProcessGrid(T), config(server_lr=best["beta"], results_dir=str(tmp_path / "plain"))
    )
    assert_states_close(
        load_file(tmp_path / "search" / "global_model.safetensors"),
        load_file(tmp_path / "plain" / "global_model.safetensors"),
    )
    assert searched["rounds"][1]["training"]["server_lr"] == best["beta"]
    # the selected model's test metrics, normalised by the fine-tuned TEST accuracy
    test = searched["selected_test"]
    finetuned_test = searched["finetuned_splits"]["test"]
    for row in test["tasks"]:
        own = finetuned_test[str(row["task"])]["accuracy"]
        assert row["normalized_accuracy"] == pytest.approx(row["accuracy"] / own)
    assert test["mean_accuracy"] == pytest.approx(best["test_mean_accuracy"])
    plain_test = plain["rounds"][1]["splits"]["test"]  # θ₀ + β·A vs the fused θ₀ + Σ βc_tΔ_t
    assert [x["loss"] for x in test["tasks"]] == pytest.approx(
        [x["loss"] for x in plain_test["tasks"]], rel=1e-5
    )
    assert test["mean_normalized_accuracy"] == pytest.approx(plain_test["mean_normalized_accuracy"])


def test_lambda_search_for_task_arithmetic_is_beta_lambda_t(tmp_path):
    results = run_federation(
        InProcessGrid(T),
        config(strategy="task_arithmetic", lambda_grid="0.1,0.3,0.6", results_dir=str(tmp_path)),
    )
    search = results["beta_search"]
    assert [row["lambda"] for row in search] == [0.1, 0.3, 0.6]
    assert [row["beta"] for row in search] == pytest.approx([0.1 * T, 0.3 * T, 0.6 * T])
    lam = results["selected_lambda"]
    assert results["selected_beta"] == pytest.approx(lam * T)
    # θ₀ + λ* Σ_t τ_t from the saved client checkpoints
    theta0 = load_file(tmp_path / "base.safetensors")
    clients = [load_file(tmp_path / path) for path in results["files"]["clients"]]
    expected = {n: theta0[n] + lam * sum(c[n] - theta0[n] for c in clients) for n in theta0}
    assert_states_close(load_file(tmp_path / "global_model.safetensors"), expected, atol=1e-5)


def test_selection_reads_val_never_test():
    """Val prefers β = 1, test prefers β = 2: β = 1 is chosen, test only reported."""
    suite = make_suite("toy", num_tasks=T, seed=0)
    recorder = RunRecorder(config(), suite, suite.initial_state())
    for split in ("val", "test"):
        recorder.finetuned[split] = {t: {"loss": 0.0, "accuracy": 0.8} for t in range(T)}
    preferred = {"val": 1.0, "test": 2.0}

    def fake_evaluate(state):
        beta = float(state["beta"])
        return {
            split: [{"loss": 0.0, "accuracy": 0.7 - 0.1 * abs(beta - best)}] * T
            for split, best in preferred.items()
        }

    recorder.evaluate = fake_evaluate
    theta, update = {"beta": torch.zeros(())}, {"beta": torch.ones(())}
    candidates = [ServerLrCandidate(b) for b in (0.5, 1.0, 2.0, 4.0)]
    assert recorder.select_server_lr(theta, update, candidates) == 1
    assert recorder.selected == candidates[1]
    rows = {row["beta"]: row for row in recorder.beta_search}
    assert rows[2.0]["test_mean_accuracy"] > rows[1.0]["test_mean_accuracy"]
    assert rows[1.0]["val_mean_normalized_accuracy"] == pytest.approx(0.7 / 0.8)


def test_every_round_is_evaluated_on_val_and_test(tmp_path):
    results = run_federation(
        InProcessGrid(T), config(num_rounds=2, eval_split="test", results_dir=str(tmp_path))
    )
    assert results["splits"] == ["val", "test"]
    for entry in results["rounds"]:
        assert set(entry["splits"]) == {"val", "test"}
        assert entry["tasks"] == entry["splits"]["test"]["tasks"]  # eval-split is the headline
    assert results["beta_search"] is None and results["selected_beta"] is None
    finetuned = results["finetuned_splits"]
    assert results["finetuned"] == finetuned["test"]
    last = results["rounds"][-1]["splits"]
    for split in ("val", "test"):
        for row in last[split]["tasks"]:
            own = finetuned[split][str(row["task"])]["accuracy"]
            assert row["normalized_accuracy"] == pytest.approx(row["accuracy"] / own)
    with (tmp_path / "results.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 3 * 2 * T  # rounds 0..2, two splits, T tasks
    assert {row["split"] for row in rows} == {"val", "test"}
