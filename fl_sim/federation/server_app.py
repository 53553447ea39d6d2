"""One federated run on Flower: R rounds of θʳ⁺¹ = θʳ + β · A(Δ₁..Δ_T) from θ₀, evaluated.

``run_federation`` takes a parsed ``RunConfig``, builds θ₀ from the task suite, asks every
node for its partition id (node → task t), runs the strategy of ``strategy`` for ``num-rounds``
(``strategy_for``: the rule section, the aggregation settings and each client's ConfigRecord)
and evaluates the global model on every task after every round (server side, with the suite;
round 0 is θ₀), on the val and the test split. Normalised accuracy is acc_t(θʳ) / acc_t(θ₀ + Δ_t)
on the same split: θ₀ + Δ_t is the client's own model after round 1 (its fine-tuned model: a
one-shot run's task-vector checkpoint) on its own task. With ``shared-head`` (one task split
over the clients) the global model is evaluated on that one task and normalised by the mean
over clients of acc(θ₀ + Δ_c) on it (results.json also keeps each client's figure).

With ``server-lr-grid`` / ``lambda-grid`` (one-shot runs) round 1 computes A once and keeps the
β whose θ₀ + β·A has the best mean normalised VAL accuracy; the test split only reports it.
The gradient diversity ζ² (fl_sim/federation/diagnostics.py) is measured at θ₀ and at the final
model.

Written to ``results-dir`` (each file atomically: a temp file, then ``os.replace``):

- ``results.json``: config, per-round per-task metrics on both splits (the ``eval-split`` one
  also at the top level of each round), p_t, w_t, χ², ‖a_t‖₁, update-cache hits, the β search,
  ζ² diagnostics, failures, timings;
- ``results.csv``: one row per round × split × task;
- ``global_model.safetensors`` (the final θ), ``base.safetensors`` (θ₀) and
  ``clients/client_<t>.safetensors`` (θ₀ + Δ_t of round 1) with ``clients/train_meta.json``
  (K_t and Σ_k η_t⁽ᵏ⁾ in the files' order), so ``fl-sim merge`` can redo round 1 offline.
- ``checkpoint/round.safetensors`` (+ ``round.json``), multi-round runs: θʳ and the run's state
  after every round (fl_sim/federation/round_checkpoint.py); ``resume = true`` (``fl-sim run
  --resume``) continues from it and ends with the results of an uninterrupted run.

The ServerApp that ``flwr run .`` starts (a whole experiment: fl_sim/experiments/flower_app.py)
and ``make_sweep_server_app`` (a list of runs, for ``simulate``) call ``run_federations``:
``run_federation`` per run, up to ``concurrent-runs`` at once (fl_sim/federation/run_schedule.py).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from logging import WARNING
from pathlib import Path

from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from clients.knobs import knobs_to_config
from clients.update_cache import suite_inputs_dir
from fl_sim.checkpoints.array_records import record_to_tensors, tensors_to_record
from fl_sim.checkpoints.safetensors_io import save_tensors
from fl_sim.config.run_config import RunConfig
from fl_sim.federation.recorder import RunRecorder
from fl_sim.federation.round_checkpoint import read_checkpoint, write_checkpoint
from fl_sim.federation.run_schedule import run_all
from fl_sim.outputs import write_atomically, write_csv, write_json
from fl_sim.suites.registry import build_suite
from strategies.flower_strategy import (
    NODE_POLL_INTERVAL,
    AggregationSettings,
    FederationError,
    RuleStrategy,
    error_summary,
    make_strategy,
    replied_for,
)

RoundCallback = Callable[[int, int, Mapping[str, float]], None]  # (round, R, mean metrics)
NODE_WAIT_SECONDS = 300.0
# runs driven at once build their suites one at a time: transformers' lazy imports are not
# thread-safe, and once one run has built a suite the memos serve the others
_BUILDING = threading.Lock()


def make_sweep_server_app(
    run_configs: Sequence[RunConfig] | None, *, on_round: RoundCallback | None = None
) -> ServerApp:
    """A ServerApp that runs ``run_configs`` on the same federation, the first config's
    ``concurrent-runs`` at once (fl_sim/federation/run_schedule.py)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        configs = run_configs or [RunConfig.from_mapping(dict(context.run_config))]
        run_federations(grid, configs, on_round=on_round)

    return app


