"""The shape every aggregation rule shares.

A rule computes the server's mean-like update A(Δ₁..Δ_T) (docs/design.md), so that
θʳ⁺¹ = θʳ + β · A for every rule with the same meaning of β.

Rules see the federated parameter vector one *chunk* at a time: a contiguous slice of one
flattened tensor, given as ``deltas`` of shape ``[T, n]`` (row t is client t's Δ_t on that slice).
Coordinate-wise rules (fedavg, fednova, fedgma, median) need nothing else. Rules whose
arithmetic couples coordinates through a whole-model quantity (cclip's norm ‖Δ_t − v‖₂) ask for
extra passes over the chunks: ``num_passes`` passes, ``observe`` on every chunk of every pass but
the last, ``end_pass`` after each, and ``aggregate`` on every chunk of the last. Rules whose
arithmetic needs a whole tensor at once (ties' per-tensor top-k magnitude trimming, dare's
per-tensor seeded masks) set ``whole_tensors``: each chunk is then one whole flattened tensor,
whatever the engine's chunk size. The same rule object therefore serves an in-memory Flower
round and a streamed offline merge.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from fl_sim.errors import ConfigError


@dataclass(frozen=True)
class Chunk:
    """Elements ``start:stop`` of the flattened tensor ``name``."""

    name: str
    start: int
    stop: int


class Rule(ABC):
    """A(Δ₁..Δ_T), evaluated chunk by chunk; see the module docstring for the protocol."""

    name: str = ""
    num_passes: int = 1
    whole_tensors: bool = False  # True: every chunk is a whole tensor (deltas [T, numel])

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = weights

    def observe(self, pass_index: int, chunk: Chunk, deltas: torch.Tensor) -> None:  # noqa: B027
        """See one chunk in a pass before the last (only multi-pass rules override this)."""

    def end_pass(self, pass_index: int) -> None:  # noqa: B027
        """Called after every chunk of pass ``pass_index`` was observed."""

    @abstractmethod
    def aggregate(self, chunk: Chunk, deltas: torch.Tensor) -> torch.Tensor:
        """A on this chunk: a ``[n]`` tensor on the device and dtype of ``deltas``."""

    def linear_coefficients(self) -> torch.Tensor | None:
        """c with A = Σ_t c_t Δ_t when the rule is linear in the updates, else None."""
        return None

    def summary(self) -> dict[str, object]:
        """Rule-specific figures for the results (scales, agreement histograms...)."""
        return {}


def client_weights(num_clients: int, weights: object | None = None) -> torch.Tensor:
    """p_t as float64: uniform 1/T by default, else the given non-negative weights normalised."""
    if num_clients < 1:
        raise ConfigError(f"need at least one client, got {num_clients}")
    if weights is None:
        return torch.full((num_clients,), 1.0 / num_clients, dtype=torch.float64)
    p = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if p.numel() != num_clients:
        raise ConfigError(
            f"weights: got {p.numel()} weights for {num_clients} clients (give one per client)"
        )
    if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
        raise ConfigError(
            f"weights must be finite, non-negative and not all zero, got {p.tolist()}"
        )
    return p / p.sum()


def as_stacked(
    deltas: torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """The clients' same-named tensors as one ``[T, ...]`` tensor (stacked if given as a list)."""
    if isinstance(deltas, torch.Tensor):
        return deltas
    return torch.stack(list(deltas))
