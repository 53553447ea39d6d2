"""PNG plots of an experiment's results (matplotlib, no display needed).

Each function takes plain numbers — what results.json holds — and writes one PNG atomically,
so a plot can be redrawn from a results file without re-running anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fl_sim.outputs import atomic_path


def _save(figure: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as temp:  # the temp name has no .png: give the format
            figure.savefig(temp, format=path.suffix[1:] or "png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def normalized_accuracy_per_task(
    path: Path,
    tasks: Sequence[str],
    per_rule: Mapping[str, Sequence[float]],
    title: str,
    errors: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Grouped bars: normalized accuracy (merged / own fine-tuned) per task, one bar per rule;
    ``errors`` (per rule, per task) draws error bars of those half-widths."""
    figure, axis = plt.subplots(figsize=(max(8, 1.3 * len(tasks)), 4.2))
    width = 0.8 / max(len(per_rule), 1)
    for i, (rule, values) in enumerate(per_rule.items()):
        positions = [t + (i - (len(per_rule) - 1) / 2) * width for t in range(len(tasks))]
        error = (errors or {}).get(rule)
        axis.bar(positions, values, width, label=rule, yerr=error, capsize=2 if error else 0)
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axis.set_xticks(range(len(tasks)), tasks, rotation=25, ha="right")
    axis.set_ylabel("normalized accuracy (test)")
    axis.set_title(title)
    axis.legend(ncol=min(len(per_rule), 6), fontsize=8, loc="lower left")
    return _save(figure, path)


def accuracy_vs_rounds(
    path: Path,
    per_rule: Mapping[str, Sequence[tuple[int, float]]],
    title: str,
    errors: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Mean test accuracy after each round, one line per rule (round 0 = θ₀); ``errors`` (per
    rule, per round) draws error bars of those half-widths."""
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for rule, points in per_rule.items():
        rounds, values = zip(*points, strict=True) if points else ((), ())
        error = (errors or {}).get(rule)
        if error:
            axis.errorbar(rounds, values, yerr=error, marker="o", capsize=3, label=rule)
        else:
            axis.plot(rounds, values, marker="o", label=rule)
    axis.set_xlabel("round")
    axis.set_ylabel("mean accuracy over tasks (test)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def accuracy_vs_beta(
    path: Path,
    per_rule: Mapping[str, Sequence[tuple[float, float]]],
    selected: Mapping[str, float],
    title: str,
) -> Path:
    """Validation accuracy against the server step β, one line per rule; the pick is marked."""
    figure, axis = plt.subplots(figsize=(6.5, 4.2))
    for rule, points in per_rule.items():
        betas, values = zip(*points, strict=True) if points else ((), ())
        (line,) = axis.plot(betas, values, marker=".", label=rule)
        if rule in selected:
            best = dict(points).get(selected[rule])
            if best is not None:
                axis.plot(
                    [selected[rule]], [best], marker="*", markersize=14, color=line.get_color()
                )
    axis.set_xscale("log")  # the search halves and doubles β beyond the grid
    axis.set_xlabel("server step β")
    axis.set_ylabel("mean normalized accuracy (validation)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def effective_weights(
    path: Path,
    tasks: Sequence[str],
    weights: Sequence[float],
    effective: Sequence[float],
    title: str,
) -> Path:
    """p_t (what we meant to optimise) against w_t (what FedAvg / Task Arithmetic optimises)."""
    figure, axis = plt.subplots(figsize=(max(6.5, 1.0 * len(tasks)), 4.0))
    positions = range(len(tasks))
    axis.bar([x - 0.2 for x in positions], weights, 0.4, label="p_t (client weight)")
    axis.bar([x + 0.2 for x in positions], effective, 0.4, label="w_t (effective weight)")
    axis.set_xticks(list(positions), tasks, rotation=25, ha="right")
    axis.set_ylabel("weight")
    axis.set_title(title)
    axis.legend(fontsize=8)
    return _save(figure, path)
