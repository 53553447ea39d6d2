"""Flower + Ray against the plain-PyTorch loop: same job, same weights, where the time goes.

    python benchmarks/bench_federation.py [--rounds 3] [--num-tasks 4] [--local-steps 20]
        [--dim 16] [--hidden 32 512] [--repeat 1] [--json OUT]

For every toy-suite size (``--hidden``) it runs two jobs of the default run config (fedavg, one
client per task, the clients' update cache off so that every run trains): one-shot (R = 1, Task
Arithmetic's shape) and R = ``--rounds`` rounds, each through ``simulate``
(fl_sim/federation/simulation.py)
(Flower's simulation engine on Ray, one Ray start per job, as ``fl-sim run`` does) and through
``fl_sim.federation.reference.run_reference`` (no Flower, no Ray), in this process, back to back.
It prints the largest |θ_Flower − θ_reference|, the overhead ratio Flower / reference (whole job;
without
start-up and tear-down; per round after round 1), and a table of wall-clock seconds that add up
to each job's wall time:

- start-up: ``ray.init``, then Flower's engine and the Ray actors until every node has answered
  the partition-id query (``discover_tasks``); tear-down: from the ServerApp's end until
  ``simulate`` returns (Ray shutdown, Flower's threads);
- the task suite and θ₀ (the server builds them while the actors start, so on 2 cores it
  competes with them);
- serialisation: ``tensors_to_record``/``record_to_tensors`` (torch ⇄ ArrayRecord) on the server
  and, in the Ray actors, on the clients;
- client training (``fine_tune``) and the clients' task-suite build, in the actors;
- aggregation (the rule over the updates), evaluation (the global model every round and, in
  round 1, every client's fine-tuned model), checkpoint and results files;
- messaging: the time a round waits on its clients while none of them is training or
  serialising (Flower's queues and their 0.1 s polling, Ray scheduling, pickling);
- other: the rest of the server (strategy bookkeeping, update norms, logs).

The ServerApp runs in a thread of this process, so its pieces are timed by wrapping the functions
it calls, in every fl_sim / strategies / clients module that imported them (the timing follows
the code when it moves between our modules). The clients run in Ray actors: this script starts
Ray itself, with the arguments Flower's Ray backend uses (no dashboard, ERROR logging, the
driver's sys.path as PYTHONPATH) plus a ``worker_process_setup_hook`` that wraps the ClientApp's
pieces the same way and appends their spans to a file; Flower finds Ray running, uses it and
shuts it down at the end, as always. A round's client time is the union of the clients' spans
(they run in parallel, one CPU each); busy and CPU seconds summed over clients are shown apart.
``--hidden`` widens the toy backbone (Linear(dim, hidden) → tanh → Linear(hidden, hidden) → tanh)
on both sides to show how the overhead shrinks when training dominates. The reference loop is
warmed up once, untimed: torch's first optimiser step imports torch._dynamo (~0.8 s), a cost each
fresh Flower actor pays in its first fine_tune, as it pays there for building the model's heads.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from fl_sim.outputs import dumps_json, write_json  # the standard library only: no Flower yet

# No venv per run (`uv sync` would pull CUDA torch) and no telemetry (docs/design.md, Running
# Flower), set before Ray or Flower start: the Ray workers inherit them.
os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"

ENV_SPAN_DIR = "FL_SIM_BENCH_SPAN_DIR"  # where the Ray workers write their spans
ENV_TOY_SIZE = "FL_SIM_BENCH_TOY_SIZE"  # "dim,hidden" of the toy suite in the workers
PACKAGES = ("fl_sim", "strategies", "clients")  # where timed functions are looked for

ROWS = (  # (key, label) of the table, in the order they happen
    ("ray_init", "start-up: ray.init"),
    ("startup", "start-up: engine + actors until nodes answer"),
    ("suite_server", "task suite + θ₀ build (server / the loop)"),
    ("serialisation_server", "serialisation, server (torch ⇄ ArrayRecord)"),
    ("serialisation_clients", "serialisation, clients"),
    ("training", "client training (fine_tune)"),
    ("suite_clients", "client task-suite build"),
    ("aggregation", "aggregation (the rule)"),
    ("evaluation", "evaluation"),
    ("files", "checkpoint + results files"),
    ("messaging", "messaging (Flower queues, Ray)"),
    ("other", "other (strategy bookkeeping, norms, logs)"),
    ("teardown", "tear-down (Ray shutdown, threads)"),
)


def empty_rows() -> dict[str, float]:
    return {key: 0.0 for key, _ in ROWS}


# ---------------------------------------------------------------------------------------------
# Spans: wall-clock intervals of named calls, with the time not spent in nested timed calls
# ---------------------------------------------------------------------------------------------


@dataclass
class Span:
    name: str
    start: float  # time.time(): one clock for this process and the Ray workers
    end: float
    own: float  # seconds not inside another timed call on the same thread
    cpu: float  # CPU seconds of the calling thread (torch runs one thread per process here)
    pid: int

    @property
    def seconds(self) -> float:
        return self.end - self.start


class SpanLog:
    """Collects spans in memory, or appends them to ``sink`` (a JSON-lines file) as they end."""

    def __init__(self, sink: Path | None = None) -> None:
        self.spans: list[Span] = []
        self.sink = sink
        self._local = threading.local()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        stack: list[float] = self._local.__dict__.setdefault("stack", [])
        stack.append(0.0)
        start, cpu = time.time(), time.thread_time()
        try:
            yield
        finally:
            end, cpu = time.time(), time.thread_time() - cpu
            nested = stack.pop()
            if stack:
                stack[-1] += end - start
            self._add(Span(name, start, end, end - start - nested, cpu, os.getpid()))

    def _add(self, span: Span) -> None:
        with self._lock:
            self.spans.append(span)
            if self.sink is not None:
                with self.sink.open("a", encoding="utf-8") as file:
                    file.write(dumps_json(asdict(span), indent=None) + "\n")

    def wrap(self, function: Callable, name: str) -> Callable:
        @functools.wraps(function)
        def timed(*args: object, **kwargs: object) -> object:
            with self.span(name):
                return function(*args, **kwargs)

        return timed

    def wrap_generator(self, function: Callable, name: str) -> Callable:
        """Times every ``next()`` of the generator ``function`` returns, not the consumer."""

        @functools.wraps(function)
        def timed(*args: object, **kwargs: object) -> Iterator[object]:
            items = function(*args, **kwargs)
            while True:
                with self.span(name):
                    try:
                        item = next(items)
                    except StopIteration:
                        return
                yield item

        return timed

    def named(self, name: str) -> list[Span]:
        return [s for s in self.spans if s.name == name]

    def own(self, *names: str) -> float:
        return sum(s.own for s in self.spans if s.name in names)


@contextlib.contextmanager
def patched(log: SpanLog, targets: Sequence[tuple[object, str, str]]) -> Iterator[None]:
    """``rebind`` for the block, then everything put back."""
    saved = []
    try:
        saved = rebind(log, targets)
        yield
    finally:
        for holder, attr, original in reversed(saved):
            setattr(holder, attr, original)


def rebind(log: SpanLog, targets: Sequence[tuple[object, str, str]]) -> list[tuple]:
    """Replace ``owner.attr`` by a timed wrapper named ``name``. A module-level function is
    replaced in every loaded fl_sim / strategies / clients module that holds it (``from m import
    f`` makes a second name), so the timing survives code moving between our modules. Returns
    (holder, attr, original) for every replacement."""
    saved = []
    for owner, attr, name in targets:
        original = getattr(owner, attr)
        wrap = log.wrap_generator if name == "aggregation" else log.wrap
        timed = wrap(original, name)
        holders = [(owner, attr)]
        if isinstance(owner, types.ModuleType):
            modules = [m for k, m in list(sys.modules.items()) if k.split(".")[0] in PACKAGES]
            holders = [(m, k) for m in modules for k, v in list(vars(m).items()) if v is original]
        for holder, name_in_holder in holders:
            saved.append((holder, name_in_holder, original))
            setattr(holder, name_in_holder, timed)
    return saved


def size_toy_suite(size: str | None) -> None:
    """Make ``make_suite("toy", ...)`` build a ToySuite of ``"dim,hidden"`` (None: as shipped)."""
    import fl_sim.suites.registry as suites
    from fl_sim.suites.toy import ToySuite

    if size:
        dim, hidden = (int(x) for x in size.split(","))
        suites.SUITES["toy"] = functools.partial(ToySuite, dim=dim, hidden=hidden)
    else:
        suites.SUITES["toy"] = ToySuite


def worker_setup() -> None:
    """Ray's worker_process_setup_hook: time the ClientApp's pieces, size the toy suite."""
    import clients.client_app  # noqa: F401  (loads every module the ClientApp uses)
    import clients.local_training as local_training
    import fl_sim.checkpoints.array_records as array_records
    import fl_sim.suites.registry as suites

    size_toy_suite(os.environ.get(ENV_TOY_SIZE))
    log = SpanLog(Path(os.environ[ENV_SPAN_DIR]) / f"worker-{os.getpid()}.jsonl")
    targets = [
        (local_training, "fine_tune", "training"),
        (array_records, "record_to_tensors", "serialisation_clients"),
        (array_records, "tensors_to_record", "serialisation_clients"),
        (suites, "make_suite", "suite_clients"),
    ]
    rebind(log, targets)


def read_worker_spans(folder: Path) -> list[Span]:
    spans = []
    for path in sorted(folder.glob("worker-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            spans.append(Span(**json.loads(line)))
    return spans


def union_seconds(intervals: Sequence[tuple[float, float]]) -> float:
    """Length of the union of [start, end] intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


