"""Error bars on sweep plots, and scripts/claims_figures.py on synthetic run folders.

``draw_sweep_plots`` draws a 95% CI bar at a point that is one sweep.csv row with seeds > 1 and
none on a point averaged over other grid keys (or with one seed). The claims script turns run
folders into PNGs and tables; here it reads hand-made folders whose means and intervals are
known. No Ray, no training.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
from pathlib import Path

import pytest

from fl_sim.experiments import sweep_plots
from fl_sim.experiments.sweep_plots import draw_sweep_plots
from fl_sim.outputs import write_csv, write_json

ROOT = Path(__file__).resolve().parents[1]
T975_2 = 4.302652729749464  # t_{0.975, 2}


@pytest.fixture
def errorbars(monkeypatch):
    """Record every errorbar call's (label, yerr)."""
    calls: list[tuple[str, object]] = []
    original = sweep_plots.plt.Axes.errorbar

    def record(self, x, y, *args, yerr=None, label=None, **kwargs):
        calls.append((label, None if yerr is None else list(yerr)))
        return original(self, x, y, *args, yerr=yerr, label=label, **kwargs)

    monkeypatch.setattr(sweep_plots.plt.Axes, "errorbar", record)
    return calls


def row(**values):
    return {"rule": "fedavg", "mode": "one-shot", **values}


def test_sweep_plot_has_error_bars_from_the_ci95_column(tmp_path, errorbars):
    rows = [
        row(mixing=0.0, test_mean_normalized_accuracy=0.7, test_mean_normalized_accuracy_ci95=0.02),
        row(mixing=1.0, test_mean_normalized_accuracy=0.8, test_mean_normalized_accuracy_ci95=0.01),
    ]
    for r in rows:
        r["n_seeds"] = 3
    [path] = draw_sweep_plots(tmp_path, {"mixing": [0.0, 1.0]}, rows)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert errorbars == [("fedavg (one-shot)", [0.02, 0.01])]


def test_sweep_plot_of_csv_cells_and_one_seed_has_no_bars(tmp_path, errorbars):
    # cells as csv.DictReader gives them: one seed leaves ci95 empty
    rows = [
        row(rho="0.2", test_mean_normalized_accuracy="0.7", test_mean_normalized_accuracy_ci95=""),
        row(rho="0.8", test_mean_normalized_accuracy="0.6", test_mean_normalized_accuracy_ci95=""),
    ]
    draw_sweep_plots(tmp_path, {"rho": ["0.2", "0.8"]}, rows)
    assert errorbars == [("fedavg (one-shot)", None)]


def test_averaged_points_get_no_bars(tmp_path, errorbars):
    rows = [
        row(
            a=a,
            b=b,
            n_seeds=2,
            test_mean_normalized_accuracy=0.5 + a + b,
            test_mean_normalized_accuracy_ci95=0.1,
        )
        for a in (0.0, 0.1)
        for b in (0.0, 0.2)
    ]
    draw_sweep_plots(tmp_path, {"a": [0.0, 0.1], "b": [0.0, 0.2]}, rows)
    # each point of a line averages two rows (the other key's values): no interval combines them
    assert errorbars == [("fedavg (one-shot)", None), ("fedavg (one-shot)", None)]


# ---------------------------------------------------------------------------------------------
# scripts/claims_figures.py
# ---------------------------------------------------------------------------------------------


