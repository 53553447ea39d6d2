"""The Flower ServerApp: R rounds of θʳ⁺¹ = θʳ + β · A(Δ₁..Δ_T) from θ₀, evaluated every round.

``main`` parses the run config once (``RunConfig``), builds θ₀ from the task suite, asks every
node for its partition id (node → task t), runs the strategy of ``strategy`` for ``num-rounds``
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
  --resume``)
  continues from it and ends with the results of an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import flwr
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

import fl_sim
from clients.update_cache import hash_tensors, resolve_cache_dir
from fl_sim.checkpoints.array_records import record_to_tensors, tensors_to_record
from fl_sim.checkpoints.safetensors_io import save_tensors
from fl_sim.config.run_config import EVAL_SPLITS as SPLITS
from fl_sim.config.run_config import RunConfig
from fl_sim.federation.diagnostics import measure as measure_diversity
from fl_sim.federation.round_checkpoint import read_checkpoint, write_checkpoint
from fl_sim.outputs import write_atomically
from fl_sim.suites.base import TaskSuite, evaluate, load_federated_state
from fl_sim.suites.suite_config import build_suite
from strategies.flower_strategy import FederationError, RuleStrategy, make_strategy
from strategies.rule import client_weights
from strategies.server_step import ServerLrCandidate, server_step

RoundCallback = Callable[[int, int, Mapping[str, float]], None]  # (round, R, mean metrics)
NODE_WAIT_SECONDS = 300.0


def make_server_app(
    run_config: RunConfig | None = None, *, on_round: RoundCallback | None = None
) -> ServerApp:
    """A ServerApp for ``run_config`` (None: parse Flower's ``context.run_config``, as under
    ``flwr run``); a compare experiment runs all its runs, then writes its table and plots."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from fl_sim.experiments.compare import expand_experiment, write_experiment

        config = run_config or RunConfig.from_mapping(dict(context.run_config))
        results = [
            run_federation(grid, run, on_round=on_round) for run in expand_experiment(config)
        ]
        if config.experiment == "compare":
            write_experiment(config, results)

    return app


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
    """Evaluates the global model every round, on val and test, and keeps what results hold."""

    def __init__(self, config: RunConfig, suite: TaskSuite, theta0: Mapping[str, torch.Tensor]):
        self.config = config
        self.suite = suite
        self.theta0 = dict(theta0)
        self.model = suite.build_model()
        self.out = Path(config.results_dir)
        self.evaluations: dict[int, dict[str, list[dict[str, float]]]] = {}  # round → split → t
        # eval task → the mean over its clients of θ₀ + Δ_t's figures; and per client
        self.finetuned: dict[str, dict[int, dict[str, float]]] = {s: {} for s in SPLITS}
        self.client_finetuned: dict[str, dict[int, dict[str, float]]] = {s: {} for s in SPLITS}
        self.client_files: list[str] = []
        self.round_seconds: dict[int, float] = {}
        self.evaluation_seconds: dict[int, float] = {}
        self.beta_search: list[dict[str, object]] = []
        self.selected: ServerLrCandidate | None = None
        self.search_seconds = 0.0
        self.diagnostics: dict[str, object] = {}
        self._last = time.perf_counter()

    def checkpoint_state(self) -> dict[str, object]:
        """What results.json needs from the rounds already run
        (fl_sim/federation/round_checkpoint.py).
        """
        return {
            "evaluations": self.evaluations,
            "finetuned": self.finetuned,
            "client_finetuned": self.client_finetuned,
            "client_files": self.client_files,
            "round_seconds": self.round_seconds,
            "evaluation_seconds": self.evaluation_seconds,
            "beta_search": self.beta_search,
            "selected": None if self.selected is None else asdict(self.selected),
            "search_seconds": self.search_seconds,
            "diagnostics": self.diagnostics,
        }

    def restore_state(self, state: Mapping[str, object]) -> None:
        """The inverse of ``checkpoint_state`` (JSON turned integer keys into strings)."""

        def by_int(mapping: object) -> dict[int, object]:
            return {int(k): v for k, v in mapping.items()}  # type: ignore[union-attr]

        self.evaluations = by_int(state["evaluations"])  # type: ignore[assignment]
        self.finetuned = {s: by_int(v) for s, v in state["finetuned"].items()}  # type: ignore[union-attr,misc]
        self.client_finetuned = {
            s: by_int(v)
            for s, v in state["client_finetuned"].items()  # type: ignore[union-attr]
        }  # type: ignore[misc]
        self.client_files = list(state["client_files"])  # type: ignore[call-overload]
        self.round_seconds = by_int(state["round_seconds"])  # type: ignore[assignment]
        self.evaluation_seconds = by_int(state["evaluation_seconds"])  # type: ignore[assignment]
        self.beta_search = list(state["beta_search"])  # type: ignore[call-overload]
        selected = state["selected"]
        self.selected = None if selected is None else ServerLrCandidate(**selected)  # type: ignore[arg-type]
        self.search_seconds = float(state["search_seconds"])  # type: ignore[arg-type]
        self.diagnostics = dict(state["diagnostics"])  # type: ignore[call-overload]
        self._last = time.perf_counter()

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, list[dict[str, float]]]:
        """Every evaluation task's loss and accuracy at ``state``, on each of SPLITS."""
        load_federated_state(self.model, state)
        return {
            split: [
                dict(zip(("loss", "accuracy"), evaluate(self.model, task, split), strict=True))
                for task in self.suite.eval_tasks
            ]
            for split in SPLITS
        }

    def evaluate_round(self, server_round: int, arrays: object) -> MetricRecord:
        """Strategy.start's evaluate_fn: every task's loss and accuracy at θʳ (both splits)."""
        self.round_seconds[server_round] = time.perf_counter() - self._last
        start = time.perf_counter()
        evaluations = self.evaluate(record_to_tensors(arrays))  # type: ignore[arg-type]
        self.evaluations[server_round] = evaluations
        self.evaluation_seconds[server_round] = time.perf_counter() - start
        self._last = time.perf_counter()
        metrics: dict[str, float] = {}
        for split, rows in evaluations.items():
            metrics[f"{split}-accuracy"] = sum(r["accuracy"] for r in rows) / len(rows)
            metrics[f"{split}-loss"] = sum(r["loss"] for r in rows) / len(rows)
        headline = self.config.eval_split
        metrics["accuracy"] = metrics[f"{headline}-accuracy"]
        metrics["loss"] = metrics[f"{headline}-loss"]
        return MetricRecord(metrics)

    def client_updates(
        self, server_round: int, updates: dict[int, dict[str, torch.Tensor]]
    ) -> None:
        """Round 1: save θ₀ + Δ_t per client and evaluate it on its own task (both splits);
        an evaluation task's fine-tuned figures are the mean over its clients'."""
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
            task = self.suite.eval_tasks[self.suite.eval_task_of(t)]
            for split in SPLITS:
                loss, accuracy = evaluate(self.model, task, split)
                self.client_finetuned[split][t] = {"loss": loss, "accuracy": accuracy}
        for split in SPLITS:
            by_task: dict[int, list[dict[str, float]]] = {}
            for t, figures in sorted(self.client_finetuned[split].items()):
                by_task.setdefault(self.suite.eval_task_of(t), []).append(figures)
            self.finetuned[split] = {
                e: {k: sum(f[k] for f in rows) / len(rows) for k in ("loss", "accuracy")}
                for e, rows in by_task.items()
            }

    def select_server_lr(
        self,
        theta: Mapping[str, torch.Tensor],
        update: Mapping[str, torch.Tensor],
        candidates: Sequence[ServerLrCandidate],
    ) -> int:
        """The grid point whose θ + β·A has the best mean normalised VAL accuracy (the first on
        ties; the mean val accuracy when no fine-tuned accuracy is known). Test is recorded,
        never used."""
        start = time.perf_counter()
        scores = []
        for candidate in candidates:
            evaluations = self.evaluate(server_step(theta, update, candidate.beta))
            val = self.split_summary(evaluations["val"], "val")
            test = self.split_summary(evaluations["test"], "test")
            normalized = val["mean_normalized_accuracy"]
            scores.append(val["mean_accuracy"] if normalized is None else normalized)
            self.beta_search.append(
                {
                    "beta": candidate.beta,
                    "lambda": candidate.lam,
                    "val_mean_accuracy": val["mean_accuracy"],
                    "val_mean_normalized_accuracy": normalized,
                    "test_mean_accuracy": test["mean_accuracy"],
                    "test_mean_normalized_accuracy": test["mean_normalized_accuracy"],
                }
            )
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
        self.selected = candidates[best]
        self.search_seconds = time.perf_counter() - start
        return best

    def normalized(self, t: int, accuracy: float, split: str | None = None) -> float | None:
        """acc_t(θ) / acc_t(θ₀ + Δ_t) on the same split (None without a fine-tuned model)."""
        own = self.finetuned[split or self.config.eval_split].get(t, {}).get("accuracy")
        return accuracy / own if own else None

    def split_summary(self, rows: list[dict[str, float]], split: str) -> dict[str, object]:
        """Per-task and mean loss, accuracy and normalised accuracy on ``split``."""
        names = [task.name for task in self.suite.eval_tasks]
        tasks = [
            {
                "task": t,
                "name": names[t],
                "loss": row["loss"],
                "accuracy": row["accuracy"],
                "normalized_accuracy": self.normalized(t, row["accuracy"], split),
            }
            for t, row in enumerate(rows)
        ]
        normalized = [x["normalized_accuracy"] for x in tasks]
        return {
            "tasks": tasks,
            "mean_loss": sum(x["loss"] for x in tasks) / len(tasks),
            "mean_accuracy": sum(x["accuracy"] for x in tasks) / len(tasks),
            "mean_normalized_accuracy": (
                sum(normalized) / len(normalized) if None not in normalized else None
            ),
        }

    def measure_diagnostics(self, label: str, state: Mapping[str, torch.Tensor]) -> None:
        """ζ² at ``state`` under ``label`` ("round_0", "final"); off with diagnostic-batch = 0."""
        if self.config.diagnostic_batch > 0:
            self.diagnostics[label] = gradient_diversity_at(
                self.suite, self.config, state, self.client_weights()
            )

    def client_weights(self) -> list[float]:
        """p_t of every task (uniform, or ∝ n_t with weighting = examples)."""
        sizes = [self.suite.num_examples(t) for t in range(self.suite.num_tasks)]
        given = sizes if self.config.weighting == "examples" else None
        return client_weights(len(sizes), given).tolist()

    def results(
        self,
        strategy: RuleStrategy,
        *,
        status: str,
        error: str | None,
        total_seconds: float,
    ) -> dict[str, object]:
        names = [task.name for task in self.suite.eval_tasks]
        headline = self.config.eval_split
        rounds = []
        train_rounds = {record.round: record for record in strategy.rounds}
        for r in sorted(self.evaluations):
            splits = {
                split: self.split_summary(rows, split)
                for split, rows in self.evaluations[r].items()
            }
            entry: dict[str, object] = {
                "round": r,
                "tasks": splits[headline]["tasks"],
                "mean_accuracy": splits[headline]["mean_accuracy"],
                "mean_normalized_accuracy": splits[headline]["mean_normalized_accuracy"],
                "splits": splits,
                "timings": {
                    "round_seconds": self.round_seconds.get(r),
                    "evaluation_seconds": self.evaluation_seconds.get(r),
                },
            }
            if r in train_rounds:
                train = train_rounds[r].to_json()
                entry["timings"]["aggregation_seconds"] = train.pop("aggregation_seconds")  # type: ignore[index]
                entry["training"] = train
                cached = sum(train_rounds[r].cached)
                entry["update_cache"] = {
                    "trained": len(train_rounds[r].clients) - cached,
                    "cached": cached,
                }
            rounds.append(entry)
        final_round = max((r for r in self.evaluations), default=None)
        selected_test = (
            self.split_summary(self.evaluations[final_round]["test"], "test")
            if self.selected is not None and final_round == 1 and status == "completed"
            else None
        )
        trained = sum(len(rec.clients) - sum(rec.cached) for rec in strategy.rounds)
        cached = sum(sum(rec.cached) for rec in strategy.rounds)
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
            "eval_split": headline,
            "splits": list(SPLITS),
            "tasks": names,
            "clients": [task.name for task in self.suite.tasks],
            "num_examples": [self.suite.num_examples(t) for t in range(self.suite.num_tasks)],
            "finetuned": {str(t): v for t, v in sorted(self.finetuned[headline].items())},
            "finetuned_splits": {
                split: {str(t): v for t, v in sorted(self.finetuned[split].items())}
                for split in SPLITS
            },
            "finetuned_clients": {
                split: {str(t): v for t, v in sorted(self.client_finetuned[split].items())}
                for split in SPLITS
            },
            "rounds": rounds,
            "beta_search": self.beta_search or None,
            "selected_beta": None if self.selected is None else self.selected.beta,
            "selected_lambda": None if self.selected is None else self.selected.lam,
            "selected_test": selected_test,
            "diagnostics": (
                {
                    "batch_size": self.config.diagnostic_batch,
                    "round_0": self.diagnostics.get("round_0"),
                    "final": self.diagnostics.get("final"),
                }
                if self.config.diagnostic_batch > 0
                else None
            ),
            "update_cache": {
                "enabled": self.config.update_cache,
                "dir": str(resolve_cache_dir(self.config.cache_dir) / "updates")
                if self.config.update_cache
                else None,
                "trained": trained,
                "cached": cached,
            },
            "failures": [asdict(f) for f in strategy.failures],
            "timings": {"total_seconds": total_seconds, "search_seconds": self.search_seconds},
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
            for split, evaluations in self.evaluations[r].items():
                for t, row in enumerate(evaluations):
                    rows.append(
                        {
                            "round": r,
                            "task": t,
                            "name": self.suite.eval_tasks[t].name,
                            "split": split,
                            "loss": row["loss"],
                            "accuracy": row["accuracy"],
                            "finetuned_accuracy": self.finetuned[split].get(t, {}).get("accuracy"),
                            "normalized_accuracy": self.normalized(t, row["accuracy"], split),
                        }
                    )
        return rows


