"""fl_sim/outputs.py: every file fl-sim writes is atomic, and every JSON file is strict JSON.

Unit tests of the encoding ("inf", "-inf", "nan" for non-finite floats, read back as floats),
the CSV writer and the atomic writers; then real in-process runs (toy suite, ``InProcessGrid``,
no Ray) whose config used to put ``Infinity`` into results.json (cclip with tau-c = inf): every
.json file they leave, the round checkpoint's metadata, the update cache's sidecars, the merge
report of ``fl-sim merge`` on the run's client files and a sweep's files must parse with a
strict parser, and a resume must read them back to the same config.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from helpers import InProcessGrid, config

from fl_sim.checkpoints.safetensors_io import SafetensorsFile
from fl_sim.cli.main import main as cli_main
from fl_sim.config.run_config import RunConfig
from fl_sim.experiments import sweep
from fl_sim.federation.round_checkpoint import METADATA_KEY, checkpoint_path, read_checkpoint
from fl_sim.federation.server_app import run_federation
from fl_sim.outputs import (
    atomic_path,
    dumps_json,
    loads_json,
    read_json,
    to_strict_json,
    write_atomically,
    write_csv,
    write_json,
)

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache", "task_identity")


def _refuse(constant: str) -> object:
    raise ValueError(f"non-standard JSON constant {constant}")


def strict_loads(text: str) -> object:
    """``json.loads`` that refuses NaN, Infinity and -Infinity."""
    return json.loads(text, parse_constant=_refuse)


def assert_strict_json_files(root: Path) -> list[Path]:
    """Every .json file under ``root`` parses strictly; no temp file is left. Returns them."""
    files = sorted(root.rglob("*.json"))
    for path in files:
        try:
            strict_loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise AssertionError(f"{path.relative_to(root)} is not strict JSON: {error}") from None
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name], "a temp file was left"
    return files


def strings_in(value: object) -> set[str]:
    if isinstance(value, str):
        return {value}
    if isinstance(value, dict):
        return set().union(*(strings_in(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(strings_in(v) for v in value))
    return set()


# ---------------------------------------------------------------------------------------------
# The encoding and the writers
# ---------------------------------------------------------------------------------------------


def test_non_finite_floats_are_strings_and_read_back_as_floats():
    value = {
        "a": math.inf,
        "b": [-math.inf, math.nan, 1.5, (2, "x")],
        "t": torch.tensor([1.0, math.inf]),
        "nested": {"none": None, "flag": True},
    }
    text = dumps_json(value)
    assert "Infinity" not in text and "NaN" not in text
    parsed = strict_loads(text)
    assert parsed["a"] == "inf" and parsed["b"][:2] == ["-inf", "nan"] and parsed["t"][1] == "inf"
    back = loads_json(text)
    assert back["a"] == math.inf and back["b"][0] == -math.inf and math.isnan(back["b"][1])
    assert back["b"][2:] == [1.5, [2, "x"]] and back["t"] == [1.0, math.inf]
    assert back["nested"] == {"none": None, "flag": True}
    assert loads_json('{"old": Infinity}') == {"old": math.inf}  # files from before the rule
    with pytest.raises(TypeError, match="cannot write object as JSON"):
        to_strict_json({"x": object()})
    assert to_strict_json({"x": Path("p")}, default=str) == {"x": "p"}


def test_the_config_echo_round_trips_an_infinite_tau_c(tmp_path):
    cfg = config(strategy="cclip", tau_c=math.inf, results_dir=str(tmp_path))
    write_json(tmp_path / "echo.json", cfg.to_mapping())
    assert strict_loads((tmp_path / "echo.json").read_text())["tau-c"] == "inf"
    assert RunConfig.from_mapping(read_json(tmp_path / "echo.json")) == cfg
    # the raw strings too: RunConfig's float keys read "inf"
    assert RunConfig.from_mapping(strict_loads((tmp_path / "echo.json").read_text())) == cfg


def test_write_csv_columns_are_the_union_of_keys_in_first_seen_order(tmp_path):
    rows = [{"a": 1, "b": math.inf}, {"a": None, "c": "x"}]
    write_csv(tmp_path / "t.csv", rows)
    assert (tmp_path / "t.csv").read_text() == "a,b,c\n1,inf,\n,,x\n"
    write_csv(tmp_path / "u.csv", rows, ["c", "a"])  # given columns: others left out
    assert list(csv.DictReader((tmp_path / "u.csv").open())) == [
        {"c": "", "a": "1"},
        {"c": "x", "a": ""},
    ]
    write_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "empty.csv").read_text() == ""


def test_a_failed_write_leaves_neither_the_file_nor_a_temp_file(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as temp:
        temp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    write_atomically(tmp_path / "sub" / "x.txt", "text")  # creates the folder
    write_atomically(target, b"\x00\x01", fsync=True)
    assert target.read_bytes() == b"\x00\x01" and (tmp_path / "sub" / "x.txt").read_text() == "text"
    with pytest.raises(TypeError):  # fails before anything is written
        write_json(tmp_path / "bad.json", {"x": object()})
    assert not (tmp_path / "bad.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------
# Real runs
# ---------------------------------------------------------------------------------------------


def test_a_run_with_infinite_values_writes_strict_json_resumes_and_merges(tmp_path, capsys):
    out = tmp_path / "run"
    knobs = {"strategy": "cclip", "tau_c": math.inf, "num_rounds": 2, "results_dir": str(out)}
    results = run_federation(InProcessGrid(3), config(**knobs))
    assert results["status"] == "completed"

    files = {str(p.relative_to(out)) for p in assert_strict_json_files(out)}
    assert {"results.json", "clients/train_meta.json", "checkpoint/round.json"} <= files
    written = strict_loads((out / "results.json").read_text())
    assert written["config"]["tau-c"] == "inf"  # was the token Infinity
    assert "inf" in strings_in(written)
    with SafetensorsFile(checkpoint_path(out)) as file:  # the commit point's JSON too
        strict_loads(file.metadata[METADATA_KEY])
    cache = assert_strict_json_files(tmp_path / "fl-sim-cache")  # the update cache's sidecars
    assert cache, "the update cache wrote no entry"

    # read back: floats again, the same config, and a resume accepts the checkpoint
    assert read_json(out / "results.json")["config"]["tau-c"] == math.inf
    assert RunConfig.from_mapping(read_json(out / "results.json")["config"]) == config(**knobs)
    saved = read_checkpoint(out, config(**knobs, resume=True))
    assert saved is not None and saved.round == 2
    left = strings_in(saved.strategy_state) | strings_in(saved.recorder_state)
    assert not left & {"inf", "-inf", "nan"}, "a non-finite float came back as a string"
    resumed = run_federation(InProcessGrid(3), config(**knobs, resume=True))
    assert resumed["status"] == "completed"
    assert_strict_json_files(out)

    # fl-sim merge on the run's client files: its report is strict JSON as well
    clients = sorted((out / "clients").glob("client_*.safetensors"))
    merged = tmp_path / "merged.safetensors"
    argv = ["merge", "--method", "fednova", "--base", str(out / "base.safetensors")]
    argv += ["--train-meta", str(out / "clients" / "train_meta.json")]  # the run's own K_t, Σ η
    argv += ["--out", str(merged), "--no-progress", *map(str, clients)]
    assert cli_main(argv) == 0, capsys.readouterr().err
    report = strict_loads((tmp_path / "merged.merge_report.json").read_text())
    assert report["weights"] == pytest.approx([1 / 3] * 3)
    meta = strict_loads((out / "clients" / "train_meta.json").read_text())
    assert report["rule"]["a_norm"] == pytest.approx([m["lr_sum"] for m in meta])
    assert_strict_json_files(tmp_path)


def test_save_clients_false_writes_no_client_models_and_changes_no_result(tmp_path):
    """save-clients = false: no clients/ folder (T model-sized files for a big model), the same
    fine-tuned figures (the clients are still evaluated) and the same global model."""
    runs = {}
    for save in (True, False):
        out = tmp_path / f"save-{save}"
        knobs = {"strategy": "fedavg", "num_rounds": 2, "save_clients": save}
        runs[save] = run_federation(InProcessGrid(3), config(**knobs, results_dir=str(out)))
        assert runs[save]["status"] == "completed"
        assert (out / "clients").exists() == save
        assert len(runs[save]["files"]["clients"]) == (3 if save else 0)
        assert (runs[save]["files"]["train_meta"] is not None) == save
    kept, dropped = runs[True], runs[False]
    assert dropped["finetuned"] == kept["finetuned"]
    for ours, theirs in zip(dropped["rounds"], kept["rounds"], strict=True):
        assert ours["splits"] == theirs["splits"]  # every task's figures on both splits
    first = SafetensorsFile(tmp_path / "save-True" / "global_model.safetensors")
    second = SafetensorsFile(tmp_path / "save-False" / "global_model.safetensors")
    with first, second:
        assert first.keys() == second.keys()
        for name in first:
            torch.testing.assert_close(first.get(name), second.get(name), rtol=0, atol=0)


def test_a_sweep_over_an_infinite_tau_c_writes_strict_json_and_resumes_from_it(
    tmp_path, monkeypatch
):
    ran: list[str] = []

    def in_process(configs, **_):  # run_group without Ray: the same run_federation
        for run in configs:
            ran.append(str(run.to_mapping()["results-dir"]))
            run_federation(InProcessGrid(2), run)

    monkeypatch.setattr(sweep, "run_group", in_process)
    base = {"experiment": "single", "task-suite": "toy", "optimizer": "sgd", "preset": "none"}
    base |= {"num-tasks": 2, "local-steps": 4, "lr": 0.05, "strategy": "cclip"}
    spec = sweep.SweepSpec(base=base, grid={"tau-c": [math.inf, 2.0]})
    out = tmp_path / "sweep"
    outcome = sweep.run_sweep(spec, out, progress=False, log=lambda _: None)
    assert sorted(outcome.finished) == sorted(p.slug for p in outcome.points) and len(ran) == 2
    assert_strict_json_files(out)
    manifest = strict_loads((out / "sweep.json").read_text())
    assert manifest["grid"] == {"tau-c": ["inf", 2.0]}
    assert next(csv.DictReader((out / "sweep.csv").open()))["tau-c"] == "inf"

    # `fl-sim sweep --out DIR --resume` alone reads the grid back from sweep.json: nothing reruns
    assert cli_main(["sweep", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert len(ran) == 2
    assert_strict_json_files(out)
