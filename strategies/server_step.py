"""The server step θ' = θ + β · A, applied to an aggregate A computed once, and the β grid.

A one-shot run with a β (or λ) grid aggregates the clients' updates once, into A itself (the
engine run from a zero base with β = 1), then evaluates θ₀ + β·A for every β of the grid on
validation data; no β re-aggregates. Every rule's A is mean-like (docs/design.md), so one grid
of β means the same for all of them; task_arithmetic's λ is β = λT. When the best β is at an end
of the grid, ``search_server_lr`` extends the grid geometrically past that end (halving below,
doubling above) until the best is interior or a bound is reached, then refines between the best
β's neighbours; every extra point is θ₀ + β·A with the same A.
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


# (θ, A, grid) → the chosen candidate, from the grid or beyond it (search_server_lr; the
# ServerApp evaluates on val data)
SelectServerLr = Callable[
    [Mapping[str, torch.Tensor], Mapping[str, torch.Tensor], Sequence[ServerLrCandidate]],
    ServerLrCandidate,
]


@dataclass(frozen=True)
class SearchSettings:
    """How a β (λ) search goes beyond its grid, all on validation data.

    ``extend``: while the best β is the smallest (largest) one tried, try half the smallest
    (twice the largest), at most ``max_extensions`` times per end (a factor 2^k beyond the grid).
    ``refine``: then, ``refine`` times, try the geometric midpoint between the best β and each
    neighbour it has among the β tried (a bisection in log β); the best score never drops.
    """

    extend: bool = True
    max_extensions: int = 6
    refine: int = 2


@dataclass(frozen=True)
class SearchPoint:
    """One β tried: the candidate, its validation score, and the stage that tried it
    (``grid``, ``extend-below``, ``extend-above`` or ``refine``)."""

    candidate: ServerLrCandidate
    score: float
    stage: str


@dataclass(frozen=True)
class SearchResult:
    """Every β tried in order, the index of the best, and whether it sits on a bound: it is
    the smallest or the largest β tried (the extension stopped at its limit or was off)."""

    points: tuple[SearchPoint, ...]
    best: int
    on_bound: bool

    @property
    def selected(self) -> ServerLrCandidate:
        return self.points[self.best].candidate


def _scaled(candidate: ServerLrCandidate, factor: float) -> ServerLrCandidate:
    """β·f, and λ·f with it (task_arithmetic's β = λT keeps its ratio)."""
    lam = None if candidate.lam is None else candidate.lam * factor
    return ServerLrCandidate(candidate.beta * factor, lam)


def search_server_lr(
    candidates: Sequence[ServerLrCandidate],
    score: Callable[[ServerLrCandidate], float],
    settings: SearchSettings = SearchSettings(),
    prefetch: Callable[[Sequence[ServerLrCandidate]], None] | None = None,
) -> SearchResult:
    """Score the grid, extend it geometrically past the end the best β sits on, then refine
    between the best β's neighbours; every extra point is another β for the same A.

    The best is the highest score, the earliest tried on ties, so an extension or a refinement
    replaces it only when strictly better and the search stops on a plateau. ``score`` is the
    validation figure; nothing else is read. ``prefetch``, when given, is told the candidates of
    each step before they are scored one by one (the grid; a refinement's two neighbours), so a
    caller may evaluate them together; it must not change any score."""
    if not candidates:
        raise ValueError("a β search needs at least one candidate")
    points: list[SearchPoint] = []

    def tried(candidate: ServerLrCandidate, stage: str) -> None:
        points.append(SearchPoint(candidate, float(score(candidate)), stage))

    def best() -> int:
        return max(range(len(points)), key=lambda i: (points[i].score, -i))

    def ordered() -> list[int]:
        return sorted(range(len(points)), key=lambda i: points[i].candidate.beta)

    if prefetch is not None:
        prefetch(candidates)
    for candidate in candidates:
        tried(candidate, "grid")
    below = above = 0
    while settings.extend:
        order, i = ordered(), best()
        if i == order[0] and below < settings.max_extensions:
            below += 1
            tried(_scaled(points[i].candidate, 0.5), "extend-below")
        elif i == order[-1] and above < settings.max_extensions:
            above += 1
            tried(_scaled(points[i].candidate, 2.0), "extend-above")
        else:
            break
    for _ in range(settings.refine):
        order, i = ordered(), best()
        position = order.index(i)
        here = points[i].candidate
        step = [
            _scaled(here, math.sqrt(points[order[j]].candidate.beta / here.beta))
            for j in (position - 1, position + 1)
            if 0 <= j < len(order)
        ]
        if prefetch is not None and len(step) > 1:
            prefetch(step)
        for candidate in step:
            tried(candidate, "refine")
    order, i = ordered(), best()
    return SearchResult(tuple(points), i, len(points) > 1 and i in (order[0], order[-1]))


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
    "SearchPoint",
    "SearchResult",
    "SearchSettings",
    "SelectServerLr",
    "ServerLrCandidate",
    "parse_grid",
    "search_server_lr",
    "server_step",
]
