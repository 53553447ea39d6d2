"""One switch for the paper's authors' choices (strategies/paper_defaults.py): a-norm = steps and
median-mode = lower where nothing else was given; explicit keys, flags and YAML parameters win."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import config
from safetensors.torch import load_file, save_file

from fl_sim.cli.main import main
from fl_sim.config.run_config import RunConfig
from fl_sim.merge.options import build_merge_options, options_from_yaml
from strategies.paper_defaults import PAPER_CHOICES, paper_values

PAPER = {"a-norm": "steps", "median-mode": "lower"}


def test_the_table_is_the_two_choices_that_differ_from_fl_sims_defaults():
    assert {c.key: c.value for c in PAPER_CHOICES} == PAPER
    defaults = RunConfig().to_mapping()
    assert all(defaults[key] != value for key, value in PAPER.items())
    assert defaults["paper-defaults"] is False and defaults["cclip-iters"] == 1
    assert paper_values({"a-norm"}) == {"median-mode": "lower"}
    assert paper_values({"median_mode"}, by="yaml") == {"a_norm": "steps"}


@pytest.mark.parametrize("switch", [True, "true"])
def test_the_switch_sets_both(switch):
    cfg = config(paper_defaults=switch)
    assert cfg.training.a_norm == "steps"
    assert cfg.rule.knobs["median"].median_mode == "lower"
    assert cfg.paper_defaults() == {"enabled": True, "set": PAPER, "kept": {}}
    # the echo of results.json reads back to the same config, and the compare runs keep it
    assert RunConfig.from_mapping(cfg.to_mapping()) == cfg
    assert cfg.updated({"strategy": "median"}).rule.knobs["median"].median_mode == "lower"
    off = config()
    assert off.training.a_norm == "lr-sum" and off.rule.knobs["median"].median_mode == "mean"
    assert off.paper_defaults() == {"enabled": False, "set": {}, "kept": {}}


def test_an_explicit_key_wins_even_when_it_is_fl_sims_default():
    cfg = config(paper_defaults=True, a_norm="lr-sum")
    assert cfg.training.a_norm == "lr-sum"
    assert cfg.rule.knobs["median"].median_mode == "lower"
    assert cfg.paper_defaults() == {
        "enabled": True,
        "set": {"median-mode": "lower"},
        "kept": {"a-norm": "lr-sum"},
    }
    cfg = config(paper_defaults=True, median_mode="mean")
    assert cfg.training.a_norm == "steps" and cfg.rule.knobs["median"].median_mode == "mean"


# -- fl-sim merge -----------------------------------------------------------------------------

T = 4  # even: the median's two modes differ


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Path]:
    root = tmp_path_factory.mktemp("paper")
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=generator)}
    save_file(base, root / "base.safetensors")
    fts = []
    for t in range(T):
        noise = torch.randn(6, 5, generator=generator) * (t + 1) * 0.1
        save_file({"w": base["w"] + noise}, root / f"ft{t}.safetensors")
        fts.append(root / f"ft{t}.safetensors")
    meta = root / "meta.json"
    meta.write_text(
        json.dumps([{"steps": 100.0 * (t + 1), "lr_sum": 0.1 / (t + 1)} for t in range(T)])
    )
    return root / "base.safetensors", fts, meta


def options(checkpoints, method: str, **kwargs):
    base, fts, meta = checkpoints
    return build_merge_options(
        method=method,
        base=str(base),
        models=[str(f) for f in fts],
        out="unused.safetensors",
        train_meta=str(meta),
        **kwargs,
    )


def test_merge_options_switch_sets_a_norm_and_the_methods_own_knob(checkpoints):
    fednova = options(checkpoints, "fednova", paper_defaults=True)
    assert fednova.a_norm_kind == "steps" and dict(fednova.paper_set) == {"a_norm": "steps"}
    median = options(checkpoints, "median", paper_defaults=True)
    assert median.knobs.median_mode == "lower"
    assert dict(median.paper_set) == {"a_norm": "steps", "median_mode": "lower"}
    plain = options(checkpoints, "median")
    assert plain.a_norm_kind == "lr-sum" and plain.knobs.median_mode == "mean"
    assert plain.paper_set == () and not plain.paper_defaults


def test_merge_flags_given_win_over_the_switch(checkpoints):
    kept = options(checkpoints, "fednova", paper_defaults=True, a_norm="lr-sum")
    assert kept.a_norm_kind == "lr-sum" and kept.paper_set == ()
    median = options(checkpoints, "median", paper_defaults=True, median_mode="mean")
    assert median.knobs.median_mode == "mean" and dict(median.paper_set) == {"a_norm": "steps"}


def test_yaml_paper_defaults_and_explicit_parameters(checkpoints, tmp_path):
    base, fts, meta = checkpoints

    def yaml_file(parameters: dict) -> str:
        path = tmp_path / f"merge{len(parameters)}.yaml"
        document = {
            "merge_method": "median",
            "base_model": str(base),
            "models": [{"model": str(f)} for f in fts],
            "parameters": parameters,
            "train_meta": str(meta),
            "out": str(tmp_path / "out.safetensors"),
        }
        path.write_text(yaml.safe_dump(document))
        return str(path)

    on = build_merge_options(**options_from_yaml(yaml_file({"paper_defaults": True}), {}))
    assert on.a_norm_kind == "steps" and on.knobs.median_mode == "lower"
    given = yaml_file({"paper_defaults": True, "a_norm": "lr-sum", "median_mode": "mean"})
    kept = build_merge_options(**options_from_yaml(given, {}))
    assert kept.a_norm_kind == "lr-sum" and kept.knobs.median_mode == "mean"
    # the flag switches a YAML file that does not
    flagged = options_from_yaml(yaml_file({}), {"paper_defaults": True, "a_norm": None})
    assert build_merge_options(**flagged).knobs.median_mode == "lower"


def test_fl_sim_merge_paper_defaults_equals_the_explicit_flags_and_is_reported(
    checkpoints, tmp_path
):
    base, fts, meta = checkpoints
    common = ["--base", str(base), "--train-meta", str(meta), "--no-progress"]
    paper, explicit = tmp_path / "paper.safetensors", tmp_path / "explicit.safetensors"
    argv = ["merge", "--method", "median", *common, "--out"]
    assert main([*argv, str(paper), "--paper-defaults", *map(str, fts)]) == 0
    flags = ["--median-mode", "lower", "--a-norm", "steps"]
    assert main([*argv, str(explicit), *flags, *map(str, fts)]) == 0
    torch.testing.assert_close(load_file(paper)["w"], load_file(explicit)["w"], rtol=0, atol=0)
    report = json.loads((tmp_path / "paper.merge_report.json").read_text())
    assert report["paper_defaults"] == {
        "enabled": True,
        "set": {"a_norm": "steps", "median_mode": "lower"},
    }
    assert report["parameters"]["median_mode"] == "lower"
    assert report["heterogeneity"]["a_norm_kind"] == "steps"
    report = json.loads((tmp_path / "explicit.merge_report.json").read_text())
    assert report["paper_defaults"] == {"enabled": False, "set": {}}
    kept = tmp_path / "kept.safetensors"
    argv = ["merge", "--method", "fednova", *common, "--out", str(kept), "--paper-defaults"]
    assert main([*argv, "--a-norm", "lr-sum", *map(str, fts)]) == 0
    report = json.loads((tmp_path / "kept.merge_report.json").read_text())
    assert report["heterogeneity"]["a_norm_kind"] == "lr-sum"
    assert report["paper_defaults"] == {"enabled": True, "set": {}}


@pytest.mark.usefixtures("one_thread", "isolated_cache", "task_identity")
def test_results_json_records_the_switch_and_the_values_it_set(tmp_path):
    from helpers import InProcessGrid

    from fl_sim.federation.server_app import run_federation

    cfg = config(strategy="fednova", paper_defaults=True, results_dir=str(tmp_path))
    results = run_federation(InProcessGrid(3), cfg)
    assert results["paper_defaults"] == {"enabled": True, "set": PAPER, "kept": {}}
    assert results["config"]["a-norm"] == "steps" and results["config"]["paper-defaults"]
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["paper_defaults"] == results["paper_defaults"]
    # every client counted its work as K_t
    training = results["rounds"][1]["training"]
    assert training["a_norm"] == [float(k) for k in training["local_steps"]]