def clip(span: Span, low: float, high: float) -> tuple[float, float] | None:
    start, end = max(span.start, low), min(span.end, high)
    return (start, end) if end > start else None


# ---------------------------------------------------------------------------------------------
# The two sides
# ---------------------------------------------------------------------------------------------


def run_flower(config: object, span_dir: Path, toy_size: str) -> dict[str, object]:
    """One ``simulate`` job on a Ray this function starts; the wall clock split into ROWS."""
    import ray

    import fl_sim.checkpoints.array_records as array_records
    import fl_sim.checkpoints.safetensors_io as safetensors_io
    import fl_sim.federation.recorder as recorder
    import fl_sim.federation.server_app as server_app
    import fl_sim.outputs as outputs
    import fl_sim.suites.base as tasks
    import fl_sim.suites.registry as suites
    import strategies.flower_strategy as flower_strategy
    import strategies.streaming as streaming
    from fl_sim.federation.simulation import flower_environment, simulate

    span_dir.mkdir(parents=True)
    log = SpanLog()
    rule = flower_strategy.RuleStrategy
    targets = [
        (server_app, "run_federation", "run_federation"),
        (server_app, "discover_tasks", "discover_tasks"),
        (suites, "make_suite", "suite_server"),
        (tasks.TaskSuite, "initial_state", "suite_server"),
        (array_records, "record_to_tensors", "serialisation_server"),
        (array_records, "tensors_to_record", "serialisation_server"),
        (streaming, "aggregate_model", "aggregation"),
        (recorder, "evaluate", "evaluation"),
        (recorder, "load_federated_state", "evaluation"),
        (safetensors_io, "save_tensors", "files"),
        (outputs, "write_atomically", "files"),  # every results file (write_json, write_csv)
        (rule, "configure_train", "configure_train"),
        (rule, "aggregate_train", "aggregate_train"),
        (server_app.RunRecorder, "evaluate_round", "evaluate_round"),
    ]
    pythonpath = os.pathsep.join(sys.path)  # what Flower's Ray backend gives its workers
    env_vars = {"PYTHONPATH": pythonpath, ENV_SPAN_DIR: str(span_dir), ENV_TOY_SIZE: toy_size}
    with flower_environment(), patched(log, targets):
        start = time.time()
        ray.init(
            include_dashboard=False,
            logging_level=logging.ERROR,
            log_to_driver=False,
            runtime_env={"env_vars": env_vars, "worker_process_setup_hook": worker_setup},
        )
        ray_ready = time.time()
        try:
            [results] = simulate([config], progress=False)
        finally:
            if ray.is_initialized():  # Flower shuts Ray down; only on a failure is it still up
                ray.shutdown()
        end = time.time()
    clients = read_worker_spans(span_dir)

    [federation] = log.named("run_federation")
    [discover] = log.named("discover_tasks")
    sent = log.named("configure_train")
    received = log.named("aggregate_train")
    evaluated = log.named("evaluate_round")  # rounds 0..R
    windows = [(s.end, r.start) for s, r in zip(sent, received, strict=True)]
    waiting = sum(high - low for low, high in windows)
    client_rows = ("training", "serialisation_clients", "suite_clients")
    rows = empty_rows()
    for low, high in windows:  # a round's wait: busy clients, else messaging
        parts = [(s.name, c) for s in clients if (c := clip(s, low, high))]
        busy = union_seconds([c for _, c in parts])
        in_window = {k: sum(c[1] - c[0] for n, c in parts if n == k) for k in client_rows}
        total = sum(in_window.values())
        for k in client_rows:  # the busy wall time, shared in proportion to span seconds
            rows[k] += busy * in_window[k] / total if total else 0.0
        rows["messaging"] += (high - low) - busy
    rows["ray_init"] = ray_ready - start
    rows["startup"] = (federation.start - ray_ready) + discover.seconds
    rows["teardown"] = end - federation.end
    for key in ("suite_server", "serialisation_server", "aggregation", "evaluation", "files"):
        rows[key] = log.own(key)
    rows["other"] = log.own("run_federation", "configure_train", "aggregate_train")
    rows["other"] += log.own("evaluate_round") - waiting
    wall = end - start
    rounds = [  # round r: configure_train(r) starts → evaluate_round(r) ends
        evaluated[r].end - sent[r - 1].start for r in range(1, len(sent) + 1)
    ]
    return {
        "wall": wall,
        "rows": rows,
        "client_training": training_totals(s for s in clients if s.name == "training"),
        "round_seconds": rounds,
        "results_dir": results["config"]["results-dir"],
        "results_timings": results["timings"],
        "status": results["status"],
    }


