"""DARE, Drop And REscale (Yu et al., "Language Models are Super Mario: Absorbing Abilities from
Homologous Models as a Free Lunch", ICML 2024), combined linearly as mergekit's ``dare_linear``.

With d = ``density`` (the keep probability, 1 − the paper's drop rate p):

    M_t,j ~ Bernoulli(d), independent over clients t and coordinates j,
    τ̃_t = M_t ⊙ Δ_t / d          (rescale = false: M_t ⊙ Δ_t),
    A = Σ_t p_t τ̃_t               (d ≥ 1: A = Σ_t p_t Δ_t, FedAvg exactly)

θ' = θ₀ + β·A. Given the masks A is linear in the Δ_t, but the masks make it random, so the rule
is not ``linear`` (the engine must see every Δ_t). With rescale, E[τ̃_t] = Δ_t, so E[A] is FedAvg's
A and Var[A_j] = (1 − d)/d · Σ_t p_t² Δ_t,j².

Paper scale: the paper and mergekit's dare_linear add the sum λ Σ_t w_t τ̃_t to θ₀ (mergekit
registers dare_linear with ``default_normalize=False``; GTATask.execute then sums
``weighted_deltas`` and multiplies by ``lambda``). With unit weights that is θ₀ + λT·A, so
β = λT (paper_scale "sum"); with weights w_t, p_t = w_t / Σ w and β = λ Σ_t w_t.

Where this follows mergekit and where not (mergekit/merge_methods/registry.py: dare_linear =
sparsification_method=random, consensus_method=None, default_rescale=True; mergekit/sparsify.py,
``bernoulli``): the mask has the law of mergekit's ``torch.bernoulli(full_like(Δ, d))`` per task
vector and tensor (not its draws: mergekit uses torch's global generator), and d ≥ 1 returns Δ
unchanged. The rescale differs: mergekit's ``bernoulli`` divided by d from DARE's first version
(Dec 2023) until Feb 2025; since then ``rescale: true`` means ``RescaleNorm.l1``,
τ̃_t = M_t ⊙ Δ_t · ‖Δ_t‖₁ / ‖M_t ⊙ Δ_t‖₁ per tensor (``rescaled_masked_tensor``). This rule keeps
the paper's 1/d: unbiased, and linear given the masks; the two factors differ by about
√((1 − d)/(d n)) on an n-element tensor whose |Δ_j| are alike. mergekit's ``density`` is per
model and defaults to 1 (drops nothing); here it is one value for all clients, default 0.5:
mergekit's docs' examples use 0.5–0.8, the paper finds that smaller models tolerate less
dropping than its 7B+ LLMs at d = 0.1, and Var[A] grows as (1 − d)/d.

Seeded, reproducible: client t's mask on tensor ``name`` is ``torch.rand(n) < d`` from a CPU
``torch.Generator`` seeded with a 63-bit BLAKE2b hash of (seed, name, t), drawn for the whole
tensor (``whole_tensors``). It is the same on every device, chunk size and run, for a given
torch version, and differs between tensors and clients. ``seed`` is ``RuleInputs.seed``: the
config layer sets it from the ``dare-seed`` knob (plus the round index in multi-round FL, so
each round draws new masks). The summary records it, so merge_report.json and results.json
name the masks used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from strategies.fedavg import fedavg
from strategies.rule import Chunk, Rule
from strategies.rule_spec import RuleInputs, RuleKnobs, RuleSpec, knob

SEED_BITS = 63


def mask_seed(seed: int, name: str, client: int) -> int:
    """The generator seed of client ``client``'s mask on tensor ``name`` (stable across runs)."""
    digest = hashlib.blake2b(f"dare:{seed}:{client}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << SEED_BITS) - 1)


def dare_mask(seed: int, name: str, client: int, numel: int, density: float) -> torch.Tensor:
    """M_t for the flattened tensor ``name``: a CPU bool ``[numel]``, True with probability d."""
    generator = torch.Generator(device="cpu").manual_seed(mask_seed(seed, name, client))
    return torch.rand(numel, generator=generator) < density


def dare(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    name: str,
    density: float = 0.5,
    rescale: bool = True,
    seed: int = 0,
) -> torch.Tensor:
    """A of DARE on one whole tensor ``name``: ``deltas`` is ``[T, ...]`` (Δ_t per row)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    return (
        DARE(weights, density, rescale, seed)
        .aggregate(Chunk(name, 0, flat.shape[1]), flat)
        .view(deltas.shape[1:])
    )


class DARE(Rule):
    """DARE with a linear combination, one whole tensor per ``aggregate`` (module docstring)."""

    name = "dare"
    whole_tensors = True

    def __init__(
        self, weights: torch.Tensor, density: float = 0.5, rescale: bool = True, seed: int = 0
    ) -> None:
        super().__init__(weights)
        self.density = float(density)
        self.rescale = bool(rescale)
        self.seed = int(seed)
        self.entries = 0
        self.kept = 0

    def aggregate(self, chunk: Chunk, deltas: torch.Tensor) -> torch.Tensor:
        if chunk.start != 0:
            raise RuntimeError(
                f"dare draws its masks per whole tensor but got elements {chunk.start}:"
                f"{chunk.stop} of {chunk.name!r}; the engine must pass each tensor as one chunk "
                "(whole_tensors)"
            )
        num_clients, n = deltas.shape
        self.entries += num_clients * n
        if self.density >= 1:  # mergekit: no drop, no rescale
            self.kept += num_clients * n
            return fedavg(deltas, self.weights)
        scale = 1.0 / self.density if self.rescale else 1.0
        merged = torch.zeros(n, dtype=deltas.dtype, device=deltas.device)
        zero = torch.zeros((), dtype=deltas.dtype, device=deltas.device)
        for t, p_t in enumerate(self.weights.tolist()):
            mask = dare_mask(self.seed, chunk.name, t, n, self.density)
            self.kept += int(mask.sum())
            mask = mask.to(deltas.device, non_blocking=True)
            merged.add_(torch.where(mask, deltas[t], zero), alpha=p_t * scale)
        return merged

    def summary(self) -> dict[str, object]:
        return {
            "density": self.density,
            "rescale": self.rescale,
            "seed": self.seed,
            "kept_fraction": self.kept / max(self.entries, 1),
        }


@dataclass(frozen=True)
class DAREKnobs(RuleKnobs):
    density: float = knob(
        0.5,
        "dare: keep probability d ∈ (0, 1] of each coordinate of each task vector (1 − the "
        "paper's drop rate; mergekit's per-model density)",
        key="dare-density",
        flag="--density",
        yaml="density",
    )
    rescale: bool = knob(
        True,
        "dare: rescale the kept coordinates by 1/d, so that E[A] is FedAvg's (the paper's DARE)",
        key="dare-rescale",
        flag="--rescale",
        yaml="rescale",
    )
    seed: int = knob(
        0,
        "dare: seed ≥ 0 of the random masks (each round of FL adds its index); recorded",
        key="dare-seed",
        flag="--seed",
        yaml="seed",
    )

    def check(self) -> None:
        if not 0.0 < self.density <= 1.0:  # also rejects NaN
            raise self.error("density", f"must be in (0, 1], got {self.density}", 0.5)
        if self.seed < 0:
            raise self.error("seed", f"must be an integer ≥ 0, got {self.seed}", 0)


def _build(inputs: RuleInputs) -> DARE:
    knobs = inputs.knobs
    return DARE(inputs.weights, knobs.density, knobs.rescale, inputs.seed)


SPEC = RuleSpec(
    name="dare",
    title="DARE",
    paper="Yu et al., ICML 2024",
    formula="Σ_t p_t M_t ⊙ Δ_t / d per tensor, M_t,j ~ Bernoulli(d), seeded",
    knobs=DAREKnobs,
    build=_build,
    linear=False,
    paper_scale="sum",
    weighting="weighted",
    mergekit="dare_linear",
    seeded=True,
)
