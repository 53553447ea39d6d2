"""The Flower ServerApp: R rounds of θʳ⁺¹ = θʳ + β · A(Δ₁..Δ_T) from θ₀, evaluated every round.

``main`` parses the run config once (``RunConfig``), builds θ₀ from the task suite, asks every
node for its partition id (node → task t), runs the strategy of ``strategy`` for ``num-rounds``
and evaluates the global model on every task after every round (server side, with the suite;
round 0 is θ₀). Normalised accuracy is acc_t(θʳ) / acc_t(θ₀ + Δ_t): the client's own model
after round 1 (its fine-tuned model: a one-shot run's task-vector checkpoint) on its own task.

Written to ``results-dir`` (each file atomically: a temp file, then ``os.replace``):

- ``results.json``: config, per-round per-task metrics, p_t, w_t, χ², ‖a_t‖₁, failures, timings;
- ``results.csv``: one row per round × task;
- ``global_model.safetensors`` (the final θ), ``base.safetensors`` (θ₀) and
  ``clients/client_<t>.safetensors`` (θ₀ + Δ_t of round 1) with ``clients/train_meta.json``
  (K_t and Σ_k η_t⁽ᵏ⁾ in the files' order), so ``fl-sim merge`` can redo round 1 offline.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import flwr
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

import fl_sim
from fl_sim.array_records import record_to_tensors, tensors_to_record
from fl_sim.run_config import RunConfig
from fl_sim.safetensors_io import save_tensors
from fl_sim.tasks import TaskSuite, evaluate, load_federated_state, make_suite
from strategies.flower_strategy import FederationError, RuleStrategy, make_strategy

RoundCallback = Callable[[int, int, Mapping[str, float]], None]  # (round, R, mean metrics)
NODE_WAIT_SECONDS = 300.0


def make_server_app(
    run_config: RunConfig | None = None, *, on_round: RoundCallback | None = None
) -> ServerApp:
    """A ServerApp for ``run_config``; None: parse Flower's ``context.run_config`` (flwr run)."""
    return make_sweep_server_app(None if run_config is None else [run_config], on_round=on_round)


def make_sweep_server_app(
    run_configs: Sequence[RunConfig] | None, *, on_round: RoundCallback | None = None
) -> ServerApp:
    """A ServerApp that runs ``run_configs`` one after the other on the same federation."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        configs = run_configs or [RunConfig.from_mapping(dict(context.run_config))]
        for config in configs:
            run_federation(grid, config, on_round=on_round)

    return app


app = make_server_app()


def discover_tasks(
    grid: Grid, num_tasks: int, timeout: float = NODE_WAIT_SECONDS
) -> dict[int, int]:
    """node id → task t, from each node's partition-id; exactly one node per task."""
    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < num_tasks:
        if time.monotonic() > deadline:
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
    queries = [Message(RecordDict(), node_id, MessageType.QUERY) for node_id in node_ids]
    node_tasks: dict[int, int] = {}
    for reply in grid.send_and_receive(queries, timeout=timeout):
        node_id = reply.metadata.src_node_id
        if reply.has_error():
            raise FederationError(
                f"node {node_id} failed the partition-id query: {reply.error.reason}"
            )
        node_tasks[node_id] = int(reply.content["metrics"]["partition-id"])
    partitions = sorted(node_tasks.values())
    if partitions != list(range(num_tasks)):
        raise FederationError(
            f"nodes report partition ids {partitions}, need each of 0..{num_tasks - 1} once "
            "(start SuperNodes with distinct --node-config partition-id=<t>)"
        )
    return node_tasks