def run_plain(config: object, suite_factory: Callable[[], object]) -> dict[str, object]:
    """``run_reference`` on the same knobs; returns its timings and final state."""
    import fl_sim.federation.reference as reference
    import fl_sim.suites.base as tasks
    from strategies.registry import RuleConfig

    log = SpanLog()
    targets = [
        (reference, "fine_tune", "training"),
        (reference, "aggregate_model", "aggregation"),
        (reference, "evaluate_state", "evaluation"),
        (tasks.TaskSuite, "initial_state", "suite_server"),
    ]
    with patched(log, targets):
        start = time.time()
        with log.span("suite_server"):
            suite = suite_factory()
        run = reference.run_reference(
            suite,
            config.client_knobs(),
            RuleConfig(config.rule.strategy, knobs=config.rule.rule_knobs),
            num_rounds=config.rule.num_rounds,
            server_lr=config.rule.server_lr,
            a_norm_kind=config.training.a_norm,
            weighting=config.rule.weighting,
            full_batch=config.training.full_batch,
        )
        end = time.time()
    rows = empty_rows()
    for key in ("suite_server", "training", "aggregation", "evaluation"):
        rows[key] = log.own(key)
    wall = end - start
    rows["other"] = wall - sum(rows.values())
    trains, evals = log.named("training"), log.named("evaluation")
    T = config.suite.num_tasks
    rounds = [
        evals[r].end - trains[(r - 1) * T].start for r in range(1, config.rule.num_rounds + 1)
    ]
    return {
        "wall": wall,
        "rows": rows,
        "client_training": training_totals(log.named("training")),
        "round_seconds": rounds,
        "state": run.state,
    }


