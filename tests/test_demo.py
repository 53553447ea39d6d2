"""``fl-sim demo`` for real, on its smallest setting (T = 2): fine-tune, merge with every rule.

What it writes must be there and load (strict JSON, a CSV that says the same), and its figures
must be consistent: the task-arithmetic model is θ₀ + λ Σ_t (θ_t − θ₀), i.e. one-shot FedAvg with
β = λT (the identity the demo demonstrates), every row's normalised accuracy is the mean of
acc / own, and χ²(p‖w) follows from the clients' fl_sim_meta.json. About 10 s on 2 cores.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from fl_sim.cli.main import main as cli_main

pytestmark = pytest.mark.usefixtures("one_thread")  # the demo sets 1 thread: restored after

RULES = ("task_arithmetic", "fedavg", "fednova", "fedgma", "median", "cclip")
LAM, T = 0.3, 2  # the demo's λ for task_arithmetic; --tasks 2


def _refuse(constant: str) -> object:
    raise ValueError(f"non-standard JSON constant {constant}")


def strict(path) -> object:
    return json.loads(path.read_text(encoding="utf-8"), parse_constant=_refuse)


def weights(folder) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(folder / "model.safetensors").items()}


def test_fl_sim_demo_writes_consistent_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli_main(["demo", "--out", str(out), "--tasks", str(T), "--no-progress"]) == 0
    assert str(out) in capsys.readouterr().out

    # the files: checkpoints, a merged model and its report per rule, the results table
    clients = [out / "checkpoints" / f"ft-count-{t}" for t in range(T)]
    for folder in [out / "checkpoints" / "base", *clients]:
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    metas = [strict(folder / "fl_sim_meta.json") for folder in clients]
    reports = {rule: strict(out / "merged" / rule / "merge_report.json") for rule in RULES}
    for rule in RULES:
        assert (out / "merged" / rule / "model.safetensors").is_file()
        assert reports[rule]["method"] == rule
    rows = strict(out / "demo_results.json")
    assert [r["method"] for r in rows] == ["base (θ₀)", *RULES, "fine-tuned (own task)"]
    with (out / "demo_results.csv").open(newline="", encoding="utf-8") as file:
        table = list(csv.DictReader(file))
    columns = list(dict.fromkeys(k for r in rows for k in r))
    assert list(table[0]) == columns and len(table) == len(rows)
    for row, line in zip(rows, table, strict=True):  # the CSV says what the JSON says
        for key in columns:
            value = row.get(key)
            assert line[key] == ("" if value is None else str(value)), (row["method"], key)

    # the identity: θ_TA = θ₀ + λ Σ_t Δ_t = θ₀ + λT · (θ_FedAvg(β=1) − θ₀)
    raw = load_file(out / "checkpoints" / "base" / "model.safetensors")
    floats = [name for name, tensor in raw.items() if tensor.is_floating_point()]
    assert floats
    base = weights(out / "checkpoints" / "base")
    tuned = [weights(folder) for folder in clients]
    ta, fedavg = weights(out / "merged" / "task_arithmetic"), weights(out / "merged" / "fedavg")
    for name in floats:
        deltas = [model[name] - base[name] for model in tuned]
        expected = base[name] + LAM * sum(deltas)
        torch.testing.assert_close(ta[name], expected, atol=1e-6, rtol=1e-5, msg=name)
        scaled = base[name] + LAM * T * (fedavg[name] - base[name])
        torch.testing.assert_close(ta[name], scaled, atol=1e-6, rtol=1e-5, msg=name)
    by_method = {r["method"]: r for r in rows}
    assert by_method["task_arithmetic"]["beta"] == pytest.approx(LAM * T)
    assert reports["task_arithmetic"]["parameters"]["server_lr"] == pytest.approx(LAM * T)

    # every row's figures: normalised accuracy and χ²(p‖w) from the clients' metadata
    names = [f"count-{t}" for t in range(T)]
    own = [by_method["fine-tuned (own task)"][name] for name in names]
    a_norm = [meta["lr_sum"] for meta in metas]  # merge's default a-norm: lr-sum
    p = [1 / T] * T
    total = sum(pi * a for pi, a in zip(p, a_norm, strict=True))
    w = [pi * a / total for pi, a in zip(p, a_norm, strict=True)]
    chi2 = sum((pi - wi) ** 2 / wi for pi, wi in zip(p, w, strict=True))
    for rule in RULES:
        row = by_method[rule]
        normalized = sum(row[n] / o for n, o in zip(names, own, strict=True)) / T
        assert row["normalized"] == pytest.approx(normalized)
        assert (
            row["chi_square"] == pytest.approx(chi2) == reports[rule]["heterogeneity"]["chi_square"]
        )
        assert all(0.0 <= row[n] <= 1.0 for n in names)
    assert reports["fednova"]["heterogeneity"]["effective_weights"] == pytest.approx(w)
