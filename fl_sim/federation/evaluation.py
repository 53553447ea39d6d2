"""Server-side evaluation, each thing once and on every free core.

What a run measures is acc_t(θ) and L_t(θ) for many θ: θ₀ every round 0, each client's
θ₀ + Δ_t in round 1, every β candidate θ₀ + β·A of a one-shot search, θʳ after each round. Many
of these are the same model in several runs of one experiment: θ₀ for every rule and mode, the
clients' θ₀ + Δ_t for every one-shot rule (their updates come from the update cache), and every
candidate of task_arithmetic and one-shot fedavg (the same A). So:

- **Evaluate once.** A result is kept under its content key (the suite's config, the SHA-256 of
  the federated state, the task, the split) for the life of the process: a (model state, task,
  split) triple is evaluated at most once per experiment, whichever run asks. A hit returns the
  very floats the first evaluation returned, so results are bit-identical to evaluating again.
- **Evaluate in parallel.** The misses of one request (θ's tasks and splits, or several
  candidates at once) are spread over ``workers`` threads, each with its own copy of the model
  and torch at one intra-op thread: PyTorch's kernels release the GIL, and inter-op parallelism
  over whole forward passes keeps every core busy where intra-op threads on small batches do not.
  Evaluation runs while the clients are idle (between rounds), so the server may use all cores.
  One-thread kernels give the same floats as torch's default here (checked on the digits suite:
  every loss and accuracy bit-identical at 1 and 2 threads).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from clients.update_cache import hash_tensors
from fl_sim.suites.base import MultiTaskModel, TaskSuite, evaluate, load_federated_state
from fl_sim.suites.piece_lanes import cores_of_process, on_lanes

Figures = tuple[float, float]  # (mean loss, accuracy)
_RESULTS: dict[tuple[object, ...], Figures] = {}  # content key → figures, for the process
_LOCK = threading.Lock()


@dataclass(frozen=True)
class Job:
    """Evaluate state ``state`` (an index into the request's states) on ``task`` and ``splits``."""

    state: int
    task: int
    splits: tuple[str, ...]


class Evaluator:
    """(θ, task, split) → (loss, accuracy), once per content key, on ``workers`` threads.

    ``suite_key`` names the suite's data and heads (its config items); two suites with the same
    key must evaluate alike. ``stats`` counts what was computed and what the cache answered.
    """

    def __init__(self, suite: TaskSuite, suite_key: tuple[object, ...], workers: int = 0):
        self.suite = suite
        self.suite_key = suite_key
        self.workers = workers if workers > 0 else cores_of_process()
        self._models: list[MultiTaskModel] = []
        self._loaded: list[str | None] = []  # the hash each model holds now
        self.stats = {"evaluated": 0, "cached": 0}

    def evaluate(
        self, states: Sequence[Mapping[str, torch.Tensor]], jobs: Sequence[Job]
    ) -> list[dict[str, Figures]]:
        """Per job, split → (loss, accuracy) of ``states[job.state]`` on ``job.task``."""
        hashes = [hash_tensors(state) for state in states]
        names = [task.name for task in self.suite.eval_tasks]

        def key(job: Job, split: str) -> tuple[object, ...]:
            return (self.suite_key, hashes[job.state], names[job.task], split)

        with _LOCK:
            missing = [
                Job(job.state, job.task, todo)
                for job in jobs
                if (todo := tuple(s for s in job.splits if key(job, s) not in _RESULTS))
            ]
        missing = list(dict.fromkeys(missing))  # a job asked twice is computed once
        computed = self._run(states, hashes, missing)
        with _LOCK:
            for job, figures in zip(missing, computed, strict=True):
                for split in job.splits:
                    _RESULTS.setdefault(key(job, split), figures[split])
            answers = [{s: _RESULTS[key(job, s)] for s in job.splits} for job in jobs]
        done = sum(len(job.splits) for job in missing)
        self.stats["evaluated"] += done
        self.stats["cached"] += sum(len(job.splits) for job in jobs) - done
        return answers

    def _run(
        self,
        states: Sequence[Mapping[str, torch.Tensor]],
        hashes: Sequence[str],
        jobs: Sequence[Job],
    ) -> list[dict[str, Figures]]:
        """The figures of ``jobs``: in this thread for one job or one worker, else on the pool,
        each worker taking the next job in (state, task) order (a state is loaded into a
        worker's model once per run of its jobs)."""
        if not jobs:
            return []
        workers = min(self.workers, len(jobs))
        while len(self._models) < workers:
            self._models.append(self.suite.build_model())
            self._loaded.append(None)
        if workers == 1:
            return [self._job(0, states, hashes, job) for job in jobs]
        order = sorted(range(len(jobs)), key=lambda i: (jobs[i].state, jobs[i].task))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="fl-sim-eval") as pool:
                done = on_lanes(
                    pool, workers, order, lambda w, i: self._job(w, states, hashes, jobs[i])
                )
        finally:
            torch.set_num_threads(threads)
        return [done[i] for i in range(len(jobs))]

    def _job(
        self,
        worker: int,
        states: Sequence[Mapping[str, torch.Tensor]],
        hashes: Sequence[str],
        job: Job,
    ) -> dict[str, Figures]:
        model = self._models[worker]
        if self._loaded[worker] != hashes[job.state]:
            load_federated_state(model, states[job.state])
            self._loaded[worker] = hashes[job.state]
        task = self.suite.eval_tasks[job.task]
        return {split: evaluate(model, task, split) for split in job.splits}


def clear_cache() -> None:
    """Forget every kept result (tests; a process that evaluates unrelated experiments)."""
    with _LOCK:
        _RESULTS.clear()