def run_federations(
    grid: Grid, configs: Sequence[RunConfig], *, on_round: RoundCallback | None = None
) -> list[dict[str, object]]:
    """``run_federation`` of every config on ``grid``, the first config's ``concurrent-runs`` at
    once (fl_sim/federation/run_schedule.py); their results.json contents, in order."""
    grid.get_node_ids()  # connect here, before the runs' threads share the grid
    return run_all(
        lambda config: run_federation(grid, config, on_round=on_round),
        configs,
        configs[0].engine.concurrent_runs if configs else 1,
    )


def discover_tasks(
    grid: Grid, num_tasks: int, timeout: float = NODE_WAIT_SECONDS, node_wait: float = 0.0
) -> dict[int, int]:
    """node id → task t, from each node's partition-id; exactly one node per task. A node lost
    while it is asked (an error reply, e.g. the SuperLink's Node Unavailable) fails the run,
    unless ``node_wait`` > 0 (node-wait): then the nodes that have not answered, the restarted
    node among them (same id with node authentication, a new one without), are asked again
    until ``node_wait`` s have passed."""
    node_tasks: dict[int, int] = {}
    retry_until: float | None = None
    while True:
        wait_until = time.monotonic() + timeout if retry_until is None else retry_until
        node_ids = online_nodes(grid, num_tasks, wait_until, timeout)
        node_tasks = {node_id: t for node_id, t in node_tasks.items() if node_id in node_ids}
        queries = [
            Message(RecordDict(), node_id, MessageType.QUERY)
            for node_id in node_ids
            if node_id not in node_tasks
        ]
        replies = grid.send_and_receive(queries, timeout=timeout)
        # the SuperLink answers for a lost node from its own id: map back by message id
        sent_to = {msg.metadata.message_id: msg.metadata.dst_node_id for msg in queries}
        asked = {msg.metadata.dst_node_id for msg in queries}
        failed: dict[int, str] = {}
        for reply in replies:
            node_id = replied_for(reply, asked, sent_to)
            if reply.has_error():
                failed[node_id] = reply.error.reason
            else:
                node_tasks[node_id] = int(reply.content["metrics"]["partition-id"])
        if not failed:
            break
        node_id, reason = min(failed.items())
        retry_until = time.monotonic() + node_wait if retry_until is None else retry_until
        if time.monotonic() >= retry_until:
            fix = (
                f"still after node-wait = {node_wait:g} s"
                if node_wait > 0
                else "set node-wait = S to wait S seconds for a lost node to come back"
            )
            raise FederationError(
                f"node {node_id} failed the partition-id query: {error_summary(reason)} ({fix})"
            )
        log(
            WARNING,
            "node %d failed the partition-id query (%s): asking again for up to %.0f s",
            node_id,
            error_summary(reason),
            retry_until - time.monotonic(),
        )
        time.sleep(NODE_POLL_INTERVAL)
    partitions = sorted(node_tasks.values())
    if partitions != list(range(num_tasks)):
        raise FederationError(
            f"nodes report partition ids {partitions}, need each of 0..{num_tasks - 1} once "
            "(start SuperNodes with distinct --node-config partition-id=<t>)"
        )
    return node_tasks


def online_nodes(grid: Grid, num_tasks: int, wait_until: float, timeout: float) -> list[int]:
    """The connected node ids, once there are ``num_tasks`` of them (polled until
    ``wait_until``, a ``time.monotonic`` instant); more than ``num_tasks`` is an error."""
    while len(node_ids := sorted(grid.get_node_ids())) < num_tasks:
        if time.monotonic() > wait_until:
            raise FederationError(
                f"only {len(node_ids)} nodes connected within {timeout:.0f} s, "
                f"num-tasks = {num_tasks} needs {num_tasks} (start more SuperNodes)"
            )
        time.sleep(0.2)
    if len(node_ids) > num_tasks:
        raise FederationError(
            f"the federation has {len(node_ids)} nodes but num-tasks = {num_tasks}: one node "
            f"per task (set num-supernodes = {num_tasks}, or num-tasks = {len(node_ids)})"
        )
    return node_ids


