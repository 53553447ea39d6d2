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
  would take plain / cores: the experiment's ratio to that is the figure of merit;
- **plain loop with the experiment's measurements** (``--same-measures``, instead): the same
  loop, plus what the experiment measures beyond it, done plainly on one thread: each client's
  θ₀ + Δ_t on its own task, a one-shot run's β search (``search_server_lr`` over the rule's
  candidates, every candidate θ₀ + β·A on every task's val split, and test at the selected β;
  with ``search-test = "every"`` test at every candidate too) and ζ² at θ₀ and at the
  final model, every evaluation and ζ² memoised by content as the experiment memoises them.
  The experiment's ratio to plain / cores is then its overhead over the same work.

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


def run_plain(sets: list[str], same_measures: bool = False) -> dict[str, object]:
    """The plain loop over every run of the experiment (module docstring), on one thread;
    with ``same_measures``, also the experiment's measurements (``plain_measures``)."""
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

    def fine_tune(suite, t, state, knobs, *, recall: bool = False, **kwargs):
        """As the update cache: content-keyed (``recall``: a look-up, not counted)."""
        key = (id(suite), t, hash_tensors(state), repr(knobs), repr(sorted(kwargs.items())))
        if key not in memo:
            counts["trained"] += 1
            memo[key] = train(suite, t, state, knobs, **kwargs)
        elif not recall:
            counts["memoised"] += 1
        return memo[key]

    reference.fine_tune = fine_tune
    start = time.perf_counter()
    try:
        suite = build_suite(config.suite_config())
        measured = PlainMeasures(suite, fine_tune) if same_measures else None
        for run in runs:
            final = reference.run_reference(
                suite,
                run.client_knobs(),
                run.rule.rule_config(None, None, 1),  # p_t and ‖a_t‖₁: per round, as Flower
                num_rounds=run.rule.num_rounds,
                server_lr=run.rule.server_lr_for(suite.num_tasks),
                a_norm_kind=run.training.a_norm,
                weighting=run.rule.weighting,
                full_batch=run.training.full_batch,
            ).state
            if measured is not None:
                measured.run(run, final)
    finally:
        reference.fine_tune = train
    extra = {}
    if measured is not None:
        extra = {"measures": measured.counts, "measures_seconds": measured.seconds}
    return {"wall_seconds": time.perf_counter() - start, "runs": len(runs), **counts, **extra}


class PlainMeasures:
    """What a run measures beyond the plain loop, done plainly (module docstring): one thread,
    evaluations and ζ² memoised by content."""

    def __init__(self, suite, fine_tune) -> None:
        self.suite, self.fine_tune = suite, fine_tune
        self.theta0 = suite.initial_state()
        self.figures: dict[tuple[str, int, str], tuple[float, float]] = {}
        self.diversity: dict[str, object] = {}
        self.counts = {"evaluated": 0, "searched": 0, "zeta": 0}
        self.seconds = 0.0  # the measurements' share of the loop's time

    def evaluate(self, state, tasks, splits=("val", "test")) -> dict[tuple[int, str], float]:
        """(task, split) → accuracy of ``state``, each triple computed once."""
        from clients.update_cache import hash_tensors
        from fl_sim.suites.base import evaluate, load_federated_state

        key = hash_tensors(state)
        model = None
        for t in tasks:
            for split in splits:
                if (key, t, split) not in self.figures:
                    if model is None:
                        model = self.suite.build_model()
                        load_federated_state(model, state)
                    self.figures[key, t, split] = evaluate(model, self.suite.eval_tasks[t], split)
                    self.counts["evaluated"] += 1
        return {(t, split): self.figures[key, t, split][1] for t in tasks for split in splits}

    def zeta(self, state, weights, batch: int) -> None:
        from clients.update_cache import hash_tensors
        from fl_sim.federation.diagnostics import measure

        key = hash_tensors(state)
        if key not in self.diversity:
            self.diversity[key] = measure(self.suite, state, weights, batch, 1)
            self.counts["zeta"] += 1

    def run(self, run, final) -> None:
        """One run's measurements: the clients' models, the β search, ζ² at θ₀ and final."""
        start = time.perf_counter()
        try:
            self._run(run, final)
        finally:
            self.seconds += time.perf_counter() - start

    def _run(self, run, final) -> None:
        from strategies.rule import client_weights
        from strategies.server_step import search_server_lr, server_step

        suite, T = self.suite, self.suite.num_tasks
        weights = client_weights(T, None).tolist()
        if run.output.diagnostic_batch > 0:
            self.zeta(self.theta0, weights, run.output.diagnostic_batch)
        own: dict[int, float] = {}
        for t, knobs in enumerate(run.client_knobs()):
            result = self.fine_tune(
                suite,
                t,
                self.theta0,
                knobs,
                recall=True,
                full_batch=run.training.full_batch,
                round_index=1,
            )
            theta_t = {k: v + result.update[k] for k, v in self.theta0.items()}
            e = suite.eval_task_of(t)
            own[e] = self.evaluate(theta_t, [e])[e, "val"]
        candidates = run.rule.search_candidates(T) if run.rule.num_rounds == 1 else []
        if candidates:
            beta0 = run.rule.server_lr_for(T)
            update = {k: (final[k] - self.theta0[k]) / beta0 for k in final}  # A

            tasks = range(len(suite.eval_tasks))
            splits = ("val", "test") if run.rule.search_test == "every" else ("val",)

            def score(candidate) -> float:
                state = server_step(self.theta0, update, candidate.beta)
                accuracy = self.evaluate(state, tasks, splits)
                self.counts["searched"] += 1
                ratios = [accuracy[e, "val"] / own[e] for e in own if own[e] > 0]
                return sum(ratios) / len(ratios)

            chosen = search_server_lr(candidates, score, run.rule.search_settings()).selected
            self.evaluate(server_step(self.theta0, update, chosen.beta), tasks, ("test",))
        if run.output.diagnostic_batch > 0:
            self.zeta(final, weights, run.output.diagnostic_batch)


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
    parser.add_argument(
        "--same-measures",
        action="store_true",
        help="the plain loop also makes the experiment's measurements (β search, ζ², clients)",
    )
    parser.add_argument("--cores", type=int, default=0, help="cores of the ideal loop (0: all)")
    parser.add_argument("--json", metavar="OUT", help="write every figure to OUT")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from fl_sim.outputs import write_json
    from fl_sim.suites.piece_lanes import cores_of_process

    cores = args.cores or cores_of_process()
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
            figures["plain"] = run_plain(args.sets, args.same_measures)
            figures["plain"]["same_measures"] = args.same_measures
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
        what = " with the experiment's measurements" if plain.get("same_measures") else ""
        lines += [
            f"plain loop{what}: {plain['wall_seconds']:.1f} s on one thread ({plain['runs']} runs, "
            f"{plain['trained']} fine-tunes, {plain['memoised']} memoised"
            + (f"; {plain['measures']}" if "measures" in plain else "")
            + ") → ideal on "
            f"{figures['cores']} cores {ideal:.1f} s; experiment / ideal "
            f"{experiment['wall_seconds'] / ideal:.2f}×",
        ]
        if "measures_seconds" in plain:  # the loop without them, as without --same-measures
            bare = (plain["wall_seconds"] - plain["measures_seconds"]) / figures["cores"]
            lines.append(
                f"  of which the measurements {plain['measures_seconds']:.1f} s; without them "
                f"the ideal loop is {bare:.1f} s and experiment / ideal "
                f"{experiment['wall_seconds'] / bare:.2f}×"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
