"""The server step θ' = θ + β · A, applied to an aggregate A computed once, and the β grid.

A one-shot run with a β (or λ) grid aggregates the clients' updates once, into A itself (the
engine run from a zero base with β = 1), then evaluates θ₀ + β·A for every β of the grid on
validation data; no β re-aggregates. Every rule's A is mean-like (docs/design.md), so one grid
of β means the same for all of them; task_arithmetic's λ is β = λT.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fl_sim.errors import ConfigError


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


def parse_grid(key: str, text: str) -> list[float]:
    """``"0.1, 0.2,0.5"`` → [0.1, 0.2, 0.5]; '' → []; every value finite and > 0, no repeats."""
    if not text.strip():
        return []
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(
                f"{key}: cannot read {item.strip()!r} as a number "
                f'(give a comma list, e.g. {key}="0.1,0.2,0.3")'
            ) from None
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}: every value must be a finite number > 0, got {value}")
        values.append(value)
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}: {text!r} lists a value twice")
    return values


__all__ = [
    "SelectServerLr",
    "ServerLrCandidate",
    "parse_grid",
    "server_step",
]