def strategy_for(
    config: RunConfig, node_tasks: Mapping[int, int], **kwargs: object
) -> RuleStrategy:
    """The Flower strategy of ``config``: its rule section, the aggregation settings, and what
    each client t gets in round r's ConfigRecord (keyword arguments: see ``RuleStrategy``)."""
    knobs = config.client_knobs()
    faults = config.declared_faults()
    suite = config.suite_config()
    training = config.training

    def client_config(t: int, server_round: int) -> dict[str, object]:
        return {
            **knobs_to_config(knobs[t]),
            **suite,
            "a-norm": training.a_norm,
            "full-batch": training.full_batch,
            "update-cache": training.update_cache,
            "cache-dir": training.cache_dir,
            # declared faults (clients/fault_injection.py); the client applies them
            "inject-failure": (t, server_round) in faults.crash,
            "byzantine": faults.byzantine.get(t, ""),
            "attack-seed": config.suite.seed + t + server_round,
            "slow-seconds": faults.slow.get(t, 0.0),
        }

    settings = AggregationSettings(
        config.engine.server_device,
        config.engine.min_clients,
        streaming=config.engine.server_streaming,
        node_wait=config.engine.node_wait,
        spill_dir=str(Path(config.output.results_dir) / "spill"),
    )
    evaluate_config = {**suite, "eval-split": config.output.eval_split}
    return make_strategy(
        config.rule,
        node_tasks,
        settings=settings,
        client_config=client_config,
        evaluate_config=evaluate_config,
        **kwargs,
    )


def run_federation(
    grid: Grid, config: RunConfig, *, on_round: RoundCallback | None = None
) -> dict[str, object]:
    """The whole run (module docstring); returns what it wrote to results.json."""
    start = time.perf_counter()
    with _BUILDING:  # the clients read the inputs it stores (clients/client_app.py)
        suite = build_suite(config.suite_config(), suite_inputs_dir(config.training.cache_dir))
        theta0 = suite.initial_state()
    out = Path(config.output.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "base.safetensors", theta0)

    discovery = time.perf_counter()
    node_tasks = discover_tasks(grid, suite.num_tasks, node_wait=config.engine.node_wait)
    recorder = RunRecorder(config, suite, theta0)
    recorder.discovery_seconds = time.perf_counter() - discovery
    recorder.write_problem()  # the quadratic suite's c, h, θ₀, p; other suites write nothing
    strategy = strategy_for(
        config,
        node_tasks,
        on_updates=recorder.client_updates,
        select_server_lr=recorder.select_server_lr,
        wants_updates=recorder.wants_client_updates,
    )
    checkpoint = read_checkpoint(out, config) if config.output.resume else None
    if checkpoint is None:
        recorder.measure_diagnostics("round_0", theta0)
        first_round, initial = 1, theta0
    else:  # rounds 1..r are done: their records, then r+1..R from θʳ
        strategy.restore_state(checkpoint.strategy_state, checkpoint.strategy_tensors)
        recorder.restore_state(checkpoint.recorder_state)
        first_round, initial = checkpoint.round + 1, checkpoint.theta

    def evaluate_fn(server_round: int, arrays: object) -> MetricRecord:
        metrics = recorder.evaluate_round(server_round, arrays, strategy.rounds)
        if server_round >= 1 and config.rule.num_rounds > 1:  # the commit point of round r
            write_checkpoint(
                out,
                server_round,
                record_to_tensors(arrays),  # type: ignore[arg-type]
                strategy.checkpoint_state(),
                recorder.checkpoint_state(),
                config,
                write_text=write_atomically,
            )
        if on_round is not None:
            on_round(server_round, config.rule.num_rounds, dict(metrics))
        return metrics

    status, error = "completed", None
    try:
        result = strategy.start(
            grid,
            tensors_to_record(initial),
            num_rounds=config.rule.num_rounds,
            timeout=config.engine.round_timeout or 3600.0,
            evaluate_fn=evaluate_fn,
            first_round=first_round,
        )
        final = record_to_tensors(result.arrays)
        save_tensors(out / "global_model.safetensors", dict(final))
        recorder.measure_diagnostics("final", final)
    except FederationError as failure:
        status, error = "failed", str(failure)
        raise
    finally:
        first = next((r for r in strategy.rounds if r.round == 1), None)
        # `fl-sim merge --train-meta`: one entry per client file, in order
        if first is not None and config.output.save_clients:
            meta = [
                {"task": t, "steps": float(k), "lr_sum": lr_sum}
                for t, k, lr_sum in zip(first.clients, first.local_steps, first.lr_sum, strict=True)
            ]
            write_json(out / "clients" / "train_meta.json", meta)
        results = recorder.results(
            strategy, status=status, error=error, total_seconds=time.perf_counter() - start
        )
        write_json(out / "results.json", results)
        write_csv(out / "results.csv", recorder.csv_rows())
    return results
