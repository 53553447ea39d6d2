"""TIES-merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models",
NeurIPS 2023), computed as mergekit's ``ties`` merge method.

Per tensor, with d = ``density``, n = the tensor's numel and k = int(d · n):

    trim:      τ̂_t = Δ_t on the k coordinates of largest |Δ_t,j| (0 elsewhere); τ̂_t = Δ_t if d ≥ 1
    elect:     γ_j = +1 if Σ_t p_t τ̂_t,j ≥ 0 else −1
    agree:     m_t,j = [sign(p_t τ̂_t,j) = γ_j]           (a trimmed zero never agrees)
    merge:     A_j = Σ_t p_t m_t,j τ̂_t,j / D_j,   D_j = Σ_t p_t m_t,j, or 1 where that is 0
               (normalize = false: D_j = 1)

θ' = θ₀ + β·A. In one-shot merging Δ_t = τ_t, the task vectors, and the paper's
θ = θ₀ + λ·τ_m with τ_m the disjoint mean above, so β = λ (paper_scale "mean").

Where and why this follows mergekit (mergekit/merge_methods/generalized_task_arithmetic.py,
``GTATask.execute`` and ``get_mask``; mergekit/sparsify.py, ``magnitude``; registered in
mergekit/merge_methods/registry.py as consensus_method=sum, sparsification_method=magnitude,
default_normalize=True):

- Per tensor. The paper trims each task vector over the whole model (top 20% of all its
  coordinates); mergekit, and so this rule, trims every tensor separately with k = int(d · n),
  so each tensor keeps the same fraction. It needs a whole tensor at once (``whole_tensors``).
- Ties at the trim threshold: mergekit keeps ``torch.argsort(|Δ_t|, descending=True)[:k]``
  without ``stable=True``, so which of several equal magnitudes at the threshold survive is
  left to the sort (torch 2.13's CPU sort is not stable past 16 elements; CUDA sorts
  otherwise).
  Here the lowest flat indices survive, what a stable sort gives, found in O(n) with
  ``kthvalue``; the result is the same on every device. Ties are common: the Δ_t of bf16 models
  take few distinct values.
- k = 0 (d · n < 1, e.g. a one-element ``logit_scale`` at d < 1): mergekit stops on an
  assertion; here that tensor's τ̂_t are all zero, so A = 0 there (θ' = θ₀), and the summary
  names the tensor.
- The sign is elected on p_t τ̂_t, as mergekit's ``get_mask(weighted_deltas)``: a zero sum
  elects +1, and a client of weight 0 never agrees. Where Σ_t w_t τ̂_t,j is exactly 0 (common
  with the few distinct values of bf16 Δ) its sign is the rounding's, in mergekit too; with
  equal p_t the sum is taken over τ̂_t unscaled, which is mergekit's with unit weights.
  mergekit also has ``consensus_method: count`` (γ_j = the sign of Σ_t sign(τ̂_t,j)), which
  its ``ties`` does not use; not offered.
- ``normalize`` (mergekit's default for ties: true) divides by the agreeing weight D_j; mergekit
  sets D_j = 1 where it is 0, i.e. where every τ̂_t,j is 0, so A_j = 0 there. mergekit then
  multiplies by its ``lambda``, so λ ↦ β = λ. The division makes A invariant to a common
  scale of the weights, so p_t = w_t / Σ w gives mergekit's result (up to rounding). With
  normalize = false mergekit's A is Σ_t w_t m_t τ̂_t, a sum: then β = λ Σ_t w_t (λT with unit
  weights).
- mergekit's ``density`` is a per-model parameter defaulting to 1 (no trimming); here it is one
  value for every client, defaulting to the paper's k = 20%.

The summary holds density, normalize, the fraction of (client, coordinate) entries kept by the
trim, the fraction of coordinates where a kept entry disagreed with the elected sign, and the
fraction where no client kept anything (A_j = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from strategies.rule import Chunk, Rule, as_stacked
from strategies.rule_spec import RuleInputs, RuleKnobs, RuleSpec, knob


def keep_count(density: float, numel: int) -> int:
    """k = int(d · n), mergekit's count of coordinates a trimmed tensor keeps (n when d ≥ 1)."""
    return numel if density >= 1 else int(density * numel)


