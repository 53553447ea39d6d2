"""The paper's claims 2 and 3 as figures with seeds: turn finished run folders into PNGs and tables.

    python scripts/claims_figures.py --runs RUNS --out docs/claims

RUNS holds the folders that the commands in README.md ("Three paper claims", "The quadratic
suite") write; each part is drawn when its folder is there and skipped otherwise:

- ``quad-hetero/`` (a sweep, experiment = single, quadratic suite, grid strategy × preset ×
  seed): ‖θʳ − θ*_p‖ and ‖θʳ − θ*_w‖ per round for each rule and preset, mean over the problem
  seeds with a 95% Student-t band, and χ²(p‖w) → ``quadratic_distances.png``.
- ``quad-spread/`` (a sweep, quadratic suite, fedavg, grid quadratic-spread × seed × num-rounds ×
  local-steps): the optimality gap L(θ) − L(θ*_p) after R rounds of K = TOTAL/R local steps
  against the spread of the c_t, one line per R → ``quadratic_gap_vs_spread.png``.
- ``nova/`` (a compare run, digits, rules fedavg,fednova, seeds > 1): per-task test accuracy
  of the multi-round models against each client's local steps K_t, and the paired
  FedNova − FedAvg difference per task → ``digits_accuracy_vs_local_steps.png``.
- ``mix/`` (a sweep over mixing, rules fedavg, seeds > 1): one-shot and multi-round test
  accuracy and the paired gap against mixing, with ζ² → ``digits_mixing.png``.

The runs' own plots are copied beside them: nova's ``plots/accuracy_vs_rounds.png`` (mean per
round with 95% CI bars) as ``digits_nova_accuracy_vs_rounds.png`` and the mixing sweep's
``plots/normalized_accuracy_vs_mixing.png`` (fl_sim/experiments/sweep_plots.py, with CI bars) as
``digits_mixing_sweep_plot.png``.

Every number is a mean over seeds (training seeds for digits, problem seeds ``seed`` for the
quadratic suite) with the half-width of a two-sided 95% Student-t interval
(fl_sim/experiments/compare.py's ``mean_ci95``); paired differences are taken per seed first.
``claims.md`` (the tables) and ``claims.json`` (every figure drawn) go next to the PNGs; all
files are written atomically (fl_sim/outputs.py, fl_sim/experiments/plots.py's ``_save``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fl_sim.experiments.compare import mean_ci95  # noqa: E402
from fl_sim.experiments.plots import _save, plt  # noqa: E402
from fl_sim.outputs import read_json, write_atomically, write_json  # noqa: E402

RULE_COLORS = {"fedavg": "tab:blue", "fednova": "tab:orange", "task_arithmetic": "tab:green"}


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def pm(mean: float | None, half: float | None, digits: int = 3, sign: bool = False) -> str:
    """``mean ± half`` (``mean`` alone without an interval, ``–`` without a mean)."""
    if mean is None:
        return "–"
    text = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    return text if half is None else f"{text} ± {half:.{digits}f}"


def pm_g(mean: float | None, half: float | None) -> str:
    """``pm`` in 3 significant digits (for figures spanning decades)."""
    if mean is None:
        return "–"
    return f"{mean:.3g}" if half is None else f"{mean:.3g} ± {half:.2g}"


def stats(values: Iterable[float | None]) -> dict[str, float | int | None]:
    values = [v for v in values if v is not None]
    mean, half = mean_ci95(values)
    return {"mean": mean, "ci95": half, "n": len(values)}


def band(axis, xs, values_per_seed, color, linestyle, label) -> None:
    """Mean over seeds (rows of ``values_per_seed``) with a 95% CI band; a point without a
    value (None, as ‖θ⁰ − θ*_w‖ before any round) or without an interval is left out."""
    nan = float("nan")
    columns = list(zip(*values_per_seed, strict=True))
    means, halves = zip(*(mean_ci95(list(c)) for c in columns), strict=True)
    means = [nan if m is None else m for m in means]
    halves = [nan if h is None else h for h in halves]
    axis.plot(xs, means, color=color, linestyle=linestyle, label=label)
    low = [m - h for m, h in zip(means, halves, strict=True)]
    high = [m + h for m, h in zip(means, halves, strict=True)]
    axis.fill_between(xs, low, high, color=color, alpha=0.2, linewidth=0)


def results_of(folder: Path) -> list[dict[str, object]]:
    """Every finished results.json under ``folder`` (a sweep's points)."""
    found = []
    for path in sorted(folder.glob("points/*/results.json")):
        results = read_json(path)
        if results.get("status") == "completed":
            found.append(results)
    return found


# ---------------------------------------------------------------------------------------------
# Quadratic suite: distances to θ*_p and θ*_w per round
# ---------------------------------------------------------------------------------------------


def quad_hetero(folder: Path, out: Path) -> tuple[dict[str, object], str]:
    runs = results_of(folder)
    groups: dict[tuple[str, str], list[dict[str, object]]] = {}
    for run in runs:
        groups.setdefault(
            (str(run["config"]["preset"]), str(run["config"]["strategy"])), []
        ).append(run)
    presets = [p for p in ("steps-hetero", "lr-hetero") if any(k[0] == p for k in groups)]
    figure, axes = plt.subplots(1, len(presets), figsize=(6.0 * len(presets), 4.2), squeeze=False)
    document: dict[str, object] = {}
    lines = [
        "| preset | rule | χ²(p‖w) | round | ‖θ − θ*_p‖ | ‖θ − θ*_w‖ | L(θ) − L(θ*_p) | n |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for axis, preset in zip(axes[0], presets, strict=True):
        chi = None
        for rule in ("fedavg", "fednova"):
            members = sorted(groups.get((preset, rule), []), key=lambda r: r["config"]["seed"])
            if not members:
                continue
            rounds = [e["round"] for e in members[0]["rounds"] if "theory" in e]
            to_p = [[e["theory"]["distance_to_opt_p"] for e in m["rounds"]] for m in members]
            to_w = [[e["theory"]["distance_to_opt_w"] for e in m["rounds"]] for m in members]
            gap = [[e["theory"]["optimality_gap"] for e in m["rounds"]] for m in members]
            chi = stats(m["rounds"][1]["training"]["chi_square"] for m in members)
            color = RULE_COLORS[rule]
            band(axis, rounds, to_p, color, "-", f"{rule}: ‖θʳ − θ*_p‖")
            band(axis, rounds, to_w, color, "--", f"{rule}: ‖θʳ − θ*_w‖")
            entry = {
                "seeds": [m["config"]["seed"] for m in members],
                "chi_square": chi,
                "rounds": rounds,
                "distance_to_opt_p": [stats(c) for c in zip(*to_p, strict=True)],
                "distance_to_opt_w": [stats(c) for c in zip(*to_w, strict=True)],
                "optimality_gap": [stats(c) for c in zip(*gap, strict=True)],
            }
            document[f"{preset}/{rule}"] = entry
            for i in (1, len(rounds) - 1):
                lines.append(
                    f"| {preset} | {rule} | {pm(chi['mean'], chi['ci95'], 4)} | {rounds[i]} | "
                    f"{pm_g(**_mc(entry['distance_to_opt_p'][i]))} | "
                    f"{pm_g(**_mc(entry['distance_to_opt_w'][i]))} | "
                    f"{pm_g(**_mc(entry['optimality_gap'][i]))} | {len(members)} |"
                )
        axis.set_yscale("log")
        axis.set_xlabel("round r")
        axis.set_ylabel("distance (mean over problem seeds, 95% CI band)")
        chi_text = "" if chi is None else f", χ²(p‖w) = {chi['mean']:.4f}"
        axis.set_title(f"quadratic suite, SGD, {preset}{chi_text}", fontsize=10)
        axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    _save(figure, out / "quadratic_distances.png")
    return document, "\n".join(lines)


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """The least-squares slope of ``ys`` against ``xs``."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def _mc(entry: Mapping[str, object]) -> dict[str, object]:
    return {"mean": entry["mean"], "half": entry["ci95"]}


# ---------------------------------------------------------------------------------------------
# Quadratic suite: the optimality gap against the spread of the c_t, R rounds
# ---------------------------------------------------------------------------------------------


def quad_spread(folder: Path, out: Path, total_steps: int) -> tuple[dict[str, object], str]:
    cells: dict[tuple[int, float], dict[int, float]] = {}
    zeta: dict[float, dict[int, float]] = {}
    for run in results_of(folder):
        config = run["config"]
        rounds, steps = int(config["num-rounds"]), int(config["local-steps"])
        if rounds * steps != total_steps:  # the same total local work only
            continue
        spread, seed = float(config["quadratic-spread"]), int(config["seed"])
        cells.setdefault((rounds, spread), {})[seed] = run["rounds"][-1]["theory"]["optimality_gap"]
        diagnostics = (run.get("diagnostics") or {}).get("round_0") or {}
        if "zeta_square" in diagnostics:
            zeta.setdefault(spread, {})[seed] = diagnostics["zeta_square"]
    round_counts = sorted({r for r, _ in cells})
    spreads = sorted({s for _, s in cells})
    document: dict[str, object] = {"total_local_steps": total_steps, "cells": []}
    header = " | ".join(f"R = {r} (K = {total_steps // r})" for r in round_counts)
    lines = [
        f"| spread | ζ² at θ₀ | {header} | one-shot / 20-round |",
        "|---" * (len(round_counts) + 3) + "|",
    ]
    figure, axis = plt.subplots(figsize=(6.6, 4.4))
    for r in round_counts:
        xs, means, halves = [], [], []
        for s in spreads:
            entry = stats((cells.get((r, s)) or {}).values())
            document["cells"].append({"rounds": r, "spread": s, **entry})
            if s > 0 and entry["mean"] is not None:
                xs.append(s)
                means.append(entry["mean"])
                halves.append(entry["ci95"] or 0.0)
        axis.errorbar(
            xs, means, yerr=halves, marker="o", capsize=3, label=f"R = {r}, K = {total_steps // r}"
        )
    first_line = [
        e for e in document["cells"] if e["rounds"] == round_counts[0] and e["spread"] > 0
    ]
    if first_line and first_line[0]["mean"]:
        s0, g0 = first_line[0]["spread"], first_line[0]["mean"]
        guide = [s for s in spreads if s > 0]
        axis.plot(
            guide,
            [g0 * (s / s0) ** 2 for s in guide],
            color="gray",
            linestyle=":",
            label="∝ s_c² (through R = 1's first point)",
        )
    for s in spreads:
        z = stats((zeta.get(s) or {}).values())
        row = [pm_g(z["mean"], z["ci95"])]
        for r in round_counts:
            entry = stats((cells.get((r, s)) or {}).values())
            row.append(pm_g(entry["mean"], entry["ci95"]))
        ratio = "–"
        first, last = cells.get((round_counts[0], s)), cells.get((round_counts[-1], s))
        if first and last and s > 0:
            paired = [first[k] / last[k] for k in first if k in last and last[k] > 0]
            ratio = pm(*mean_ci95(paired), digits=2)
        lines.append(f"| {s:g} | " + " | ".join(row) + f" | {ratio} |")
        document.setdefault("zeta_square_theta0", []).append({"spread": s, **z})
    axis.set_xscale("log")
    axis.set_yscale("log")
    positive = [s for s in spreads if s > 0]
    axis.set_xticks(positive, [f"{s:g}" for s in positive])
    axis.minorticks_off()
    axis.set_xlabel("spread s_c of the task minimisers c_t (quadratic-spread)")
    axis.set_ylabel("L(θ_R) − L(θ*_p), mean ± 95% CI over problem seeds")
    n = max((len(v) for v in cells.values()), default=0)
    axis.set_title(
        f"quadratic suite, FedAvg, {total_steps} local steps per client in all, {n} seeds",
        fontsize=10,
    )
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    _save(figure, out / "quadratic_gap_vs_spread.png")
    return document, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Digits: FedAvg vs FedNova under steps-hetero, per-task accuracy against K_t
# ---------------------------------------------------------------------------------------------


def digits_nova(folder: Path, out: Path) -> tuple[dict[str, object], str]:
    experiment = read_json(folder / "experiment.json")
    rows = experiment["rows"]
    tasks = list(experiment["tasks"])
    steps: dict[str, list[int]] = {}
    for mode in ("one-shot", "multi-round"):
        for path in sorted((folder / mode).glob("*/seed-*/results.json")):
            training = read_json(path)["rounds"][1]["training"]
            steps.setdefault(mode, training["local_steps"])
    by = {(r["rule"], r["mode"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    rules = [r for r in ("fedavg", "fednova") if any(k[0] == r for k in by)]
    document: dict[str, object] = {"tasks": tasks, "seeds": seeds, "local_steps": steps}
    lines = [
        "| mode | K_t per round | fedavg acc | fednova acc | fednova − fedavg (paired) | n |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("one-shot", "multi-round"):
        accs = {
            rule: [
                by[(rule, mode, s)]["test_mean_accuracy"] for s in seeds if (rule, mode, s) in by
            ]
            for rule in rules
        }
        deltas = [
            by[("fednova", mode, s)]["test_mean_accuracy"]
            - by[("fedavg", mode, s)]["test_mean_accuracy"]
            for s in seeds
            if ("fednova", mode, s) in by and ("fedavg", mode, s) in by
        ]
        entry = {rule: stats(a) for rule, a in accs.items()} | {"delta": stats(deltas)}
        document[mode] = entry
        k = steps.get(mode, [])
        k_text = f"{min(k)}…{max(k)}" if k else "–"
        lines.append(
            f"| {mode} | {k_text} | "
            + " | ".join(pm(entry[r]["mean"], entry[r]["ci95"]) for r in ("fedavg", "fednova"))
            + f" | {pm(entry['delta']['mean'], entry['delta']['ci95'], sign=True)} "
            f"| {len(deltas)} |"
        )
    mode = "multi-round"
    k = steps.get(mode) or list(range(len(tasks)))
    figure, (left, right) = plt.subplots(1, 2, figsize=(12.0, 4.4))
    per_task: dict[str, object] = {}
    for i, rule in enumerate(rules):
        values = [by[(rule, mode, s)]["test_accuracy"] for s in seeds if (rule, mode, s) in by]
        columns = [stats(c) for c in zip(*values, strict=True)]
        per_task[rule] = columns
        offset = (i - 0.5) * 0.3
        left.errorbar(
            [x + offset for x in k],
            [c["mean"] for c in columns],
            yerr=[c["ci95"] or 0.0 for c in columns],
            marker="o",
            capsize=3,
            linestyle="none",
            color=RULE_COLORS[rule],
            label=rule,
        )
    diffs = [
        [
            a - b
            for a, b in zip(
                by[("fednova", mode, s)]["test_accuracy"],
                by[("fedavg", mode, s)]["test_accuracy"],
                strict=True,
            )
        ]
        for s in seeds
        if ("fednova", mode, s) in by and ("fedavg", mode, s) in by
    ]
    if diffs:
        columns = [stats(c) for c in zip(*diffs, strict=True)]
        per_task["fednova_minus_fedavg"] = columns
        # the re-weighting in one number: per seed, the least-squares slope of the per-task
        # difference against K_t (accuracy per local step), then mean ± ci95 over the seeds
        slope = stats(_slope(k, d) for d in diffs)
        document["delta_slope_per_local_step"] = slope
        lines.append(
            f"\nslope of the per-task fednova − fedavg difference ({mode}) against K_t, "
            f"per seed then over {slope['n']} seeds: "
            f"{pm(slope['mean'], slope['ci95'], 4, sign=True)} accuracy per local step"
        )
        right.errorbar(
            k,
            [c["mean"] for c in columns],
            yerr=[c["ci95"] or 0.0 for c in columns],
            marker="o",
            capsize=3,
            linestyle="none",
            color="tab:purple",
            label="fednova − fedavg (paired by seed)",
        )
        right.axhline(0.0, color="black", linewidth=0.8)
    for x, name in zip(k, tasks, strict=True):
        left.annotate(
            name,
            (x, 0),
            xycoords=("data", "axes fraction"),
            fontsize=6,
            rotation=90,
            xytext=(2, 4),
            textcoords="offset points",
        )
    document["per_task_multi_round"] = per_task
    n = len(seeds)
    left.set_xlabel("K_t: client t's local steps per round")
    left.set_ylabel(f"test accuracy of task t, mean ± 95% CI ({n} seeds)")
    left.set_title(f"digits, steps-hetero, SGD, {mode}", fontsize=10)
    right.set_xlabel("K_t: client t's local steps per round")
    right.set_ylabel("paired difference in task t's test accuracy")
    right.set_title("FedNova − FedAvg per task (re-weighting undone?)", fontsize=10)
    for axis in (left, right):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    _save(figure, out / "digits_accuracy_vs_local_steps.png")
    return document, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Digits: the mixing sweep
# ---------------------------------------------------------------------------------------------


def digits_mixing(folder: Path, out: Path) -> tuple[dict[str, object], str]:
    import csv

    rows = list(csv.DictReader((folder / "sweep_seeds.csv").open()))
    levels = sorted({float(r["mixing"]) for r in rows})
    value = {
        (float(r["mixing"]), r["mode"], int(r["training_seed"])): float(r["test_mean_accuracy"])
        for r in rows
    }
    zeta = {
        (float(r["mixing"]), int(r["training_seed"])): float(r["zeta_square_ratio_theta0"])
        for r in rows
        if r["mode"] == "one-shot" and r.get("zeta_square_ratio_theta0") not in (None, "")
    }
    rounds = {r["mode"]: r["rounds"] for r in rows}
    seeds = sorted({int(r["training_seed"]) for r in rows})
    document: dict[str, object] = {"seeds": seeds, "levels": []}
    multi = f"{rounds.get('multi-round', '?')}-round"
    lines = [
        f"| mixing | ζ²/Σpₜ‖gₜ‖² at θ₀ | one-shot acc | {multi} acc | gap (paired) | n |",
        "|---|---|---|---|---|---|",
    ]
    series: dict[str, list[dict[str, object]]] = {"one-shot": [], "multi-round": [], "gap": []}
    for m in levels:
        one = [value.get((m, "one-shot", s)) for s in seeds]
        many = [value.get((m, "multi-round", s)) for s in seeds]
        gaps = [b - a for a, b in zip(one, many, strict=True) if a is not None and b is not None]
        entry = {
            "mixing": m,
            "zeta_square_ratio_theta0": stats(zeta.get((m, s)) for s in seeds),
            "one-shot": stats(one),
            "multi-round": stats(many),
            "gap": stats(gaps),
        }
        document["levels"].append(entry)
        for key in series:
            series[key].append(entry[key])
        z = entry["zeta_square_ratio_theta0"]
        lines.append(
            f"| {m:g} | {pm(z['mean'], z['ci95'])} | "
            f"{pm(entry['one-shot']['mean'], entry['one-shot']['ci95'])} | "
            f"{pm(entry['multi-round']['mean'], entry['multi-round']['ci95'])} | "
            f"{pm(entry['gap']['mean'], entry['gap']['ci95'], sign=True)} | {len(gaps)} |"
        )
    figure, (left, right) = plt.subplots(1, 2, figsize=(11.0, 4.2))
    for key, label in (("one-shot", "one-shot (= Task Arithmetic)"), ("multi-round", multi)):
        left.errorbar(
            levels,
            [e["mean"] for e in series[key]],
            yerr=[e["ci95"] or 0.0 for e in series[key]],
            marker="o",
            capsize=3,
            label=f"fedavg {label}",
        )
    right.errorbar(
        levels,
        [e["mean"] for e in series["gap"]],
        yerr=[e["ci95"] or 0.0 for e in series["gap"]],
        marker="o",
        capsize=3,
        color="tab:red",
        label=f"{multi} − one-shot (paired by seed)",
    )
    right.axhline(0.0, color="black", linewidth=0.8)
    n = len(seeds)
    left.set_xlabel("mixing (fraction of every other task's data each client holds)")
    left.set_ylabel(f"test mean accuracy, mean ± 95% CI ({n} seeds)")
    left.set_title("digits, lr-hetero, AdamW: accuracy vs data heterogeneity", fontsize=10)
    right.set_xlabel("mixing")
    right.set_ylabel("accuracy gap, mean ± 95% CI")
    right.set_title("what the rounds buy back", fontsize=10)
    for axis in (left, right):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
    _save(figure, out / "digits_mixing.png")
    return document, "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------

PARTS = ("quad-hetero", "quad-spread", "nova", "mix")
COPIED = {  # part: (plot in the run folder, name in --out)
    "nova": (("plots/accuracy_vs_rounds.png", "digits_nova_accuracy_vs_rounds.png"),),
    "mix": (("plots/normalized_accuracy_vs_mixing.png", "digits_mixing_sweep_plot.png"),),
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of the run folders")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "claims", help="PNG folder")
    parser.add_argument(
        "--total-steps", type=int, default=40, help="quad-spread: R·K of the lines drawn"
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    drawers = {
        "quad-hetero": lambda f: quad_hetero(f, args.out),
        "quad-spread": lambda f: quad_spread(f, args.out, args.total_steps),
        "nova": lambda f: digits_nova(f, args.out),
        "mix": lambda f: digits_mixing(f, args.out),
    }
    document, sections = {}, []
    for part in PARTS:
        folder = args.runs / part
        if not folder.is_dir():
            print(f"{part}: {folder} not found, skipped")
            continue
        document[part], text = drawers[part](folder)
        for source, name in COPIED.get(part, ()):  # the run's own plots, as fl-sim drew them
            if (folder / source).is_file():
                write_atomically(args.out / name, (folder / source).read_bytes())
        sections.append(f"## {part}\n\n{text}\n")
        print(f"## {part}\n{text}\n")
    write_json(args.out / "claims.json", document)
    write_atomically(args.out / "claims.md", "\n".join(sections))
    print(f"wrote {args.out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