def training_totals(spans: Iterable[Span]) -> dict[str, float]:
    """Σ over every client's fine_tune calls: seconds from call to return, and CPU seconds."""
    spans = list(spans)
    return {"busy": sum(s.seconds for s in spans), "cpu": sum(s.cpu for s in spans)}


def max_abs_diff(a: Mapping[str, object], b: Mapping[str, object]) -> float:
    if sorted(a) != sorted(b):
        raise SystemExit(f"the two runs' models differ in tensor names: {sorted(a)} {sorted(b)}")
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


# ---------------------------------------------------------------------------------------------
# Jobs, repeats, the table
# ---------------------------------------------------------------------------------------------


def median_of(runs: Sequence[Mapping[str, object]]) -> dict[str, object]:
    """Per-key median over repeats (rows, CPU, per-round seconds and the wall)."""
    first = runs[0]
    return {
        "wall": statistics.median(r["wall"] for r in runs),
        "rows": {k: statistics.median(r["rows"][k] for r in runs) for k in first["rows"]},
        "client_training": {
            k: statistics.median(r["client_training"][k] for r in runs)
            for k in first["client_training"]
        },
        "round_seconds": [
            statistics.median(r["round_seconds"][i] for r in runs)
            for i in range(len(first["round_seconds"]))
        ],
    }


def steady_round(round_seconds: Sequence[float]) -> float:
    """Mean seconds per round after round 1 (round 1 alone for a one-shot job)."""
    later = round_seconds[1:] or round_seconds
    return sum(later) / len(later)