def top_magnitude_mask(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The k coordinates of largest |Δ_j| of a flat tensor; equal magnitudes at the threshold go
    to the lowest indices, as ``torch.argsort(|Δ|, descending=True, stable=True)[:k]``."""
    n = delta.numel()
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=delta.device)
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=delta.device)
    magnitude = delta.abs()
    threshold = torch.kthvalue(magnitude, n - k + 1).values  # the k-th largest
    keep = magnitude > threshold
    missing = k - int(keep.sum())
    if missing > 0:
        tied = torch.nonzero(magnitude == threshold).flatten()[:missing]
        keep[tied] = True
    return keep


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """τ̂: a flat Δ with all but its top int(d · n) magnitudes set to 0 (Δ itself when d ≥ 1)."""
    if density >= 1:
        return delta
    keep = top_magnitude_mask(delta, keep_count(density, delta.numel()))
    return torch.where(keep, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


@dataclass
class TiesParts:
    """One tensor's A and the counts the summary adds up."""

    merged: torch.Tensor
    conflicted: int  # coordinates where a kept p_t τ̂_t,j has the sign opposite γ_j
    empty: int  # coordinates where every τ̂_t,j = 0 (D_j = 0 → 1, A_j = 0)


def ties_parts(trimmed: torch.Tensor, weights: torch.Tensor, normalize: bool = True) -> TiesParts:
    """Elect and disjoint-merge trimmed ``[T, n]`` τ̂ (mergekit's GTATask.execute); ``trimmed``
    is overwritten (with p_t m_t τ̂_t), to keep one ``[T, n]`` buffer of model size."""
    p = weights.to(device=trimmed.device, dtype=trimmed.dtype).unsqueeze(-1)
    # Equal p_t: elect on Σ_t τ̂_t, as mergekit with unit weights, so that a sum that is exactly
    # 0 (discrete bf16 Δ) stays 0 instead of taking the sign of the rounding of p_t = 1/T.
    uniform = bool((weights == weights[0]).all())
    if uniform:
        elected = torch.where(trimmed.sum(dim=0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    weighted = trimmed.mul_(p)
    if not uniform:
        elected = torch.where(weighted.sum(dim=0) >= 0, 1.0, -1.0).to(trimmed.dtype)
    signs = weighted.sign()
    agree = signs == elected
    merged = weighted.mul_(agree).sum(dim=0)
    divisor = (p * agree).sum(dim=0)
    empty = divisor == 0
    if normalize:
        merged /= divisor.masked_fill_(empty, 1.0)
    conflicted = int(((signs != 0) & ~agree).any(dim=0).sum())
    return TiesParts(merged, conflicted, int(empty.sum()))


def ties(
    deltas: torch.Tensor | list[torch.Tensor],
    weights: torch.Tensor,
    density: float = 0.2,
    normalize: bool = True,
) -> torch.Tensor:
    """A of TIES-merging on one whole tensor: ``deltas`` is ``[T, ...]`` (Δ_t per row)."""
    delta = as_stacked(deltas)
    flat = delta.reshape(delta.shape[0], -1)
    trimmed = torch.stack([trim(row, density) for row in flat])
    return ties_parts(trimmed, weights, normalize).merged.reshape(delta.shape[1:])


class Ties(Rule):
    """TIES-merging, one whole tensor per ``aggregate`` (see the module docstring)."""

    name = "ties"
    whole_tensors = True

    def __init__(self, weights: torch.Tensor, density: float = 0.2, normalize: bool = True):
        super().__init__(weights)
        self.density = float(density)
        self.normalize = bool(normalize)
        self.entries = 0  # (client, coordinate) pairs seen
        self.kept = 0
        self.coordinates = 0
        self.conflicted = 0
        self.empty = 0
        self.trimmed_to_zero: list[str] = []

    def aggregate(self, chunk: Chunk, deltas: torch.Tensor) -> torch.Tensor:
        if chunk.start != 0:
            raise RuntimeError(
                f"ties trims whole tensors but got elements {chunk.start}:{chunk.stop} of "
                f"{chunk.name!r}; the engine must pass each tensor as one chunk (whole_tensors)"
            )
        num_clients, n = deltas.shape
        k = keep_count(self.density, n)
        if k == 0:
            self.trimmed_to_zero.append(chunk.name)
        trimmed = torch.stack([trim(row, self.density) for row in deltas])
        parts = ties_parts(trimmed, self.weights, self.normalize)
        self.entries += num_clients * n
        self.kept += num_clients * k
        self.coordinates += n
        self.conflicted += parts.conflicted
        self.empty += parts.empty
        return parts.merged

    def summary(self) -> dict[str, object]:
        coordinates = max(self.coordinates, 1)
        return {
            "density": self.density,
            "normalize": self.normalize,
            "kept_fraction": self.kept / max(self.entries, 1),
            "sign_conflict_fraction": self.conflicted / coordinates,
            "all_trimmed_fraction": self.empty / coordinates,
            "trimmed_to_zero_tensors": list(self.trimmed_to_zero),
        }


@dataclass(frozen=True)
class TiesKnobs(RuleKnobs):
    density: float = knob(
        0.2,
        "ties: fraction d ∈ (0, 1] of each task vector's coordinates kept per tensor, by "
        "magnitude (the paper's k = 20%; mergekit's per-model density)",
        key="ties-density",
        flag="--density",
        yaml="density",
    )
    normalize: bool = knob(
        True,
        "ties: divide by the weight of the clients agreeing with the elected sign (a disjoint "
        "mean, mergekit's default); false gives a disjoint sum",
        key="ties-normalize",
        flag="--normalize",
        yaml="normalize",
    )

    def check(self) -> None:
        if not 0.0 < self.density <= 1.0:  # also rejects NaN
            raise self.error("density", f"must be in (0, 1], got {self.density}", 0.2)


def _build(inputs: RuleInputs) -> Ties:
    knobs = inputs.knobs
    return Ties(inputs.weights, knobs.density, knobs.normalize)


SPEC = RuleSpec(
    name="ties",
    title="TIES-merging",
    paper="Yadav et al., NeurIPS 2023",
    formula=(
        "Σ_t p_t m_t τ̂_t / Σ_t p_t m_t per tensor, τ̂_t = top-d |Δ_t|, "
        "m_t = [sign τ̂_t = sign Σ_s p_s τ̂_s]"
    ),
    knobs=TiesKnobs,
    build=_build,
    linear=False,
    paper_scale="mean",
    weighting="weighted",
    mergekit="ties",
)
