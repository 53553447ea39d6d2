"""Plots of a sweep: normalised test accuracy against each swept knob, one line per rule and mode.

``draw_sweep_plots`` reads sweep.csv's rows (plain numbers and the grid values) and writes one
PNG per grid key. With several grid keys, each point of a line is the mean over the other keys'
values (the title says which). With seeds > 1 a point that is one sweep.csv row (no other grid
key averaged into it) gets an error bar: the row's ``test_mean_normalized_accuracy_ci95``, the
95% Student-t half-width over the seeds; a point averaged over other keys' values gets none (its
rows share the training seeds, so their intervals do not combine) and the title says so.
Written atomically with fl_sim/experiments/plots.py's ``_save``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from fl_sim.experiments.plots import _save, plt

MODE_STYLES = {"one-shot": "-", "multi-round": "--"}


def normalized_accuracy_vs_knob(
    path: Path,
    key: str,
    values: Sequence[object],
    lines: Mapping[tuple[str, str], Sequence[float | None]],
    averaged_over: Sequence[str],
    errors: Mapping[tuple[str, str], Sequence[float | None]] | None = None,
    n_seeds: int = 1,
) -> Path:
    """One line per (rule, mode): mean normalised test accuracy at each value of ``key``.

    Numeric knobs get a numeric axis (log when the values span two decades or more), others
    (presets, rule lists) one tick per value in grid order. Missing points are left out.
    ``errors``: per line, the 95% CI half-width of each point (None: no bar at that point);
    ``n_seeds``: the most seeds behind a point (the labels say it when > 1).
    """
    numeric = all(  # tau-c = inf has no place on a numeric axis: one tick per value then
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values
    )
    positions = [float(v) for v in values] if numeric else list(range(len(values)))
    figure, axis = plt.subplots(figsize=(7.0, 4.4))
    colors: dict[str, str] = {}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (rule, mode), ys in lines.items():
        color = colors.setdefault(rule, cycle[len(colors) % len(cycle)])
        xs_present = [x for x, y in zip(positions, ys, strict=True) if y is not None]
        ys_present = [y for y in ys if y is not None]
        half = (errors or {}).get((rule, mode))
        bars = (
            [e if e is not None else 0.0 for e, y in zip(half, ys, strict=True) if y is not None]
            if half is not None and any(e is not None for e in half)
            else None
        )
        axis.errorbar(
            xs_present,
            ys_present,
            yerr=bars,
            marker="o",
            capsize=3 if bars is not None else 0,
            color=color,
            linestyle=MODE_STYLES.get(mode, ":"),
            label=f"{rule} ({mode})",
        )
    if numeric:
        low, high = min(positions), max(positions)
        if low > 0 and high / low >= 100:
            axis.set_xscale("log")
        axis.set_xticks(positions, [str(v) for v in values])
    else:
        axis.set_xticks(positions, [str(v) for v in values], rotation=20, ha="right")
        axis.set_xlim(-0.5, len(values) - 0.5)
    axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    axis.set_xlabel(key)
    with_bars = any(e is not None for half in (errors or {}).values() for e in half)
    axis.set_ylabel(
        "mean normalized accuracy (test)"
        + (f"\n± 95% CI over {n_seeds} seeds" if with_bars else "")
    )
    title = f"normalized accuracy vs {key}"
    if averaged_over:
        title += f"\n(mean over {', '.join(averaged_over)}"
        title += f"; {n_seeds} seeds, no error bars on averaged points)" if n_seeds > 1 else ")"
    axis.set_title(title)
    axis.legend(fontsize=7, ncol=2 if len(lines) > 6 else 1)
    axis.grid(alpha=0.3)
    return _save(figure, path)


def draw_sweep_plots(
    folder: Path,
    grid: Mapping[str, Sequence[object]],
    rows: Sequence[Mapping[str, object]],
) -> list[Path]:
    """``normalized_accuracy_vs_<key>.png`` per grid key (values in grid order) from the rows."""
    written = []
    n_seeds = max((_int(row.get("n_seeds")) for row in rows), default=1)
    for key, values in grid.items():
        values = list(values)
        sums: dict[tuple[str, str], list[list[tuple[float, float | None]]]] = {}
        for row in rows:
            accuracy = _float(row.get("test_mean_normalized_accuracy"))
            if accuracy is None:
                continue
            series = sums.setdefault((str(row["rule"]), str(row["mode"])), [[] for _ in values])
            series[values.index(row[key])].append(
                (accuracy, _float(row.get("test_mean_normalized_accuracy_ci95")))
            )
        lines = {
            label: [sum(a for a, _ in xs) / len(xs) if xs else None for xs in series]
            for label, series in sums.items()
        }
        # a bar only where the point is one row (one sweep point, several seeds)
        errors = {
            label: [xs[0][1] if len(xs) == 1 else None for xs in series]
            for label, series in sums.items()
        }
        others = [k for k in grid if k != key]
        name = re.sub(r"[^A-Za-z0-9._+-]", "-", key)
        written.append(
            normalized_accuracy_vs_knob(
                folder / f"normalized_accuracy_vs_{name}.png",
                key,
                values,
                lines,
                others,
                errors,
                n_seeds,
            )
        )
    return written


def _float(value: object) -> float | None:
    """A finite number from a sweep.csv cell (None, '' or non-finite: None)."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    number = float(value)  # type: ignore[arg-type]
    return number if math.isfinite(number) else None


def _int(value: object) -> int:
    number = _float(value)
    return int(number) if number is not None else 1
