"""The server's own peak memory in one round against T, streaming or holding every reply.

    python benchmarks/bench_server_memory.py [--models minilm,base] [--clients 8,32,64]
        [--points held:fedavg,fold:fedavg,spill:median[:8/32]] [--held-clients 8,32] [--json OUT]

No Ray and no clients: every point is a fresh process that builds θʳ with the model's tensor
shapes (all-MiniLM-L6-v2: 22.6M parameters; BERT-base: 109.5M, the shapes of
benchmarks/bench_scale.py), a RuleStrategy, and one round of T replies of model-sized Δ_t made
here, then reports the process's peak RSS above its level before the round (``ru_maxrss``) and
the round's seconds. What differs between the servers is exactly what the strategy keeps:

- ``held``: ``server-streaming = false``: the T replies arrive as one list, as
  ``Grid.send_and_receive`` returns them, and aggregate at once;
- ``fold``: the streaming server on a linear rule: each reply is made only when the server asks
  for the next one (as ``Grid.pull_messages`` delivers them) and folded, then dropped;
- ``spill``: the streaming server on a non-linear rule (or any rule in round 1): each reply is
  spilled to a safetensors file in a temporary folder, then the engine reads the files back.

So the figure is the server's share of a round (θʳ, the sum or the files' pages, the output,
the replies it holds), without Ray's object store or the clients, which
benchmarks/bench_scale.py measures with everything else.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

GIB = 2**30
SHAPES = {  # (hidden, layers, intermediate): BERT-style encoders, 30,522-token vocabulary
    "minilm": (384, 6, 1536),
    "base": (768, 12, 3072),
}


def model_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """Every float tensor of a BERT-style encoder (embeddings, layers, no pooler)."""
    hidden, layers, inner = SHAPES[model]
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (30522, hidden),
        "embeddings.position_embeddings.weight": (512, hidden),
        "embeddings.token_type_embeddings.weight": (2, hidden),
        "embeddings.LayerNorm.weight": (hidden,),
        "embeddings.LayerNorm.bias": (hidden,),
    }
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):  # fmt: skip
            shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (hidden, hidden), (hidden,)
        shapes[p + "intermediate.dense.weight"] = (inner, hidden)
        shapes[p + "intermediate.dense.bias"] = (inner,)
        shapes[p + "output.dense.weight"] = (hidden, inner)
        shapes[p + "output.dense.bias"] = (hidden,)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[p + norm + ".weight"], shapes[p + norm + ".bias"] = (hidden,), (hidden,)
    return shapes


def run_point(model: str, server: str, rule: str, clients: int) -> dict[str, object]:
    """One round in this process (module docstring); its figures."""
    import torch
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fl_sim.checkpoints.array_records import record_to_tensors, tensors_to_record
    from fl_sim.config.run_config import RunConfig
    from strategies.flower_strategy import AggregationSettings, make_strategy

    torch.set_num_threads(1)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 7, 0  # as run_simulation
    g = torch.Generator().manual_seed(0)
    shapes = model_shapes(model)
    theta = {name: torch.randn(shape, generator=g) * 0.02 for name, shape in shapes.items()}
    delta = {name: torch.randn(shape, generator=g) * 1e-3 for name, shape in shapes.items()}
    largest = max(math.prod(s) for s in shapes.values()) * 4
    parameters = sum(math.prod(s) for s in shapes.values())
    config = RunConfig.from_mapping(
        {"experiment": "single", "task-suite": "toy", "num-tasks": clients, "strategy": rule}
    )
    scratch = tempfile.mkdtemp(prefix="bench-server-memory-")
    spill = str(Path(scratch) / "spill")  # made by a spilling round, removed at its end
    settings = AggregationSettings("cpu", streaming=server != "held", spill_dir=spill)
    strategy = make_strategy(config.rule, {100 + t: t for t in range(clients)}, settings=settings)
    if server == "spill":  # round 1: the recorder reads each Δ_t (here: only its norm)
        strategy.on_updates = lambda r, updates: None
    arrays = tensors_to_record(theta)
    del theta
    messages = list(strategy.configure_train(1, arrays, ConfigRecord(), None))
    metrics = {"num-examples": 10, "local-steps": 1, "a-norm": 1.0, "a-norm-steps": 1.0,
               "a-norm-lr-sum": 1.0, "a-norm-exact": 1, "loss-before": 1.0,
               "loss-after": 0.5}  # fmt: skip

    def replies() -> Iterator[Message]:
        for t, msg in enumerate(messages):  # Δ_t = (1 + t/T) Δ: one new record per reply
            update = {name: x * (1.0 + t / clients) for name, x in delta.items()}
            content = RecordDict(
                {"arrays": tensors_to_record(update), "metrics": MetricRecord(metrics)}
            )
            del update
            yield Message(content, reply_to=msg)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    if server == "held":
        merged, _ = strategy.aggregate_train(1, list(replies()))
    else:
        merged, _ = strategy.aggregate_train(1, replies())
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert set(record_to_tensors(merged)) == set(shapes) and not Path(spill).exists()
    Path(scratch).rmdir()
    return {
        "model": model,
        "server": server,
        "rule": rule,
        "clients": clients,
        "parameters": parameters,
        "update_gib": parameters * 4 / GIB,
        "largest_tensor_gib": largest / GIB,
        "rss_before_gib": before / GIB,
        "peak_rss_gib": peak / GIB,
        "round_rise_gib": (peak - before) / GIB,
        "seconds": seconds,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_server_memory.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", default="minilm,base")
    parser.add_argument("--clients", default="8,32,64", help="T of the streaming points")
    parser.add_argument("--held-clients", default="8,32", help="T of the held points")
    parser.add_argument("--points", default="held:fedavg,fold:fedavg,spill:median",
                        help="server:rule[:T1/T2...] (server: held, fold, spill)")  # fmt: skip
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: model,server,rule,T
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.point:
        model, server, rule, clients = args.point.split(",")
        print(json.dumps(run_point(model, server, rule, int(clients))))
        return 0
    rows = []
    for model in args.models.split(","):
        for pair in args.points.split(","):
            server, rule, *own = pair.split(":")  # server:rule or server:rule:T1/T2/...
            counts = args.held_clients if server == "held" else args.clients
            counts = own[0].replace("/", ",") if own else counts
            for clients in [int(x) for x in counts.split(",")]:
                point = f"{model},{server},{rule},{clients}"
                done = subprocess.run(
                    [sys.executable, str(Path(__file__).resolve()), "--point", point],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows.append(row)
                print(
                    f"{model:<7} {server:<6} {rule:<8} T={clients:<3} round rise "
                    f"{row['round_rise_gib']:6.2f} GiB  peak RSS {row['peak_rss_gib']:6.2f} GiB  "
                    f"(U = {row['update_gib']:.2f} GiB)  {row['seconds']:6.1f} s",
                    flush=True,
                )
    if args.json:
        from fl_sim.outputs import write_json

        command = " ".join(["python", "benchmarks/bench_server_memory.py", *(argv or sys.argv[1:])])
        write_json(Path(args.json), {"command": command, "points": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