_DIVERSITY: dict[tuple[object, ...], dict[str, object]] = {}  # θ₀'s: shared by a sweep's runs


def gradient_diversity_at(
    suite: TaskSuite, config: RunConfig, state: Mapping[str, torch.Tensor], weights: list[float]
) -> dict[str, object]:
    """``fl_sim.federation.diagnostics.measure`` at ``state``, memoised per suite, batch, state and
    weights.
    """
    key = (
        tuple(sorted(config.suite_config().items())),
        config.diagnostic_batch,
        hash_tensors(state),
        tuple(weights),
    )
    if key not in _DIVERSITY:
        _DIVERSITY[key] = measure_diversity(suite, state, weights, config.diagnostic_batch)
    return dict(_DIVERSITY[key])


def run_federation(
    grid: Grid, config: RunConfig, *, on_round: RoundCallback | None = None
) -> dict[str, object]:
    """The whole run (module docstring); returns what it wrote to results.json."""
    start = time.perf_counter()
    suite = build_suite(config.suite_config())
    theta0 = suite.initial_state()
    out = Path(config.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(out / "base.safetensors", theta0)

    node_tasks = discover_tasks(grid, suite.num_tasks)
    recorder = RunRecorder(config, suite, theta0)
    strategy = make_strategy(
        config,
        node_tasks,
        on_updates=recorder.client_updates,
        select_server_lr=recorder.select_server_lr,
    )
    checkpoint = read_checkpoint(out, config) if config.resume else None
    if checkpoint is None:
        recorder.measure_diagnostics("round_0", theta0)
        first_round, initial = 1, theta0
    else:  # rounds 1..r are done: their records, then r+1..R from θʳ
        strategy.restore_state(checkpoint.strategy_state, checkpoint.strategy_tensors)
        recorder.restore_state(checkpoint.recorder_state)
        first_round, initial = checkpoint.round + 1, checkpoint.theta

    def evaluate_fn(server_round: int, arrays: object) -> MetricRecord:
        metrics = recorder.evaluate_round(server_round, arrays)
        if server_round >= 1 and config.num_rounds > 1:  # the commit point of round r
            write_checkpoint(
                out,
                server_round,
                record_to_tensors(arrays),  # type: ignore[arg-type]
                strategy.checkpoint_state(),
                recorder.checkpoint_state(),
                config,
                json_default=_json_default,
                write_text=write_atomically,
            )
        if on_round is not None:
            on_round(server_round, config.num_rounds, dict(metrics))
        return metrics

    status, error = "completed", None
    try:
        result = strategy.start(
            grid,
            tensors_to_record(initial),
            num_rounds=config.num_rounds,
            timeout=config.round_timeout or 3600.0,
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
