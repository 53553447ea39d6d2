"""Data-heterogeneity diagnostics (DESIGN.md): the gradient diversity of the tasks at a model θ.

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
mixing = 1 gives every client the same batch and ζ² = 0). Everything is computed from the Gram
matrix G_ij = ⟨g_i, g_j⟩, accumulated in float64 tensor by tensor: ζ² = Σ_t p_t G_tt − pᵀGp
for any weights p.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fl_sim.tasks import (
    TaskSuite,
    TrainingGroup,
    batch_loss,
    federated_parameters,
    load_federated_state,
    task_loss,
)


def task_gradients(
    suite: TaskSuite, state: Mapping[str, torch.Tensor], batch_size: int
) -> list[list[torch.Tensor]]:
    """g_t for every task t: ∇ L_t on its first ``batch_size`` training examples, at ``state``."""
    model = suite.build_model()
    load_federated_state(model, state)
    model.eval()
    params = federated_parameters(model)
    gradients = []
    for t in range(suite.num_tasks):
        groups = suite.training_groups(t)
        if len(groups) == 1:
            x, y = groups[0].x[:batch_size], groups[0].y[:batch_size]
            loss = task_loss(model, groups[0].task_index, x, y)
        else:
            loss = batch_loss(model, groups, *diagnostic_batch(groups, batch_size))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        gradients.append(
            [
                torch.zeros_like(p) if g is None else g.detach()
                for p, g in zip(params, grads, strict=True)
            ]
        )
    return gradients


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


def gradient_gram(gradients: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
    """G_ij = ⟨g_i, g_j⟩ over every parameter tensor, in float64."""
    num_tasks = len(gradients)
    gram = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
    for tensors in zip(*gradients, strict=True):
        flat = torch.stack([g.reshape(-1).double() for g in tensors])
        gram += flat @ flat.T
    return gram


def gradient_diversity(gram: torch.Tensor, weights: Sequence[float]) -> dict[str, object]:
    """ζ², Σ_t p_t‖g_t‖², ‖ḡ‖², their ratio and every ‖g_t‖, from the Gram matrix G."""
    p = torch.tensor(list(weights), dtype=torch.float64)
    p = p / p.sum()
    square_norms = gram.diagonal()
    mean_square_norm = float(p @ square_norms)  # Σ_t p_t ‖g_t‖²
    mean_gradient_square_norm = float(p @ gram @ p)  # ‖ḡ‖²
    zeta_square = max(mean_square_norm - mean_gradient_square_norm, 0.0)
    return {
        "zeta_square": zeta_square,
        "mean_square_norm": mean_square_norm,
        "mean_gradient_square_norm": mean_gradient_square_norm,
        "ratio": zeta_square / mean_square_norm if mean_square_norm > 0 else None,
        "gradient_norms": square_norms.clamp_min(0).sqrt().tolist(),
        "weights": p.tolist(),
    }


def measure(
    suite: TaskSuite,
    state: Mapping[str, torch.Tensor],
    weights: Sequence[float],
    batch_size: int,
) -> dict[str, object]:
    """``gradient_diversity`` of ``suite``'s tasks at ``state`` (module docstring)."""
    gram = gradient_gram(task_gradients(suite, state, batch_size))
    return {
        **gradient_diversity(gram, weights),
        "batch_size": [min(batch_size, suite.num_examples(t)) for t in range(suite.num_tasks)],
    }


__all__ = ["gradient_diversity", "gradient_gram", "measure", "task_gradients"]
