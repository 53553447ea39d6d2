"""Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018).

    A_j = median(Δ_1,j, …, Δ_T,j)

For even T the median is the mean of the two middle values (``mode = "mean"``, as NumPy and
Flower's FedMedian) or the lower one (``mode = "lower"``, as ``torch.median`` and the paper's code).
With uniform p_t the paper's median is this A with β = λ.
"""

from __future__ import annotations

import torch

from fl_sim.errors import ConfigError
from strategies.rule import Chunk, Rule, as_stacked

MEDIAN_MODES = ("mean", "lower")


def check_median_mode(mode: str) -> str:
    if mode not in MEDIAN_MODES:
        raise ConfigError(f"median: mode must be one of {MEDIAN_MODES}, got {mode!r}")
    return mode


def median(deltas: torch.Tensor | list[torch.Tensor], mode: str = "mean") -> torch.Tensor:
    """Coordinate-wise median over clients (dim 0); even T per ``mode``."""
    delta = as_stacked(deltas)
    num_clients = delta.shape[0]
    middle = num_clients // 2
    if num_clients % 2 == 1:
        return torch.kthvalue(delta, middle + 1, dim=0).values
    ordered = torch.sort(delta, dim=0).values
    if check_median_mode(mode) == "lower":
        return ordered[middle - 1].clone()
    return (ordered[middle - 1] + ordered[middle]) / 2


class Median(Rule):
    name = "median"

    def __init__(self, weights: torch.Tensor, mode: str = "mean") -> None:
        super().__init__(weights)  # coordinate-wise median ignores p_t, as in the paper
        self.mode = check_median_mode(mode)

    def aggregate(self, chunk: Chunk, deltas: torch.Tensor) -> torch.Tensor:
        return median(deltas, self.mode)

    def summary(self) -> dict[str, object]:
        return {"median_mode": self.mode}
