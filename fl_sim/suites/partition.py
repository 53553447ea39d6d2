"""Who trains on what: the data-heterogeneity knobs of docs/design.md, as seeded index sets.

- ``mixing_subset``: the part of task s's training split that ``mixing`` m shares with every
  other client: the first ⌊m·n_s⌋ indices of a permutation seeded by (seed, s), sorted. The same
  subset for every client, and nested in m; m = 1 is the whole split in its own order.
- ``dirichlet_partition``: one task's training split over C clients with Dirichlet(α) label
  skew (Hsu et al. 2019, arXiv 1909.06335): for every class c, p_c ~ Dir(α·1_C) and class c's
  examples (shuffled) go to the clients in proportions p_c (cut at ⌊cumsum(p_c)·n_c⌋). Small α:
  each client holds few classes; α → ∞: every client holds the label distribution of the task.
  α = 0 means no skew: one shuffled split into C near-equal parts (IID). A draw that leaves a
  client empty is redrawn from the same generator (at most ``MAX_DRAWS`` times).

Everything is drawn from NumPy's ``SeedSequence`` (portable across platforms and versions).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fl_sim.errors import ConfigError

MAX_DRAWS = 100
_MIXING_STREAM, _DIRICHLET_STREAM = 1, 2  # keep the knobs' random streams apart


def mixing_subset(num_examples: int, mixing: float, seed: int, task_index: int) -> torch.Tensor:
    """Sorted indices of the ⌊mixing·n⌋ examples of task ``task_index`` every client shares."""
    count = math.floor(mixing * num_examples)
    if count >= num_examples:
        return torch.arange(num_examples)
    rng = np.random.default_rng(np.random.SeedSequence([_MIXING_STREAM, seed, task_index]))
    chosen = np.sort(rng.permutation(num_examples)[:count])
    return torch.from_numpy(chosen.astype(np.int64))


def dirichlet_partition(
    labels: torch.Tensor, num_clients: int, alpha: float, seed: int
) -> list[torch.Tensor]:
    """C disjoint, covering, sorted index sets of ``labels`` (module docstring; α = 0: IID)."""
    n = int(labels.shape[0])
    if num_clients < 1 or n < num_clients:
        raise ConfigError(
            f"cannot split {n} training examples over {num_clients} clients "
            "(lower num-tasks, the number of clients with shared-head)"
        )
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ConfigError(f"dirichlet-alpha must be a finite number ≥ 0, got {alpha}")
    rng = np.random.default_rng(np.random.SeedSequence([_DIRICHLET_STREAM, seed]))
    if alpha == 0:
        parts = np.array_split(rng.permutation(n), num_clients)
        return [torch.from_numpy(np.sort(part).astype(np.int64)) for part in parts]
    y = labels.numpy()
    for _ in range(MAX_DRAWS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in np.unique(y):
            members = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            cuts = np.floor(np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].append(chunk)
        merged = [np.sort(np.concatenate(chunks)) for chunks in parts]
        if min(len(part) for part in merged) > 0:
            return [torch.from_numpy(part.astype(np.int64)) for part in merged]
    raise ConfigError(
        f"dirichlet-alpha={alpha} left a client without data in {MAX_DRAWS} draws "
        f"({num_clients} clients, {n} examples): raise dirichlet-alpha or lower num-tasks"
    )


def label_entropy(labels: torch.Tensor, num_classes: int) -> float:
    """H(y) in nats of the empirical label distribution (label skew: low = few classes)."""
    counts = torch.bincount(labels, minlength=num_classes).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


__all__ = ["MAX_DRAWS", "dirichlet_partition", "label_entropy", "mixing_subset"]
