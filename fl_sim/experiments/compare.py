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

from collections.abc import Mapping, Sequence
from pathlib import Path

from fl_sim.config.run_config import RunConfig
from fl_sim.experiments import plots
from strategies.registry import rule_spec

ONE_SHOT, MULTI_ROUND = "one-shot", "multi-round"


def expand_experiment(config: RunConfig) -> list[RunConfig]:
    """The runs of ``config``: itself for ``single``, the compare grid for ``compare``."""
    experiment = config.experiment
    if experiment.kind == "single":
        return [config]
    root = Path(config.output.results_dir)
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
            "results-dir": str(root / ONE_SHOT / rule),
            **(auto if rule == "cclip" else {}),
        }
        if rule_spec(rule).uses_lambda:  # task_arithmetic searches λ = β/T
            one_shot |= {"lambda-grid": ",".join(f"{b / T:.6g}" for b in grid)}
            one_shot |= {"server-lr-grid": ""}
        else:
            one_shot |= {"server-lr-grid": ",".join(f"{b:g}" for b in grid)}
        runs.append(config.updated(one_shot))  # validated as a whole
    if experiment.multi_rounds > 0:
        steps = _steps_per_round(config)
        for rule in experiment.rule_names():
            multi: dict[str, object] = {
                "experiment": "single",
                "strategy": rule,
                "num-rounds": experiment.multi_rounds,
                "local-steps": steps,
                "server-lr": experiment.multi_round_server_lr,
                "results-dir": str(root / MULTI_ROUND / rule),
                **(auto if rule == "cclip" else {}),
            }
            if rule_spec(rule).uses_lambda:  # multi-round TA is FedAvg with p_t = 1/T
                multi["lambda"] = experiment.multi_round_server_lr / T
            runs.append(config.updated(multi))
    return runs


def _steps_per_round(config: RunConfig) -> int | str:
    """local-steps / R per client (at least 1), keeping lists and ranges per client."""
    from clients.knobs import per_client

    steps = per_client("local-steps", config.training.local_steps, config.suite.num_tasks, int)
    per_round = [max(1, round(k / config.experiment.multi_rounds)) for k in steps]
    if config.training.preset != "none":  # a preset spreads one base value: give it the base / R
        return max(1, round(int(config.training.local_steps) / config.experiment.multi_rounds))
    return ",".join(str(k) for k in per_round) if len(set(per_round)) > 1 else per_round[0]


def summarize(config: RunConfig, results: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """One row per (rule, one-shot/multi-round) with test figures of val-chosen models.

    Every row is normalised by the same models: each client's full-length one-shot fine-tune
    θ₀ + τ_t on its own task (a multi-round run's round-1 models train local-steps / R steps).
    """
    first = results[0]
    finetuned = first["finetuned_splits"]["test"]
    own = [finetuned[str(t)]["accuracy"] for t in range(len(first["tasks"]))]
    rows: list[dict[str, object]] = []
    for run in results:
        run_config = run["config"]
        folder = Path(str(run_config["results-dir"]))
        final = run["rounds"][-1]
        test = run.get("selected_test") or final["splits"]["test"]
        training = next((r["training"] for r in run["rounds"] if "training" in r), {})
        diagnostics = run.get("diagnostics") or {}
        accuracy = [t["accuracy"] for t in test["tasks"]]
        normalized = [a / o for a, o in zip(accuracy, own, strict=True)]
        rows.append(
            {
                "rule": folder.name,
                "mode": folder.parent.name,
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
    return {
        "experiment": "compare",
        "config": config.to_mapping(),
        "tasks": first["tasks"],
        "theta0_test_accuracy": first["rounds"][0]["splits"]["test"]["mean_accuracy"],
        "finetuned_test_accuracy": own,
        "normalized_by": "each client's one-shot fine-tuned θ₀ + τ_t on its own task (test)",
        "rows": rows,
    }


def write_experiment(
    config: RunConfig, results: Sequence[Mapping[str, object]]
) -> dict[str, object]:
    """experiment.json, experiment.csv and the plots in ``results-dir``; returns the summary."""
    from fl_sim.outputs import write_csv, write_json

    root = Path(config.output.results_dir)
    summary = summarize(config, results)
    summary["plots"] = [str(p.relative_to(root)) for p in draw_plots(root, summary, results)]
    write_json(root / "experiment.json", summary)
    fields = [k for k in summary["rows"][0] if not isinstance(summary["rows"][0][k], list)]
    write_csv(root / "experiment.csv", summary["rows"], fields)
    return summary


def draw_plots(
    root: Path, summary: Mapping[str, object], results: Sequence[Mapping[str, object]]
) -> list[Path]:
    folder = root / "plots"
    tasks = list(summary["tasks"])
    rows = summary["rows"]
    written = []
    for mode in (ONE_SHOT, MULTI_ROUND):
        per_rule = {r["rule"]: r["test_normalized_accuracy"] for r in rows if r["mode"] == mode}
        if per_rule:
            written.append(
                plots.normalized_accuracy_per_task(
                    folder / f"normalized_accuracy_{mode}.png",
                    tasks,
                    per_rule,
                    f"{mode}: merged / own fine-tuned accuracy per task (test)",
                )
            )
    by_rule_rounds = {}
    searches, selected = {}, {}
    for run in results:
        folder_name = Path(str(run["config"]["results-dir"]))
        rule, mode = folder_name.name, folder_name.parent.name
        if mode == MULTI_ROUND:
            by_rule_rounds[rule] = [
                (r["round"], r["splits"]["test"]["mean_accuracy"]) for r in run["rounds"]
            ]
        if run.get("beta_search"):
            searches[rule] = sorted(
                ((s["beta"], s["val_mean_normalized_accuracy"]) for s in run["beta_search"]),
                key=lambda point: point[0],
            )
            selected[rule] = run["selected_beta"]
    if by_rule_rounds:
        written.append(
            plots.accuracy_vs_rounds(
                folder / "accuracy_vs_rounds.png", by_rule_rounds, "multi-round: accuracy per round"
            )
        )
    if searches:
        written.append(
            plots.accuracy_vs_beta(
                folder / "accuracy_vs_beta.png", searches, selected, "one-shot: β search on val"
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


def table(summary: Mapping[str, object]) -> str:
    """The printed table: rule × one-shot/multi-round."""
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
