"""A whole `fl-sim run` experiment against the plain loop doing the same client work, and against
an earlier revision of fl-sim, in one run.

    python benchmarks/bench_experiment.py                       # the default digits experiment
    python benchmarks/bench_experiment.py --set task-suite=text --set model=minilm \\
        --set num-tasks=5 --set multi-rounds=3 --baseline-rev 8f6d1f9 --no-plain

Each side starts from an empty update cache in its own folder, so every client trains as in a
first run:

- **experiment**: the `fl-sim run` command with the given ``--set`` keys, in a subprocess: its
  wall time, the machine's CPU share while it runs (busy / (wall × cores), from /proc/stat: the
  whole machine, so other work running beside it counts too) and the time line it prints
  (client training, Ray/Flower, aggregation, evaluation, diagnostics, other);
- **baseline** (``--baseline-rev REV``): the same command from a `git worktree` of REV (its
  modules ahead of this checkout's on PYTHONPATH, the same virtualenv), the same figures, and
  whether both gave the same table (their experiment.csv's test accuracies side by side);
- **plain loop** (unless ``--no-plain``): the experiment's client work through
  ``fl_sim.federation.reference.run_reference`` (no Flower, no Ray, one thread, in this process)
  for every run of ``expand_experiment``, with client fine-tunes memoised as the update cache
  memoises them (one-shot rules share the clients' θ₀ + Δ_t; multi-round rules share round 1),
  and its own per-round evaluation; no β search. An ideally parallel loop on ``cores`` cores
  would take plain / cores: the experiment's ratio to that is the figure of merit.

Ratios are taken within the run (machines here are noisy); the JSON (``--json OUT``) keeps every
figure.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def cpu_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat's first line."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def run_experiment(sets: list[str], work: Path, pythonpath: Path | None) -> dict[str, object]:
    """`fl-sim run` with ``sets`` into ``work``: wall seconds, CPU share, its time line."""
    work.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-c",
        "import sys; from fl_sim.cli.main import main; sys.exit(main())",
        "run",
        "--no-progress",
        *(arg for s in sets for arg in ("--set", s)),
        "--set",
        f"results-dir={work / 'results'}",
        "--set",
        f"cache-dir={work / 'cache'}",
    ]
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
    busy0, total0 = cpu_ticks()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - start
    busy1, total1 = cpu_ticks()
    (work / "stdout.txt").write_text(done.stdout)
    (work / "stderr.txt").write_text(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"fl-sim run failed ({done.returncode}); see {work / 'stderr.txt'}")
    lines = [line for line in done.stdout.splitlines() if line.startswith("time ")]
    return {
        "wall_seconds": wall,
        "cpu_share": (busy1 - busy0) / max(total1 - total0, 1),
        "time_line": lines[-1] if lines else None,
        "table": read_table(work / "results" / "experiment.csv"),
    }


def read_table(path: Path) -> dict[str, float]:
    """rule/mode/seed → test mean accuracy, from an experiment.csv."""
    if not path.is_file():
        return {}
    with path.open(newline="") as handle:
        return {
            f"{row['rule']}/{row['mode']}/{row.get('seed', '')}": float(row["test_mean_accuracy"])
            for row in csv.DictReader(handle)
        }


def run_plain(sets: list[str]) -> dict[str, object]:
    """The plain loop over every run of the experiment (module docstring), on one thread."""
    import torch

    import fl_sim.federation.reference as reference
    from clients.update_cache import hash_tensors
    from fl_sim.config.run_config import RunConfig
    from fl_sim.experiments.compare import expand_experiment
    from fl_sim.suites.registry import build_suite

    torch.set_num_threads(1)  # as every client
    config = RunConfig.from_sources(None, sets)
    runs = expand_experiment(config)
    train = reference.fine_tune
    memo: dict[tuple[object, ...], object] = {}
    counts = {"trained": 0, "memoised": 0}

    def fine_tune(suite, t, state, knobs, **kwargs):  # as the update cache: content-keyed
        key = (id(suite), t, hash_tensors(state), repr(knobs), repr(sorted(kwargs.items())))
        if key not in memo:
            counts["trained"] += 1
            memo[key] = train(suite, t, state, knobs, **kwargs)
        else:
            counts["memoised"] += 1
        return memo[key]

    reference.fine_tune = fine_tune
    start = time.perf_counter()
    try:
        suite = build_suite(config.suite_config())
        for run in runs:
            reference.run_reference(
                suite,
                run.client_knobs(),
                run.rule.rule_config(None, None, 1),  # p_t and ‖a_t‖₁: per round, as Flower
                num_rounds=run.rule.num_rounds,
                server_lr=run.rule.server_lr_for(suite.num_tasks),
                a_norm_kind=run.training.a_norm,
                weighting=run.rule.weighting,
                full_batch=run.training.full_batch,
            )
    finally:
        reference.fine_tune = train
    return {"wall_seconds": time.perf_counter() - start, "runs": len(runs), **counts}


def worktree(rev: str, where: Path) -> Path:
    """A detached `git worktree` of ``rev`` at ``where`` (removed by ``drop_worktree``)."""
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(where), rev],
        check=True,
        capture_output=True,
    )
    return where


def drop_worktree(where: Path) -> None:
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(where)],
        check=False,
        capture_output=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="time a whole fl-sim run experiment against the plain loop doing the same "
        "client work (ideally parallel over the cores) and, optionally, an earlier revision",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[1],
    )
    parser.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config key for every side (repeatable), as in fl-sim run --set",
    )
    parser.add_argument("--baseline-rev", metavar="REV", help="also run REV's fl-sim (git)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain loop")
    parser.add_argument("--cores", type=int, default=0, help="cores of the ideal loop (0: all)")
    parser.add_argument("--json", metavar="OUT", help="write every figure to OUT")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from fl_sim.federation.evaluation import free_cores
    from fl_sim.outputs import write_json

    cores = args.cores or free_cores()
    work = Path(args.keep or tempfile.mkdtemp(prefix="fl-sim-bench-experiment-"))
    figures: dict[str, object] = {"sets": args.sets, "cores": cores}
    try:
        figures["experiment"] = run_experiment(args.sets, work / "experiment", None)
        print(f"experiment: {figures['experiment']['wall_seconds']:.1f} s", flush=True)
        if args.baseline_rev:
            tree = worktree(args.baseline_rev, work / "baseline-tree")
            try:
                figures["baseline"] = run_experiment(args.sets, work / "baseline", tree)
            finally:
                drop_worktree(tree)
            figures["baseline"]["rev"] = args.baseline_rev
            print(f"baseline {args.baseline_rev}: {figures['baseline']['wall_seconds']:.1f} s")
        if not args.no_plain:
            figures["plain"] = run_plain(args.sets)
            print(f"plain loop: {figures['plain']['wall_seconds']:.1f} s", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(report(figures))
    if args.json:
        write_json(Path(args.json), figures)
    return 0


def report(figures: dict[str, object]) -> str:
    experiment = figures["experiment"]
    lines = [
        f"experiment ({' '.join(figures['sets']) or 'defaults'}): "
        f"{experiment['wall_seconds']:.1f} s, CPU share {experiment['cpu_share']:.0%}",
        f"  {experiment['time_line']}",
    ]
    if "baseline" in figures:
        base = figures["baseline"]
        same = [
            abs(base["table"][k] - experiment["table"][k])
            for k in base["table"]
            if k in experiment["table"]
        ]
        speedup = base["wall_seconds"] / experiment["wall_seconds"]
        lines += [
            f"baseline {base['rev']}: {base['wall_seconds']:.1f} s, CPU share "
            f"{base['cpu_share']:.0%} → speed-up {speedup:.2f}×",
            f"  {base['time_line'] or '(no time line at that revision)'}",
            f"  tables: {len(same)} rows in both, max |Δ test acc| "
            f"{max(same) if same else float('nan'):.4f}",
        ]
    if "plain" in figures:
        plain = figures["plain"]
        ideal = plain["wall_seconds"] / figures["cores"]
        lines += [
            f"plain loop: {plain['wall_seconds']:.1f} s on one thread ({plain['runs']} runs, "
            f"{plain['trained']} fine-tunes, {plain['memoised']} memoised) → ideal on "
            f"{figures['cores']} cores {ideal:.1f} s; experiment / ideal "
            f"{experiment['wall_seconds'] / ideal:.2f}×",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
