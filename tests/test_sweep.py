"""``fl-sim sweep``: grids from TOML and flags, validated points, resume by content, sweep.csv.

The fast tests replace ``fl_sim.experiments.sweep.run_group`` (the one call that starts Ray) with a
fake that writes results.json / results.csv the way ``run_federation`` does, so resume logic is
tested without Ray. The slow test runs the real engine in a subprocess, SIGKILLs it once the
first point is finished, and resumes.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fl_sim.cli.main import main as cli_main
from fl_sim.config.run_config import RunConfig
from fl_sim.errors import ConfigError, FlSimError
from fl_sim.experiments import sweep
from fl_sim.experiments.sweep import (
    SweepSpec,
    build_spec,
    expand_sweep,
    parse_grid_flag,
    point_finished,
    point_slug,
    run_sweep,
)
from fl_sim.outputs import write_atomically

REPO = Path(__file__).resolve().parents[1]
TOY = {
    "task-suite": "toy",
    "optimizer": "sgd",
    "preset": "none",
    "lr": 0.05,
    "local-steps": 4,
    "num-tasks": 2,
    "rules": "fedavg,fednova",
    "multi-rounds": 2,
    "compare-beta-grid": "1,2",
    "diagnostic-batch": 0,
}
TOY_SINGLE = {
    "task-suite": "toy",
    "experiment": "single",
    "optimizer": "sgd",
    "preset": "none",
    "lr": 0.05,
    "local-steps": 5,
    "num-tasks": 2,
}


@pytest.fixture(autouse=True)
def isolated_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FL_SIM_CACHE", str(tmp_path / "fl-sim-cache"))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")


def set_flags(values: dict[str, object]) -> list[str]:
    return [flag for key, value in values.items() for flag in ("--set", f"{key}={value}")]


def spec(grid: dict, **base: object) -> SweepSpec:
    return SweepSpec(base={**TOY, **base}, grid=grid)


# ---------------------------------------------------------------------------------------------
# A fake engine: results files shaped like run_federation's
# ---------------------------------------------------------------------------------------------


def fake_results(run: RunConfig) -> dict[str, object]:
    """What run_federation writes, with accuracies that depend on the knobs (deterministic)."""
    T = run.suite.num_tasks
    tasks = [f"toy{t}" for t in range(T)]
    own = [0.9] * T
    merged = (
        0.5
        + 0.1 * run.rule.knobs["fedgma"].rho
        + 0.05 * run.rule.num_rounds
        + (0.01 if run.rule.strategy == "fednova" else 0)
    )

    def split(accuracy: float) -> dict[str, object]:
        return {
            "mean_accuracy": accuracy,
            "mean_normalized_accuracy": accuracy / 0.9,
            "tasks": [{"name": n, "accuracy": accuracy} for n in tasks],
        }

    rounds = [{"round": 0, "splits": {"val": split(0.3), "test": split(0.3)}}]
    for r in range(1, run.rule.num_rounds + 1):
        rounds.append(
            {
                "round": r,
                "splits": {"val": split(merged), "test": split(merged)},
                "training": {
                    "server_lr": run.rule.server_lr,
                    "chi_square": 0.0,
                    "weights": [1 / T] * T,
                    "effective_weights": [1 / T] * T,
                },
            }
        )
    search = run.rule.server_lr_candidates()
    return {
        "status": "completed",
        "error": None,
        "config": run.to_mapping(),
        "tasks": tasks,
        "finetuned_splits": {
            s: {str(t): {"accuracy": a} for t, a in enumerate(own)} for s in ("val", "test")
        },
        "rounds": rounds,
        "beta_search": [{"beta": b, "val_mean_normalized_accuracy": merged} for b in search]
        or None,
        "selected_beta": search[0] if search else None,
        "selected_lambda": None,
        "selected_test": None,
        "diagnostics": None,
        "update_cache": {"trained": T, "cached": 0},
        "timings": {"total_seconds": 0.25},
    }


def write_fake_run(run: RunConfig) -> None:
    folder = Path(run.output.results_dir)
    write_atomically(folder / "results.json", json.dumps(fake_results(run)))
    write_atomically(folder / "results.csv", "round,task\n")


class FakeEngine:
    """Stands in for ``run_group``; ``stop_after`` runs, it raises like a kill would stop it."""

    def __init__(self, stop_after: int | None = None, error: Exception | None = None) -> None:
        self.calls: list[list[str]] = []
        self.stop_after = stop_after
        self.error = error or KeyboardInterrupt()

    def __call__(self, configs, **kwargs) -> None:
        self.calls.append([c.output.results_dir for c in configs])
        for i, run in enumerate(configs):
            if self.stop_after is not None and i == self.stop_after:
                Path(run.output.results_dir).mkdir(parents=True, exist_ok=True)  # a run in flight
                (Path(run.output.results_dir) / "base.safetensors").write_bytes(b"partial")
                raise self.error
            write_fake_run(run)


@pytest.fixture
def engine(monkeypatch):
    def install(**kwargs) -> FakeEngine:
        fake = FakeEngine(**kwargs)
        monkeypatch.setattr(sweep, "run_group", fake)
        return fake

    return install


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# ---------------------------------------------------------------------------------------------
# Grids, points and slugs
# ---------------------------------------------------------------------------------------------


def test_grid_from_toml_and_flags_is_the_cartesian_product(tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text(
        '[base]\ntask-suite = "toy"\nnum-tasks = 2\nlr = 0.01\n\n'
        '[grid]\npreset = ["homogeneous", "lr-hetero", "both"]\nmulti-rounds = [1, 3]\n'
    )
    built = build_spec(toml, ["rho=0.2,0.8"], ["seed=3"])
    assert built.base == {"task-suite": "toy", "num-tasks": 2, "lr": 0.01, "seed": 3}
    assert built.grid == {
        "preset": ["homogeneous", "lr-hetero", "both"],
        "multi-rounds": [1, 3],
        "rho": [0.2, 0.8],
    }
    points = expand_sweep(built, tmp_path / "out")
    assert len(points) == 3 * 2 * 2
    assert [p.values for p in points[:3]] == [  # the first grid key varies slowest
        {"preset": "homogeneous", "multi-rounds": 1, "rho": 0.2},
        {"preset": "homogeneous", "multi-rounds": 1, "rho": 0.8},
        {"preset": "homogeneous", "multi-rounds": 3, "rho": 0.2},
    ]
    last = points[-1]
    assert (
        last.config.training.preset,
        last.config.experiment.multi_rounds,
        last.config.rule.knobs["fedgma"].rho,
    ) == ("both", 3, 0.8)
    assert (last.config.suite.seed, last.config.training.lr, last.config.experiment.kind) == (
        3,
        0.01,
        "compare",
    )
    assert last.slug == "multi-rounds=3__preset=both__rho=0.8"
    assert last.folder == tmp_path / "out" / "points" / last.slug
    assert len({p.slug for p in points}) == len(points)


def test_a_grid_flag_replaces_the_files_values_and_reads_toml_lists(tmp_path):
    toml = tmp_path / "sweep.toml"
    toml.write_text('[tool.flwr.app.config]\nresults-dir = "ignored"\n[grid]\nrho = [0.1]\n')
    built = build_spec(toml, ["rho=0.3,0.6", 'lr=["0.1,0.05", 0.1]', "preset=both,none"])
    assert built.base == {}  # results-dir is the sweep's
    assert built.grid == {"rho": [0.3, 0.6], "lr": ["0.1,0.05", 0.1], "preset": ["both", "none"]}
    assert parse_grid_flag("full-batch=true,false") == ("full-batch", [True, False])
    assert parse_grid_flag("lr=log:1e-4:1e-2,1e-3") == ("lr", ["log:1e-4:1e-2", 1e-3])


def test_slugs_are_stable_filesystem_safe_and_distinct():
    assert point_slug({"rho": 0.5, "preset": "both"}) == "preset=both__rho=0.5"
    assert point_slug({"preset": "both", "rho": 0.5}) == "preset=both__rho=0.5"  # key order
    assert point_slug({"full-batch": True, "multi-rounds": 3}) == "full-batch=true__multi-rounds=3"
    lossy = point_slug({"lr": "log:1e-4:1e-2"})
    assert lossy.startswith("lr=log-1e-4-1e-2-") and len(lossy) == len("lr=log-1e-4-1e-2-") + 8
    assert lossy == point_slug({"lr": "log:1e-4:1e-2"})  # the same every time
    assert point_slug({"lr": "log-1e-4-1e-2"}) != lossy  # no two points share a folder
    assert point_slug({"lr": "a/b"}) != point_slug({"lr": "a:b"})
    assert "/" not in point_slug({"lr": "a/b"})
    long = point_slug({"rules": "task_arithmetic,fedavg,fednova,fedgma,median,cclip" * 3})
    assert len(long) <= 120


@pytest.mark.parametrize(
    ("grid", "flags", "message"),
    [
        ({"rho": [0.5, 1.5]}, [], "sweep point rho=1.5: fedgma: rho must be in [0, 1], got 1.5"),
        ({"multi-rounds": [1, -1]}, [], "sweep point multi-rounds=-1: multi-rounds must be"),
        ({"preset": ["both", "wild"]}, [], "sweep point preset=wild: unknown preset 'wild'"),
        ({"rhoo": [0.5]}, [], "sweep grid: unknown run-config key 'rhoo'"),
        ({"results-dir": ["a", "b"]}, [], "sweep grid: results-dir is set by the sweep"),
        ({"rho": [0.5, 0.5]}, [], "sweep points rho=0.5 and rho=0.5 are the same point"),
        ({}, [], "sweep: the grid is empty"),
        ({"rho": [0.5]}, ["rho=0.2"], "--set rho and the grid both set rho"),
        ({"rho": [0.5]}, ["results-dir=x"], "--set results-dir: the sweep sets it"),
    ],
)
def test_an_invalid_point_is_a_one_line_error_before_anything_runs(
    tmp_path, engine, grid, flags, message
):
    fake = engine()
    toml = tmp_path / "sweep.toml"
    lines = [f"{k} = {json.dumps(v)}" for k, v in grid.items()]
    toml.write_text('[base]\ntask-suite = "toy"\nnum-tasks = 2\n[grid]\n' + "\n".join(lines))
    with pytest.raises(ConfigError) as error:
        run_sweep(build_spec(toml, [], flags), tmp_path / "out", progress=False, log=lambda _: None)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
    assert fake.calls == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[grid]\nrho = 0.5\n", "grid key rho needs a non-empty list"),
        ("[grid]\nrho = []\n", "grid key rho needs a non-empty list"),
        ("[grids]\nrho = [0.5]\n", "unknown table [grids]; use [base] and [grid]"),
        ("[grid\n", "is not valid TOML"),
    ],
)
def test_a_bad_sweep_toml_is_a_one_line_error(tmp_path, text, message):
    toml = tmp_path / "sweep.toml"
    toml.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build_spec(toml)


def test_grid_flags_without_values_are_one_line_errors():
    for text in ("rho", "rho=", "=0.5", "rho=0.5,,0.6", "lr=[1,"):
        with pytest.raises(ConfigError) as error:
            parse_grid_flag(text)
        assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Running and resuming (fake engine)
# ---------------------------------------------------------------------------------------------


def test_a_finished_sweep_is_skipped_on_resume(tmp_path, engine, capsys):
    fake = engine()
    out = tmp_path / "out"
    outcome = run_sweep(spec({"rho": [0.2, 0.8]}), out, progress=False)
    assert outcome.finished == ["rho=0.2", "rho=0.8"] and not outcome.failed
    assert len(fake.calls) == 1 and len(fake.calls[0]) == 2 * 4  # one group: both points' runs
    points = expand_sweep(spec({"rho": [0.2, 0.8]}), out)
    assert all(point_finished(p) for p in points)
    before = mtimes(out / "points")

    outcome = run_sweep(spec({"rho": [0.2, 0.8]}), out, resume=True, progress=False)
    assert "skipping 2 finished points" in capsys.readouterr().out
    assert len(fake.calls) == 1  # nothing ran
    assert outcome.skipped == ["rho=0.2", "rho=0.8"]
    assert mtimes(out / "points") == before
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["status"] == "finished"
    assert [p["status"] for p in manifest["points"]] == ["finished", "finished"]


def test_a_sweep_stopped_midway_reruns_only_what_did_not_finish(tmp_path, engine, capsys):
    grid = {"rho": [0.2, 0.5, 0.8]}
    out = tmp_path / "out"
    # killed in point 2's third run: point 1's runs and point 2's first two are on disk
    fake = engine(stop_after=4 + 2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(spec(grid), out, progress=False)
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["running"] * 3
    assert not any(point_finished(p) for p in expand_sweep(spec(grid), out))
    partial = out / "points" / "rho=0.5" / "multi-round" / "fedavg" / "base.safetensors"
    assert partial.exists()
    kept = mtimes(out / "points" / "rho=0.2")

    fake = engine()
    with pytest.raises(FlSimError, match="already holds a sweep: add --resume"):
        run_sweep(spec(grid), out, progress=False)
    outcome = run_sweep(spec(grid), out, resume=True, progress=False)
    printed = capsys.readouterr().out
    assert "skipping" not in printed and "6 finished run(s) kept" in printed
    ran = [Path(d).relative_to(out / "points") for d in fake.calls[0]]
    assert [str(d) for d in ran[:2]] == [
        "rho=0.5/multi-round/fedavg",
        "rho=0.5/multi-round/fednova",
    ]
    assert all(str(d).startswith("rho=0.8/") for d in ran[2:]) and len(ran) == 2 + 4
    assert not partial.exists()  # the run in flight was discarded, then rerun
    assert (partial.parent / "results.json").exists()
    assert outcome.finished == ["rho=0.2", "rho=0.5", "rho=0.8"]
    # point 1 lost nothing: its runs are untouched; only its experiment files are new
    after = mtimes(out / "points" / "rho=0.2")
    assert {k: v for k, v in after.items() if k in kept} == kept
    assert "experiment.json" in after
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["kept_runs"] for p in manifest["points"]] == [4, 2, 0]

    run_sweep(spec(grid), out, resume=True, progress=False)
    assert "skipping 3 finished points" in capsys.readouterr().out
    assert len(fake.calls) == 1


def test_a_point_whose_stored_config_differs_is_rerun(tmp_path, engine, capsys):
    fake = engine()
    out = tmp_path / "out"
    grid = {"rho": [0.2, 0.8]}
    run_sweep(spec(grid), out, progress=False)
    # the stored config of point rho=0.8 is another run's (e.g. written with another lr)
    point = out / "points" / "rho=0.8"
    for path in [point / "experiment.json", *point.rglob("results.json")]:
        document = json.loads(path.read_text())
        document["config"]["lr"] = 0.5
        path.write_text(json.dumps(document))
    (point / "stale.txt").write_text("left by the other run")
    run_sweep(spec(grid), out, resume=True, progress=False)
    assert "skipping 1 finished point\n" in capsys.readouterr().out
    assert len(fake.calls) == 2 and all("rho=0.8" in d for d in fake.calls[1])
    assert len(fake.calls[1]) == 4 and not (point / "stale.txt").exists()
    assert json.loads((point / "experiment.json").read_text())["config"]["lr"] == 0.05

    # changing the base changes every point: all rerun
    run_sweep(spec(grid, lr=0.1), out, resume=True, progress=False)
    assert "skipping" not in capsys.readouterr().out
    assert len(fake.calls[2]) == 8


def test_a_failed_group_keeps_the_points_that_finished(tmp_path, engine):
    from strategies.flower_strategy import FederationError

    engine(stop_after=4, error=FederationError("round 1: only 1 of 2 clients delivered"))
    out = tmp_path / "out"
    outcome = run_sweep(spec({"rho": [0.2, 0.8]}), out, progress=False)
    assert outcome.finished == ["rho=0.2"]
    assert outcome.failed == {"rho=0.8": "round 1: only 1 of 2 clients delivered"}
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert {r["point"] for r in rows} == {"rho=0.2"}
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["status"] == "failed"
    assert manifest["points"][1]["error"] == "round 1: only 1 of 2 clients delivered"


def test_points_of_different_federations_run_in_separate_groups(tmp_path, engine):
    fake = engine()
    run_sweep(spec({"seed": [0, 1], "rho": [0.2, 0.8]}), tmp_path / "out", progress=False)
    assert len(fake.calls) == 2  # one Ray start per (task-suite, num-tasks, seed)
    assert all("seed=0" in d for d in fake.calls[0]) and len(fake.calls[0]) == 8
    assert all("seed=1" in d for d in fake.calls[1])


# ---------------------------------------------------------------------------------------------
# sweep.csv and plots
# ---------------------------------------------------------------------------------------------


def test_sweep_csv_has_a_row_per_point_rule_and_mode_and_a_plot_per_knob(tmp_path, engine):
    engine()
    out = tmp_path / "out"
    outcome = run_sweep(
        spec({"rho": [0.2, 0.8], "preset": ["none", "homogeneous"]}), out, progress=False
    )
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 4 * 2 * 2  # points × rules × (one-shot, multi-round)
    header = list(rows[0])
    assert header[:3] == ["rho", "preset", "point"]
    for column in (
        "rule",
        "mode",
        "beta",
        "selected_lambda",
        "test_mean_accuracy",
        "test_mean_normalized_accuracy",
        "chi_square",
        "zeta_square_ratio_theta0",
        "zeta_square_ratio_final",
        "seconds",
    ):
        assert column in header
    row = next(r for r in rows if r["point"] == "preset=none__rho=0.8" and r["mode"] == "one-shot")
    assert (row["rho"], row["preset"], row["rule"]) == ("0.8", "none", "fedavg")
    assert float(row["test_mean_accuracy"]) == pytest.approx(0.5 + 0.08 + 0.05)
    assert float(row["test_mean_normalized_accuracy"]) == pytest.approx(0.63 / 0.9)
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["normalized_accuracy_vs_preset.png", "normalized_accuracy_vs_rho.png"]
    for name in plots:
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(str(p.name) for p in outcome.plots) == plots
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["files"]["plots"] == [f"plots/{n}" for n in reversed(plots)]


def test_single_points_give_one_row_each(tmp_path, engine):
    engine()
    out = tmp_path / "out"
    run_sweep(
        SweepSpec(base=TOY_SINGLE, grid={"num-rounds": [1, 3]}), out, progress=False, log=print
    )
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["num-rounds"], r["rule"], r["mode"]) for r in rows] == [
        ("1", "fedavg", "one-shot"),
        ("3", "fedavg", "multi-round"),
    ]
    assert (out / "plots" / "normalized_accuracy_vs_num-rounds.png").exists()


def test_cli_help_dry_run_and_errors(tmp_path, capsys, engine):
    with pytest.raises(SystemExit) as done:
        cli_main(["sweep", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for needle in ("SWEEP.toml", "[grid]", "--resume", "sweep.csv", "DIR/points/<slug>"):
        assert needle in text
    fake = engine()
    argv = ["sweep", "--set", "task-suite=toy", "--set", "num-tasks=2", "--out", str(tmp_path)]
    assert cli_main([*argv, "--grid", "rho=0.2,0.8", "--dry-run"]) == 0
    assert "rho=0.2  (compare, 12 runs, to run)" in capsys.readouterr().out
    assert cli_main([*argv, "--grid", "rho=0.2,1.2"]) == 2
    assert capsys.readouterr().err == (
        "fl-sim: error: sweep point rho=1.2: fedgma: rho must be in [0, 1], got 1.2 "
        "(run config: rho = 0.5; fl-sim merge: --rho 0.5 or parameters: {rho: 0.5})\n"
    )
    assert fake.calls == []
    # --resume alone reads the grid back from sweep.json
    out = str(tmp_path / "s")
    argv = ["sweep", *set_flags(TOY)]
    assert cli_main([*argv, "--grid", "rho=0.2,0.8", "--out", out, "--no-progress"]) == 0
    assert cli_main(["sweep", "--out", out, "--resume", "--no-progress"]) == 0
    assert "skipping 2 finished points" in capsys.readouterr().out
    assert len(fake.calls) == 1


# ---------------------------------------------------------------------------------------------
# The real engine: SIGKILL after the first point, then resume
# ---------------------------------------------------------------------------------------------


def _session_pids(session: int) -> list[int]:
    """Processes still in the killed sweep's session (Ray's, if any outlived it)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session:  # stat field 6: session id
                pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_sweep_killed_after_its_first_point_resumes_without_redoing_it(tmp_path):
    out = tmp_path / "sweep"
    env = {
        **os.environ,
        "FL_SIM_CACHE": str(tmp_path / "cache"),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    sets = set_flags(TOY_SINGLE)
    command = [sys.executable, "-m", "fl_sim.cli.main", "sweep", *sets, "--grid", "num-rounds=1,3"]
    command += ["--out", str(out), "--no-progress"]
    first = out / "points" / "num-rounds=1"
    second = out / "points" / "num-rounds=3"

    log = (tmp_path / "first.log").open("w")
    start = time.monotonic()
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        while not sweep.run_finished(
            RunConfig.from_mapping({**TOY_SINGLE, "num-rounds": 1, "results-dir": str(first)})
        ):
            assert process.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() - start < 300, "the first point did not finish in 300 s"
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)  # the whole sweep, mid-way through point 2
    finally:
        process.kill()
        process.wait()
        for pid in _session_pids(process.pid):
            os.kill(pid, signal.SIGKILL)
        log.close()
    killed_after = time.monotonic() - start
    assert not (second / "results.json").exists()
    finished_files = mtimes(first)
    assert "results.json" in finished_files and "global_model.safetensors" in finished_files

    start = time.monotonic()
    resumed = subprocess.run(
        [
            sys.executable,
            "-m",
            "fl_sim.cli.main",
            "sweep",
            "--out",
            str(out),
            "--resume",
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    resumed_after = time.monotonic() - start
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "skipping 1 finished point\n" in resumed.stdout
    assert mtimes(first) == finished_files  # the finished point was not redone
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [(r["num-rounds"], r["rule"], r["mode"]) for r in rows] == [
        ("1", "fedavg", "one-shot"),
        ("3", "fedavg", "multi-round"),
    ]
    assert all(0 < float(r["test_mean_accuracy"]) <= 1 for r in rows)
    manifest = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in manifest["points"]] == ["finished", "finished"]
    assert (out / "plots" / "normalized_accuracy_vs_num-rounds.png").exists()
    print(f"killed after {killed_after:.1f} s, resumed in {resumed_after:.1f} s")
