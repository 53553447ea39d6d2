"""What a federated run measures and writes: the RunRecorder.

It evaluates the global model after every round on every task, on the val and the test split,
keeps each client's fine-tuned figures (θ₀ + Δ_t of round 1) for the normalised accuracy, runs the
β/λ search of one-shot runs on the val split, measures the gradient diversity ζ², and assembles
results.json and results.csv (fl_sim/federation/server_app.py writes them).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import flwr
import torch
from flwr.app import MetricRecord

import fl_sim
from clients.update_cache import hash_tensors, resolve_cache_dir
from fl_sim.checkpoints.array_records import record_to_tensors
from fl_sim.checkpoints.safetensors_io import save_tensors
from fl_sim.config.run_config import EVAL_SPLITS as SPLITS
from fl_sim.config.run_config import RunConfig
from fl_sim.federation.diagnostics import measure as measure_diversity
from fl_sim.federation.evaluation import Evaluator, Job
from fl_sim.federation.timing import time_breakdown
from fl_sim.suites.base import TaskSuite
from strategies.flower_strategy import RoundRecord, RuleStrategy
from strategies.rule import client_weights
from strategies.server_step import ServerLrCandidate, search_server_lr, server_step

QUADRATIC_FILE = "quadratic.safetensors"
MODEL_FOLDERS = "hf"  # results-dir/hf/<name>: Hugging Face folders of a suite that writes them
PREFETCH_BYTES = 256 * 2**20  # the β candidates' states a search holds at once to evaluate them


class RunRecorder:
    """Evaluates the global model every round, on val and test, and keeps what results hold."""

    def __init__(self, config: RunConfig, suite: TaskSuite, theta0: Mapping[str, torch.Tensor]):
        self.config = config
        self.suite = suite
        self.theta0 = dict(theta0)
        self.evaluator = Evaluator(
            suite, tuple(sorted(config.suite_config().items())), config.engine.eval_workers
        )
        self.out = Path(config.output.results_dir)
        self.evaluations: dict[int, dict[str, list[dict[str, float]]]] = {}  # round → split → t
        # eval task → the mean over its clients of θ₀ + Δ_t's figures; and per client
        self.finetuned: dict[str, dict[int, dict[str, float]]] = {s: {} for s in SPLITS}
        self.client_finetuned: dict[str, dict[int, dict[str, float]]] = {s: {} for s in SPLITS}
        self.client_files: list[str] = []
        self.round_seconds: dict[int, float] = {}
        self.evaluation_seconds: dict[int, float] = {}
        self.beta_search: list[dict[str, object]] = []
        self.selected: ServerLrCandidate | None = None
        self.selected_on_bound: bool | None = None  # the selected β is an end of those tried
        self.search_seconds = 0.0
        self.client_evaluation_seconds = 0.0  # round 1: θ₀ + Δ_t on each client's own task
        self.diagnostics_seconds = 0.0
        self.discovery_seconds = 0.0  # waiting for the nodes and their partition ids
        self.diagnostics: dict[str, object] = {}
        self.theory: dict[int, dict[str, object]] = {}  # round → the suite's theory_metrics
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
            "selected_on_bound": self.selected_on_bound,
            "search_seconds": self.search_seconds,
            "client_evaluation_seconds": self.client_evaluation_seconds,
            "diagnostics_seconds": self.diagnostics_seconds,
            "diagnostics": self.diagnostics,
            "theory": self.theory,
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
        self.selected_on_bound = state.get("selected_on_bound")  # type: ignore[assignment]
        self.search_seconds = float(state["search_seconds"])  # type: ignore[arg-type]
        self.client_evaluation_seconds = float(state.get("client_evaluation_seconds", 0.0))  # type: ignore[arg-type]
        self.diagnostics_seconds = float(state.get("diagnostics_seconds", 0.0))  # type: ignore[arg-type]
        self.diagnostics = dict(state["diagnostics"])  # type: ignore[call-overload]
        self.theory = by_int(state.get("theory", {}))  # type: ignore[assignment]
        self._last = time.perf_counter()

    def evaluate(
        self, state: Mapping[str, torch.Tensor], splits: Sequence[str] = SPLITS
    ) -> dict[str, list[dict[str, float]]]:
        """Every evaluation task's loss and accuracy at ``state``, on each of ``splits``."""
        return self.evaluate_many([state], splits)[0]

    def evaluate_many(
        self, states: Sequence[Mapping[str, torch.Tensor]], splits: Sequence[str] = SPLITS
    ) -> list[dict[str, list[dict[str, float]]]]:
        """``evaluate`` of every state, as one request: what no earlier request evaluated is
        computed in one parallel pass (fl_sim/federation/evaluation.py)."""
        tasks = range(len(self.suite.eval_tasks))
        jobs = [Job(i, t, tuple(splits)) for i in range(len(states)) for t in tasks]
        answers = iter(self.evaluator.evaluate(states, jobs))
        by_state = [[next(answers) for _ in tasks] for _ in states]
        return [
            {
                split: [dict(zip(("loss", "accuracy"), row[split], strict=True)) for row in rows]
                for split in splits
            }
            for rows in by_state
        ]

    def evaluate_round(
        self, server_round: int, arrays: object, records: Sequence[RoundRecord] = ()
    ) -> MetricRecord:
        """Strategy.start's evaluate_fn: every task's loss and accuracy at θʳ (both splits);
        and, for a suite with ``theory_metrics`` (the quadratic suite), those, with the
        effective weights w_t of round ``server_round``'s record in ``records``."""
        self.round_seconds[server_round] = time.perf_counter() - self._last
        start = time.perf_counter()
        state = record_to_tensors(arrays)  # type: ignore[arg-type]
        evaluations = self.evaluate(state)
        self.evaluations[server_round] = evaluations
        if server_round == self.config.rule.num_rounds:  # the final model
            self.write_model_folder("global", state)
        theory_metrics = getattr(self.suite, "theory_metrics", None)
        if theory_metrics is not None:
            self.theory[server_round] = theory_metrics(
                state, self.client_weights(), self.effective_weights(server_round, records)
            )
        self.evaluation_seconds[server_round] = time.perf_counter() - start
        self._last = time.perf_counter()
        metrics: dict[str, float] = {}
        for split, rows in evaluations.items():
            metrics[f"{split}-accuracy"] = sum(r["accuracy"] for r in rows) / len(rows)
            metrics[f"{split}-loss"] = sum(r["loss"] for r in rows) / len(rows)
        headline = self.config.output.eval_split
        metrics["accuracy"] = metrics[f"{headline}-accuracy"]
        metrics["loss"] = metrics[f"{headline}-loss"]
        return MetricRecord(metrics)

    def effective_weights(
        self, server_round: int, records: Sequence[RoundRecord]
    ) -> list[float] | None:
        """w_t of every task in round ``server_round`` (0 for a client that did not reply);
        None without that round's record (round 0)."""
        record = next((rec for rec in records if rec.round == server_round), None)
        if record is None:
            return None
        weights = [0.0] * self.suite.num_tasks
        for t, w in zip(record.clients, record.effective_weights, strict=True):
            weights[t] = float(w)
        return weights

    @staticmethod
    def wants_client_updates(server_round: int) -> bool:
        """The rounds whose individual Δ_t ``client_updates`` reads: round 1 only (a streaming
        server folds the other rounds' updates of a linear rule without keeping them)."""
        return server_round == 1

    def client_updates(
        self, server_round: int, updates: Mapping[int, Mapping[str, torch.Tensor]]
    ) -> None:
        """Round 1: save θ₀ + Δ_t per client (unless save-clients = false) and evaluate it on
        its own task (both splits); an evaluation task's fine-tuned figures are the mean over
        its clients'. The clients go ``workers`` at a time (one model each), so the server
        never holds T models: the updates may be memory-mapped spill files (strategies/spill.py).
        """
        if not self.wants_client_updates(server_round):
            return
        save = self.config.output.save_clients
        folder = self.out / "clients"
        if save:
            folder.mkdir(parents=True, exist_ok=True)
        ordered = sorted(updates.items())
        workers = max(self.evaluator.workers, 1)
        for first in range(0, len(ordered), workers):
            clients, states = [], []
            for t, update in ordered[first : first + workers]:
                theta_t = {
                    name: (self.theta0[name] + delta)
                    if delta.is_floating_point()
                    else delta.clone()
                    for name, delta in update.items()
                }
                if save:
                    save_tensors(folder / f"client_{t}.safetensors", theta_t)
                    self.write_model_folder(f"client_{t}", theta_t)
                    self.client_files.append(f"clients/client_{t}.safetensors")
                clients.append(t)
                states.append(theta_t)
            start = time.perf_counter()
            jobs = [Job(i, self.suite.eval_task_of(t), SPLITS) for i, t in enumerate(clients)]
            for t, figures in zip(clients, self.evaluator.evaluate(states, jobs), strict=True):
                for split in SPLITS:
                    loss, accuracy = figures[split]
                    self.client_finetuned[split][t] = {"loss": loss, "accuracy": accuracy}
            self.client_evaluation_seconds += time.perf_counter() - start
            del states
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
    ) -> ServerLrCandidate:
        """The β whose θ + β·A has the best mean normalised VAL accuracy (the first tried on
        ties; the mean val accuracy when no fine-tuned accuracy is known), from the grid or,
        when the grid's best is at an end, beyond it (strategies/server_step.py
        search_server_lr, settings from the rule section). Test is recorded, never used: with
        ``search-test = "selected"`` (the default) only at the selected β, whose model the
        round evaluates anyway, so a search costs val alone; with ``"every"`` at every β tried
        (a row's test columns are None where test was not evaluated)."""
        start = time.perf_counter()
        every = self.config.rule.search_test == "every"
        splits = SPLITS if every else ("val",)
        rows: list[dict[str, object]] = []
        state_bytes = sum(t.numel() * t.element_size() for t in update.values())
        group_size = max(self.evaluator.workers, PREFETCH_BYTES // max(state_bytes, 1))

        def prefetch(step: Sequence[ServerLrCandidate]) -> None:
            """A step's candidates in one parallel request (the grid: as many θ at a time as
            fit in PREFETCH_BYTES, at least one per worker)."""
            for first in range(0, len(step), group_size):
                group = step[first : first + group_size]
                self.evaluate_many([server_step(theta, update, c.beta) for c in group], splits)

        def test_columns(evaluations: Mapping[str, list[dict[str, float]]]) -> dict[str, object]:
            test = self.split_summary(evaluations["test"], "test")
            return {
                "test_mean_accuracy": test["mean_accuracy"],
                "test_mean_normalized_accuracy": test["mean_normalized_accuracy"],
            }

        def score(candidate: ServerLrCandidate) -> float:
            evaluations = self.evaluate(server_step(theta, update, candidate.beta), splits)
            val = self.split_summary(evaluations["val"], "val")
            normalized = val["mean_normalized_accuracy"]
            rows.append(
                {
                    "beta": candidate.beta,
                    "lambda": candidate.lam,
                    "val_mean_accuracy": val["mean_accuracy"],
                    "val_mean_normalized_accuracy": normalized,
                    **(
                        test_columns(evaluations)
                        if every
                        else dict.fromkeys(("test_mean_accuracy", "test_mean_normalized_accuracy"))
                    ),
                }
            )
            return float(val["mean_accuracy"] if normalized is None else normalized)  # type: ignore[arg-type]

        result = search_server_lr(candidates, score, self.config.rule.search_settings(), prefetch)
        for index, (row, point) in enumerate(zip(rows, result.points, strict=True)):
            row |= {"stage": point.stage, "selected": index == result.best}
        if not every:  # the selected model's test figures: the round's own evaluation reuses them
            chosen = server_step(theta, update, result.selected.beta)
            rows[result.best] |= test_columns(self.evaluate(chosen, ("test",)))
        self.beta_search.extend(rows)
        self.selected = result.selected
        self.selected_on_bound = result.on_bound
        self.search_seconds = time.perf_counter() - start
        return result.selected

    def normalized(self, t: int, accuracy: float, split: str | None = None) -> float | None:
        """acc_t(θ) / acc_t(θ₀ + Δ_t) on the same split (None without a fine-tuned model)."""
        own = self.finetuned[split or self.config.output.eval_split].get(t, {}).get("accuracy")
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

    def write_problem(self) -> None:
        """A suite with ``problem_tensors`` (the quadratic suite): its problem (c, h, θ₀, p) to
        results-dir/quadratic.safetensors, atomically, so the trajectory can be recomputed; a
        suite with ``save_model_folder``: θ₀ as the folder hf/base (``write_model_folder``)."""
        problem = getattr(self.suite, "problem_tensors", None)
        if problem is not None:
            save_tensors(self.out / QUADRATIC_FILE, problem(self.client_weights()))
        self.write_model_folder("base", self.theta0)

    def write_model_folder(self, name: str, state: Mapping[str, torch.Tensor]) -> None:
        """A suite with ``save_model_folder`` (the causal suite): the whole model at ``state``
        as the Hugging Face folder results-dir/hf/<name> (base, client_<t>: θ₀ + Δ_t of round
        1, global: the final model), replaced atomically; other suites write nothing."""
        save = getattr(self.suite, "save_model_folder", None)
        if save is not None:
            save(dict(state), self.out / MODEL_FOLDERS / name, force=True)

    def measure_diagnostics(self, label: str, state: Mapping[str, torch.Tensor]) -> None:
        """ζ² at ``state`` under ``label`` ("round_0", "final"); off with diagnostic-batch = 0."""
        if self.config.output.diagnostic_batch > 0:
            start = time.perf_counter()
            self.diagnostics[label] = gradient_diversity_at(
                self.suite, self.config, state, self.client_weights(), self.evaluator.workers
            )
            self.diagnostics_seconds += time.perf_counter() - start

    def client_weights(self) -> list[float]:
        """p_t of every task (uniform, or ∝ n_t with weighting = examples)."""
        sizes = [self.suite.num_examples(t) for t in range(self.suite.num_tasks)]
        given = sizes if self.config.rule.weighting == "examples" else None
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
        headline = self.config.output.eval_split
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
                **({"theory": self.theory[r]} if r in self.theory else {}),
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
            "paper_defaults": self.config.paper_defaults(),
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
            "selected_on_bound": self.selected_on_bound,
            "selected_test": selected_test,
            "diagnostics": (
                {
                    "batch_size": self.config.output.diagnostic_batch,
                    "round_0": self.diagnostics.get("round_0"),
                    "final": self.diagnostics.get("final"),
                }
                if self.config.output.diagnostic_batch > 0
                else None
            ),
            "update_cache": {
                "enabled": self.config.training.update_cache,
                "dir": str(resolve_cache_dir(self.config.training.cache_dir) / "updates")
                if self.config.training.update_cache
                else None,
                "trained": trained,
                "cached": cached,
            },
            "failures": [asdict(f) for f in strategy.failures],
            "timings": {
                "total_seconds": total_seconds,
                "search_seconds": self.search_seconds,
                "breakdown": time_breakdown(
                    total_seconds,
                    strategy.rounds,
                    evaluation=sum(self.evaluation_seconds.values())
                    + self.client_evaluation_seconds
                    + self.search_seconds,
                    diagnostics=self.diagnostics_seconds,
                    discovery=self.discovery_seconds,
                ),
            },
            "evaluation_cache": dict(self.evaluator.stats),
            # adapter=lora: targets, rank and bytes per client and round (fl_sim/suites/lora.py)
            **(
                {"lora": self.suite.adapter_report()}
                if hasattr(self.suite, "adapter_report")
                else {}
            ),
            "files": {
                "global_model": "global_model.safetensors" if status == "completed" else None,
                "base": "base.safetensors",
                "clients": self.client_files,
                "train_meta": "clients/train_meta.json" if self.client_files else None,
                **({"quadratic": QUADRATIC_FILE} if hasattr(self.suite, "problem_tensors") else {}),
                **(
                    {
                        "hf_folders": sorted(
                            f"{MODEL_FOLDERS}/{p.name}"
                            for p in folders.iterdir()
                            if not p.name.startswith(".")  # a folder being written
                        )
                    }
                    if (folders := self.out / MODEL_FOLDERS).is_dir()
                    else {}
                ),
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
    suite: TaskSuite,
    config: RunConfig,
    state: Mapping[str, torch.Tensor],
    weights: list[float],
    workers: int = 1,
) -> dict[str, object]:
    """``fl_sim.federation.diagnostics.measure`` at ``state``, memoised per suite, batch, state and
    weights.
    """
    key = (
        tuple(sorted(config.suite_config().items())),
        config.output.diagnostic_batch,
        hash_tensors(state),
        tuple(weights),
    )
    if key not in _DIVERSITY:
        _DIVERSITY[key] = measure_diversity(
            suite, state, weights, config.output.diagnostic_batch, workers
        )
    return dict(_DIVERSITY[key])
