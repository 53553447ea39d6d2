"""β (λ) selection on validation data, never test; results on both splits. No Ray."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from helpers import InProcessGrid, assert_states_close, config
from safetensors.torch import load_file

from fl_sim.errors import ConfigError
from fl_sim.federation.server_app import RunRecorder, run_federation
from fl_sim.suites.registry import make_suite
from strategies.server_step import SearchSettings, ServerLrCandidate, search_server_lr

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
    assert [row["beta"] for row in search if row["stage"] == "grid"] == grid
    assert [row["selected"] for row in search].count(True) == 1
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
    assert [row["lambda"] for row in search][:3] == [0.1, 0.3, 0.6]
    assert [row["beta"] for row in search] == pytest.approx([r["lambda"] * T for r in search])
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
    recorder = RunRecorder(config(search_test="every"), suite, suite.initial_state())
    for split in ("val", "test"):
        recorder.finetuned[split] = {t: {"loss": 0.0, "accuracy": 0.8} for t in range(T)}
    preferred = {"val": 1.0, "test": 2.0}

    def fake_evaluate(state, splits=("val", "test")):
        beta = float(state["beta"])
        return {
            split: [{"loss": 0.0, "accuracy": 0.7 - 0.1 * abs(beta - preferred[split])}] * T
            for split in splits
        }

    recorder.evaluate = fake_evaluate
    recorder.evaluate_many = lambda states, splits=("val", "test"): [
        fake_evaluate(state, splits) for state in states
    ]
    theta, update = {"beta": torch.zeros(())}, {"beta": torch.ones(())}
    candidates = [ServerLrCandidate(b) for b in (0.5, 1.0, 2.0, 4.0)]
    assert recorder.select_server_lr(theta, update, candidates) == candidates[1]
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


# -- beyond the grid: extension, bounds, refinement ------------------------------------------


def log_peak(at: float):
    """A toy val score with its maximum at β = ``at`` (unimodal in log β)."""
    return lambda candidate: -((math.log(candidate.beta) - math.log(at)) ** 2)


GRID = [ServerLrCandidate(b) for b in (0.5, 1.0, 2.0, 4.0)]


@pytest.mark.parametrize(("optimum", "stage"), [(0.03, "extend-below"), (20.0, "extend-above")])
def test_an_optimum_beyond_the_grid_is_found_inside_after_extending(optimum, stage):
    result = search_server_lr(GRID, log_peak(optimum), SearchSettings(refine=0))
    betas = sorted(p.candidate.beta for p in result.points)
    assert not result.on_bound
    assert betas[0] < result.selected.beta < betas[-1]  # interior
    assert optimum / 2 < result.selected.beta < optimum * 2
    assert {p.stage for p in result.points} == {"grid", stage}
    assert [p.stage for p in result.points][: len(GRID)] == ["grid"] * len(GRID)
    # every extension halves the smallest (doubles the largest) β tried
    extended = [p.candidate.beta for p in result.points if p.stage == stage]
    factor = 0.5 if stage == "extend-below" else 2.0
    edge = GRID[0].beta if stage == "extend-below" else GRID[-1].beta
    assert extended == [edge * factor ** (k + 1) for k in range(len(extended))]


def test_an_optimum_past_the_bound_is_flagged_on_bound():
    result = search_server_lr(GRID, log_peak(1e-4), SearchSettings(max_extensions=3, refine=2))
    below = [p.candidate.beta for p in result.points if p.stage == "extend-below"]
    assert below == [0.25, 0.125, 0.0625]  # 2^3 below the grid, then it stops
    assert result.selected.beta == 0.0625 and result.on_bound
    # refinement only looks between the best and its one neighbour, above it
    assert all(0.0625 < p.candidate.beta < 0.125 for p in result.points if p.stage == "refine")
    off = search_server_lr(GRID, log_peak(1e-4), SearchSettings(extend=False, refine=0))
    assert off.selected == GRID[0] and off.on_bound and len(off.points) == len(GRID)


def test_a_plateau_stops_the_extension_and_ties_keep_the_first_tried():
    result = search_server_lr(GRID, lambda c: 1.0, SearchSettings(refine=0))
    assert [p.stage for p in result.points] == ["grid"] * 4 + ["extend-below"]
    assert result.selected == GRID[0] and not result.on_bound


@pytest.mark.parametrize("optimum", [0.03, 0.7, 1.3, 3.0, 50.0])
def test_refinement_improves_or_keeps_the_val_score(optimum):
    score = log_peak(optimum)
    coarse = search_server_lr(GRID, score, SearchSettings(refine=0))
    fine = search_server_lr(GRID, score, SearchSettings(refine=3))
    assert fine.points[fine.best].score >= coarse.points[coarse.best].score
    assert fine.points[: len(coarse.points)] == coarse.points  # refinement only adds points
    refined = [p for p in fine.points if p.stage == "refine"]
    assert len(refined) <= 2 * 3
    order = sorted(p.candidate.beta for p in coarse.points)
    i = order.index(coarse.selected.beta)
    lo, hi = order[max(i - 1, 0)], order[min(i + 1, len(order) - 1)]
    assert all(lo < p.candidate.beta < hi for p in refined)  # between the best's neighbours


def test_lambda_candidates_extend_lambda_and_keep_beta_lambda_t():
    grid = [ServerLrCandidate(lam * T, lam) for lam in (0.1, 0.2)]
    result = search_server_lr(grid, log_peak(0.9 * T), SearchSettings(refine=1))
    for point in result.points:
        assert point.candidate.beta == pytest.approx(point.candidate.lam * T)
    assert 0.45 < result.selected.lam < 1.8 and not result.on_bound


def test_search_settings_are_run_config_keys():
    assert config().rule.search_settings() == SearchSettings(True, 6, 2)
    settings = config(search_extend=False, search_max_extensions=3, search_refine=0)
    assert settings.rule.search_settings() == SearchSettings(False, 3, 0)
    with pytest.raises(ConfigError, match="search-refine must be an integer ≥ 0"):
        config(search_refine=-1)


def fake_recorder(preferred: dict[str, float], search_test: str = "every") -> RunRecorder:
    """A recorder whose val (test) accuracy peaks at β = preferred['val'] (['test']); it keeps
    the splits of every evaluation asked for in ``recorder.asked``."""
    suite = make_suite("toy", num_tasks=T, seed=0)
    recorder = RunRecorder(config(search_test=search_test), suite, suite.initial_state())
    for split in ("val", "test"):
        recorder.finetuned[split] = {t: {"loss": 0.0, "accuracy": 1.0} for t in range(T)}
    recorder.asked = []

    def fake_evaluate(state, splits=("val", "test")):
        beta = float(state["beta"])
        recorder.asked.append((beta, tuple(splits)))
        return {
            split: [{"loss": 0.0, "accuracy": 1 / (1 + abs(math.log(beta / preferred[split])))}] * T
            for split in splits
        }

    recorder.evaluate = fake_evaluate
    recorder.evaluate_many = lambda states, splits=("val", "test"): [
        fake_evaluate(state, splits) for state in states
    ]
    return recorder


def test_the_recorder_extends_below_the_grid_on_val_and_records_every_beta():
    """Val peaks at β = 0.1, below the grid; test peaks at 4: the search follows val only."""
    recorder = fake_recorder({"val": 0.1, "test": 4.0})
    theta, update = {"beta": torch.zeros(())}, {"beta": torch.ones(())}
    chosen = recorder.select_server_lr(theta, update, GRID)
    assert 0.05 < chosen.beta < 0.2 and recorder.selected_on_bound is False
    rows = recorder.beta_search
    assert [r["stage"] for r in rows][:4] == ["grid"] * 4
    assert {"extend-below", "refine"} <= {r["stage"] for r in rows}
    assert [r["beta"] for r in rows if r["selected"]] == [chosen.beta]
    best_val = max(r["val_mean_normalized_accuracy"] for r in rows)
    assert rows[[r["selected"] for r in rows].index(True)]["val_mean_normalized_accuracy"] == (
        best_val
    )
    best_test = max(rows, key=lambda r: r["test_mean_accuracy"])
    assert best_test["beta"] == 4.0 and not best_test["selected"]  # test is reported, not used


def test_by_default_the_search_reads_val_alone_and_tests_the_selected_beta_only():
    """search-test = "selected": every β tried is evaluated on val, test once, at the chosen β;
    its row carries the test figures, the others None."""
    recorder = fake_recorder({"val": 0.1, "test": 4.0}, search_test="selected")
    theta, update = {"beta": torch.zeros(())}, {"beta": torch.ones(())}
    chosen = recorder.select_server_lr(theta, update, GRID)
    on_test = [beta for beta, splits in recorder.asked if "test" in splits]
    assert on_test == [pytest.approx(chosen.beta)]  # the fake state holds β in float32
    assert {splits for _, splits in recorder.asked} == {("val",), ("test",)}
    rows = recorder.beta_search
    selected = [r for r in rows if r["selected"]]
    assert [r["beta"] for r in selected] == [chosen.beta]
    assert selected[0]["test_mean_accuracy"] == pytest.approx(
        1 / (1 + abs(math.log(chosen.beta / 4)))
    )
    others = [r for r in rows if not r["selected"]]
    assert others and all(r["test_mean_accuracy"] is None for r in others)
    assert all(r["test_mean_normalized_accuracy"] is None for r in others)
    # the same β is chosen as when test is evaluated at every β
    every = fake_recorder({"val": 0.1, "test": 4.0}, search_test="every")
    assert every.select_server_lr(theta, update, GRID) == chosen
    assert [r["val_mean_accuracy"] for r in every.beta_search] == [
        r["val_mean_accuracy"] for r in rows
    ]


def test_search_test_selected_and_every_give_the_same_run_bar_the_unused_test_columns(tmp_path):
    """A real one-shot run with a β grid: the same selected β, model and figures either way;
    "selected" evaluates test for one candidate instead of all of them."""
    from fl_sim.federation.evaluation import clear_cache

    runs = {}
    for mode in ("selected", "every"):
        clear_cache()
        runs[mode] = run_federation(
            InProcessGrid(T),
            config(server_lr_grid="0.3,1,3", search_test=mode, results_dir=str(tmp_path / mode)),
        )
    selected, every = runs["selected"], runs["every"]
    assert selected["selected_beta"] == every["selected_beta"]
    assert selected["selected_test"] == every["selected_test"]
    for a, b in zip(selected["rounds"], every["rounds"], strict=True):  # bar their timings
        assert a["splits"] == b["splits"] and a["mean_accuracy"] == b["mean_accuracy"]
    models = [load_file(tmp_path / mode / "global_model.safetensors") for mode in runs]
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][name], models[1][name]) for name in models[0])
    for a, b in zip(selected["beta_search"], every["beta_search"], strict=True):
        assert {k: v for k, v in a.items() if not k.startswith("test_")} == {
            k: v for k, v in b.items() if not k.startswith("test_")
        }
        if a["selected"]:
            assert a == b
        else:
            assert a["test_mean_accuracy"] is None and b["test_mean_accuracy"] is not None
    tried = len(every["beta_search"])
    T_eval = len(every["rounds"][0]["tasks"])
    assert (
        every["evaluation_cache"]["evaluated"] - selected["evaluation_cache"]["evaluated"]
        == (tried - 1) * T_eval
    )


def test_a_bad_search_test_is_a_one_line_config_error():
    with pytest.raises(
        ConfigError, match="unknown search-test 'all'; choose one of selected, every"
    ):
        config(search_test="all")


def test_prefetch_sees_each_step_before_it_is_scored_and_changes_nothing():
    """The grid, then each refinement's two neighbours, are announced before their scores are
    asked; an extension (one β) is not. The search is the same with and without it."""

    def score(candidate):
        return 1 / (1 + abs(math.log(candidate.beta / 0.3)))

    settings = SearchSettings(extend=True, max_extensions=3, refine=2)
    plain = search_server_lr(GRID, score, settings)
    events = []

    def scored(candidate):
        events.append(("score", candidate.beta))
        return score(candidate)

    fetched = search_server_lr(
        GRID,
        scored,
        settings,
        prefetch=lambda step: events.append(("fetch", [c.beta for c in step])),
    )
    assert fetched == plain
    fetches = [e for e in events if e[0] == "fetch"]
    assert fetches[0] == ("fetch", [c.beta for c in GRID])
    assert [len(f[1]) for f in fetches[1:]] == [2, 2]
    for index, event in enumerate(events):  # every announced β is scored right after
        if event[0] == "fetch":
            following = [e[1] for e in events[index + 1 : index + 1 + len(event[1])]]
            assert following == event[1]


def test_the_tables_flag_a_beta_on_a_bound():
    from fl_sim.cli.run import summary_table
    from fl_sim.experiments.compare import table

    row = {"beta": 0.5, "lambda": None, "val_mean_accuracy": 0.5}
    results = {
        "config": {"strategy": "fednova", "num-tasks": T, "num-rounds": 1},
        "eval_split": "test",
        "timings": {"total_seconds": 1.0},
        "failures": [],
        "rounds": [
            {
                "round": 0,
                "mean_accuracy": 0.5,
                "mean_normalized_accuracy": None,
                "timings": {},
                "tasks": [],
            }
        ],
        "beta_search": [
            row | {"val_mean_normalized_accuracy": 0.9, "stage": "grid", "selected": True},
            row | {"beta": 1.0, "val_mean_normalized_accuracy": 0.8, "stage": "grid"},
        ],
        "selected_beta": 0.5,
        "selected_on_bound": True,
    }
    text = summary_table(results)
    assert "← selected*" in text and "* the selected β is the smallest or largest" in text
    assert "*" not in summary_table(results | {"selected_on_bound": False})
    summary = {
        "theta0_test_accuracy": 0.1,
        "finetuned_test_accuracy": [0.9],
        "rows": [
            {
                "rule": rule,
                "mode": "one-shot",
                "beta": 0.5,
                "beta_on_bound": on_bound,
                "test_mean_accuracy": 0.5,
                "test_mean_normalized_accuracy": 0.6,
                "chi_square": 0.0,
            }
            for rule, on_bound in (("fednova", True), ("fedavg", False))
        ],
    }
    lines = table(summary).splitlines()
    assert "0.5*" in lines[2] and "0.5*" not in lines[3]
    assert lines[-1].startswith("* β on a bound of its search")


def test_the_compare_experiment_searches_beyond_its_grid(tmp_path):
    from fl_sim.experiments.compare import expand_experiment, table, write_experiment

    cfg = config(
        experiment="compare",
        rules="fedavg,task_arithmetic",
        multi_rounds=0,
        compare_beta_grid="0.5,1",
        search_max_extensions=2,
        search_refine=1,
        results_dir=str(tmp_path),
    )
    results = [run_federation(InProcessGrid(T), run) for run in expand_experiment(cfg)]
    for run in results:
        stages = [row["stage"] for row in run["beta_search"]]
        assert stages[:2] == ["grid", "grid"] and len(stages) > 2
        assert isinstance(run["selected_on_bound"], bool)
    summary = write_experiment(cfg, results)
    assert [row["beta_on_bound"] for row in summary["rows"]] == [
        run["selected_on_bound"] for run in results
    ]
    assert "task_arithmetic" in table(summary)
