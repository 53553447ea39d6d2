"""``fl-sim run``: a federated run on Flower's simulation engine (Ray), started from Python.

    fl-sim run [--config FILE.toml] [--set key=value ...] [--num-supernodes N]
               [--ray-address [ADDR]] [--client-cpus N] [--client-gpus N]

The run config is parsed here, once, into a ``RunConfig``, expanded into its runs and handed to
the ServerApp object (``simulate``, fl_sim/federation/simulation.py): ``run_simulation`` gives
the app an empty ``context.run_config``, and the ServerApp runs in a thread of this process.
Clients get their knobs in each message.

What Ray reserves per simulated client is the run config's ``client-num-cpus`` and
``client-num-gpus``; ``--client-cpus N`` / ``--client-gpus N`` are shortcuts for
``--set client-num-cpus=N`` / ``--set client-num-gpus=N``. (Under ``flwr run`` these keys are
not used: the federation's ``options.backend.client-resources`` decide.)
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fl_sim.config.run_config import RunConfig, help_text
from fl_sim.federation.simulation import simulate
from strategies.registry import rule_table

RUN_DESCRIPTION = """\
With no arguments: the default experiment (experiment = "compare"): the digits suite and the
vit-digits model, 8 clients with heterogeneous learning rates (preset lr-hetero), every rule
one-shot (β chosen on val) and multi-round (5 rounds, same total steps); a table, results and
plots in results-dir. experiment = "single" runs one strategy:

Run a federation on Flower's simulation engine (Ray): T clients, client t fine-tunes task t
from the global model θʳ and returns Δ_t; the server applies θʳ⁺¹ = θʳ + β · A(Δ₁..Δ_T).
num-rounds = 1 from θ₀ is one-shot merging: with fedavg, p_t = 1/T and β = λT (or
strategy = "task_arithmetic" with lambda = λ) it is Task Arithmetic θ₀ + λ Σ_t τ_t.

Knobs come from --config FILE.toml (flat keys, or a pyproject-style [tool.flwr.app.config]
table), then --set key=value overrides; every key and its default is listed below. Results go
to results-dir: results.json, results.csv, global_model.safetensors, base.safetensors and
clients/client_<t>.safetensors (θ₀ + Δ_t of round 1, for `fl-sim merge`).

Clients cache their updates (update-cache, cache-dir): an identical run, or another rule from
the same θ₀, trains nothing. A one-shot run can pick β (server-lr-grid) or task_arithmetic's λ
(lambda-grid) on the validation split; every round is evaluated on val and test."""

RUN_EPILOG = """\
examples:
  fl-sim run                                   # the default experiment: every rule, digits
  fl-sim run --set rules=task_arithmetic,fednova --set preset=steps-hetero
  fl-sim run --set seeds=3                     # 3 training seeds: mean ± 95% CI per rule
  fl-sim run --set experiment=single --set strategy=task_arithmetic --set lambda=0.3
  fl-sim run --set experiment=single --set strategy=fednova --set num-rounds=5
  fl-sim run --config my.toml --set results-dir=runs/fednova --ray-address auto
  RAY_ADDRESS=10.0.0.5:6379 fl-sim run --set client-num-cpus=2 --set client-num-gpus=0.25
                                               # a Ray cluster; --client-cpus 2 is the same
  fl-sim run --set experiment=single --set strategy=task_arithmetic --set lambda-grid=0.1,0.2,0.3

