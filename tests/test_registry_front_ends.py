"""A rule added through the registry alone reaches every front end: TIES and DARE (one module and
one registry line each) in ``fl-sim merge`` flags, mergekit-style YAML (``merge_method: ties`` /
``dare_linear``, mergekit's ``weight`` and ``density``), the Flower strategy one-shot and
multi-round (in process, against the plain-PyTorch reference loop), and the compare experiment.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from helpers import InProcessGrid, assert_states_close, config
from safetensors.torch import load_file, save_file

from fl_sim.cli.main import main as cli_main
from fl_sim.experiments.compare import expand_experiment
from fl_sim.federation.reference import run_reference
from fl_sim.federation.server_app import run_federation
from fl_sim.suites.registry import make_suite
from strategies.registry import RuleConfig, make_rule
from strategies.streaming import AggregationOptions, TensorPlan, aggregate_model

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache", "task_identity")

T = 3


def merge_directly(rule: RuleConfig, base, models, beta: float) -> dict[str, torch.Tensor]:
    """θ₀ + β·A through the engine, from tensors in memory (the independent side)."""
    plans = [TensorPlan(n, tuple(x.shape), x.dtype) for n, x in base.items()]
    engine = aggregate_model(
        make_rule(rule, len(models)),
        plans,
        base.__getitem__,
        [m.__getitem__ for m in models],
        AggregationOptions(server_lr=beta, inputs="models"),
    )
    return {name: tensor.clone() for name, tensor in engine}


@pytest.fixture
def checkpoints(tmp_path):
    generator = torch.Generator().manual_seed(0)
    shapes = {"layer.weight": (6, 5), "layer.bias": (6,), "head.weight": (3, 6)}
    base = {n: torch.randn(s, generator=generator) for n, s in shapes.items()}
    models = [
        {n: x + 0.1 * torch.randn(x.shape, generator=generator) for n, x in base.items()}
        for _ in range(T)
    ]
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for t, model in enumerate(models):
        paths.append(tmp_path / f"ft{t}.safetensors")
        save_file(model, paths[-1])
    return tmp_path, base, models, paths


def merged(out: Path) -> tuple[dict[str, torch.Tensor], dict]:
    report = json.loads(out.with_name(f"{out.stem}.merge_report.json").read_text())
    return load_file(out), report


def test_ties_from_flags_and_from_mergekit_yaml(checkpoints):
    folder, base, models, paths = checkpoints
    out = folder / "flags.safetensors"
    argv = ["merge", "--method", "ties", "--density", "0.4", "--lambda", "0.7"]
    argv += ["--base", str(folder / "base.safetensors"), "--out", str(out), "--no-progress"]
    assert cli_main([*argv, *map(str, paths)]) == 0
    state, report = merged(out)
    rule = RuleConfig("ties", density=0.4)
    assert_states_close(state, merge_directly(rule, base, models, 0.7), atol=1e-6)  # β = λ
    assert report["parameters"]["density"] == 0.4 and report["rule"]["density"] == 0.4

    # mergekit's ties: per-model weight and density, normalize; p ∝ w and β = λ (it divides)
    document = {
        "merge_method": "ties",
        "base_model": str(folder / "base.safetensors"),
        "models": [
            {"model": str(p), "parameters": {"weight": w, "density": 0.4}}
            for p, w in zip(paths, (1.0, 2.0, 1.0), strict=True)
        ],
        "parameters": {"normalize": True, "lambda": 0.7},
    }
    config_path = folder / "ties.yaml"
    config_path.write_text(yaml.safe_dump(document))
    out = folder / "yaml.safetensors"
    assert cli_main(["merge", str(config_path), "--out", str(out), "--no-progress"]) == 0
    state, _ = merged(out)
    rule = RuleConfig("ties", weights=[1.0, 2.0, 1.0], density=0.4)
    assert_states_close(state, merge_directly(rule, base, models, 0.7), atol=1e-6)


def test_dare_linear_from_mergekit_yaml_sums_the_weighted_task_vectors(checkpoints):
    folder, base, models, paths = checkpoints
    weights = (0.5, 1.0, 1.5)
    document = {
        "merge_method": "dare_linear",
        "base_model": str(folder / "base.safetensors"),
        "models": [
            {"model": str(p), "parameters": {"weight": w, "density": 0.6}}
            for p, w in zip(paths, weights, strict=True)
        ],
        "parameters": {"seed": 11},
    }
    config_path = folder / "dare.yaml"
    config_path.write_text(yaml.safe_dump(document))
    out = folder / "dare.safetensors"
    assert cli_main(["merge", str(config_path), "--out", str(out), "--no-progress"]) == 0
    state, report = merged(out)
    # mergekit: θ₀ + Σ_t w_t τ̃_t, i.e. p = w / Σ w and β = Σ w
    rule = RuleConfig("dare", weights=list(weights), density=0.6, seed=11)
    assert_states_close(state, merge_directly(rule, base, models, sum(weights)), atol=1e-6)
    assert report["rule"]["seed"] == 11 and report["parameters"]["seed"] == 11


@pytest.mark.parametrize(
    ("rule", "knobs"),
    [("ties", {"ties-density": 0.5}), ("dare", {"dare-density": 0.7, "dare-seed": 3})],
)
@pytest.mark.parametrize("num_rounds", [1, 2])
def test_the_flower_strategy_equals_the_reference_loop(tmp_path, rule, knobs, num_rounds):
    """The real ClientApp and ServerApp in process: the registry's rule, its knobs and (dare)
    its per-round seed reach the Flower round exactly as the reference loop applies them."""
    cfg = config(strategy=rule, num_rounds=num_rounds, results_dir=str(tmp_path), **knobs)
    results = run_federation(InProcessGrid(T), cfg)
    assert results["status"] == "completed" and results["failures"] == []
    suite = make_suite("toy", num_tasks=T, seed=0)
    reference = run_reference(
        suite,
        cfg.client_knobs(),
        RuleConfig(rule, knobs=cfg.rule.rule_knobs),
        num_rounds=num_rounds,
        server_lr=cfg.rule.server_lr,
    )
    assert_states_close(load_file(tmp_path / "global_model.safetensors"), reference.state)
    summaries = [r["training"]["rule_summary"] for r in results["rounds"] if "training" in r]
    assert len(summaries) == num_rounds
    if rule == "dare":  # the rule's seed + round − 1, recorded every round
        assert [s["seed"] for s in summaries] == [3 + r for r in range(num_rounds)]


def test_the_compare_experiment_runs_registered_rules_with_their_knobs():
    cfg = config(experiment="compare", rules="fedavg,ties,dare", ties_density=0.3, multi_rounds=2)
    runs = expand_experiment(cfg)
    names = [(run.rule.strategy, run.rule.num_rounds) for run in runs]
    assert names == [
        ("fedavg", 1),
        ("ties", 1),
        ("dare", 1),
        ("fedavg", 2),
        ("ties", 2),
        ("dare", 2),
    ]
    assert all(run.rule.knobs["ties"].density == 0.3 for run in runs)
