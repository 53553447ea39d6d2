"""One training step's length pieces on the cores the machine leaves free, bit for bit.

A text batch runs in length-sorted pieces p = 1..m (fl_sim/suites/length_chunks.py), so its loss
is L = CE(head_t(normalise(cat(f₁, …, f_m)[inverse])), y) with f_p = features(x_p), and

    ∂L/∂θ = Σ_p (∂f_p/∂θ)ᵀ · ∂L/∂f_p

The pieces are independent up to the cat: their forward passes, and their backward passes once
the tail (cat, normalise, head, CE) has given each its ∂L/∂f_p, run on separate threads, one
torch thread each. The one-graph backward sums a leaf's pieces in the autograd engine's order,
the last piece first (its nodes were made last), ((g_m + g_{m−1}) + …) + g₁; the lanes add the
pieces' gradients in that very order, so every gradient, and so every Δ_t, is bit-identical to
one pass on one thread, whichever number of lanes ran it (tests/test_piece_lanes.py). Where the
pieces cannot run apart (LoRA's dropout draws from the global RNG; a mixing client's several
groups; off the CPU) the step is the one-graph backward.

What is left of a step runs on the lanes too, bit for bit: each parameter's sum of its pieces'
gradients (in that same order), and the optimizer's step. Every optimizer here (AdamW, SGD, SGD
with momentum) moves a parameter from its own gradient and state alone, so the parameters are
cut once into ``max_lanes`` contiguous parts of about equal size, each with its own optimizer of
the same settings (``SplitOptimizer``): a part's step is the one optimizer's step restricted to
it, and the parts step side by side.

How many lanes: a client trains on one torch thread because the other clients hold the other
cores. When the machine has a core to spare (five clients on two cores train in three waves, the
last one alone), the step takes it: ``CoreMeter`` reads what the rest of the machine used over
the last half second (/proc/stat less this process's own CPU time), and the step runs on
⌊free + 1/4⌋ lanes, at least 1 and at most ``max_lanes``. Results never depend on that choice.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch
import torch.nn.functional as F

from fl_sim.suites.base import MultiTaskModel, TrainingGroup, federated_parameters, task_loss
from fl_sim.suites.encoders import PretrainedTaskModel, TextEncoder, spans, text_lengths

T = TypeVar("T")
PROC_STAT = Path("/proc/stat")
WINDOW_SECONDS = 0.5  # CoreMeter's measuring window


def cores_of_process() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


class CoreMeter:
    """free = cores − (machine busy − this process's CPU) / wall, over the last window.

    ``busy_seconds`` gives the machine's busy CPU seconds since boot (None where /proc/stat is
    not readable: then no core is ever free), ``own_seconds`` this process's CPU seconds and
    ``clock`` the wall clock (injected in tests).
    """

    def __init__(
        self,
        cores: int,
        window: float = WINDOW_SECONDS,
        *,
        busy_seconds: Callable[[], float | None] | None = None,
        own_seconds: Callable[[], float] = time.process_time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cores = cores
        self.window = window
        self._busy = busy_seconds or machine_busy_seconds
        self._own = own_seconds
        self._clock = clock
        self.free = 0.0  # until a window has passed: nothing known, nothing taken
        self._last = self._sample()

    def _sample(self) -> tuple[float, float | None, float]:
        return self._clock(), self._busy(), self._own()

    def free_cores(self) -> float:
        """The cores the rest of the machine left idle over the last complete window (the
        counters are read once a window has passed, not at every step)."""
        if self._clock() - self._last[0] < self.window:
            return self.free
        now = self._sample()
        wall = now[0] - self._last[0]
        if wall >= self.window:
            if now[1] is not None and self._last[1] is not None:
                others = ((now[1] - self._last[1]) - (now[2] - self._last[2])) / wall
                self.free = max(self.cores - others, 0.0)
            self._last = now
        return self.free

    def lanes(self, max_lanes: int) -> int:
        """⌊free + 1/4⌋ lanes, in 1..``max_lanes``."""
        return max(1, min(max_lanes, int(self.free_cores() + 0.25)))


def machine_busy_seconds() -> float | None:
    """CPU seconds every core spent busy since boot (/proc/stat: all but idle and iowait)."""
    try:
        fields = [int(v) for v in PROC_STAT.read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


class PieceLanes:
    """Runs a text model's training steps on up to one thread per core (module docstring)."""

    def __init__(self, model: MultiTaskModel):
        self.model = model
        self.encoder = model.encoder  # type: ignore[attr-defined]
        self.params = federated_parameters(model)
        self.max_lanes = cores_of_process()
        self.meter = CoreMeter(self.max_lanes)
        self.parts = balanced_parts([p.numel() for p in self.params], self.max_lanes)
        self._pool: ThreadPoolExecutor | None = None

    def optimizer(
        self, make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    ) -> SplitOptimizer:
        """``make``'s optimizer over the federated parameters, one per part (module docstring)."""
        return SplitOptimizer([make([self.params[j] for j in part]) for part in self.parts], self)

    @staticmethod
    def applies(model: MultiTaskModel, groups: Sequence[TrainingGroup]) -> bool:
        """True for a text encoder's model (no LoRA), one training group, on the CPU."""
        return (
            type(model) is PretrainedTaskModel
            and isinstance(model.encoder, TextEncoder)
            and len(groups) == 1
            and all(p.device.type == "cpu" for p in federated_parameters(model))
        )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def backward(self, task_index: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """∂L_t/∂θ of the batch (x, y) into the federated parameters' ``.grad`` (zeroed, as
        ``optimizer.zero_grad(set_to_none=True)`` leaves them), exactly as
        ``task_loss(model, task_index, x, y).backward()``."""
        cut = self.encoder.pieces(x)
        lanes = 1 if cut is None or len(cut[1]) < 2 else self.meter.lanes(self.max_lanes)
        if lanes == 1:
            task_loss(self.model, task_index, x, y).backward()
            return
        order, ends = cut
        pieces = spans(ends)
        # the costliest first (|p| · its longest text), so the lanes finish together
        lengths = text_lengths(x)[order]
        costs = [(b - a) * int(lengths[b - 1]) for a, b in pieces]

        def forward(p: int) -> torch.Tensor:
            a, b = pieces[p]
            return self.encoder.features(x[order[a:b]])

        parts = self._on_lanes(forward, costs, lanes)
        leaves = [part.detach().requires_grad_() for part in parts]
        logits = self.model.head_for(task_index)(self.encoder.assemble(leaves, order))
        F.cross_entropy(logits, y).backward()  # the tail: ∂L/∂f_p into each leaf's .grad

        def backward(p: int) -> Sequence[torch.Tensor | None]:
            return torch.autograd.grad(parts[p], self.params, leaves[p].grad, allow_unused=True)

        grads = self._on_lanes(backward, costs, lanes)

        def add_up(k: int) -> None:
            for j in self.parts[k]:
                param, total = self.params[j], None
                for p in reversed(range(len(parts))):  # the engine's order: the last piece first
                    g = grads[p][j]
                    if g is not None:
                        total = g if total is None else total + g
                if total is not None:
                    param.grad = total if param.grad is None else param.grad + total

        self.on_parts(add_up, lanes)

    def on_parts(self, work: Callable[[int], None], lanes: int | None = None) -> None:
        """``work(k)`` for every part k of the parameters, on ``lanes`` lanes (None: as many
        as the machine leaves free)."""
        if lanes is None:
            lanes = self.meter.lanes(self.max_lanes)
        lanes = min(lanes, len(self.parts))
        if lanes <= 1:
            for k in range(len(self.parts)):
                work(k)
            return
        on_lanes(self._threads(), lanes, range(len(self.parts)), lambda lane, k: work(k))

    def _on_lanes(self, work: Callable[[int], T], costs: Sequence[int], lanes: int) -> list[T]:
        """``work(p)`` for every piece p, the costliest first; the results in piece order."""
        order = sorted(range(len(costs)), key=lambda p: -costs[p])
        done = on_lanes(self._threads(), lanes, order, lambda lane, p: work(p))
        return [done[p] for p in range(len(costs))]

    def _threads(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_lanes, thread_name_prefix="fl-sim-piece")
        return self._pool


class SplitOptimizer:
    """One optimizer per part of the parameters (``PieceLanes.optimizer``), used as one: the
    training loop sets each group's learning rate, zeroes the gradients and steps; the parts
    step on the lanes the machine leaves free."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer], lanes: PieceLanes):
        self.optimizers = list(optimizers)
        self.lanes = lanes

    @property
    def param_groups(self) -> list[dict[str, object]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.lanes.on_parts(lambda k: self.optimizers[k].step())


def balanced_parts(sizes: Sequence[int], count: int) -> list[list[int]]:
    """``sizes``' indices cut into ``count`` (at most ``len(sizes)``, at least 1) contiguous,
    non-empty parts whose totals are about equal: part k ends where the running total comes
    closest to (k + 1)/count of the whole."""
    count = max(1, min(count, len(sizes)))
    whole = sum(sizes)
    parts: list[list[int]] = []
    start, done = 0, 0
    for k in range(count):
        end = len(sizes)
        if k < count - 1:
            target = whole * (k + 1) / count
            end, done = start + 1, done + sizes[start]
            while end < len(sizes) - (count - k - 1) and abs(done + sizes[end] - target) <= abs(
                done - target
            ):
                done += sizes[end]
                end += 1
        parts.append(list(range(start, end)))
        start = end
    return parts


def on_lanes(
    pool: ThreadPoolExecutor, lanes: int, order: Iterable[int], work: Callable[[int, int], T]
) -> dict[int, T]:
    """``work(lane, i)`` for every i of ``order``, on ``lanes`` threads of ``pool``, each taking
    the next i left and running torch on one thread; i → its result."""
    queue = iter(order)
    take = threading.Lock()
    results: dict[int, T] = {}

    def lane(w: int) -> None:
        torch.set_num_threads(1)  # PyTorch keeps a count per thread: set this one's own
        while True:
            with take:
                i = next(queue, None)
            if i is None:
                return
            results[i] = work(w, i)

    for future in [pool.submit(lane, w) for w in range(lanes)]:
        future.result()
    return results
