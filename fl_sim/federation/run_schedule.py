"""An experiment's runs on one federation, several at once.

A run's figures depend on its config alone: a client's fine-tune is deterministic in its knobs
and the weights it starts from, the update cache (clients/update_cache.py) returns the Δ_t that
training would, and the evaluation cache (fl_sim/federation/evaluation.py) the floats that
evaluating again would. So the runs of a compare or a sweep may run in any order, or at once,
and write the same results; the order only decides how much work the caches save and how busy
the cores are.

Run one after the other, five clients on two cores train in three waves a round and one core idles
in the third; a cached one-shot rule's β search runs on the server while every client waits. With
``concurrent-runs = K`` the server drives up to K runs at once on the same federation (each in its
own thread, with its own strategy and recorder): their clients' messages share the nodes' queue, so
one run's clients fill the cores another run leaves idle, and one run's server-side evaluation
overlaps another's training.

Who may overlap whom: runs whose clients do the same round-1 work (``client_work_key``: the same
suite and the same knobs for every client, e.g. every one-shot rule of a compare, or every
multi-round rule) share it through the update cache, so the first of them (the *lead*) runs
before the others (its *followers*) start; followers of one lead run at once. Runs start in list
order as slots and leads allow, e.g. for the compare: one-shot task_arithmetic and multi-round
task_arithmetic first, then the cached one-shot rules beside multi-round training, then the other
multi-round rules two at a time.

A failure stops new runs from starting; the runs under way finish (and write their results),
then the failure of the earliest failed run in list order is raised, as one after the other.
Each run's thread computes with the torch thread count of the thread that called ``run_all``
(PyTorch keeps one per thread), so aggregation rounds as it does one run at a time.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from clients.knobs import knobs_to_config
from fl_sim.config.run_config import RunConfig

Result = TypeVar("Result")


def client_work_key(config: RunConfig) -> str:
    """What a run's clients do in round 1 from θ₀: its suite and every client's knobs. Runs with
    the same key share those fine-tunes through the update cache."""
    knobs = [knobs_to_config(k) for k in config.client_knobs()]
    work = [config.suite_config(), knobs, config.training.full_batch]
    return json.dumps(work, sort_keys=True, default=str)


def leads(configs: Sequence[RunConfig]) -> list[int]:
    """For each run, the index of the first run with its ``client_work_key`` (itself if first)."""
    first: dict[str, int] = {}
    return [first.setdefault(client_work_key(c), i) for i, c in enumerate(configs)]


def run_all(
    run_one: Callable[[RunConfig], Result], configs: Sequence[RunConfig], concurrency: int
) -> list[Result]:
    """``run_one(config)`` for every config, up to ``concurrency`` at once (module docstring);
    the results in the configs' order."""
    if concurrency <= 1 or len(configs) <= 1:
        return [run_one(config) for config in configs]
    lead = leads(configs)
    threads = torch.get_num_threads()
    results: dict[int, Result] = {}
    errors: dict[int, BaseException] = {}
    started: set[int] = set()
    finished: set[int] = set()
    changed = threading.Condition()

    def body(i: int) -> None:
        torch.set_num_threads(threads)
        try:
            outcome = run_one(configs[i])
        except BaseException as error:  # re-raised in the caller's thread below
            with changed:
                errors[i] = error
        else:
            with changed:
                results[i] = outcome
        finally:
            with changed:
                finished.add(i)
                changed.notify_all()

    workers: list[threading.Thread] = []
    with changed:
        while len(finished) < len(started) or (not errors and len(started) < len(configs)):
            running = len(started) - len(finished)
            ready = [
                i
                for i in range(len(configs))
                if i not in started and (lead[i] == i or lead[i] in finished)
            ]
            if errors or running >= concurrency or not ready:
                changed.wait()
                continue
            i = ready[0]
            started.add(i)
            worker = threading.Thread(target=body, args=(i,), name=f"fl-sim-run-{i}", daemon=True)
            workers.append(worker)
            worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[min(errors)]
    return [results[i] for i in range(len(configs))]