rules (strategy = ..., or rules = "a,b,..." for compare):
{rules}
run-config keys (TOML key = default):
"""


def add_run_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "run",
        help="run a federation (fedavg, task_arithmetic, fednova, ...) on Flower simulation",
        description=RUN_DESCRIPTION,
        epilog=RUN_EPILOG.format(rules=rule_table()) + help_text(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.toml", help="run-config TOML file")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key (repeatable), e.g. --set num-rounds=3",
    )
    parser.add_argument(
        "--num-supernodes",
        type=int,
        metavar="N",
        help="simulated SuperNodes; must equal num-tasks (default: num-tasks)",
    )
    parser.add_argument(
        "--ray-address",
        nargs="?",
        const="auto",
        metavar="ADDR",
        help="run on an existing Ray cluster (`ray start --head`); without ADDR: auto "
        "(default: $RAY_ADDRESS if set, else a private local Ray)",
    )
    parser.add_argument(
        "--client-cpus",
        type=float,
        metavar="N",
        help="CPUs Ray reserves per client: shortcut for --set client-num-cpus=N, which it "
        "overrides (default: the run config's, 1: clients run in parallel up to the cores)",
    )
    parser.add_argument(
        "--client-gpus",
        type=float,
        metavar="N",
        help="GPUs Ray reserves per client, fractional allowed, e.g. 0.25: shortcut for --set "
        "client-num-gpus=N, which it overrides (default: the run config's, 0)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from results-dir/checkpoint at its last finished round (--set resume=true)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fl_sim.experiments.compare import expand_experiment, table, write_experiment

    overrides = [*args.overrides, *(["resume=true"] if args.resume else [])]
    overrides += resource_overrides(args.client_cpus, args.client_gpus)
    config = RunConfig.from_sources(args.config, overrides)
    start = time.perf_counter()
    results = simulate(
        expand_experiment(config),
        num_supernodes=args.num_supernodes,
        ray_address=args.ray_address,
        progress=not args.no_progress,
        verbose=args.verbose,
    )
    print(time_line(results, config.engine.concurrent_runs, time.perf_counter() - start))
    if config.experiment.kind == "single" and len(results) == 1:
        print(summary_table(results[0]))
        print(f"results: {Path(config.output.results_dir) / 'results.json'}")
        return 0
    if config.experiment.kind == "single":
        print(seeds_summary(config, results))
        json_path, csv_path = write_seeds_summary(config, results)
        print(f"results: {Path(config.output.results_dir) / 'seed-<s>' / 'results.json'}")
        print(f"seeds summary: {json_path}, {csv_path}")
        return 0
    summary = write_experiment(config, results)
    print(table(summary))
    root = Path(config.output.results_dir)
    print(f"results: {root / 'experiment.json'}, {root / 'experiment.csv'}")
    print(f"plots: {root / 'plots'}/")
    return 0


def time_line(
    results: Sequence[Mapping[str, object]], concurrent_runs: int = 1, wall: float | None = None
) -> str:
    """Where the runs' wall time went, summed over ``results`` (fl_sim/federation/timing.py).
    Runs driven at once overlap, so their sum exceeds the experiment's ``wall``, and a run's
    Ray/Flower part holds the time its messages queued behind another run's clients: the line
    says so."""
    from fl_sim.federation.timing import add_breakdowns, format_breakdown

    breakdowns = [run["timings"]["breakdown"] for run in results]  # type: ignore[index]
    line = format_breakdown(add_breakdowns(breakdowns))
    if len(results) == 1:
        return line
    if concurrent_runs <= 1:
        return f"{line} ({len(results)} runs)"
    overlap = f"{len(results)} runs summed, up to {concurrent_runs} at once"
    return f"{line} ({overlap}{'' if wall is None else f'; wall {wall:.1f} s'})"


def seeds_summary(config: RunConfig, results: list[Mapping[str, object]]) -> str:
    """A single experiment over several training seeds: each seed's test mean accuracy (of
    the val-chosen model when β was searched), then mean ± ci95 over the seeds."""
    from fl_sim.experiments.compare import CI_NOTE, plus_minus, summarize

    summary = summarize(config, results)
    lines = [f"{config.rule.strategy} · {len(results)} training seeds · test mean accuracy"]
    lines += [f"  seed {row['seed']}: {row['test_mean_accuracy']:.3f}" for row in summary["rows"]]
    [row] = summary["summary"]
    accuracy = plus_minus(row["test_mean_accuracy_mean"], row["test_mean_accuracy_ci95"])
    normalized = plus_minus(
        row["test_mean_normalized_accuracy_mean"], row["test_mean_normalized_accuracy_ci95"]
    )
    lines.append(
        f"mean ± 95% CI over {row['n_seeds']} seeds: acc {accuracy}, norm acc {normalized}"
    )
    lines.append(f"({CI_NOTE.split(';')[0]})")
    return "\n".join(lines)


SEEDS_SUMMARY_JSON = "seeds_summary.json"
SEEDS_SUMMARY_CSV = "seeds_summary.csv"


def write_seeds_summary(
    config: RunConfig, results: list[Mapping[str, object]]
) -> tuple[Path, Path]:
    """A single experiment over several training seeds, as files next to the seed-<s>/ folders:
    ``seeds_summary.json`` (every seed's row as in experiment.json, per-task figures included,
    then ``summary``: n_seeds, mean and ci95 over the seeds, and the CI note) and
    ``seeds_summary.csv`` (one line per seed, ``row = seed``, then a ``mean`` and a ``ci95``
    line with the same columns; per-task lists are left out). Both written atomically."""
    from fl_sim.experiments.compare import CI_NOTE, summarize
    from fl_sim.outputs import write_csv, write_json

    root = Path(config.output.results_dir)
    summary = summarize(config, results)
    [row] = summary["summary"]
    per_seed = summary["rows"]
    document = {
        "experiment": "single",
        "strategy": config.rule.strategy,
        "config": config.to_mapping(),
        "tasks": summary["tasks"],
        "seeds": summary["seeds"],
        "theta0_test_accuracy": summary["theta0_test_accuracy"],
        "rows": per_seed,
        "summary": row,
        "ci95": CI_NOTE,
    }
    json_path = root / SEEDS_SUMMARY_JSON
    write_json(json_path, document)
    scalar = [k for k in per_seed[0] if not isinstance(per_seed[0][k], (list, dict))]
    lines: list[dict[str, object]] = [
        {"row": "seed", **{k: r[k] for k in scalar}} for r in per_seed
    ]
    for kind in ("mean", "ci95"):
        line: dict[str, object] = {"row": kind, "n_seeds": row["n_seeds"]}
        for column in ("test_mean_accuracy", "test_mean_normalized_accuracy"):
            line[column] = row[f"{column}_{kind}"]
        lines.append(line)
    csv_path = root / SEEDS_SUMMARY_CSV
    write_csv(csv_path, lines, ["row", *scalar, "n_seeds"])
    return json_path, csv_path


def resource_overrides(client_cpus: float | None, client_gpus: float | None) -> list[str]:
    """``--client-cpus`` / ``--client-gpus`` as ``--set`` overrides (None: keep the config's)."""
    overrides = []
    if client_cpus is not None:
        overrides.append(f"client-num-cpus={float(client_cpus)!r}")
    if client_gpus is not None:
        overrides.append(f"client-num-gpus={float(client_gpus)!r}")
    return overrides


def summary_table(results: Mapping[str, object]) -> str:
    """Per round: mean accuracy, mean normalised accuracy, χ², aggregation time, failures."""
    config = results["config"]
    lines = [
        f"{config['strategy']} · {config['num-tasks']} clients · {config['num-rounds']} round(s) "
        f"· split {results['eval_split']} · {results['timings']['total_seconds']:.1f} s",
        f"{'round':>5}  {'acc':>6}  {'norm acc':>8}  {'χ²(p‖w)':>8}  {'agg s':>7}  {'failed':>6}",
    ]
    failures = results["failures"]
    for entry in results["rounds"]:
        r = entry["round"]
        training = entry.get("training") or {}
        norm = entry["mean_normalized_accuracy"]
        chi2 = training.get("chi_square")
        agg = entry["timings"].get("aggregation_seconds")
        failed = sum(1 for f in failures if f["round"] == r)
        lines.append(
            f"{r:>5}  {entry['mean_accuracy']:>6.3f}  "
            f"{'-' if norm is None else f'{norm:.3f}':>8}  "
            f"{'-' if chi2 is None else f'{chi2:.4f}':>8}  "
            f"{'-' if agg is None else f'{agg:.4f}':>7}  {failed if r else '-':>6}"
        )
    final = results["rounds"][-1]
    lines.append(
        "final per task: " + ", ".join(f"{x['name']} {x['accuracy']:.3f}" for x in final["tasks"])
    )
    on_bound = bool(results.get("selected_on_bound"))
    for row in sorted(results.get("beta_search") or [], key=lambda r: r["beta"]):
        knob = f"λ {row['lambda']:g} (β {row['beta']:g})" if row["lambda"] else f"β {row['beta']:g}"
        norm = row["val_mean_normalized_accuracy"]
        selected = row.get("selected", row["beta"] == results["selected_beta"])
        chosen = f"  ← selected{'*' if on_bound else ''}" if selected else ""
        lines.append(
            f"search {knob} [{row.get('stage', 'grid')}]: val acc {row['val_mean_accuracy']:.3f}, "
            f"val norm acc {'-' if norm is None else f'{norm:.3f}'}{chosen}"
        )
    if results.get("beta_search") and on_bound:
        lines.append(
            "* the selected β is the smallest or largest tried: the optimum may lie beyond "
            "(raise search-max-extensions or widen the grid)"
        )
    if results.get("selected_test"):
        test = results["selected_test"]
        norm = test["mean_normalized_accuracy"]
        lines.append(
            f"selected model on test: acc {test['mean_accuracy']:.3f}, "
            f"norm acc {'-' if norm is None else f'{norm:.3f}'}"
        )
    diagnostics = results.get("diagnostics") or {}
    ratios = {label: (diagnostics.get(label) or {}).get("ratio") for label in ("round_0", "final")}
    if any(r is not None for r in ratios.values()):
        lines.append(
            "gradient diversity ζ²/Σp‖g‖²: "
            + ", ".join(f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in ratios.items())
        )
    cache = results.get("update_cache") or {}
    if cache.get("enabled"):
        lines.append(f"update cache: {cache['trained']} trained, {cache['cached']} cached")
    return "\n".join(lines)
