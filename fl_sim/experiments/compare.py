"""The compare experiment: every rule, one-shot and multi-round, on one federation.

``experiment = "compare"`` (the default of ``fl-sim run``) expands one RunConfig into runs that
share the federation, the clients and their knobs:

- one-shot, per rule: one round from θ₀ with ``local-steps`` steps; β is picked on the VAL split
  from ``compare-beta-grid`` (task_arithmetic searches λ = β/T, so θ = θ₀ + λ Σ_t τ_t). Every
  client fine-tunes once: the update cache answers the other rules (fine-tune once, merge many);
- multi-round, per rule: ``multi-rounds`` rounds of ``local-steps / multi-rounds`` steps (the
  same total), β = ``multi-round-server-lr``.

cclip without a ``tau-c`` uses ``tau-c-auto`` (τ_c = the round's median ‖Δ_t − v₀‖₂). Then
``write_experiment`` gathers the runs into ``experiment.json``/``experiment.csv``, the table that
``fl-sim run`` prints, and PNG plots. Test accuracy is reported only for models chosen on val.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from fl_sim.config.run_config import RunConfig
from fl_sim.experiments import plots
from strategies.registry import rule_spec

ONE_SHOT, MULTI_ROUND = "one-shot", "multi-round"


def expand_experiment(config: RunConfig) -> list[RunConfig]:
    """The runs of ``config``: itself for ``single``, the compare grid for ``compare``; each
    once per training seed of ``seeds`` (in ``seed-<s>/`` when there is more than ``seed``)."""
    experiment = config.experiment
    repeats = seed_repeats(config)
    root = Path(config.output.results_dir)
    if experiment.kind == "single":
        if repeats == [({}, "")]:
            return [config]
        return [config.updated({**c, "results-dir": str(root / sub)}) for c, sub in repeats]
    grid = experiment.beta_grid()
    T = config.suite.num_tasks
    cclip = config.rule.knobs["cclip"]
    auto = {"tau-c-auto": cclip.tau_c_auto or cclip.tau_c == 0}  # cclip without a τ_c
    runs: list[RunConfig] = []
    for rule in experiment.rule_names():
        one_shot: dict[str, object] = {
            "experiment": "single",
            "strategy": rule,
            "num-rounds": 1,
            **(auto if rule == "cclip" else {}),
        }
        if rule_spec(rule).uses_lambda:  # task_arithmetic searches λ = β/T
            one_shot |= {"lambda-grid": ",".join(f"{b / T:.6g}" for b in grid)}
            one_shot |= {"server-lr-grid": ""}
        else:
            one_shot |= {"server-lr-grid": ",".join(f"{b:g}" for b in grid)}
        for changes, sub in repeats:
            folder = root / ONE_SHOT / rule / sub
            runs.append(config.updated({**one_shot, **changes, "results-dir": str(folder)}))
    if experiment.multi_rounds > 0:
        steps = _steps_per_round(config)
        for rule in experiment.rule_names():
            multi: dict[str, object] = {
                "experiment": "single",
                "strategy": rule,
                "num-rounds": experiment.multi_rounds,
                "local-steps": steps,
                "server-lr": experiment.multi_round_server_lr,
                **(auto if rule == "cclip" else {}),
            }
            if rule_spec(rule).uses_lambda:  # multi-round TA is FedAvg with p_t = 1/T
                multi["lambda"] = experiment.multi_round_server_lr / T
            for changes, sub in repeats:
                folder = root / MULTI_ROUND / rule / sub
                runs.append(config.updated({**multi, **changes, "results-dir": str(folder)}))
    return runs


def seed_repeats(config: RunConfig) -> list[tuple[dict[str, object], str]]:
    """(run-config changes, subfolder) per repeat: [({}, "")] when the only seed is ``seed``
    (today's runs and folders), else per training seed s ``training-seed = s`` in seed-<s>."""
    seeds = config.seed_list()
    if seeds == [config.suite.seed]:
        return [({}, "")]
    return [({"seeds": 1, "training-seed": s}, f"seed-{s}") for s in seeds]


def _steps_per_round(config: RunConfig) -> int | str:
    """local-steps / R per client (at least 1), keeping lists and ranges per client."""
    from clients.knobs import per_client

    steps = per_client("local-steps", config.training.local_steps, config.suite.num_tasks, int)
    per_round = [max(1, round(k / config.experiment.multi_rounds)) for k in steps]
    if config.training.preset != "none":  # a preset spreads one base value: give it the base / R
        return max(1, round(int(config.training.local_steps) / config.experiment.multi_rounds))
    return ",".join(str(k) for k in per_round) if len(set(per_round)) > 1 else per_round[0]


def summarize(config: RunConfig, results: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """One row per (rule, one-shot/multi-round, seed) with test figures of val-chosen models,
    and under ``summary`` one row per (rule, mode): the mean and 95% CI over seeds.

    Every row is normalised by the same models of its seed: each client's full-length one-shot
    fine-tune θ₀ + τ_t on its own task (a multi-round run's round-1 models train local-steps /
    R steps), read from the first run of that seed.
    """
    first = results[0]
    own_by_seed: dict[int, list[float]] = {}
    for run in results:
        finetuned = run["finetuned_splits"]["test"]
        own_by_seed.setdefault(
            _run_seed(run["config"]),
            [finetuned[str(t)]["accuracy"] for t in range(len(run["tasks"]))],
        )
    rows: list[dict[str, object]] = []
    for run in results:
        run_config = run["config"]
        rule, mode = _rule_and_mode(config, run_config)
        seed = _run_seed(run_config)
        own = own_by_seed[seed]
        final = run["rounds"][-1]
        test = run.get("selected_test") or final["splits"]["test"]
        training = next((r["training"] for r in run["rounds"] if "training" in r), {})
        diagnostics = run.get("diagnostics") or {}
        accuracy = [t["accuracy"] for t in test["tasks"]]
        normalized = [a / o for a, o in zip(accuracy, own, strict=True)]
        rows.append(
            {
                "rule": rule,
                "mode": mode,
                "seed": seed,
                "rounds": run_config["num-rounds"],
                "beta": run.get("selected_beta") or training.get("server_lr"),
                "lambda": run.get("selected_lambda"),
                "beta_on_bound": run.get("selected_on_bound"),
                "beta_tried": len(run.get("beta_search") or []),
                "test_mean_accuracy": test["mean_accuracy"],
                "test_mean_normalized_accuracy": sum(normalized) / len(normalized),
                "test_accuracy": accuracy,
                "test_normalized_accuracy": normalized,
                "chi_square": training.get("chi_square"),
                "zeta_square_ratio_theta0": (diagnostics.get("round_0") or {}).get("ratio"),
                "zeta_square_ratio_final": (diagnostics.get("final") or {}).get("ratio"),
                "trained_clients": (run.get("update_cache") or {}).get("trained"),
                "seconds": run["timings"]["total_seconds"],
            }
        )
    seeds = list(own_by_seed)
    return {
        "experiment": "compare",
        "config": config.to_mapping(),
        "tasks": first["tasks"],
        "seeds": seeds,
        "theta0_test_accuracy": first["rounds"][0]["splits"]["test"]["mean_accuracy"],
        "finetuned_test_accuracy": own_by_seed[seeds[0]],
        "finetuned_test_accuracy_by_seed": {str(s): own for s, own in own_by_seed.items()},
        "normalized_by": "each client's one-shot fine-tuned θ₀ + τ_t on its own task (test), "
        "of the row's seed",
        "rows": rows,
        "ci95": CI_NOTE,
        "summary": summary_rows(rows),
    }


CI_NOTE = (
    "mean over seeds ± the half-width of a two-sided 95% Student-t interval, "
    "t_{0.975, n−1} · s / √n (s: the sample standard deviation over the n seeds); "
    "delta_vs_task_arithmetic is paired: the per-seed difference to task_arithmetic of the "
    "same mode and seed (test mean accuracy). With one seed every ci95 is null: no interval."
)
SUMMARY_FIELDS = (
    "rule",
    "mode",
    "n_seeds",
    "test_mean_accuracy_mean",
    "test_mean_accuracy_ci95",
    "test_mean_normalized_accuracy_mean",
    "test_mean_normalized_accuracy_ci95",
    "delta_vs_task_arithmetic_mean",
    "delta_vs_task_arithmetic_ci95",
)
REFERENCE_RULE = "task_arithmetic"


def mean_ci95(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(mean, half-width of the two-sided 95% Student-t CI) of ``values`` (None skipped);
    the half-width is None for fewer than two values, the mean None for none."""
    numbers = [float(v) for v in values if v is not None]
    n = len(numbers)
    if n == 0:
        return None, None
    mean = sum(numbers) / n
    if n == 1:
        return mean, None
    import statistics

    from scipy.stats import t as student_t  # scikit-learn's dependency

    half = float(student_t.ppf(0.975, n - 1)) * statistics.stdev(numbers) / math.sqrt(n)
    return mean, half


def summary_rows(rows: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """One row per (rule, mode), in first-seen order: n_seeds, mean and ci95 of the test mean
    (normalised) accuracy over seeds, and the paired difference to task_arithmetic."""
    groups: dict[tuple[str, str], list[Mapping[str, object]]] = {}
    for row in rows:
        groups.setdefault((str(row["rule"]), str(row["mode"])), []).append(row)
    table = []
    for (rule, mode), members in groups.items():
        accuracy = _mean_ci95_of(members, "test_mean_accuracy")
        normalized = _mean_ci95_of(members, "test_mean_normalized_accuracy")
        reference = {
            r.get("seed"): r["test_mean_accuracy"] for r in groups.get((REFERENCE_RULE, mode), [])
        }
        deltas = [
            r["test_mean_accuracy"] - reference[r.get("seed")]  # type: ignore[operator]
            for r in members
            if r.get("seed") in reference
        ]
        delta = mean_ci95(deltas)
        table.append(
            {
                "rule": rule,
                "mode": mode,
                "n_seeds": len(members),
                "test_mean_accuracy_mean": accuracy[0],
                "test_mean_accuracy_ci95": accuracy[1],
                "test_mean_normalized_accuracy_mean": normalized[0],
                "test_mean_normalized_accuracy_ci95": normalized[1],
                "delta_vs_task_arithmetic_mean": delta[0],
                "delta_vs_task_arithmetic_ci95": delta[1],
            }
        )
    return table


def _mean_ci95_of(
    rows: Sequence[Mapping[str, object]], key: str
) -> tuple[float | None, float | None]:
    return mean_ci95([r.get(key) for r in rows])  # type: ignore[misc]


def _run_seed(run_config: Mapping[str, object]) -> int:
    """The training seed of a run (its results.json config): training-seed, else seed."""
    training_seed = int(run_config.get("training-seed", -1))  # type: ignore[call-overload]
    return int(run_config["seed"]) if training_seed < 0 else training_seed  # type: ignore[call-overload]


def _rule_and_mode(config: RunConfig, run_config: Mapping[str, object]) -> tuple[str, str]:
    """A compare run's rule and mode from its folder (<mode>/<rule>[/seed-<s>]); a single
    experiment's from its strategy and rounds."""
    if config.experiment.kind == "single":
        rounds = int(run_config["num-rounds"])  # type: ignore[call-overload]
        return str(run_config["strategy"]), ONE_SHOT if rounds == 1 else MULTI_ROUND
    folder = Path(str(run_config["results-dir"]))
    if int(run_config.get("training-seed", -1)) >= 0 and folder.name.startswith("seed-"):  # type: ignore[call-overload]
        folder = folder.parent
    return folder.name, folder.parent.name


def write_experiment(
    config: RunConfig, results: Sequence[Mapping[str, object]]
) -> dict[str, object]:
    """experiment.json, experiment.csv (a row per rule × mode × seed),
    experiment_summary.csv (a row per rule × mode: mean and ci95 over seeds) and the plots in
    ``results-dir``; returns the summary."""
    from fl_sim.outputs import write_csv, write_json

    root = Path(config.output.results_dir)
    summary = summarize(config, results)
    summary["plots"] = [str(p.relative_to(root)) for p in draw_plots(root, summary, results)]
    write_json(root / "experiment.json", summary)
    fields = [k for k in summary["rows"][0] if not isinstance(summary["rows"][0][k], list)]
    write_csv(root / "experiment.csv", summary["rows"], fields)
    write_csv(root / "experiment_summary.csv", summary["summary"], list(SUMMARY_FIELDS))
    return summary


def draw_plots(
    root: Path, summary: Mapping[str, object], results: Sequence[Mapping[str, object]]
) -> list[Path]:
    """The experiment's PNGs; with several seeds, means over seeds with 95% CI error bars."""
    folder = root / "plots"
    tasks = list(summary["tasks"])
    rows = summary["rows"]
    written = []
    for mode in (ONE_SHOT, MULTI_ROUND):
        per_seed: dict[str, list[Sequence[float]]] = {}
        for r in rows:
            if r["mode"] == mode:
                per_seed.setdefault(r["rule"], []).append(r["test_normalized_accuracy"])
        if per_seed:
            per_rule, errors = _means_and_errors(per_seed)
            written.append(
                plots.normalized_accuracy_per_task(
                    folder / f"normalized_accuracy_{mode}.png",
                    tasks,
                    per_rule,
                    f"{mode}: merged / own fine-tuned accuracy per task (test)"
                    + _seeds_label(per_seed),
                    errors=errors,
                )
            )
    config = RunConfig.from_mapping(summary["config"]) if "config" in summary else None
    rounds_per_seed: dict[str, list[Sequence[float]]] = {}
    round_numbers: dict[str, list[int]] = {}
    searches, selected = {}, {}
    for run in results:
        if config is not None:
            rule, mode = _rule_and_mode(config, run["config"])
        else:
            folder_name = Path(str(run["config"]["results-dir"]))
            rule, mode = folder_name.name, folder_name.parent.name
        if mode == MULTI_ROUND:
            round_numbers.setdefault(rule, [r["round"] for r in run["rounds"]])
            rounds_per_seed.setdefault(rule, []).append(
                [r["splits"]["test"]["mean_accuracy"] for r in run["rounds"]]
            )
        if run.get("beta_search") and rule not in searches:  # the first seed's search
            searches[rule] = sorted(
                ((s["beta"], s["val_mean_normalized_accuracy"]) for s in run["beta_search"]),
                key=lambda point: point[0],
            )
            selected[rule] = run["selected_beta"]
    if rounds_per_seed:
        means, errors = _means_and_errors(rounds_per_seed)
        by_rule_rounds = {
            rule: list(zip(round_numbers[rule], values, strict=True))
            for rule, values in means.items()
        }
        written.append(
            plots.accuracy_vs_rounds(
                folder / "accuracy_vs_rounds.png",
                by_rule_rounds,
                "multi-round: accuracy per round" + _seeds_label(rounds_per_seed),
                errors=errors,
            )
        )
    if searches:
        several = len(summary.get("seeds") or []) > 1
        written.append(
            plots.accuracy_vs_beta(
                folder / "accuracy_vs_beta.png",
                searches,
                selected,
                "one-shot: β search on val" + (" (first seed)" if several else ""),
            )
        )
    first = next((r for r in results if any("training" in x for x in r["rounds"])), None)
    if first is not None:
        training = next(x["training"] for x in first["rounds"] if "training" in x)
        written.append(
            plots.effective_weights(
                folder / "effective_weights.png",
                tasks,
                training["weights"],
                training["effective_weights"],
                f"training heterogeneity: χ²(p‖w) = {training['chi_square']:.3f}",
            )
        )
    return written


def _means_and_errors(
    per_seed: Mapping[str, Sequence[Sequence[float]]],
) -> tuple[dict[str, list[float]], dict[str, list[float]] | None]:
    """Per rule the element-wise mean over seeds and, where a rule has n > 1 seeds, the 95% CI
    half-widths (None when no rule has more than one seed: plain values, no error bars)."""
    means: dict[str, list[float]] = {}
    errors: dict[str, list[float]] = {}
    for rule, series in per_seed.items():
        if len(series) == 1:
            means[rule] = list(series[0])
            continue
        columns = [mean_ci95(values) for values in zip(*series, strict=True)]
        means[rule] = [m for m, _ in columns]  # type: ignore[misc]
        errors[rule] = [h for _, h in columns]  # type: ignore[misc]
    return means, errors or None


def _seeds_label(per_seed: Mapping[str, Sequence[object]]) -> str:
    n = max(len(series) for series in per_seed.values())
    return f"\nmean over {n} seeds, 95% CI" if n > 1 else ""


def table(summary: Mapping[str, object]) -> str:
    """The printed table: rule × one-shot/multi-round (with several seeds: mean ± ci95)."""
    if any(row["n_seeds"] > 1 for row in summary.get("summary") or []):
        return seeds_table(summary)
    lines = [
        f"θ₀ mean test accuracy {summary['theta0_test_accuracy']:.3f}; own fine-tuned "
        f"{sum(summary['finetuned_test_accuracy']) / len(summary['finetuned_test_accuracy']):.3f}",
        f"{'rule':<16}{'mode':<13}{'β':>7}{'test acc':>10}{'normalized':>12}{'χ²(p‖w)':>10}",
    ]
    bound = False
    for row in summary["rows"]:
        beta = "-" if row["beta"] is None else f"{row['beta']:.3g}"
        if row.get("beta_on_bound"):
            beta, bound = beta + "*", True
        normalized = row["test_mean_normalized_accuracy"]
        chi = row["chi_square"]
        lines.append(
            f"{row['rule']:<16}{row['mode']:<13}{beta:>7}{row['test_mean_accuracy']:>10.3f}"
            f"{'-' if normalized is None else f'{normalized:.3f}':>12}"
            f"{'-' if chi is None else f'{chi:.3f}':>10}"
        )
    if bound:
        lines.append(
            "* β on a bound of its search (the smallest or largest β tried after extending the "
            "grid): the optimum may lie beyond"
        )
    return "\n".join(lines)


def seeds_table(summary: Mapping[str, object]) -> str:
    """rule × mode: mean ± ci95 over seeds of the test accuracy, the normalised accuracy and
    the paired difference to task_arithmetic."""
    seeds = summary.get("seeds") or []
    lines = [
        f"θ₀ mean test accuracy {summary['theta0_test_accuracy']:.3f}; "
        f"{len(seeds)} training seeds ({', '.join(str(s) for s in seeds)}); mean ± 95% CI "
        "(Student t) over seeds",
        f"{'rule':<16}{'mode':<13}{'n':>3}{'test acc':>17}{'normalized':>17}"
        f"{'Δ vs task_arith.':>19}",
    ]
    for row in summary["summary"]:
        accuracy = plus_minus(row["test_mean_accuracy_mean"], row["test_mean_accuracy_ci95"])
        normalized = plus_minus(
            row["test_mean_normalized_accuracy_mean"], row["test_mean_normalized_accuracy_ci95"]
        )
        delta = plus_minus(
            row["delta_vs_task_arithmetic_mean"], row["delta_vs_task_arithmetic_ci95"], sign=True
        )
        lines.append(
            f"{row['rule']:<16}{row['mode']:<13}{row['n_seeds']:>3}"
            f"{accuracy:>17}{normalized:>17}{delta:>19}"
        )
    return "\n".join(lines)


def plus_minus(mean: float | None, half: float | None, *, sign: bool = False) -> str:
    if mean is None:
        return "-"
    text = f"{mean:+.3f}" if sign else f"{mean:.3f}"
    return text if half is None else f"{text} ± {half:.3f}"