class RunRecorder:
    """Evaluates the global model every round and keeps everything results.json holds."""

    def __init__(self, config: RunConfig, suite: TaskSuite, theta0: Mapping[str, torch.Tensor]):
        self.config = config
        self.suite = suite
        self.theta0 = dict(theta0)
        self.model = suite.build_model()
        self.out = Path(config.results_dir)
        self.evaluations: dict[int, list[dict[str, float]]] = {}
        self.finetuned: dict[int, dict[str, float]] = {}
        self.client_files: list[str] = []
        self.round_seconds: dict[int, float] = {}
        self.evaluation_seconds: dict[int, float] = {}
        self._last = time.perf_counter()

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> list[dict[str, float]]:
        load_federated_state(self.model, state)
        rows = []
        for task in self.suite.tasks:
            loss, accuracy = evaluate(self.model, task, self.config.eval_split)
            rows.append({"loss": loss, "accuracy": accuracy})
        return rows

    def evaluate_round(self, server_round: int, arrays: object) -> MetricRecord:
        """Strategy.start's evaluate_fn: every task's loss and accuracy at θʳ."""
        self.round_seconds[server_round] = time.perf_counter() - self._last
        start = time.perf_counter()
        rows = self.evaluate(record_to_tensors(arrays))  # type: ignore[arg-type]
        self.evaluations[server_round] = rows
        self.evaluation_seconds[server_round] = time.perf_counter() - start
        self._last = time.perf_counter()
        n = len(rows)
        return MetricRecord(
            {
                "accuracy": sum(r["accuracy"] for r in rows) / n,
                "loss": sum(r["loss"] for r in rows) / n,
            }
        )

    def client_updates(
        self, server_round: int, updates: dict[int, dict[str, torch.Tensor]]
    ) -> None:
        """Round 1: save θ₀ + Δ_t per client and evaluate it on its own task."""
        if server_round != 1:
            return
        folder = self.out / "clients"
        folder.mkdir(parents=True, exist_ok=True)
        for t, update in sorted(updates.items()):
            theta_t = {
                name: (self.theta0[name] + delta) if delta.is_floating_point() else delta.clone()
                for name, delta in update.items()
            }
            save_tensors(folder / f"client_{t}.safetensors", theta_t)
            self.client_files.append(f"clients/client_{t}.safetensors")
            load_federated_state(self.model, theta_t)
            loss, accuracy = evaluate(self.model, self.suite.tasks[t], self.config.eval_split)
            self.finetuned[t] = {"loss": loss, "accuracy": accuracy}

    def normalized(self, t: int, accuracy: float) -> float | None:
        own = self.finetuned.get(t, {}).get("accuracy")
        return accuracy / own if own else None

    def results(
        self,
        strategy: RuleStrategy,
        *,
        status: str,
        error: str | None,
        total_seconds: float,
    ) -> dict[str, object]:
        names = [task.name for task in self.suite.tasks]
        rounds = []
        train_rounds = {record.round: record for record in strategy.rounds}
        for r in sorted(self.evaluations):
            tasks = [
                {
                    "task": t,
                    "name": names[t],
                    "loss": row["loss"],
                    "accuracy": row["accuracy"],
                    "normalized_accuracy": self.normalized(t, row["accuracy"]),
                }
                for t, row in enumerate(self.evaluations[r])
            ]
            normalized = [x["normalized_accuracy"] for x in tasks]
            entry: dict[str, object] = {
                "round": r,
                "tasks": tasks,
                "mean_accuracy": sum(x["accuracy"] for x in tasks) / len(tasks),
                "mean_normalized_accuracy": (
                    sum(normalized) / len(normalized) if None not in normalized else None
                ),
                "timings": {
                    "round_seconds": self.round_seconds.get(r),
                    "evaluation_seconds": self.evaluation_seconds.get(r),
                },
            }
            if r in train_rounds:
                train = train_rounds[r].to_json()
                entry["timings"]["aggregation_seconds"] = train.pop("aggregation_seconds")  # type: ignore[index]
                entry["training"] = train
            rounds.append(entry)
        return {
            "status": status,
            "error": error,
            "config": self.config.to_mapping(),
            "versions": {
                "fl_sim": fl_sim.__version__,
                "flwr": flwr.__version__,
                "torch": torch.__version__,
            },
            "strategy": type(strategy).__name__,
            "eval_split": self.config.eval_split,
            "tasks": names,
            "num_examples": [task.num_train for task in self.suite.tasks],
            "finetuned": {str(t): v for t, v in sorted(self.finetuned.items())},
            "rounds": rounds,
            "failures": [asdict(f) for f in strategy.failures],
            "timings": {"total_seconds": total_seconds},
            "files": {
                "global_model": "global_model.safetensors" if status == "completed" else None,
                "base": "base.safetensors",
                "clients": self.client_files,
                "train_meta": "clients/train_meta.json" if self.client_files else None,
            },
        }

    def csv_rows(self) -> list[dict[str, object]]:
        rows = []
        for r in sorted(self.evaluations):
            for t, row in enumerate(self.evaluations[r]):
                rows.append(
                    {
                        "round": r,
                        "task": t,
                        "name": self.suite.tasks[t].name,
                        "split": self.config.eval_split,
                        "loss": row["loss"],
                        "accuracy": row["accuracy"],
                        "finetuned_accuracy": self.finetuned.get(t, {}).get("accuracy"),
                        "normalized_accuracy": self.normalized(t, row["accuracy"]),
                    }
                )
        return rows


def run_federation(
    grid: Grid, config: RunConfig, *, on_round: RoundCallback | None = None
) -> dict[str, object]:
    """The whole run (module docstring); returns what it wrote to results.json."""
    start = time.perf_counter()
    suite = make_suite(config.task_suite, num_tasks=config.num_tasks, seed=config.seed)
    theta0 = suite.initial_state()
    out = Path(config.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "base.safetensors", theta0)

    node_tasks = discover_tasks(grid, suite.num_tasks)
    recorder = RunRecorder(config, suite, theta0)
    strategy = make_strategy(config, node_tasks, on_updates=recorder.client_updates)

    def evaluate_fn(server_round: int, arrays: object) -> MetricRecord:
        metrics = recorder.evaluate_round(server_round, arrays)
        if on_round is not None:
            on_round(server_round, config.num_rounds, dict(metrics))
        return metrics

    status, error = "completed", None
    try:
        result = strategy.start(
            grid, tensors_to_record(theta0), num_rounds=config.num_rounds, evaluate_fn=evaluate_fn
        )
        final = record_to_tensors(result.arrays)
        save_tensors(out / "global_model.safetensors", dict(final))
    except FederationError as failure:
        status, error = "failed", str(failure)
        raise
    finally:
        first = next((r for r in strategy.rounds if r.round == 1), None)
        if first is not None:  # `fl-sim merge --train-meta`: one entry per client file, in order
            meta = [
                {"task": t, "steps": float(k), "lr_sum": lr_sum}
                for t, k, lr_sum in zip(first.clients, first.local_steps, first.lr_sum, strict=True)
            ]
            write_atomically(out / "clients" / "train_meta.json", json.dumps(meta, indent=2))
        results = recorder.results(
            strategy, status=status, error=error, total_seconds=time.perf_counter() - start
        )
        write_atomically(out / "results.json", json.dumps(results, indent=2, default=_json_default))
        write_atomically(out / "results.csv", _csv_text(recorder.csv_rows()))
    return results


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to results.json")


def _csv_text(rows: list[dict[str, object]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temp file next to ``path``, then ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
