"""The streaming server (``server-streaming``): replies folded or spilled as they arrive.

Hand-made replies first: the running fold of the linear rules against the in-memory path and
against A = Σ_t c_t Δ_t computed here in float64; the spill path bit for bit against the
in-memory path; a bad reply recorded and neither folded nor spilled; spill files gone after a
round, also a failed one; no reply kept once folded. Then the real ClientApp through a grid
with Flower's push/pull API (the streaming loop itself, its timeout and a resume), and, marked
slow, a simulation on Ray with streaming on and off.
"""

from __future__ import annotations

import gc
import itertools
import json
import uuid
import weakref
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import (
    ConfigRecord,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from helpers import InProcessGrid, config
from safetensors.torch import load_file

from fl_sim.checkpoints.array_records import record_to_tensors, tensors_to_record
from fl_sim.federation.round_checkpoint import read_checkpoint
from fl_sim.federation.server_app import run_federation, strategy_for
from strategies.flower_strategy import AggregationSettings, FederationError, make_strategy
from strategies.round_accumulator import LinearFold, fold_factor

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")
F64 = torch.float64
NODES = 5


def theta_and_updates(num_clients: int, seed: int = 0):
    """θʳ (two float tensors and an integer buffer) and Δ_t of every client."""
    g = torch.Generator().manual_seed(seed)
    theta = {
        "layer.weight": torch.randn(6, 5, generator=g),
        "layer.bias": torch.randn(5, generator=g),
        "position_ids": torch.arange(4),
    }
    updates = {
        t: {
            "layer.weight": torch.randn(6, 5, generator=g) * (t + 1),
            "layer.bias": torch.randn(5, generator=g) / (t + 1),
            "position_ids": torch.arange(4),
        }
        for t in range(num_clients)
    }
    return theta, updates


def reply_metrics(t: int, a_norm: float) -> dict[str, float]:
    return {
        "num-examples": 10 * (t + 1) + t * t,  # n_t: unequal
        "local-steps": 4 + t,
        "a-norm": a_norm,
        "a-norm-steps": 4.0 + t,
        "a-norm-lr-sum": a_norm,
        "a-norm-exact": 1,
        "loss-before": 1.0 + t,
        "loss-after": 0.5,
    }


A_NORMS = {0: 1.0, 1: 2.5, 2: 0.4, 3: 7.0, 4: 1.25}  # heterogeneous ‖a_t‖₁


def hand_made_replies(strategy, theta, updates, *, server_round=1, bad=None, order=None):
    """configure_train, then one reply per node carrying Δ_t (``bad``: t → what to send
    instead: an Error, or a (arrays, metrics) pair)."""
    messages = list(
        strategy.configure_train(server_round, tensors_to_record(theta), ConfigRecord(), None)
    )
    replies = []
    for msg in messages:
        t = strategy.node_tasks[msg.metadata.dst_node_id]
        arrays, metrics = tensors_to_record(updates[t]), reply_metrics(t, A_NORMS[t])
        if bad and t in bad:
            if isinstance(bad[t], Error):
                replies.append(Message(bad[t], reply_to=msg))
                continue
            arrays, metrics = bad[t]
        content = RecordDict({"metrics": MetricRecord(metrics)})
        if arrays is not None:
            content["arrays"] = arrays
        replies.append(Message(content, reply_to=msg))
    if order is not None:
        replies = [replies[i] for i in order]
    return replies


def strategy(tmp_path, streaming: bool, num_clients: int = NODES, **knobs):
    settings = AggregationSettings(
        device="cpu",
        min_clients=knobs.pop("min_clients", 0),
        streaming=streaming,
        spill_dir=str(tmp_path / "spill"),
    )
    cfg = config(num_tasks=num_clients, **knobs)
    return make_strategy(cfg.rule, {100 + t: t for t in range(num_clients)}, settings=settings)


def one_round(tmp_path, streaming, theta, updates, *, order=None, server_round=1, **knobs):
    s = strategy(tmp_path, streaming, len(updates), **knobs)
    replies = hand_made_replies(s, theta, updates, server_round=server_round, order=order)
    arrays, _ = s.aggregate_train(server_round, replies)
    return record_to_tensors(arrays), s


def hand_coefficients(rule: str, weighting: str, tasks: list[int]) -> torch.Tensor:
    """c_t with A = Σ_t c_t Δ_t, straight from docs/design.md's formulas."""
    w = torch.tensor(
        [reply_metrics(t, 1.0)["num-examples"] if weighting == "examples" else 1.0 for t in tasks],
        dtype=F64,
    )
    p = w / w.sum()
    if rule != "fednova":
        return p
    a = torch.tensor([A_NORMS[t] for t in tasks], dtype=F64)
    tau_eff = (p * a).sum()
    return tau_eff * p / a


LINEAR = [
    ("fedavg", "uniform"),
    ("fedavg", "examples"),
    ("task_arithmetic", "uniform"),
    ("fednova", "uniform"),
    ("fednova", "examples"),
]


@pytest.mark.parametrize(("rule", "weighting"), LINEAR)
def test_fold_equals_the_in_memory_aggregation_and_the_formula(
    tmp_path, task_identity, rule, weighting
):
    theta, updates = theta_and_updates(NODES)
    knobs = {"strategy": rule, "weighting": weighting, "server_lr": 0.7, "lambda": 0.3}
    before, _ = one_round(tmp_path / "a", False, theta, updates, **knobs)
    order = [3, 0, 4, 1, 2]  # replies arrive out of task order
    after, s = one_round(tmp_path / "b", True, theta, updates, order=order, **knobs)
    assert not (tmp_path / "b" / "spill").exists()  # folded: nothing was spilled
    beta = 0.3 * NODES if rule == "task_arithmetic" else 0.7
    c = hand_coefficients(rule, weighting, list(range(NODES)))
    for name, base in theta.items():
        if not base.is_floating_point():
            assert torch.equal(after[name], base) and after[name].dtype == base.dtype
            continue
        a = sum(c[t] * updates[t][name].to(F64) for t in range(NODES))
        want = base.to(F64) + beta * a
        torch.testing.assert_close(after[name].to(F64), want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(after[name], before[name], rtol=1e-6, atol=1e-6)
        assert after[name].dtype == base.dtype
    record = s.rounds[0]
    assert record.clients == list(range(NODES))  # in task order, whatever the arrival
    assert record.update_norms == pytest.approx(
        [float(torch.cat([u.flatten() for u in updates[t].values()][:2]).norm()) for t in updates]
    )


def test_fold_factors_and_the_scale_give_the_rules_coefficients():
    """u_t = w_t/d_t on arrival, g from the rule's c_t at the end: c_t = g u_t."""
    theta = {"w": torch.zeros(2)}
    fold = LinearFold(theta, torch.device("cpu"))
    n, a = [10, 30, 60], [1.0, 2.0, 4.0]
    for t in range(3):
        fold.add(
            t, fold_factor(n[t], a[t], weighted=True, normalised=True), {"w": torch.ones(2)}, "c"
        )
    p = torch.tensor(n, dtype=F64) / sum(n)
    tau_eff = float((p * torch.tensor(a, dtype=F64)).sum())
    c = tau_eff * p / torch.tensor(a, dtype=F64)
    g = fold.scale([0, 1, 2], c)
    assert g == pytest.approx(tau_eff / sum(n), rel=1e-12)
    with pytest.raises(Exception, match="cannot be folded"):
        fold.scale([0, 1, 2], torch.tensor([0.2, 0.3, 0.5], dtype=F64))
    merged = fold.merged(g, 2.0, zero_base=False)
    torch.testing.assert_close(merged["w"], torch.full((2,), 2.0 * float(c.sum())))


@pytest.mark.parametrize(
    ("rule", "knobs"),
    [("median", {}), ("cclip", {"tau_c": 0.8}), ("fedgma", {"rho": 0.4}), ("ties", {})],
)
def test_spill_is_bit_identical_to_the_in_memory_path(tmp_path, task_identity, rule, knobs):
    theta, updates = theta_and_updates(NODES, seed=1)
    knobs = {"strategy": rule, "server_lr": 0.9, **knobs}
    a = strategy(tmp_path / "a", False, **knobs)
    b = strategy(tmp_path / "b", True, **knobs)
    seen: list[list[str]] = []
    b.on_updates = lambda r, u: seen.append(sorted(p.name for p in (tmp_path / "b").rglob("*")))
    for server_round in (1, 2):  # cclip: round 2 is centred at round 1's A
        before = a.aggregate_train(
            server_round, hand_made_replies(a, theta, updates, server_round=server_round)
        )
        after = b.aggregate_train(
            server_round,
            hand_made_replies(b, theta, updates, server_round=server_round, order=[4, 2, 0, 3, 1]),
        )
        x, y = record_to_tensors(before[0]), record_to_tensors(after[0])
        assert x.keys() == y.keys()
        for name in x:
            assert torch.equal(x[name], y[name]), (rule, server_round, name)
        theta = {k: v.clone() for k, v in y.items()}
    # the Δ_t were on disk while the round aggregated, one file per client, and are gone now
    files = [f"client_{t}.safetensors" for t in range(NODES)]
    assert seen[0] == [*files, "round-1", "spill"]
    assert not (tmp_path / "b" / "spill").exists()
    assert a.rounds[-1].update_norms == pytest.approx(b.rounds[-1].update_norms)
    assert a.rounds[-1].rule_summary == b.rounds[-1].rule_summary


@pytest.mark.parametrize("streaming", [False, True])
def test_a_bad_reply_is_recorded_and_never_aggregated(tmp_path, task_identity, streaming):
    theta, updates = theta_and_updates(NODES, seed=2)
    nan = {k: v.clone() for k, v in updates[1].items()}
    nan["layer.bias"][2] = float("nan")
    wrong_shape = {**updates[3], "layer.bias": torch.zeros(4)}
    wrong_dtype = {**updates[4], "layer.weight": updates[4]["layer.weight"].to(F64)}
    missing = {k: v for k, v in updates[0].items() if k != "layer.bias"}
    bad = {
        0: (tensors_to_record(missing), reply_metrics(0, 1.0)),
        1: (tensors_to_record(nan), reply_metrics(1, 1.0)),
        3: (tensors_to_record(wrong_shape), reply_metrics(3, 1.0)),
        4: (tensors_to_record(wrong_dtype), reply_metrics(4, 1.0)),
    }
    s = strategy(tmp_path, streaming, strategy="fedavg", server_lr=1.0, min_clients=1)
    arrays, _ = s.aggregate_train(1, hand_made_replies(s, theta, updates, bad=bad))
    merged = record_to_tensors(arrays)
    # only client 2 was aggregated: θ + 1·Δ_2
    for name in ("layer.weight", "layer.bias"):
        torch.testing.assert_close(merged[name], theta[name] + updates[2][name])
    failures = {(f.node_id, f.round, f.task, f.phase): f.reason for f in s.failures}
    assert sorted(failures) == [(100 + t, 1, t, "train") for t in (0, 1, 3, 4)]
    assert "missing ['layer.bias']" in failures[(100, 1, 0, "train")]
    assert failures[(101, 1, 1, "train")] == "non-finite update (NaN or Inf in 'layer.bias')"
    assert "has shape (4,), the model's is (5,)" in failures[(103, 1, 3, "train")]
    assert failures[(104, 1, 4, "train")] == (
        "update 'layer.weight' has dtype float64, the model's is float32"
    )
    assert s.rounds[0].clients == [2] and s.rounds[0].failures == 4


def test_a_reply_without_arrays_is_a_failure_while_streaming(tmp_path, task_identity):
    theta, updates = theta_and_updates(3)
    s = strategy(tmp_path, True, 3, strategy="fedavg", min_clients=2)
    bad = {1: (None, reply_metrics(1, 1.0))}
    s.aggregate_train(1, hand_made_replies(s, theta, updates, bad=bad))
    [failure] = s.failures
    assert (failure.task, failure.reason) == (1, "reply lacks 'arrays'")


def test_spill_files_are_removed_when_a_round_fails(tmp_path, task_identity):
    theta, updates = theta_and_updates(NODES, seed=3)
    s = strategy(tmp_path, True, strategy="median")  # min-clients = 0: every client must deliver
    failed = {2: Error(code=2, reason="boom")}
    # what the round writes: one file per valid reply, as it arrives
    intake = s._open_intake(1)
    try:
        for reply in hand_made_replies(s, theta, updates, bad=failed):
            s._take_reply(1, intake, reply)
        names = [p.name for p in intake.spill.files()]
        assert names == [f"client_{t}.safetensors" for t in (0, 1, 3, 4)]
    finally:
        intake.close()
    assert not (tmp_path / "spill").exists()
    # the same round through aggregate_train fails, and leaves no spill file behind
    s = strategy(tmp_path, True, strategy="median")
    with pytest.raises(FederationError, match="only 4 of 5 clients delivered"):
        s.aggregate_train(1, hand_made_replies(s, theta, updates, bad=failed))
    assert not (tmp_path / "spill").exists()
    # so does a round whose diagnostics raise while the files are open
    s = strategy(tmp_path, True, strategy="fedgma")
    s.on_updates = lambda r, u: (_ for _ in ()).throw(RuntimeError("diagnostic failed"))
    with pytest.raises(RuntimeError, match="diagnostic failed"):
        s.aggregate_train(1, hand_made_replies(s, theta, updates))
    assert not (tmp_path / "spill").exists()


# ---------------------------------------------------------------------------------------------
# The streaming loop: Flower's push/pull API with the real ClientApp
# ---------------------------------------------------------------------------------------------


class PushPullGrid(InProcessGrid):
    """InProcessGrid with Flower's ``push_messages``/``pull_messages``: a pushed message is
    answered by the real ClientApp when pulled, one reply per pull (as replies trickle in), and
    the grid keeps nothing once a reply is pulled (as ``InMemoryGrid`` deletes it). It keeps
    weak references to every reply and its ArrayRecord: ``alive`` counts the earlier replies
    still alive at each pull. ``silent``: tasks whose node never answers."""

    pull_interval = 0.01

    def __init__(self, num_nodes: int, silent: Iterable[int] = ()) -> None:
        super().__init__(num_nodes)
        self.silent = {100 + t for t in silent}
        self.pending: dict[str, Message] = {}
        self.refs: list[weakref.ref] = []
        self.alive: list[int] = []
        self.pushed_rounds: list[str] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            if msg.metadata.message_type == MessageType.TRAIN:
                self.pushed_rounds.append(msg.metadata.group_id)
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        gc.collect()
        self.alive.append(sum(ref() is not None for ref in self.refs))
        for message_id in message_ids:
            msg = self.pending.get(message_id)
            if msg is None or msg.metadata.dst_node_id in self.silent:
                continue
            del self.pending[message_id]
            [reply] = self.send_and_receive([msg])
            self.refs.append(weakref.ref(reply))
            if reply.has_content() and "arrays" in reply.content:
                self.refs.append(weakref.ref(reply.content["arrays"]))
            return [reply]
        return []


def test_the_streaming_loop_keeps_no_reply_once_folded(tmp_path, task_identity):
    grid = PushPullGrid(4)
    cfg = config(num_tasks=4, num_rounds=2, results_dir=str(tmp_path))
    s = strategy_for(cfg, {100 + t: t for t in range(4)})
    from fl_sim.suites.registry import make_suite

    theta0 = make_suite("toy", num_tasks=4, seed=0).initial_state()
    result = s.start(grid, tensors_to_record(theta0), num_rounds=2, timeout=60)
    assert [r.round for r in s.rounds] == [1, 2] and s.failures == []
    # at every pull, no earlier reply (Message or ArrayRecord) was still alive
    assert len(grid.alive) >= 8 and grid.alive == [0] * len(grid.alive)
    assert set(record_to_tensors(result.arrays)) == set(theta0)


def test_the_streaming_loop_records_a_silent_client_after_the_timeout(tmp_path, task_identity):
    grid = PushPullGrid(3, silent=[1])
    cfg = config(min_clients=2, results_dir=str(tmp_path))
    s = strategy_for(cfg, {100 + t: t for t in range(3)})
    from fl_sim.suites.registry import make_suite

    theta0 = make_suite("toy", num_tasks=3, seed=0).initial_state()
    s.start(grid, tensors_to_record(theta0), num_rounds=1, timeout=5.0)
    [failure] = s.failures
    assert (failure.node_id, failure.task, failure.reason) == (
        101,
        1,
        "no reply before the round's timeout",
    )
    assert s.rounds[0].clients == [0, 2]


class DyingPushPullGrid(PushPullGrid):
    """Dies (a SIGKILL of the server) when asked to push round ``round``'s training messages."""

    def __init__(self, num_nodes: int, round: int) -> None:
        super().__init__(num_nodes)
        self.round = round

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        if any(
            m.metadata.message_type == MessageType.TRAIN and m.metadata.group_id == str(self.round)
            for m in messages
        ):
            raise ServerDies
        return super().push_messages(messages)


class ServerDies(BaseException):
    """Stands for a SIGKILL: nothing after it runs."""


def test_a_streaming_run_resumes_from_its_round_checkpoint(tmp_path, task_identity):
    knobs = {"strategy": "fedavg", "num_rounds": 3, "server_lr": 1.5, "update_cache": False}
    whole = run_federation(PushPullGrid(3), config(**knobs, results_dir=str(tmp_path / "a")))
    with pytest.raises(ServerDies):
        run_federation(
            DyingPushPullGrid(3, round=3), config(**knobs, results_dir=str(tmp_path / "b"))
        )
    saved = read_checkpoint(tmp_path / "b", config(**knobs, results_dir=str(tmp_path / "b")))
    assert saved is not None and saved.round == 2
    grid = PushPullGrid(3)
    resumed = run_federation(grid, config(**knobs, resume=True, results_dir=str(tmp_path / "b")))
    assert grid.pushed_rounds == ["3"] * 3  # only round 3 ran again
    a = load_file(tmp_path / "a" / "global_model.safetensors")
    b = load_file(tmp_path / "b" / "global_model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [r["mean_accuracy"] for r in resumed["rounds"]] == [
        r["mean_accuracy"] for r in whole["rounds"]
    ]
    assert not (tmp_path / "a" / "spill").exists() and not (tmp_path / "b" / "spill").exists()


# ---------------------------------------------------------------------------------------------
# End to end on Flower's simulation engine: streaming on equals off
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_streaming_simulation_equals_the_in_memory_server(tmp_path):
    from fl_sim.config.run_config import RunConfig
    from fl_sim.federation.simulation import simulate

    runs = {
        f"{rule}-{mode}": config(
            strategy=rule,
            num_rounds=2,
            server_lr=1.2,
            server_streaming=mode == "on",
            results_dir=str(tmp_path / f"{rule}-{mode}"),
            cache_dir=str(tmp_path / "cache"),
        )
        for rule, mode in itertools.product(("fednova", "median"), ("on", "off"))
    }
    simulate([RunConfig.from_mapping(c.to_mapping()) for c in runs.values()], progress=False)
    for rule in ("fednova", "median"):
        on, off = (
            json.loads((tmp_path / f"{rule}-{m}" / "results.json").read_text())
            for m in ("on", "off")
        )
        assert on["status"] == off["status"] == "completed"
        assert (
            on["config"]["server-streaming"] is True and off["config"]["server-streaming"] is False
        )
        x, y = (
            load_file(tmp_path / f"{rule}-{m}" / "global_model.safetensors") for m in ("on", "off")
        )
        for name in x:
            if rule == "median":  # spilled every round: bit for bit
                assert torch.equal(x[name], y[name]), name
            else:  # round 1 spilled, round 2 folded in float64: float32 tolerance
                torch.testing.assert_close(x[name], y[name], rtol=1e-6, atol=1e-7)
        # round 1 (the clients' checkpoints and the one-shot model) is bit for bit either way
        for path in on["files"]["clients"]:
            a, b = (
                load_file(tmp_path / f"{rule}-on" / path),
                load_file(tmp_path / f"{rule}-off" / path),
            )
            assert all(torch.equal(a[n], b[n]) for n in a)
        for a, b in zip(on["rounds"][1:], off["rounds"][1:], strict=True):
            assert a["training"]["update_norms"] == pytest.approx(b["training"]["update_norms"])
            assert a["mean_accuracy"] == pytest.approx(b["mean_accuracy"], abs=1e-6)
        assert not (tmp_path / f"{rule}-on" / "spill").exists()


def test_the_scale_bench_pairs_streaming_and_held_points():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scale.py"
    spec = importlib.util.spec_from_file_location("bench_scale_streaming", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)  # type: ignore[union-attr]

    def point(server, seconds, used, driver):
        rounds = [{"round": r, "round_seconds": seconds * r} for r in (1, 2)]
        return {"model": "base", "clients": 8, "server": server, "rounds": rounds,
                "peak_used_rise_gib": used, "driver_peak_rss_gib": driver}  # fmt: skip

    held, streaming = point("held", 10.0, 16.0, 12.0), point("streaming", 9.0, 8.0, 4.0)
    old = {k: v for k, v in held.items() if k != "server"}  # saved before the switch: held
    for points in ([held, streaming], [old, streaming]):
        [row] = bench.comparison(points)
        assert (row["model"], row["clients"]) == ("base", 8)
        assert row["steady_round"] == pytest.approx(18.0 / 20.0)
        assert row["round_1"] == pytest.approx(0.9)
        assert (row["used_rise"], row["driver_rss"]) == (pytest.approx(0.5), pytest.approx(1 / 3))
    # the streaming server's projection grows by STREAMING_COPIES_PER_CLIENT updates per client
    one = bench.projected_gib([(8, 6.0)], 32, 0.4, bench.STREAMING_COPIES_PER_CLIENT)
    assert one == pytest.approx(6.0 + bench.STREAMING_COPIES_PER_CLIENT * 0.4 * 24)
    args = bench.parse_args(["--streaming", "on,off", "--clients", "8,32", "--held-clients", "8"])
    assert (args.mode_list, args.client_list, args.held_list) == (["on", "off"], [8, 32], [8])
