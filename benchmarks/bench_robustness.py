"""Measured robustness: every rule × 0, 1 or 2 Byzantine clients of 8, for every attack.

    python benchmarks/bench_robustness.py [--out runs/robustness] [--rules fedavg,median,...]
        [--attacks scale:-10,sign-flip,gaussian:1,nan] [--local-steps 200] [--table-only]

The digits default suite (8 clients, vit-digits, preset lr-hetero), one-shot (R = 1, β = 1;
task_arithmetic with its default λ), through ``simulate`` (fl_sim/federation/simulation.py): one
Ray start for
every run. The attackers are the last clients (7, then 7 and 6); the attack is applied after
honest training (``byzantine`` run-config key), so the clients' update cache trains each client
once and every later run reuses its honest Δ_t. cclip uses ``tau-c-auto`` (τ_c = the median
‖Δ_t − v₀‖₂). ``nan`` updates are rejected by the server, so those runs aggregate the honest
clients only (``min-clients`` = 8 − Byzantine). Printed: the final mean TEST accuracy of every
run (normalised accuracy in brackets: acc_t(θ) / acc_t(θ₀ + Δ_t)). ``--table-only`` prints the
table from the results already in ``--out`` (e.g. after an interrupted run).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from fl_sim.config.run_config import RunConfig
from fl_sim.outputs import read_json
from strategies.registry import RULE_NAMES

NUM_CLIENTS = 8


def run_name(rule: str, attack: str, count: int) -> str:
    return f"{rule}__clean" if count == 0 else f"{rule}__{attack.replace(':', '_')}__{count}"


def configs(args: argparse.Namespace) -> list[tuple[str, RunConfig]]:
    out = Path(args.out)
    runs = []
    for rule in args.rules.split(","):
        plans = [("", 0)] + [(a, n) for a in args.attacks.split(",") for n in (1, 2)]
        for attack, count in plans:
            attackers = list(range(NUM_CLIENTS - 1, NUM_CLIENTS - 1 - count, -1))
            values: dict[str, object] = {
                "experiment": "single",
                "strategy": rule,
                "num-tasks": NUM_CLIENTS,
                "local-steps": args.local_steps,
                "diagnostic-batch": 0,
                "cache-dir": str(out / "cache"),
                "results-dir": str(out / run_name(rule, attack, count)),
                "byzantine": ",".join(f"{t}:{attack}" for t in attackers),
                "min-clients": NUM_CLIENTS - count if attack == "nan" else 0,
            }
            if rule == "cclip":
                values["tau-c-auto"] = True
            runs.append((run_name(rule, attack, count), RunConfig.from_mapping(values)))
    return runs


def table(args: argparse.Namespace) -> str:
    out = Path(args.out)
    attacks = args.attacks.split(",")
    head = ["rule", "clean"] + [f"{a} ×{n}" for a in attacks for n in (1, 2)]
    lines = [" | ".join(head), " | ".join("---" for _ in head)]
    for rule in args.rules.split(","):
        cells = [rule]
        for attack, count in [("", 0)] + [(a, n) for a in attacks for n in (1, 2)]:
            path = out / run_name(rule, attack, count) / "results.json"
            if not path.exists():
                cells.append("-")
                continue
            results = read_json(path)
            if results["status"] != "completed":
                cells.append("failed")
                continue
            test = results["rounds"][-1]["splits"]["test"]
            norm = test["mean_normalized_accuracy"]
            cells.append(
                f"{test['mean_accuracy']:.3f}" + ("" if norm is None else f" ({norm:.2f})")
            )
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/robustness")
    parser.add_argument("--rules", default=",".join(RULE_NAMES))
    parser.add_argument("--attacks", default="scale:-10,sign-flip,gaussian:1,nan")
    parser.add_argument("--local-steps", type=int, default=200)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    if not args.table_only:
        from fl_sim.federation.simulation import simulate

        runs = configs(args)
        start = time.perf_counter()
        simulate([config for _, config in runs], progress=False)
        print(f"{len(runs)} runs in {time.perf_counter() - start:.0f} s (one Ray start)")
    print(table(args))


if __name__ == "__main__":
    main()
