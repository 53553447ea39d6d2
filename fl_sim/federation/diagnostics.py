"""Data-heterogeneity diagnostics (docs/design.md): the gradient diversity of the tasks at θ.

    g_t = ∇_θ L_t(θ)                            over the federated parameters only
    ḡ   = Σ_i p_i g_i
    ζ²  = Σ_t p_t ‖g_t − ḡ‖²  = Σ_t p_t ‖g_t‖² − ‖ḡ‖²      (Σ_t p_t = 1)

reported with Σ_t p_t ‖g_t‖² and the scale-free ratio ζ² / Σ_t p_t ‖g_t‖² ∈ [0, 1] (0: every task
pulls θ the same way; 1: the pulls cancel, ḡ = 0). ζ² is the bounded-dissimilarity constant of
FedAvg's analyses (e.g. Wang et al. 2020, Woodworth et al. 2020), measured where the run starts
(θ₀) and where it ends (the merged model).

L_t is client t's loss (clients/local_training.py: each example scored by its own task's
head) on a fixed batch: the first ``batch_size`` examples of its training set, the model in
eval mode (no dropout), so the figures are deterministic. With ``mixing`` > 0 the set has
several groups and the batch takes the first ⌊batch_size·n_g/N⌋ examples of each group g (so
mixing = 1 gives every client the same batch and ζ² = 0). The g_t are computed one at a time
and folded into Σ_t p_t ‖g_t‖² and ḡ in float64, so memory stays one model's worth whatever T
(holding all T gradients for a Gram matrix G_ij = ⟨g_i, g_j⟩, as this module first did, took the
server from 0.5 to 4.7 GiB for 16 MiniLM-sized tasks; one pass peaks at 1.0 GiB, measured).
With ``workers`` > 1 the g_t are computed on as many threads, each with its own model and torch at
one intra-op thread (as the server's evaluation: fl_sim/federation/evaluation.py), each thread
taking the next task as soon as it is free, and still folded in task order: memory is ``workers``
models and at most 2·``workers`` + 1 gradients. The figures are the serial pass's to float
rounding: bit-identical on the toy suite (tests/test_diagnostics.py); on the digits suite ζ² at
θ₀ moved in its 11th significant digit (516.34413188793 → 516.34413188343), the backward pass's
rounding at one intra-op thread instead of torch's two.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from fl_sim.suites.base import (
    TaskSuite,
    TrainingGroup,
    batch_loss,
    federated_parameters,
    load_federated_state,
    task_loss,
)


def task_gradients(
    suite: TaskSuite, state: Mapping[str, torch.Tensor], batch_size: int, workers: int = 1
) -> Iterator[list[torch.Tensor]]:
    """g_t for t = 0..T−1, in order: ∇ L_t on its first ``batch_size`` training examples, at
    ``state``; ``workers`` of them at a time (module docstring; one: a single model, and a
    consumer that drops g_t before the next holds one)."""
    models = []
    for _ in range(max(1, min(workers, suite.num_tasks))):
        model = suite.build_model()
        load_federated_state(model, state)
        model.eval()
        models.append(model)
    if len(models) == 1:
        for t in range(suite.num_tasks):
            yield task_gradient(suite, models[0], t, batch_size)
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(len(models), thread_name_prefix="fl-sim-zeta") as pool:
            yield from _in_task_order(pool, models, suite, batch_size)
    finally:
        torch.set_num_threads(threads)


def _in_task_order(
    pool: ThreadPoolExecutor,
    models: Sequence[torch.nn.Module],
    suite: TaskSuite,
    batch_size: int,
) -> Iterator[list[torch.Tensor]]:
    """g_0..g_{T−1} in order, computed by one lane per model, each lane taking the next task as
    soon as it is free (tasks of unequal size leave no lane waiting for a wave to end), and at
    most ``2 · lanes`` tasks ahead of the one the consumer folds (memory stays bounded)."""
    num_tasks, ahead = suite.num_tasks, 2 * len(models)
    ready: dict[int, list[torch.Tensor]] = {}
    turn = threading.Condition()
    state: dict[str, object] = {"next": 0, "folded": 0, "error": None, "closed": False}

    def stopped() -> bool:
        return state["error"] is not None or bool(state["closed"])

    def lane(model: torch.nn.Module) -> None:
        torch.set_num_threads(1)  # PyTorch keeps a count per thread: set this one's own
        while True:
            with turn:
                while int(state["next"]) - int(state["folded"]) >= ahead and not stopped():
                    turn.wait()
                t = int(state["next"])
                if t >= num_tasks or stopped():
                    return
                state["next"] = t + 1
            try:
                gradient = task_gradient(suite, model, t, batch_size)
            except BaseException as error:  # handed to the consumer, raised there
                with turn:
                    state["error"] = error
                    turn.notify_all()
                return
            with turn:
                ready[t] = gradient
                turn.notify_all()

    lanes = [pool.submit(lane, model) for model in models]
    try:
        for t in range(num_tasks):
            with turn:
                while t not in ready and state["error"] is None:
                    turn.wait()
                if state["error"] is not None:
                    raise state["error"]  # type: ignore[misc]
                gradient = ready.pop(t)
                state["folded"] = t + 1
                turn.notify_all()
            yield gradient
    finally:
        with turn:
            state["closed"] = True
            turn.notify_all()
        for future in lanes:
            future.result()


def task_gradient(
    suite: TaskSuite, model: torch.nn.Module, t: int, batch_size: int
) -> list[torch.Tensor]:
    """g_t = ∇ L_t at ``model``'s state, on client t's first ``batch_size`` training examples."""
    params = federated_parameters(model)
    groups = suite.training_groups(t)
    if len(groups) == 1:
        x, y = groups[0].x[:batch_size], groups[0].y[:batch_size]
        loss = task_loss(model, groups[0].task_index, x, y)
    else:
        loss = batch_loss(model, groups, *diagnostic_batch(groups, batch_size))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [
        torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)
    ]


def diagnostic_batch(
    groups: Sequence[TrainingGroup], batch_size: int
) -> tuple[list[int], torch.Tensor]:
    """(group offsets, batch indices in 0..N−1): the first ⌊batch_size·n_g/N⌋ of each group."""
    sizes = [group.size for group in groups]
    total = sum(sizes)
    offsets, index, start = [], [], 0
    for size in sizes:
        take = size if total <= batch_size else (batch_size * size) // total
        offsets.append(start)
        index.append(torch.arange(start, start + take))
        start += size
    return offsets, torch.cat(index)


def gradient_diversity(
    gradients: Iterable[Sequence[torch.Tensor]], weights: Sequence[float]
) -> dict[str, object]:
    """ζ², Σ_t p_t‖g_t‖², ‖ḡ‖², their ratio and every ‖g_t‖, in one pass over the g_t.

    Memory is one model's worth of float64 (ḡ = Σ_t p_t g_t, accumulated as the g_t arrive),
    whatever T: ζ² = Σ_t p_t ‖g_t‖² − ‖ḡ‖², both sums in float64.
    """
    p = torch.tensor(list(weights), dtype=torch.float64)
    p = p / p.sum()
    square_norms: list[float] = []
    mean: list[torch.Tensor] = []
    for t, tensors in enumerate(gradients):
        if t >= len(p):
            raise ValueError(f"more task gradients than the {len(p)} weights")
        if not mean:
            mean = [torch.zeros(g.shape, dtype=torch.float64) for g in tensors]
        square = 0.0
        for acc, g in zip(mean, tensors, strict=True):
            g64 = g.detach().to(torch.float64)
            square += float(torch.dot(g64.reshape(-1), g64.reshape(-1)))
            acc.add_(g64, alpha=float(p[t]))
        square_norms.append(square)
    if len(square_norms) != len(p):
        raise ValueError(f"{len(square_norms)} task gradients for {len(p)} weights")
    norms = torch.tensor(square_norms, dtype=torch.float64)
    mean_square_norm = float(p @ norms)  # Σ_t p_t ‖g_t‖²
    mean_gradient_square_norm = sum(float(torch.dot(m.reshape(-1), m.reshape(-1))) for m in mean)
    zeta_square = max(mean_square_norm - mean_gradient_square_norm, 0.0)
    return {
        "zeta_square": zeta_square,
        "mean_square_norm": mean_square_norm,
        "mean_gradient_square_norm": mean_gradient_square_norm,
        "ratio": zeta_square / mean_square_norm if mean_square_norm > 0 else None,
        "gradient_norms": norms.clamp_min(0).sqrt().tolist(),
        "weights": p.tolist(),
    }


def measure(
    suite: TaskSuite,
    state: Mapping[str, torch.Tensor],
    weights: Sequence[float],
    batch_size: int,
    workers: int = 1,
) -> dict[str, object]:
    """``gradient_diversity`` of ``suite``'s tasks at ``state`` (module docstring)."""
    return {
        **gradient_diversity(task_gradients(suite, state, batch_size, workers), weights),
        "batch_size": [min(batch_size, suite.num_examples(t)) for t in range(suite.num_tasks)],
    }


__all__ = ["gradient_diversity", "measure", "task_gradients"]