def load_script():
    spec = importlib.util.spec_from_file_location(
        "claims_figures", ROOT / "scripts" / "claims_figures.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def quadratic_run(folder: Path, config: dict, gaps: list[float], chi: float = 0.5) -> None:
    theory = [
        {"optimality_gap": g, "distance_to_opt_p": math.sqrt(g), "distance_to_opt_w": 2 * g}
        for g in gaps
    ]
    rounds = [{"round": r, "theory": t} for r, t in enumerate(theory)]
    for entry in rounds[1:]:
        entry["training"] = {"chi_square": chi}
    write_json(
        folder / "results.json",
        {
            "status": "completed",
            "config": config,
            "rounds": rounds,
            "diagnostics": {"round_0": {"zeta_square": 10.0 * config.get("quadratic-spread", 1)}},
        },
    )


def test_claims_script_on_synthetic_folders(tmp_path):
    script = load_script()
    runs = tmp_path / "runs"
    for seed, scale in enumerate((1.0, 2.0, 3.0)):
        for rule in ("fedavg", "fednova"):
            config = {"preset": "steps-hetero", "strategy": rule, "seed": seed}
            folder = runs / "quad-hetero" / "points" / f"{rule}-{seed}"
            quadratic_run(folder, config, [4.0 * scale, scale, 0.5 * scale])
        for spread in (0.0, 1.0, 2.0):
            for rounds, steps in ((1, 4), (2, 2), (2, 4)):  # (2, 4) is not R·K = 4: left out
                config = {
                    "seed": seed,
                    "quadratic-spread": spread,
                    "num-rounds": rounds,
                    "local-steps": steps,
                }
                gap = scale * spread**2 / rounds
                folder = runs / "quad-spread" / "points" / f"{spread}-{rounds}-{steps}-{seed}"
                quadratic_run(folder, config, [9.0] * rounds + [gap])
    mix = runs / "mix"
    mix.mkdir(parents=True)
    mix_rows = [
        {
            "mixing": m,
            "mode": mode,
            "rounds": 1 if mode == "one-shot" else 5,
            "training_seed": s,
            "test_mean_accuracy": 0.6 + 0.1 * m + (0.01 * s if mode == "one-shot" else 0.05),
            "zeta_square_ratio_theta0": 0.8 * (1 - m),
        }
        for m in (0.0, 1.0)
        for mode in ("one-shot", "multi-round")
        for s in (0, 1, 2)
    ]
    write_csv(mix / "sweep_seeds.csv", mix_rows)

    nova = runs / "nova"
    nova_rows = []
    for s in (0, 1, 2):
        for mode, steps in (("one-shot", [4, 8]), ("multi-round", [1, 2])):
            for rule in ("fedavg", "fednova"):
                shift = 0.1 if rule == "fednova" else 0.0
                accuracy = [0.5 + 0.01 * s - shift, 0.7 + 0.01 * s + shift]
                nova_rows.append(
                    {
                        "rule": rule,
                        "mode": mode,
                        "seed": s,
                        "test_mean_accuracy": sum(accuracy) / 2 + (0.01 * s if shift else 0),
                        "test_accuracy": accuracy,
                    }
                )
                training = {"local_steps": steps}
                write_json(
                    nova / mode / rule / f"seed-{s}" / "results.json",
                    {"rounds": [{"round": 0}, {"round": 1, "training": training}]},
                )
    write_json(nova / "experiment.json", {"tasks": ["a", "b"], "rows": nova_rows})

    out = tmp_path / "claims"
    assert script.main(["--runs", str(runs), "--out", str(out), "--total-steps", "4"]) == 0
    for name in (
        "quadratic_distances.png",
        "quadratic_gap_vs_spread.png",
        "digits_mixing.png",
        "digits_accuracy_vs_local_steps.png",
    ):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    document = json.loads((out / "claims.json").read_text())
    nova_doc = document["nova"]
    assert nova_doc["local_steps"] == {"one-shot": [4, 8], "multi-round": [1, 2]}
    # paired FedNova − FedAvg: 0.01 s for s = 0, 1, 2
    assert nova_doc["multi-round"]["delta"]["mean"] == pytest.approx(0.01)
    assert nova_doc["multi-round"]["delta"]["ci95"] == pytest.approx(T975_2 * 0.01 / math.sqrt(3))
    per_task = nova_doc["per_task_multi_round"]["fednova_minus_fedavg"]
    assert [t["mean"] for t in per_task] == pytest.approx([-0.1, 0.1])
    assert [t["ci95"] for t in per_task] == pytest.approx([0.0, 0.0], abs=1e-12)
    slope = nova_doc["delta_slope_per_local_step"]  # (0.1 − (−0.1)) / (2 − 1) in every seed
    assert slope["mean"] == pytest.approx(0.2) and slope["ci95"] == pytest.approx(0, abs=1e-12)
    final = document["quad-hetero"]["steps-hetero/fedavg"]["optimality_gap"][-1]
    assert final["mean"] == pytest.approx(1.0) and final["n"] == 3
    assert final["ci95"] == pytest.approx(T975_2 * 0.5 / math.sqrt(3))
    cells = {(c["rounds"], c["spread"]): c for c in document["quad-spread"]["cells"]}
    assert set(cells) == {(r, s) for r in (1, 2) for s in (0.0, 1.0, 2.0)}
    assert cells[(1, 2.0)]["mean"] == pytest.approx(8.0)  # mean of 4 · (1, 2, 3)
    assert cells[(2, 2.0)]["mean"] == pytest.approx(4.0)
    levels = document["mix"]["levels"]
    # the gap is paired by seed: 0.05 − 0.01 s for s = 0, 1, 2
    assert levels[0]["gap"]["mean"] == pytest.approx(0.04)
    assert levels[0]["gap"]["ci95"] == pytest.approx(T975_2 * 0.01 / math.sqrt(3))
    text = (out / "claims.md").read_text()
    assert "| 2 | 20 ± " in text  # ζ² at spread 2, the same in every seed: ± 0
    assert "+0.040 ± 0.025" in text
    rows = list(csv.DictReader((mix / "sweep_seeds.csv").open()))
    assert len(rows) == 12
