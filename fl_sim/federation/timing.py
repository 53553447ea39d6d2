"""Where a run's wall time went, in one line.

A run's wall time T_run splits into what the server waited for and what it did itself:

- **client training**: per round, the part of the wait for the clients' replies (from sending
  the train messages to holding every reply) during which at least one client handler ran:
  the length of the union of the handlers' [start, end] intervals (each client stamps them,
  ``client-start`` / ``client-end``), clipped to the wait;
- **Ray/Flower**: the rest of that wait, when no handler ran (scheduling, actor start,
  serialisation and transport of θʳ and Δ_t), and the wait for the nodes to connect and give
  their partition ids (in simulation: Ray starting the SuperNodes' actors); with
  ``concurrent-runs`` > 1 also the time the run's messages queued behind another run's
  clients (fl_sim/federation/run_schedule.py), and the runs' sum then exceeds the wall;
- **aggregation**: the rule's engine (and θ₀ + β·A for the selected β);
- **evaluation**: θʳ after every round, each client's θ₀ + Δ_t, the β/λ search;
- **diagnostics**: the gradient diversity ζ²;
- **other**: T_run less all of the above (building the suite and θ₀, writing results and
  checkpoints).

In a deployment the handlers' stamps come from the nodes' clocks: clipping to the server's
wait keeps the split within the wait, but a skewed clock moves time between the first two.
"""

from __future__ import annotations

from collections.abc import Sequence

from strategies.flower_strategy import RoundRecord

PARTS = ("client_training", "ray_flower", "aggregation", "evaluation", "diagnostics", "other")


def time_breakdown(
    total: float,
    rounds: Sequence[RoundRecord],
    *,
    evaluation: float,
    diagnostics: float,
    discovery: float = 0.0,
) -> dict[str, float]:
    """Seconds per part of ``PARTS`` (module docstring) and ``total``."""
    waited = sum(record.wait_seconds for record in rounds)
    training = sum(record.busy_seconds for record in rounds)
    aggregation = sum(record.aggregation_seconds for record in rounds)
    parts = {
        "client_training": training,
        "ray_flower": waited - training + discovery,
        "aggregation": aggregation,
        "evaluation": evaluation,
        "diagnostics": diagnostics,
    }
    parts["other"] = total - sum(parts.values())
    return {"total": total, **parts}


def add_breakdowns(breakdowns: Sequence[dict[str, float]]) -> dict[str, float]:
    """The sum of several runs' breakdowns (an experiment's)."""
    return {key: sum(b.get(key, 0.0) for b in breakdowns) for key in ("total", *PARTS)}


def format_breakdown(breakdown: dict[str, float]) -> str:
    """``time 186.2 s: client training 150.1 s · Ray/Flower 5.0 s · …`` (one line)."""
    labels = {
        "client_training": "client training",
        "ray_flower": "Ray/Flower",
        "aggregation": "aggregation",
        "evaluation": "evaluation",
        "diagnostics": "diagnostics",
        "other": "other",
    }
    parts = " · ".join(f"{labels[key]} {breakdown[key]:.1f} s" for key in PARTS)
    return f"time {breakdown['total']:.1f} s: {parts}"