def run_size(args: argparse.Namespace, hidden: int, work: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    from fl_sim.config.run_config import RunConfig
    from fl_sim.suites.base import make_suite

    toy_size = f"{args.dim},{hidden}"
    size_toy_suite(toy_size)
    base: dict[str, object] = {
        "experiment": "single",
        "task-suite": "toy",
        "optimizer": "sgd",
        "preset": "none",
        "lr": 0.05,
        "num-tasks": args.num_tasks,
        "local-steps": args.local_steps,
    }
    if "update-cache" in RunConfig().to_mapping():  # every run must train, not reuse a Δ_t
        base["update-cache"] = False
    jobs = {"one-shot": 1, f"{args.rounds} rounds": args.rounds}

    def suite() -> object:
        return make_suite("toy", num_tasks=args.num_tasks, seed=0)

    params = sum(x.numel() for x in suite().initial_state().values())
    warm = RunConfig.from_mapping({**base, "local-steps": 1})
    cold_start = time.time()
    run_plain(warm, suite)  # torch's one-off first-step cost, outside the timed runs
    cold = time.time() - cold_start

    out: dict[str, object] = {
        "dim": args.dim,
        "hidden": hidden,
        "federated_params": params,
        "reference_warmup_seconds": cold,
        "jobs": {},
    }
    for job, num_rounds in jobs.items():
        flower_runs, plain_runs, diffs = [], [], []
        for repeat in range(args.repeat):
            folder = work / f"h{hidden}-r{num_rounds}-{repeat}"
            config = RunConfig.from_mapping(
                {**base, "num-rounds": num_rounds, "results-dir": str(folder / "results")}
            )
            plain = run_plain(config, suite)
            flower = run_flower(config, folder / "spans", toy_size)
            if flower["status"] != "completed":
                raise SystemExit(f"{job}: the Flower run ended {flower['status']}")
            merged = load_file(str(folder / "results" / "global_model.safetensors"))
            diffs.append(max_abs_diff(merged, plain.pop("state")))
            flower_runs.append(flower)
            plain_runs.append(plain)
            print(
                f"  hidden {hidden}, {job}, repeat {repeat + 1}/{args.repeat}: Flower "
                f"{flower['wall']:.2f} s, reference {plain['wall']:.3f} s, "
                f"max |Δθ| {diffs[-1]:.2e}",
                file=sys.stderr,
                flush=True,
            )
        out["jobs"][job] = {
            "num_rounds": num_rounds,
            "flower": median_of(flower_runs),
            "reference": median_of(plain_runs),
            "max_abs_diff": max(diffs),
            "repeats": {"flower": flower_runs, "reference": plain_runs},
        }
    size_toy_suite(None)
    return out


def run_ratios(flower: Mapping[str, object], plain: Mapping[str, object]) -> dict[str, float]:
    """Flower / reference of one repeat (the two ran back to back, on the same load)."""
    rows = flower["rows"]
    startup = rows["ray_init"] + rows["startup"] + rows["teardown"]
    return {
        "whole_job": flower["wall"] / plain["wall"],
        "without_startup": (flower["wall"] - startup) / plain["wall"],
        "per_round": steady_round(flower["round_seconds"]) / steady_round(plain["round_seconds"]),
        "startup_seconds": startup,
    }


def ratios(job: Mapping[str, object]) -> dict[str, float]:
    """The median over repeats of each repeat's own ratios."""
    each = [
        run_ratios(f, p)
        for f, p in zip(job["repeats"]["flower"], job["repeats"]["reference"], strict=True)
    ]
    return {key: statistics.median(r[key] for r in each) for key in each[0]}


def table(size: Mapping[str, object], args: argparse.Namespace) -> str:
    jobs = size["jobs"]
    names = list(jobs)
    width = 46
    head = (
        f"toy suite dim {size['dim']} hidden {size['hidden']} "
        f"({size['federated_params']:,} federated params) · {args.num_tasks} clients · "
        f"fedavg · {args.local_steps} local steps · median of {args.repeat}"
    )
    lines = [head, f"{'seconds':<{width}}" + "".join(f"{n:>22}" for n in names)]
    lines.append(f"{'':<{width}}" + "".join(f"{'Flower':>11}{'reference':>11}" for _ in names))

    def cell(value: float) -> str:
        return f"{'-':>11}" if value == 0 else f"{value:>11.3f}"

    for key, label in ROWS:
        flower = [jobs[n]["flower"]["rows"][key] for n in names]
        values = zip(flower, [jobs[n]["reference"]["rows"][key] for n in names], strict=True)
        lines.append(f"{label:<{width}}" + "".join(cell(f) + cell(p) for f, p in values))
    walls = [(jobs[n]["flower"]["wall"], jobs[n]["reference"]["wall"]) for n in names]
    lines.append(f"{'total (wall)':<{width}}" + "".join(f"{f:>11.3f}{p:>11.3f}" for f, p in walls))
    for key, label in (
        ("busy", "  client training, busy s summed over clients"),
        ("cpu", "  client training, CPU s summed over clients"),
    ):
        lines.append(
            f"{label:<{width}}"
            + "".join(
                cell(jobs[n]["flower"]["client_training"][key])
                + cell(jobs[n]["reference"]["client_training"][key])
                for n in names
            )
        )
    lines.append(
        f"{'  seconds per round (after round 1)':<{width}}"
        + "".join(
            f"{steady_round(jobs[n]['flower']['round_seconds']):>11.3f}"
            f"{steady_round(jobs[n]['reference']['round_seconds']):>11.3f}"
            for n in names
        )
    )
    for label, key, unit in (
        ("overhead Flower / reference, whole job", "whole_job", "×"),
        ("  without start-up and tear-down", "without_startup", "×"),
        ("  per round (steady state)", "per_round", "×"),
    ):
        lines.append(
            f"{label:<{width}}" + "".join(f"{ratios(jobs[n])[key]:>21.2f}{unit}" for n in names)
        )
    lines.append(
        f"{'max |θ_Flower − θ_reference|':<{width}}"
        + "".join(f"{jobs[n]['max_abs_diff']:>22.2e}" for n in names)
    )
    note = f"reference warm-up, untimed: {size['reference_warmup_seconds']:.2f} s"
    if args.repeat > 1:
        note += "; each row is its own median, so rows add up to the total only within one run"
    lines.append(f"({note})")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_federation.py",
        description=(
            "Run the same federated job through Flower + Ray (simulation.simulate) and "
            "through the plain-PyTorch reference loop "
            "(fl_sim.federation.reference.run_reference); check "
            "the final weights agree and show the overhead and where the time goes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the multi-round job")
    parser.add_argument("--num-tasks", type=int, default=4, help="T, tasks = clients")
    parser.add_argument("--local-steps", type=int, default=20, help="K, steps per client")
    parser.add_argument("--dim", type=int, default=16, help="toy suite input dimension")
    parser.add_argument(
        "--hidden",
        type=int,
        nargs="+",
        default=[32],
        help="toy backbone width(s); each is one more table (32 is the shipped suite)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per job; medians shown")
    parser.add_argument("--json", metavar="OUT", help="write every measurement to OUT")
    parser.add_argument("--keep", action="store_true", help="keep the runs' results folders")
    args = parser.parse_args(argv)
    for name in ("rounds", "num_tasks", "local_steps", "dim", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    if min(args.hidden) < 1:
        parser.error(f"--hidden must be ≥ 1, got {min(args.hidden)}")
    if args.rounds == 1:
        parser.error("--rounds must be ≥ 2 (the one-shot job is always run)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(1)  # as every client (and the tests): the runs are bit-comparable
    import_start = time.time()
    import flwr.simulation  # noqa: F401
    import ray  # noqa: F401

    import fl_sim.cli.run  # noqa: F401  (Flower, Ray and the apps: imported once, untimed)

    imports = time.time() - import_start
    keep = tempfile.mkdtemp(prefix="bench-federation-") if args.keep else None
    with contextlib.ExitStack() as stack:
        work = Path(keep or stack.enter_context(tempfile.TemporaryDirectory()))
        sizes = [run_size(args, hidden, work) for hidden in args.hidden]
    print(f"fl-sim federation benchmark (Flower + Ray vs the plain loop; imports {imports:.1f} s)")
    for size in sizes:
        print()
        print(table(size, args))
    if keep:
        print(f"\nresults folders: {keep}")
    if args.json:
        report = {
            "argv": sys.argv[1:],
            "imports_seconds": imports,
            "cpu_count": os.cpu_count(),
            "sizes": [
                {**s, "ratios": {job: ratios(j) for job, j in s["jobs"].items()}} for s in sizes
            ],
        }
        write_json(Path(args.json), report)
        print(f"measurements: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
