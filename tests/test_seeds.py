"""``seeds``: repeats of an experiment over training seeds, means and 95% Student-t CIs.

A repeat changes the clients' training seed (``training-seed``: client t trains with s + t)
and nothing of the suite (θ₀, splits: ``seed``). The summary math is checked against hand
values on synthetic results; one in-process toy federation checks that training seeds change
the clients' updates while θ₀ stays the same. No Ray.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from helpers import InProcessGrid, config

from fl_sim.cli.run import seeds_summary, write_seeds_summary
from fl_sim.config.run_config import RunConfig
from fl_sim.errors import ConfigError
from fl_sim.experiments import sweep
from fl_sim.experiments.compare import (
    SUMMARY_FIELDS,
    expand_experiment,
    mean_ci95,
    summarize,
    summary_rows,
    table,
    write_experiment,
)
from fl_sim.experiments.sweep import SweepSpec, run_sweep
from fl_sim.outputs import write_atomically

T975_2 = 4.302652729749464  # t_{0.975, 2}, from a table


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def test_seeds_is_a_count_from_seed_or_an_explicit_list():
    assert RunConfig().seed_list() == [0]
    assert RunConfig.from_mapping({"seeds": 3}).seed_list() == [0, 1, 2]
    assert RunConfig.from_mapping({"seeds": 3, "seed": 5}).seed_list() == [5, 6, 7]
    assert RunConfig.from_mapping({"seeds": 2.0}).seed_list() == [0, 1]
    assert RunConfig.from_mapping({"seeds": "0, 4,2", "seed": 9}).seed_list() == [0, 4, 2]
    assert RunConfig.from_sources(overrides=["seeds=0,1"]).seed_list() == [0, 1]
    assert RunConfig.from_sources(overrides=["seeds=2"]).seed_list() == [0, 1]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "seeds must be a count in 1..1000"),
        (-2, "seeds must be a count in 1..1000"),
        (1001, "seeds must be a count in 1..1000"),
        (True, "seeds must be a count or a comma list of seeds"),
        (1.5, "seeds must be a count or a comma list of seeds"),
        ("", "comma list of integers ≥ 0"),
        ("0,,1", "comma list of integers ≥ 0"),
        ("a,b", "comma list of integers ≥ 0"),
        ("-1,2", "comma list of integers ≥ 0"),
        ("1,1", "distinct seeds"),
        (str(2**32), "seeds must be ≤"),
    ],
)
def test_bad_seeds_are_one_line_errors(value, message):
    with pytest.raises(ConfigError, match=message) as error:
        RunConfig.from_mapping({"seeds": value})
    assert "\n" not in str(error.value)


def test_seeds_and_training_seed_checks():
    with pytest.raises(ConfigError, match="drop training-seed"):
        RunConfig.from_mapping({"seeds": 2, "training-seed": 3})
    with pytest.raises(ConfigError, match="seed \\+ seeds − 1 must be ≤"):
        RunConfig.from_mapping({"seeds": 2, "seed": 2**32 - 1})
    with pytest.raises(ConfigError, match="training-seed must be -1"):
        RunConfig.from_mapping({"training-seed": -2})
    cfg = config(training_seed=7)
    assert [k.seed for k in cfg.client_knobs()] == [7, 8, 9]
    assert cfg.suite_config() == config().suite_config()  # θ₀ and the splits: seed


# ---------------------------------------------------------------------------------------------
# Expansion
# ---------------------------------------------------------------------------------------------


def test_one_seed_expands_to_todays_runs(tmp_path):
    base = dict(experiment="compare", rules="task_arithmetic,fedavg", results_dir=str(tmp_path))
    runs = expand_experiment(config(**base))
    assert [Path(r.output.results_dir).relative_to(tmp_path).as_posix() for r in runs] == [
        "one-shot/task_arithmetic",
        "one-shot/fedavg",
        "multi-round/task_arithmetic",
        "multi-round/fedavg",
    ]
    for run in runs:
        assert run.training.training_seed == -1 and run.experiment.seeds == 1
        assert [k.seed for k in run.client_knobs()] == [0, 1, 2]  # seed + t, as before
    # seeds = "<seed>" is the same experiment: the same runs, the same folders
    same = expand_experiment(config(**base, seeds="0"))
    assert [r.updated({"seeds": 1}) for r in same] == runs
    single = config(results_dir=str(tmp_path))
    assert expand_experiment(single) == [single]


def test_seeds_expand_every_rule_and_mode_per_training_seed(tmp_path):
    cfg = config(
        experiment="compare",
        rules="task_arithmetic,fedavg",
        seeds=3,
        seed=4,
        results_dir=str(tmp_path),
    )
    runs = expand_experiment(cfg)
    folders = [Path(r.output.results_dir).relative_to(tmp_path).as_posix() for r in runs]
    assert folders == [
        f"{mode}/{rule}/seed-{s}"
        for mode in ("one-shot", "multi-round")
        for rule in ("task_arithmetic", "fedavg")
        for s in (4, 5, 6)
    ]
    assert {r.suite_config() == cfg.suite_config() for r in runs} == {True}  # θ₀, splits fixed
    assert {r.suite.seed for r in runs} == {4}
    for run, folder in zip(runs, folders, strict=True):
        s = int(folder.rsplit("-", 1)[1])
        assert run.training.training_seed == s and run.experiment.seeds == 1
        assert [k.seed for k in run.client_knobs()] == [s, s + 1, s + 2]
    # a different training seed is a different update-cache key (TrainingKnobs holds it)
    assert runs[0].client_knobs() != runs[1].client_knobs()
    single = expand_experiment(config(seeds="2,9", results_dir=str(tmp_path)))
    assert [Path(r.output.results_dir).name for r in single] == ["seed-2", "seed-9"]
    assert [r.training.training_seed for r in single] == [2, 9]


@pytest.mark.usefixtures("one_thread", "isolated_cache", "task_identity")
def test_training_seeds_change_the_updates_not_theta0(tmp_path):
    from fl_sim.federation.server_app import run_federation

    runs = expand_experiment(config(seeds=2, batch_size=2, results_dir=str(tmp_path)))
    results = [run_federation(InProcessGrid(3), run) for run in runs]
    first, second = (r["rounds"] for r in results)

    def losses(entry):
        return [t["loss"] for split in ("val", "test") for t in entry["splits"][split]["tasks"]]

    assert losses(first[0]) == losses(second[0])  # θ₀ is the same model, on the same splits
    assert losses(first[1]) != losses(second[1])  # the clients trained differently
    assert results[0]["finetuned_splits"] != results[1]["finetuned_splits"]
    assert [r["config"]["training-seed"] for r in results] == [0, 1]
    text = seeds_summary(config(seeds=2), results)
    assert "2 training seeds" in text and " ± " in text


# ---------------------------------------------------------------------------------------------
# Summary math
# ---------------------------------------------------------------------------------------------


def test_mean_ci95_is_student_t():
    mean, half = mean_ci95([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(T975_2 * 1.0 / math.sqrt(3)) and half == pytest.approx(2.4841377)
    assert mean_ci95([0.7]) == (0.7, None)  # one seed: no interval, not 0
    assert mean_ci95([]) == (None, None)
    assert mean_ci95([0.5, None, 0.5]) == (0.5, 0.0)


def fake_run(root: Path, rule: str, mode: str, seed: int, accuracy: float) -> dict[str, object]:
    """A results.json of a compare run, as run_federation writes it (the fields used)."""

    def split(value: float) -> dict[str, object]:
        return {
            "mean_accuracy": value,
            "mean_normalized_accuracy": value / 0.8,
            "tasks": [{"name": f"toy{t}", "accuracy": value} for t in range(2)],
        }

    rounds = [{"round": 0, "splits": {"test": split(0.3)}}]
    rounds += [
        {
            "round": 1,
            "splits": {"test": split(accuracy)},
            "training": {
                "server_lr": 1.0,
                "chi_square": 0.0,
                "weights": [0.5, 0.5],
                "effective_weights": [0.5, 0.5],
            },
        }
    ]
    return {
        "config": {
            "results-dir": str(root / mode / rule / f"seed-{seed}"),
            "strategy": rule,
            "num-rounds": 1,
            "seed": 0,
            "training-seed": seed,
        },
        "tasks": ["toy0", "toy1"],
        "finetuned_splits": {"test": {"0": {"accuracy": 0.8}, "1": {"accuracy": 0.8}}},
        "rounds": rounds,
        "beta_search": [{"beta": 1.0, "val_mean_normalized_accuracy": 0.9}],
        "selected_beta": 1.0,
        "selected_test": split(accuracy),
        "timings": {"total_seconds": 0.1},
    }


TA = [0.5, 0.6, 0.7]
FEDAVG = [0.55, 0.62, 0.8]


def synthetic(root: Path, seeds=(0, 1, 2)) -> tuple[RunConfig, list[dict[str, object]]]:
    cfg = config(
        experiment="compare",
        rules="task_arithmetic,fedavg",
        multi_rounds=0,
        seeds=len(seeds),
        results_dir=str(root),
    )
    results = [
        fake_run(root, rule, "one-shot", s, values[i])
        for rule, values in (("task_arithmetic", TA), ("fedavg", FEDAVG))
        for i, s in enumerate(seeds)
    ]
    return cfg, results


def test_summary_has_means_cis_and_paired_deltas(tmp_path):
    cfg, results = synthetic(tmp_path)
    summary = summarize(cfg, results)
    assert [(r["rule"], r["mode"], r["seed"]) for r in summary["rows"]] == [
        (rule, "one-shot", s) for rule in ("task_arithmetic", "fedavg") for s in (0, 1, 2)
    ]
    ta, fedavg = summary["summary"]
    assert (ta["rule"], ta["n_seeds"], fedavg["rule"], fedavg["n_seeds"]) == (
        "task_arithmetic",
        3,
        "fedavg",
        3,
    )
    assert ta["test_mean_accuracy_mean"] == pytest.approx(0.6)
    assert ta["test_mean_accuracy_ci95"] == pytest.approx(T975_2 * 0.1 / math.sqrt(3))
    assert ta["test_mean_normalized_accuracy_mean"] == pytest.approx(0.6 / 0.8)
    assert ta["delta_vs_task_arithmetic_mean"] == 0 and ta["delta_vs_task_arithmetic_ci95"] == 0
    deltas = [f - t for f, t in zip(FEDAVG, TA, strict=True)]  # 0.05, 0.02, 0.10
    mean = sum(deltas) / 3
    sd = math.sqrt(sum((d - mean) ** 2 for d in deltas) / 2)
    assert fedavg["delta_vs_task_arithmetic_mean"] == pytest.approx(mean)
    assert fedavg["delta_vs_task_arithmetic_ci95"] == pytest.approx(T975_2 * sd / math.sqrt(3))
    # paired: the difference's CI is narrower than the unpaired spread of fedavg alone
    assert fedavg["delta_vs_task_arithmetic_ci95"] < fedavg["test_mean_accuracy_ci95"]
    text = table(summary)
    assert "0.600 ± 0.248" in text and "+0.057 ± " in text and "3 training seeds" in text


def test_deltas_pair_by_seed_and_need_task_arithmetic():
    rows = [
        {"rule": "task_arithmetic", "mode": "one-shot", "seed": 1, "test_mean_accuracy": 0.5},
        {"rule": "task_arithmetic", "mode": "one-shot", "seed": 0, "test_mean_accuracy": 0.1},
        {"rule": "fedavg", "mode": "one-shot", "seed": 0, "test_mean_accuracy": 0.2},
        {"rule": "fedavg", "mode": "one-shot", "seed": 1, "test_mean_accuracy": 0.7},
        {"rule": "fedavg", "mode": "multi-round", "seed": 0, "test_mean_accuracy": 0.9},
    ]
    by_rule = {(r["rule"], r["mode"]): r for r in summary_rows(rows)}
    fedavg = by_rule[("fedavg", "one-shot")]
    assert fedavg["delta_vs_task_arithmetic_mean"] == pytest.approx(0.15)  # (0.1 + 0.2) / 2
    multi = by_rule[("fedavg", "multi-round")]
    assert multi["delta_vs_task_arithmetic_mean"] is None  # no task_arithmetic in that mode
    assert multi["test_mean_accuracy_ci95"] is None and multi["n_seeds"] == 1


def test_experiment_files_have_a_row_per_seed_and_a_summary(tmp_path):
    cfg, results = synthetic(tmp_path)
    write_experiment(cfg, results)
    rows = list(csv.DictReader((tmp_path / "experiment.csv").open()))
    assert len(rows) == 6 and [r["seed"] for r in rows] == ["0", "1", "2"] * 2
    summary_csv = list(csv.DictReader((tmp_path / "experiment_summary.csv").open()))
    assert list(summary_csv[0]) == list(SUMMARY_FIELDS) and len(summary_csv) == 2
    assert float(summary_csv[0]["test_mean_accuracy_ci95"]) == pytest.approx(0.24841377)
    stored = json.loads((tmp_path / "experiment.json").read_text())
    assert stored["summary"][1]["n_seeds"] == 3 and "Student-t" in stored["ci95"]
    assert (tmp_path / "plots" / "normalized_accuracy_one-shot.png").is_file()


def test_one_seed_leaves_the_ci_columns_empty(tmp_path):
    cfg, results = synthetic(tmp_path, seeds=(0,))
    summary = write_experiment(cfg, results)
    [ta, fedavg] = summary["summary"]
    assert ta["test_mean_accuracy_ci95"] is None and fedavg["delta_vs_task_arithmetic_ci95"] is None
    assert fedavg["delta_vs_task_arithmetic_mean"] == pytest.approx(0.05)
    summary_csv = list(csv.DictReader((tmp_path / "experiment_summary.csv").open()))
    assert {r["test_mean_accuracy_ci95"] for r in summary_csv} == {""}
    stored = json.loads((tmp_path / "experiment.json").read_text())
    assert stored["summary"][0]["test_mean_accuracy_ci95"] is None
    assert " ± " not in table(summary)  # one seed: today's table


def test_a_single_experiment_over_seeds_writes_a_seeds_summary(tmp_path):
    cfg = config(strategy="fedavg", seeds=3, results_dir=str(tmp_path))
    results = [fake_run(tmp_path, "fedavg", "one-shot", s, FEDAVG[s]) for s in (0, 1, 2)]
    json_path, csv_path = write_seeds_summary(cfg, results)
    assert (json_path, csv_path) == (
        tmp_path / "seeds_summary.json",
        tmp_path / "seeds_summary.csv",
    )
    stored = json.loads(json_path.read_text())
    assert stored["seeds"] == [0, 1, 2] and stored["strategy"] == "fedavg"
    assert [r["test_mean_accuracy"] for r in stored["rows"]] == FEDAVG
    assert stored["rows"][0]["test_accuracy"] == [0.55, 0.55]  # per task, in the JSON
    mean = sum(FEDAVG) / 3
    sd = math.sqrt(sum((a - mean) ** 2 for a in FEDAVG) / 2)
    assert stored["summary"]["n_seeds"] == 3 and "Student-t" in stored["ci95"]
    assert stored["summary"]["test_mean_accuracy_mean"] == pytest.approx(mean)
    assert stored["summary"]["test_mean_accuracy_ci95"] == pytest.approx(T975_2 * sd / math.sqrt(3))
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["row"] for r in rows] == ["seed", "seed", "seed", "mean", "ci95"]
    assert [r["seed"] for r in rows] == ["0", "1", "2", "", ""]
    assert "test_accuracy" not in rows[0]  # lists stay in the JSON
    assert float(rows[3]["test_mean_accuracy"]) == pytest.approx(mean)
    assert float(rows[4]["test_mean_accuracy"]) == pytest.approx(T975_2 * sd / math.sqrt(3))
    assert float(rows[3]["test_mean_normalized_accuracy"]) == pytest.approx(mean / 0.8)
    assert rows[4]["n_seeds"] == "3"
    assert not list(tmp_path.glob(".*.tmp-*"))  # written atomically: no temp file left


# ---------------------------------------------------------------------------------------------
# Sweep
# ---------------------------------------------------------------------------------------------


def test_sweep_points_expand_seeds_and_sweep_csv_has_the_summary(tmp_path, monkeypatch):
    def fake_group(configs, **_):
        for run in configs:
            folder = Path(run.output.results_dir)
            rounds = run.rule.num_rounds
            accuracy = 0.5 + 0.01 * run.training_seed() + 0.05 * run.rule.knobs["fedgma"].rho
            accuracy += 0.02 if run.rule.strategy == "fedgma" else 0.0
            result = fake_run(folder, run.rule.strategy, "x", run.training_seed(), accuracy)
            result["rounds"] = [
                {**entry, "round": r} for r, entry in enumerate(result["rounds"][:1] * rounds)
            ] + result["rounds"][1:]
            result |= {"status": "completed", "config": run.to_mapping()}
            result["update_cache"] = {"trained": 2, "cached": 0}
            write_atomically(folder / "results.json", json.dumps(result))
            write_atomically(folder / "results.csv", "round,task\n")

    monkeypatch.setattr(sweep, "run_group", fake_group)
    base = {
        "task-suite": "toy",
        "optimizer": "sgd",
        "preset": "none",
        "num-tasks": 2,
        "rules": "task_arithmetic,fedgma",
        "multi-rounds": 0,
        "compare-beta-grid": "1",
        "seeds": 2,
    }
    out = tmp_path / "out"
    run_sweep(SweepSpec(base=base, grid={"rho": [0.2, 0.8]}), out, progress=False, log=str)
    per_seed = list(csv.DictReader((out / "sweep_seeds.csv").open()))
    assert len(per_seed) == 2 * 2 * 2 and {r["training_seed"] for r in per_seed} == {"0", "1"}
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 2 * 2 and {r["n_seeds"] for r in rows} == {"2"}
    assert set(SUMMARY_FIELDS) <= set(rows[0])
    assert float(rows[0]["test_mean_accuracy"]) == pytest.approx(
        float(rows[0]["test_mean_accuracy_mean"])
    )
    fedgma = [r for r in rows if r["rule"] == "fedgma"]
    assert [float(r["delta_vs_task_arithmetic_mean"]) for r in fedgma] == pytest.approx([0.02] * 2)
    assert [float(r["delta_vs_task_arithmetic_ci95"]) for r in fedgma] == pytest.approx([0, 0])
    assert (
        out / "points" / "rho=0.2" / "one-shot" / "fedgma" / "seed-1" / "results.json"
    ).is_file()
