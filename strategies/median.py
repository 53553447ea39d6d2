"""Coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018).

    A_j = median(Δ_1,j, …, Δ_T,j)

For even T the median is the mean of the two middle values (``mode = "mean"``, as NumPy and
Flower's FedMedian) or the lower one (``mode = "lower"``, as ``torch.median`` and the paper's code).
With uniform p_t the paper's median is this A with β = λ.

Speed: ``torch.sort``/``torch.median`` along a short client axis run at a few hundred MB/s. For
T ≤ 64 we instead run a selection network: Batcher's odd-even merge sort pruned to the
comparators that reach the middle wire(s), each comparator one elementwise ``minimum`` and
``maximum`` over whole rows (≈ 10× faster on the CPU, and just as exact: it only moves values).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from fl_sim.errors import ConfigError
from strategies.rule import Chunk, Rule, as_stacked
from strategies.rule_spec import RuleKnobs, RuleSpec, knob

MEDIAN_MODES = ("mean", "lower")


def check_median_mode(mode: str) -> str:
    if mode not in MEDIAN_MODES:
        raise ConfigError(f"median: mode must be one of {MEDIAN_MODES}, got {mode!r}")
    return mode


NETWORK_MAX_CLIENTS = 64


@cache
def selection_network(num_clients: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i, j), i < j, after which wires T//2 − 1 and T//2 hold those order statistics.

    Batcher's odd-even merge sort on the next power of two, minus comparators that touch a
    missing wire (≥ T, think +∞: they never swap) and those that cannot reach the middle.
    """
    size = 1
    while size < num_clients:
        size *= 2
    network: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        network.append((i + j, i + j + k))
            k //= 2
        p *= 2
    network = [(i, j) for i, j in network if j < num_clients]
    needed = {num_clients // 2, (num_clients - 1) // 2}
    kept: list[tuple[int, int]] = []
    for i, j in reversed(network):
        if i in needed or j in needed:
            kept.append((i, j))
            needed |= {i, j}
    return tuple(reversed(kept))


def order_statistics_by_network(delta: torch.Tensor) -> list[torch.Tensor]:
    """Wires after the selection network: entries T//2 − 1 and T//2 are the middle values."""
    wires = list(delta.unbind(0))
    scratch: set[int] = set()  # ids of buffers we own; the caller's rows are never written
    spare: list[torch.Tensor] = []
    for i, j in selection_network(delta.shape[0]):
        low = spare.pop() if spare else torch.empty_like(wires[i])
        high = spare.pop() if spare else torch.empty_like(wires[i])
        scratch |= {id(low), id(high)}
        torch.minimum(wires[i], wires[j], out=low)
        torch.maximum(wires[i], wires[j], out=high)
        spare.extend(old for old in (wires[i], wires[j]) if id(old) in scratch)
        wires[i], wires[j] = low, high
    return wires


def median(deltas: torch.Tensor | list[torch.Tensor], mode: str = "mean") -> torch.Tensor:
    """Coordinate-wise median over clients (dim 0); even T per ``mode``."""
    delta = as_stacked(deltas)
    num_clients = delta.shape[0]
    middle = num_clients // 2
    check_median_mode(mode)
    if 1 < num_clients <= NETWORK_MAX_CLIENTS:
        wires = order_statistics_by_network(delta)
        if num_clients % 2 == 1:
            return wires[middle].clone()
        if mode == "lower":
            return wires[middle - 1].clone()
        return (wires[middle - 1] + wires[middle]) / 2
    if num_clients % 2 == 1:
        return torch.kthvalue(delta, middle + 1, dim=0).values
    ordered = torch.sort(delta, dim=0).values
    if mode == "lower":
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


@dataclass(frozen=True)
class MedianKnobs(RuleKnobs):
    median_mode: str = knob(
        "mean",
        "median with even T: mean of the two middle values, or the lower one",
        key="median-mode",
        choices=MEDIAN_MODES,
    )


SPEC = RuleSpec(
    name="median",
    title="Median",
    paper="Yin et al., ICML 2018",
    formula="coordinate-wise median of Δ_1..Δ_T",
    knobs=MedianKnobs,
    build=lambda inputs: Median(inputs.weights, inputs.knobs.median_mode),
    linear=False,
    paper_scale="mean",
    weighting="unweighted",
)
