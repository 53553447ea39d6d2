"""The server step θ' = θ + β · A, applied to an aggregate A computed once, and the β grid.

A one-shot run with a β (or λ) grid aggregates the clients' updates once, into A itself (the
engine run from a zero base with β = 1), then evaluates θ₀ + β·A for every β of the grid on
validation data; no β re-aggregates. Every rule's A is mean-like (DESIGN.md), so one grid of β
means the same for all of them; task_arithmetic's λ is β = λT.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ServerLrCandidate:
    """One grid point: β, and task_arithmetic's λ when β = λT came from it."""

    beta: float
    lam: float | None = None


# (θ, A, candidates) → the index of the chosen candidate (the ServerApp evaluates on val data)
SelectServerLr = Callable[
    [Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Sequence[ServerLrCandidate]], int
]


def server_step(
    theta: Mapping[str, torch.Tensor], update: Mapping[str, torch.Tensor], beta: float
) -> dict[str, torch.Tensor]:
    """θ' = θ + β·A on every floating-point tensor; integer buffers are θ's, copied."""
    return {
        name: torch.add(tensor, update[name], alpha=beta)
        if tensor.is_floating_point()
        else tensor.clone()
        for name, tensor in theta.items()
    }


__all__ = ["SelectServerLr", "ServerLrCandidate", "server_step"]
