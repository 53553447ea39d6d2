"""The Flower half: run config, strategies, ClientApp and ServerApp, and the identities end to end.

Fast tests build Flower Messages in-process (with ``TaskIdentity`` set, as ``run_simulation``
does) and drive the real ClientApp and ServerApp code through ``InProcessGrid``, a Grid that
calls the ClientApp directly. The ``slow`` tests run one simulation on Ray (``fl-sim run``'s
engine) holding several runs, and check the paper's identity end to end:

    one-shot FedAvg (p_t = 1/T, β = λT) through Flower = θ₀ + λ Σ_t (θ_t − θ₀) = run_reference.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict
from helpers import InProcessGrid, assert_states_close, config
from safetensors.torch import load_file

from fl_sim.checkpoints.array_records import record_to_tensors, tensors_to_record
from fl_sim.cli.main import main as cli_main
from fl_sim.config.run_config import RunConfig, help_text, parse_override, read_toml, toml_table
from fl_sim.errors import ConfigError
from fl_sim.federation.reference import run_reference
from fl_sim.federation.server_app import run_federation
from fl_sim.federation.server_app import strategy_for as make_strategy
from fl_sim.suites.registry import make_suite
from strategies.flower_strategy import STRATEGIES, FederationError
from strategies.registry import RuleConfig

LAM = 0.3
T = 3
pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


# ---------------------------------------------------------------------------------------------
# Run config: one-line errors, parsed once
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"strategy": "fedprox"}, "unknown strategy 'fedprox'; choose one of"),
        ({"lr": -0.1}, "lr"),
        ({"rho": 1.5}, "rho must be in [0, 1], got 1.5"),
        ({"x": 1}, "unknown run-config key 'x' (see fl-sim run --help)"),
        ({"num-rounds": 0}, "num-rounds must be an integer ≥ 1, got 0"),
        ({"num-rounds": 1.5}, "num-rounds must be an integer, got 1.5"),
        ({"server-lr": "fast"}, "server-lr must be a number, got 'fast'"),
        ({"full-batch": "yes"}, "full-batch must be true or false"),
        ({"strategy": "cclip"}, "cclip needs tau-c > 0"),
        ({"weighting": "examples", "strategy": "median"}, "median is unweighted"),
        ({"weighting": "size"}, "unknown weighting 'size'"),
        ({"server-device": "tpu"}, "unknown server-device 'tpu'"),
        ({"min-clients": 9}, "min-clients must be ≤ num-tasks"),
        (
            {"preset": "steps-hetero", "lr": "0.1,0.2,0.3"},
            "preset 'steps-hetero' spreads one base lr",
        ),
        ({"local-steps": "5,6"}, "local-steps: got 2 values for 3 clients"),
    ],
)
def test_bad_run_config_is_a_one_line_config_error(values, message):
    with pytest.raises(ConfigError) as error:
        config(**{k.replace("-", "_"): v for k, v in values.items()})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_run_config_reads_toml_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[tool.flwr.app.config]\nexperiment = "single"\npreset = "none"\nstrategy = "fednova"\n'
        "num-rounds = 3\n"
        'lr = "log:0.01:0.1"\n'
    )
    cfg = RunConfig.from_sources(path, ["num-rounds=5", "a-norm=steps", "tau-c=inf"])
    assert (
        cfg.rule.strategy,
        cfg.rule.num_rounds,
        cfg.training.a_norm,
        cfg.rule.knobs["cclip"].tau_c,
    ) == (
        "fednova",
        5,
        "steps",
        float("inf"),
    )
    lrs = [k.lr for k in cfg.client_knobs()]
    assert lrs[0] == pytest.approx(0.01) and lrs[-1] == pytest.approx(0.1)
    assert parse_override('lr="0.1,0.2"') == ("lr", "0.1,0.2")
    with pytest.raises(ConfigError, match="is not key=value"):
        parse_override("num-rounds")
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "missing.toml")


def test_every_key_has_a_default_in_the_pyproject_table_and_the_help(tmp_path):
    path = tmp_path / "pyproject.toml"
    path.write_text(toml_table())
    assert RunConfig.from_sources(path) == RunConfig()
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == RunConfig().to_mapping()
    for key in RunConfig().to_mapping():
        assert f"  {key} = " in help_text()


# ---------------------------------------------------------------------------------------------
# Strategies and the ClientApp, in-process
# ---------------------------------------------------------------------------------------------


def test_array_records_round_trip_without_copy_on_the_server():
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5)}
    record = tensors_to_record(tensors)
    views = record_to_tensors(record)
    assert_states_close(views, tensors, atol=0)
    payload = np.frombuffer(record["a"].data, dtype=np.uint8).ctypes.data
    inside = range(payload, payload + len(record["a"].data))
    assert views["a"].data_ptr() in inside  # a view of the message's bytes, no copy
    assert record_to_tensors(record, writable=True)["a"].data_ptr() not in inside


def fake_round(strategy, theta, updates, server_round=1, fail=(), metrics=None):
    """configure_train, then replies carrying ``updates[t]`` (or an error for t in ``fail``)."""
    messages = list(
        strategy.configure_train(server_round, tensors_to_record(theta), ConfigRecord(), None)
    )
    replies = []
    for msg in messages:
        t = strategy.node_tasks[msg.metadata.dst_node_id]
        if t in fail:
            replies.append(Message(Error(code=2, reason="boom"), reply_to=msg))
            continue
        m = {
            "num-examples": 10 * (t + 1),
            "local-steps": 4,
            "a-norm": 1.0,
            "a-norm-steps": 4.0,
            "a-norm-lr-sum": 1.0,
            "a-norm-exact": 1,
            "loss-before": 1.0,
            "loss-after": 0.5,
            **((metrics or {}).get(t, {})),
        }
        content = RecordDict({"arrays": tensors_to_record(updates[t]), "metrics": MetricRecord(m)})
        replies.append(Message(content, reply_to=msg))
    return strategy.aggregate_train(server_round, replies)


def test_strategy_sends_each_node_its_own_knobs(task_identity):
    cfg = config(preset="steps-hetero")
    strategy = make_strategy(cfg, {100: 0, 101: 1, 102: 2})
    theta = {"w": torch.zeros(2)}
    messages = list(strategy.configure_train(1, tensors_to_record(theta), ConfigRecord(), None))
    steps = {m.metadata.dst_node_id: m.content["config"]["local-steps"] for m in messages}
    assert steps == {100 + t: k.local_steps for t, k in enumerate(cfg.client_knobs())}
    assert len(set(steps.values())) == T
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)


def test_fedavg_strategy_records_a_failed_client_and_goes_on(task_identity):
    theta = {"w": torch.tensor([1.0, 2.0])}
    updates = {t: {"w": torch.tensor([float(t), 1.0])} for t in range(T)}
    strategy = make_strategy(config(min_clients=2, server_lr=0.5), {100: 0, 101: 1, 102: 2})
    arrays, _ = fake_round(strategy, theta, updates, fail={1})
    merged = record_to_tensors(arrays)
    # clients 0 and 2, p = 1/2: θ + 0.5 · mean(Δ_0, Δ_2)
    torch.testing.assert_close(merged["w"], torch.tensor([1.0 + 0.5 * 1.0, 2.5]))
    [failure] = strategy.failures
    assert (failure.round, failure.node_id, failure.task, failure.phase) == (1, 101, 1, "train")
    assert "boom" in failure.reason
    assert strategy.rounds[0].clients == [0, 2]


def test_too_few_clients_is_a_one_line_federation_error(task_identity):
    theta = {"w": torch.zeros(2)}
    updates = {t: {"w": torch.ones(2)} for t in range(T)}
    strategy = make_strategy(config(), {100: 0, 101: 1, 102: 2})  # min-clients = 0: all
    with pytest.raises(FederationError) as error:
        fake_round(strategy, theta, updates, fail={2})
    assert "round 1: only 2 of 3 clients delivered an update" in str(error.value)
    assert "\n" not in str(error.value)


def test_fednova_strategy_effective_weights_follow_the_clients_a_norm(task_identity):
    theta = {"w": torch.zeros(1)}
    updates = {t: {"w": torch.tensor([float(t + 1)])} for t in range(T)}
    a = {0: 1.0, 1: 2.0, 2: 3.0}
    strategy = make_strategy(config(strategy="fednova"), {100: 0, 101: 1, 102: 2})
    assert isinstance(strategy, STRATEGIES["fednova"])
    arrays, _ = fake_round(strategy, theta, updates, metrics={t: {"a-norm": a[t]} for t in a})
    record = strategy.rounds[0]
    w = [x / 6 for x in (1.0, 2.0, 3.0)]
    assert record.effective_weights == pytest.approx(w)
    assert record.chi_square == pytest.approx(sum((1 / 3 - x) ** 2 / x for x in w))
    # A = τ_eff Σ p_t Δ_t / ‖a_t‖₁ = 2 · (1/3)(1 + 1 + 1) = 2
    torch.testing.assert_close(record_to_tensors(arrays)["w"], torch.tensor([2.0]))


def test_cclip_strategy_centres_round_two_at_round_one_update(task_identity):
    theta = {"w": torch.zeros(2)}
    updates = {t: {"w": torch.tensor([1.0, 0.0])} for t in range(T)}
    strategy = make_strategy(
        config(strategy="cclip", tau_c=10.0, server_lr=0.5), {100: 0, 101: 1, 102: 2}
    )
    assert isinstance(strategy, STRATEGIES["cclip"]) and strategy.center() is None
    fake_round(strategy, theta, updates)
    torch.testing.assert_close(strategy.center()["w"], torch.tensor([1.0, 0.0]))  # A, not β·A
    assert strategy.rounds[0].update_norms == pytest.approx([1.0] * T)


def test_one_shot_fedavg_in_process_equals_run_reference(tmp_path, task_identity):
    """The real ClientApp and ServerApp without Ray (InProcessGrid): same Δ_t, same merge."""
    cfg = config(server_lr=LAM * T, results_dir=str(tmp_path / "run"))
    results = run_federation(InProcessGrid(T), cfg)
    assert results["status"] == "completed" and results["failures"] == []
    suite = make_suite("toy", num_tasks=T, seed=0)
    reference = run_reference(
        suite, cfg.client_knobs(), RuleConfig("fedavg"), num_rounds=1, server_lr=LAM * T
    )
    assert_states_close(load_file(tmp_path / "run" / "global_model.safetensors"), reference.state)
    accuracy = [x["accuracy"] for x in results["rounds"][1]["tasks"]]
    assert accuracy == pytest.approx(reference.history[1].val_accuracy)
    # `fl-sim merge --method task_arithmetic` from the checkpoints the run saved, bit for bit
    # (strategies/streaming.py: linear rules add Σ_t (β c_t) Δ_t to θ₀ on one Δ-based path)
    run, offline = tmp_path / "run", tmp_path / "offline.safetensors"
    argv = ["merge", "--method", "task_arithmetic", "--lambda", str(LAM), "--no-progress"]
    argv += ["--base", str(run / "base.safetensors"), "--out", str(offline)]
    argv += [str(run / path) for path in results["files"]["clients"]]
    assert cli_main(argv) == 0
    flower, merged = load_file(run / "global_model.safetensors"), load_file(offline)
    assert flower.keys() == merged.keys()
    for name, tensor in flower.items():
        assert torch.equal(tensor, merged[name]), name


def test_client_evaluate_reports_its_task_accuracy(task_identity):
    cfg = config()
    suite = make_suite("toy", num_tasks=T, seed=0)
    grid = InProcessGrid(T)
    strategy = make_strategy(cfg, {100: 0, 101: 1, 102: 2}, evaluate_on_clients=True)
    messages = strategy.configure_evaluate(
        0, tensors_to_record(suite.initial_state()), ConfigRecord(), grid
    )
    metrics = strategy.aggregate_evaluate(0, grid.send_and_receive(messages))
    model = suite.build_model()
    expected = [suite.evaluate(model, task, "val")[1] for task in suite.tasks]
    assert metrics["accuracy"] == pytest.approx(sum(expected) / T)


# ---------------------------------------------------------------------------------------------
# End to end on Flower's simulation engine (Ray): one Ray start, several runs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    from fl_sim.federation.simulation import simulate

    root = tmp_path_factory.mktemp("federation")
    runs = {
        "fedavg": config(server_lr=LAM * T),
        "fednova_same": config(strategy="fednova", server_lr=LAM * T),
        "fednova_steps": config(strategy="fednova", preset="steps-hetero", server_lr=LAM * T),
        "failure": config(num_rounds=3, fail_client=1, fail_round=2, min_clients=2),
        "too_few": config(num_rounds=2, fail_client=1, fail_round=2),
    }
    configs = [
        RunConfig.from_mapping(
            {**c.to_mapping(), "results-dir": str(root / name), "cache-dir": str(root / "cache")}
        )
        for name, c in runs.items()
    ]
    with pytest.raises(FederationError) as error:
        simulate(configs, progress=False)
    return root, error.value


def read_run(root: Path, name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    results = json.loads((root / name / "results.json").read_text())
    model = root / name / "global_model.safetensors"
    return results, (load_file(model) if model.exists() else {})


@pytest.mark.slow
def test_task_arithmetic_equals_one_shot_fedavg_through_flower(simulation):
    root, _ = simulation
    results, merged = read_run(root, "fedavg")
    assert results["status"] == "completed"
    # (i) task arithmetic from the checkpoints the run saved: θ₀ + λ Σ_t (θ_t − θ₀)
    theta0 = load_file(root / "fedavg" / "base.safetensors")
    clients = [load_file(root / "fedavg" / path) for path in results["files"]["clients"]]
    assert len(clients) == T
    task_arithmetic = {
        name: theta0[name] + LAM * sum(c[name] - theta0[name] for c in clients) for name in theta0
    }
    assert_states_close(merged, task_arithmetic, atol=1e-5)
    # (i') the same checkpoints through the real `fl-sim merge --method task_arithmetic --lambda λ`
    offline = root / "fedavg-offline.safetensors"
    argv = ["merge", "--method", "task_arithmetic", "--lambda", str(LAM), "--no-progress"]
    argv += ["--base", str(root / "fedavg" / "base.safetensors"), "--out", str(offline)]
    argv += [str(root / "fedavg" / path) for path in results["files"]["clients"]]
    assert cli_main(argv) == 0
    offline_model = load_file(offline)  # bit for bit: strategies/streaming.py's one linear path
    assert all(torch.equal(merged[name], offline_model[name]) for name in merged), "offline"
    # (ii) the plain-PyTorch reference loop
    cfg = RunConfig.from_mapping(results["config"])
    suite = make_suite("toy", num_tasks=T, seed=0)
    reference = run_reference(
        suite, cfg.client_knobs(), RuleConfig("fedavg"), num_rounds=1, server_lr=LAM * T
    )
    assert_states_close(merged, reference.state)
    # results: per-task metrics every round, the fine-tuned accuracy, χ² = 0 when homogeneous
    assert [r["round"] for r in results["rounds"]] == [0, 1]
    assert set(results["finetuned"]) == {"0", "1", "2"}
    assert results["rounds"][1]["training"]["chi_square"] == pytest.approx(0.0)
    csv_lines = (root / "fedavg" / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * 2 * T  # rounds 0 and 1, val and test, every task


@pytest.mark.slow
def test_fednova_equals_fedavg_when_training_is_homogeneous_through_flower(simulation):
    root, _ = simulation
    _, fedavg = read_run(root, "fedavg")
    _, fednova = read_run(root, "fednova_same")
    assert_states_close(fednova, fedavg)


@pytest.mark.slow
def test_fednova_with_heterogeneous_steps_differs_and_records_effective_weights(simulation):
    root, _ = simulation
    results, fednova = read_run(root, "fednova_steps")
    training = results["rounds"][1]["training"]
    steps = training["local_steps"]
    assert len(set(steps)) == T
    p, a = training["weights"], training["a_norm"]
    assert a == pytest.approx([0.05 * k for k in steps])  # lr-sum = η K_t, constant η
    w = [
        pi * ai / sum(pj * aj for pj, aj in zip(p, a, strict=True))
        for pi, ai in zip(p, a, strict=True)
    ]
    assert training["effective_weights"] == pytest.approx(w)
    assert training["chi_square"] == pytest.approx(
        sum((pi - wi) ** 2 / wi for pi, wi in zip(p, w, strict=True))
    )
    # FedAvg of the same clients (from the saved checkpoints) is a different model
    theta0 = load_file(root / "fednova_steps" / "base.safetensors")
    clients = [load_file(root / "fednova_steps" / path) for path in results["files"]["clients"]]
    fedavg = {n: theta0[n] + LAM * sum(c[n] - theta0[n] for c in clients) for n in theta0}
    name = next(n for n in theta0 if theta0[n].is_floating_point() and theta0[n].dim() == 2)
    assert not torch.allclose(fednova[name], fedavg[name], atol=1e-4)
    # and FedNova's own formula: θ₀ + β τ_eff Σ_t p_t Δ_t / ‖a_t‖₁
    tau_eff = sum(pi * ai for pi, ai in zip(p, a, strict=True))
    expected = {
        n: theta0[n]
        + LAM
        * T
        * tau_eff
        * sum(pi / ai * (c[n] - theta0[n]) for pi, ai, c in zip(p, a, clients, strict=True))
        for n in theta0
    }
    assert_states_close(fednova, expected, atol=1e-5)


@pytest.mark.slow
def test_failed_client_is_recorded_and_the_run_finishes(simulation):
    root, error = simulation
    results, merged = read_run(root, "failure")
    assert results["status"] == "completed" and merged
    [failure] = [f for f in results["failures"] if f["phase"] == "train"]
    assert (failure["round"], failure["task"]) == (2, 1)
    assert "fault injection: client 1 fails in round 2" in failure["reason"]
    assert [r["training"]["clients"] for r in results["rounds"][1:]] == [
        [0, 1, 2],
        [0, 2],
        [0, 1, 2],
    ]
    # the same fault with min-clients = 0 (all) stops that run with a one-line error
    assert "round 2: only 2 of 3 clients delivered an update" in str(error)
    assert "\n" not in str(error)
    too_few, _ = read_run(root, "too_few")
    assert too_few["status"] == "failed" and too_few["error"] == str(error)


@pytest.mark.slow
def test_later_runs_of_a_sweep_reuse_the_cached_updates_through_ray(simulation):
    root, _ = simulation
    first, _ = read_run(root, "fedavg")
    same, _ = read_run(root, "fednova_same")  # the same clients, knobs and θ₀: nothing to train
    assert first["rounds"][1]["update_cache"] == {"trained": T, "cached": 0}
    assert same["rounds"][1]["update_cache"] == {"trained": 0, "cached": T}
    assert same["rounds"][1]["training"]["cached"] == [True] * T
