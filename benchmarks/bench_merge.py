"""How fast and how lean ``fl-sim merge`` is, against memory bandwidth and the usual baselines.

The issue's goals, each checked in one run on BERT-shaped checkpoints made here:

- fedavg, task_arithmetic, fednova: ≥ 60 % of the memory-read bandwidth measured in the same run;
- fedgma and cclip: ≥ 25 % of that bandwidth;
- median: ≥ 5× faster than Flower's FedMedian (``np.median(np.stack(layers), axis=0)``);
- the whole ``fl-sim merge`` process: ≥ 3× faster than ``mergekit-yaml`` task_arithmetic on the
  same T = 8 base-size merge;
- peak RSS of ``fl-sim merge`` ≤ output size + T × largest tensor + 0.5 GB.

Input bytes are the T + 1 checkpoints (base and T fine-tuned models) and GB/s = input bytes / wall
time, counted once per merge however often a rule reads them: cclip reads its input L + 1 times,
so the table also shows the passes and the GB/s actually streamed. The goals are judged on
``fl_sim.merge.run.run_merge`` (opening, merging and writing the output), with and without the task-
vector statistics (the ``--no-stats`` path); the "engine" column times ``aggregate_model`` alone
with its output discarded, to show what the writing costs. The whole process is ``fl-sim merge``
run as a subprocess, whose wall time and peak RSS a small launcher reports.

Fairness: every input file is read once before timing, so every run reads from the page cache;
outputs go to ``--out-dir`` (tmpfs ``/dev/shm`` by default), so neither disk speed nor fsync is
timed, for fl-sim and mergekit alike. Baselines read the same files: a plain per-tensor
``acc.add_(x, alpha=w)`` loop, Flower's ``aggregate_arrayrecords`` (FedAvg) on ArrayRecords built
from the tensors (building them is not timed), Flower's FedMedian arithmetic on the same records,
and ``mergekit-yaml`` (optional, from its own virtual environment: see benchmarks/README.md).
fl-sim aggregates on one CPU thread (strategies/streaming.py says why); the add_ loop and
mergekit get their best of one thread and torch's default, and the bandwidth reference is the
best of both. The machine may be shared and noisy: compare the ratios printed within one run.

    python benchmarks/bench_merge.py --json bench.json      # the full run (several minutes)
    python benchmarks/bench_merge.py --quick                # a smoke run in seconds
    python benchmarks/bench_merge.py --device cpu,cuda      # add GPU rows (skipped without a GPU)

``--adapters RANK`` measures the adapter path instead: T PEFT-format LoRA adapters of rank RANK
on every Linear weight of the BERT shape, merged by the ``fl-sim merge`` process into a full model
(task_arithmetic, median) and into an adapter (``--to-adapter --rank T·RANK``: exact), with wall
time and peak RSS against the design bound: the output (a model streams out; an adapter is held
until written) + T × the largest materialised ΔW + the engine's output buffer (the largest
tensor) + 0.5 GB.

    python benchmarks/bench_merge.py --adapters 16 --sizes base --clients 8
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fl_sim.checkpoints.model_checkpoint import check_compatible, open_checkpoint
from fl_sim.checkpoints.safetensors_io import SafetensorsFile, save_tensors
from fl_sim.merge.options import build_merge_options
from fl_sim.merge.run import run_merge
from fl_sim.outputs import write_json
from strategies.cclip import auto_tau_c
from strategies.registry import RULE_NAMES, make_rule
from strategies.streaming import AggregationOptions, TensorPlan, aggregate_model, resolve_device

GB = 1e9
RSS_SLACK = 0.5 * GB
LAMBDA = 0.3  # task_arithmetic's λ (and the add_ loop's weight)
NOISE = 1e-3  # fine-tuned = base + NOISE · σ_t · N(0, 1), σ_t from 0.5 to 2 across clients
LINEAR_METHODS = ("fedavg", "task_arithmetic", "fednova")
ROBUST_METHODS = ("fedgma", "cclip")
LINEAR_GOAL = 0.60
ROBUST_GOAL = 0.25
MEDIAN_GOAL = 5.0
MERGEKIT_GOAL = 3.0
WEIGHTS_FILE = "model.safetensors"
ARCHITECTURE = "FlSimBenchBertModel"  # unknown to mergekit on purpose: see make_checkpoints


@dataclass(frozen=True)
class BertShape:
    """State-dict names and shapes of a BERT encoder (BertForSequenceClassification, no head)."""

    hidden: int
    layers: int
    intermediate: int
    vocab: int = 30522
    positions: int = 512

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        h, i = self.hidden, self.intermediate
        shapes: dict[str, tuple[int, ...]] = {
            "bert.embeddings.word_embeddings.weight": (self.vocab, h),
            "bert.embeddings.position_embeddings.weight": (self.positions, h),
            "bert.embeddings.token_type_embeddings.weight": (2, h),
            "bert.embeddings.LayerNorm.weight": (h,),
            "bert.embeddings.LayerNorm.bias": (h,),
        }
        for layer in range(self.layers):
            prefix = f"bert.encoder.layer.{layer}."
            for name in ("attention.self.query", "attention.self.key", "attention.self.value"):
                shapes[f"{prefix}{name}.weight"] = (h, h)
                shapes[f"{prefix}{name}.bias"] = (h,)
            shapes[f"{prefix}attention.output.dense.weight"] = (h, h)
            shapes[f"{prefix}attention.output.dense.bias"] = (h,)
            shapes[f"{prefix}attention.output.LayerNorm.weight"] = (h,)
            shapes[f"{prefix}attention.output.LayerNorm.bias"] = (h,)
            shapes[f"{prefix}intermediate.dense.weight"] = (i, h)
            shapes[f"{prefix}intermediate.dense.bias"] = (i,)
            shapes[f"{prefix}output.dense.weight"] = (h, i)
            shapes[f"{prefix}output.dense.bias"] = (h,)
            shapes[f"{prefix}output.LayerNorm.weight"] = (h,)
            shapes[f"{prefix}output.LayerNorm.bias"] = (h,)
        shapes["bert.pooler.dense.weight"] = (h, h)
        shapes["bert.pooler.dense.bias"] = (h,)
        return shapes

    def config(self) -> dict[str, object]:
        return {
            "architectures": [ARCHITECTURE],
            "model_type": "bert",
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.hidden // 64,
            "intermediate_size": self.intermediate,
            "vocab_size": self.vocab,
            "max_position_embeddings": self.positions,
            "type_vocab_size": 2,
            "torch_dtype": "float32",
        }


SIZES = {
    "tiny": BertShape(hidden=64, layers=2, intermediate=256, vocab=1024),  # --quick
    "small": BertShape(hidden=384, layers=6, intermediate=1536),  # ~22.7M, all-MiniLM-L6-v2
    "base": BertShape(hidden=768, layers=12, intermediate=3072),  # ~109M, bert-base
}


@dataclass(frozen=True)
class Checkpoints:
    """A base and fine-tuned HF folders of one size, with what the rules and the bounds need."""

    size: str
    base: Path
    models: tuple[Path, ...]
    train_meta: Path
    model_bytes: int
    largest_tensor_bytes: int
    parameters: int
    tau_c: float  # cclip's radius: the median task-vector norm, so about half the clients clip

    def clients(self, num_clients: int) -> list[Path]:
        return list(self.models[:num_clients])

    def input_bytes(self, num_clients: int) -> int:
        return (num_clients + 1) * self.model_bytes

    def rss_bound(self, num_clients: int) -> int:
        return int(self.model_bytes + num_clients * self.largest_tensor_bytes + RSS_SLACK)


@dataclass
class Row:
    """One fl-sim measurement: (size, T, method, device) and what was measured on it."""

    size: str
    clients: int
    method: str
    device: str
    passes: int
    input_bytes: int
    engine_seconds: float | None = None  # aggregate_model alone: statistics off, nothing written
    seconds_no_stats: float | None = None
    seconds_stats: float | None = None
    process_seconds: float | None = None
    process_peak_rss: int | None = None
    rss_bound: int | None = None
    goals: dict[str, bool] = field(default_factory=dict)


@dataclass
class Baselines:
    """Baseline timings on the same (size, T) input, CPU only."""

    size: str
    clients: int
    add_loop_seconds: float | None = None
    flower_fedavg_seconds: float | None = None
    flower_fedmedian_seconds: float | None = None
    mergekit_seconds: float | None = None
    mergekit_peak_rss: int | None = None
    mergekit_missing_tensors: list[str] = field(default_factory=list)  # not in its output
    flsim_process_task_arithmetic_seconds: float | None = None  # same flags, stats on (default)
    flsim_process_no_stats_seconds: float | None = None  # the same with --no-stats
    checks: dict[str, float] = field(default_factory=dict)  # max |fl-sim − baseline| per pair


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def make_checkpoints(root: Path, size: str, num_clients: int, seed: int = 0) -> Checkpoints:
    """Write base/ and ft0/..ft{T-1}/ as HF folders: config.json and model.safetensors.

    Random float32 tensors with BERT's names and shapes; each fine-tuned model is the base plus
    small Gaussian noise whose scale grows with t. The names carry the ``bert.`` prefix of
    fine-tuned BERT checkpoints and the architecture name is unknown to mergekit, which then
    infers the layout from the tensors (mergekit 0.1.5 crashes on its own BERT definitions: an
    optional weight with aliases).
    """
    shape = SIZES[size]
    shapes = shape.tensor_shapes()
    generator = torch.Generator().manual_seed(seed)
    folder = root / size
    base = {name: torch.randn(s, generator=generator) * 0.02 for name, s in shapes.items()}
    write_model(folder / "base", base, shape)
    parameters = sum(math.prod(s) for s in shapes.values())
    scales = [0.5 + 1.5 * t / max(num_clients - 1, 1) for t in range(num_clients)]
    models = []
    for t, scale in enumerate(scales):
        fine_tuned = {
            name: theta0 + torch.randn(theta0.shape, generator=generator) * (NOISE * scale)
            for name, theta0 in base.items()
        }
        models.append(write_model(folder / f"ft{t}", fine_tuned, shape))
    meta = folder / "train_meta.json"
    # Keyed by folder, so the same file serves every T (fednova: heterogeneous local work).
    write_json(
        meta,
        {str(m): {"steps": 100 + 50 * t, "lr_sum": 0.1 * (1 + t)} for t, m in enumerate(models)},
    )
    norms = [NOISE * s * math.sqrt(parameters) for s in scales]  # ‖Δ_t‖₂ ≈ σ_t·√n
    return Checkpoints(
        size=size,
        base=folder / "base",
        models=tuple(models),
        train_meta=meta,
        model_bytes=parameters * 4,
        largest_tensor_bytes=max(math.prod(s) for s in shapes.values()) * 4,
        parameters=parameters,
        tau_c=auto_tau_c(norms),  # the median, as tau-c-auto
    )


def write_model(folder: Path, tensors: dict[str, torch.Tensor], shape: BertShape) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / WEIGHTS_FILE, tensors)
    write_json(folder / "config.json", shape.config())
    return folder


def warm_page_cache(folders: Sequence[Path]) -> None:
    """Read every weight file once so that each timed run reads from the page cache."""
    for folder in folders:
        with open(folder / WEIGHTS_FILE, "rb", buffering=0) as file:
            while file.read(1 << 24):
                pass


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def best_seconds(run: Callable[[], object], repeat: int) -> float:
    best = math.inf
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best


def measure_bandwidth(nbytes: int) -> dict[str, float]:
    """Memory-read bandwidth: ``torch.sum`` over ``nbytes`` of float32, best of 3, per thread
    count. The reference is the best of them, so no thread setting flatters the fractions."""
    values = torch.ones(nbytes // 4)
    default_threads = torch.get_num_threads()
    figures: dict[str, float] = {}
    try:
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            seconds = best_seconds(values.sum, 3)
            figures[f"threads_{threads}"] = values.numel() * 4 / seconds / GB
    finally:
        torch.set_num_threads(default_threads)
    figures["reference"] = max(figures.values())
    return figures


def merge_kwargs(checkpoints: Checkpoints, num_clients: int, method: str) -> dict[str, object]:
    """The knobs each rule needs, the same for run_merge and the CLI."""
    kwargs: dict[str, object] = {}
    if method == "task_arithmetic":
        kwargs["lam"] = LAMBDA
    if method == "fednova":
        kwargs["train_meta"] = str(checkpoints.train_meta)
    if method == "cclip":
        kwargs["tau_c"] = checkpoints.tau_c
    return kwargs


def time_run_merge(
    checkpoints: Checkpoints,
    num_clients: int,
    method: str,
    *,
    statistics: bool,
    device: str,
    out: Path,
    repeat: int,
) -> float:
    """Best wall time of ``run_merge`` in this process (open, merge, write the output)."""
    options = build_merge_options(
        method=method,
        base=str(checkpoints.base),
        models=[str(m) for m in checkpoints.clients(num_clients)],
        out=str(out),
        device=device,
        statistics=statistics,
        force=True,
        **merge_kwargs(checkpoints, num_clients, method),
    )

    def merge() -> None:
        shutil.rmtree(out, ignore_errors=True)
        run_merge(options)

    return best_seconds(merge, repeat)


def time_engine(
    checkpoints: Checkpoints, num_clients: int, method: str, *, device: str, repeat: int
) -> float:
    """Best wall time of the streaming engine alone, as run_merge drives it (statistics off,
    pages released after the last pass) but with the output discarded instead of written."""
    options = build_merge_options(
        method=method,
        base=str(checkpoints.base),
        models=[str(m) for m in checkpoints.clients(num_clients)],
        out="unused",
        device=device,
        statistics=False,
        **merge_kwargs(checkpoints, num_clients, method),
    )

    def merge() -> None:
        base = open_checkpoint(options.base)
        models = [open_checkpoint(m) for m in options.models]
        names = check_compatible(base, models)
        plans = [TensorPlan(n, base.shape(n), base.dtype(n)) for n in names]
        rule = make_rule(options.rule_config(), num_clients)

        def release(plan: TensorPlan, pass_index: int) -> None:
            if pass_index == rule.num_passes - 1:
                for checkpoint in (base, *models):
                    checkpoint.release(plan.name)

        aggregation = AggregationOptions(server_lr=options.server_lr, device=resolve_device(device))
        getters = [m.get for m in models]
        for _ in aggregate_model(
            rule, plans, base.get, getters, aggregation, on_tensor_done=release
        ):
            pass

    return best_seconds(merge, repeat)


def fl_sim_command() -> list[str]:
    script = Path(sys.executable).with_name("fl-sim")
    return [str(script)] if script.exists() else [sys.executable, "-m", "fl_sim.cli.main"]


# A child's ru_maxrss starts at its parent's RSS when it forks (Linux keeps the high-water mark
# across exec), so a child forked from this big process would report our RSS, not its own. A
# small launcher forks the command instead and reports its wall time and peak RSS.
LAUNCHER = """
import json, os, sys, time
started = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
seconds = time.perf_counter() - started
with open(sys.argv[1], "w") as report:
    json.dump({"seconds": seconds, "maxrss_kib": usage.ru_maxrss,
               "exit": os.waitstatus_to_exitcode(status)}, report, allow_nan=False)
"""


def run_process(argv: Sequence[str]) -> tuple[float, int]:
    """Wall time and peak RSS (bytes) of one command; raises if it fails."""
    with tempfile.NamedTemporaryFile(suffix=".json") as report_file:
        launcher = [sys.executable, "-S", "-c", LAUNCHER, report_file.name, *argv]
        finished = subprocess.run(launcher, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        report = json.loads(Path(report_file.name).read_text() or "{}")
    if finished.returncode != 0 or report.get("exit") != 0:
        errors = finished.stderr.decode(errors="replace").strip()[-2000:]
        raise RuntimeError(f"{argv[0]} failed (exit {report.get('exit')}): {errors}")
    return report["seconds"], report["maxrss_kib"] * 1024  # Linux reports KiB


def time_fl_sim_process(
    checkpoints: Checkpoints,
    num_clients: int,
    method: str,
    *,
    device: str,
    out: Path,
    statistics: bool = True,
) -> tuple[float, int]:
    """``fl-sim merge`` as a user runs it (statistics on unless asked otherwise)."""
    flags = {
        "lam": "--lambda",
        "train_meta": "--train-meta",
        "tau_c": "--tau-c",
    }
    argv = [*fl_sim_command(), "merge", "--method", method, "--base", str(checkpoints.base)]
    argv += ["--out", str(out), "--device", device, "--no-progress"]
    for key, value in merge_kwargs(checkpoints, num_clients, method).items():
        argv += [flags[key], str(value)]
    if not statistics:
        argv.append("--no-stats")
    argv += [str(m) for m in checkpoints.clients(num_clients)]
    shutil.rmtree(out, ignore_errors=True)
    return run_process(argv)


# ---------------------------------------------------------------------------------------------
# The adapter path (--adapters RANK)
# ---------------------------------------------------------------------------------------------

LORA_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@dataclass(frozen=True)
class AdapterInputs:
    size: str
    base: Path
    adapters: tuple[Path, ...]
    model_bytes: int
    largest_delta_bytes: int  # the largest materialised ΔW (float32)
    largest_tensor_bytes: int  # the engine's output buffer
    adapter_bytes: int  # one adapter's A and B


def make_adapters(root: Path, size: str, num_clients: int, rank: int) -> AdapterInputs:
    """base/ and lora0/..: PEFT LoRA adapters (adapter_config.json, adapter_model.safetensors,
    keys ``base_model.model.<module>.lora_A.weight``) of rank ``rank`` on every Linear weight."""
    shape = SIZES[size]
    shapes = shape.tensor_shapes()
    generator = torch.Generator().manual_seed(0)
    folder = root / f"{size}-lora"
    base = {name: torch.randn(s, generator=generator) * 0.02 for name, s in shapes.items()}
    write_model(folder / "base", base, shape)
    targets = [
        name
        for name in shapes
        if name.endswith(".weight") and any(f".{t}.weight" in name for t in LORA_TARGETS)
    ]
    adapters = []
    for t in range(num_clients):
        tensors = {}
        for name in targets:
            rows, columns = shapes[name]
            module = f"base_model.model.{name.removesuffix('.weight')}"
            tensors[f"{module}.lora_A.weight"] = torch.randn(rank, columns, generator=generator)
            tensors[f"{module}.lora_B.weight"] = 0.01 * torch.randn(rows, rank, generator=generator)
        adapter = folder / f"lora{t}"
        adapter.mkdir(parents=True, exist_ok=True)
        save_tensors(adapter / "adapter_model.safetensors", tensors)
        config = {
            "peft_type": "LORA",
            "base_model_name_or_path": str(folder / "base"),
            "r": rank,
            "lora_alpha": 2 * rank,
            "target_modules": ["query", "key", "value", "dense"],
            "fan_in_fan_out": False,
            "use_rslora": False,
        }
        write_json(adapter / "adapter_config.json", config)
        adapters.append(adapter)
    return AdapterInputs(
        size=size,
        base=folder / "base",
        adapters=tuple(adapters),
        model_bytes=sum(math.prod(s) for s in shapes.values()) * 4,
        largest_delta_bytes=max(math.prod(shapes[n]) for n in targets) * 4,
        largest_tensor_bytes=max(math.prod(s) for s in shapes.values()) * 4,
        adapter_bytes=sum(t.numel() * 4 for t in tensors.values()),
    )


def run_adapter_benchmark(args: argparse.Namespace) -> dict[str, object]:
    """Wall time and peak RSS of ``fl-sim merge`` over T adapters, against the design bound."""
    workdir = Path(tempfile.mkdtemp(prefix="fl-sim-bench-", dir=args.workdir))
    out_root = Path(tempfile.mkdtemp(prefix="fl-sim-bench-out-", dir=args.out_dir))
    _, import_rss = run_process([sys.executable, "-c", "import fl_sim.merge.run"])
    print(f"peak RSS of importing fl_sim.merge.run (torch included): {import_rss / GB:.2f} GB")
    rows = []
    try:
        for size in args.sizes:
            inputs = make_adapters(workdir, size, max(args.clients), args.adapters)
            warm_page_cache([inputs.base])
            for num_clients in args.clients:
                adapters = [str(a) for a in inputs.adapters[:num_clients]]
                cases = (
                    ("task_arithmetic", "model", []),
                    ("median", "model", []),
                    ("task_arithmetic", "adapter", ["--to-adapter", "--rank"]),
                )
                for method, output, extra in cases:
                    out = out_root / f"{size}-{num_clients}-{method}-{output}"
                    flags = [*extra, str(num_clients * args.adapters)] if extra else []
                    argv = [*fl_sim_command(), "merge", "--method", method, "--base"]
                    argv += [str(inputs.base), "--out", str(out), "--no-progress", *flags]
                    seconds, rss = run_process([*argv, *adapters])
                    report = json.loads((out / "merge_report.json").read_text())
                    # the output adapter is held in memory until written; a model streams out
                    weights = out / "adapter_model.safetensors"
                    out_bytes = inputs.model_bytes if output == "model" else weights.stat().st_size
                    bound = (
                        out_bytes
                        + num_clients * inputs.largest_delta_bytes
                        + inputs.largest_tensor_bytes
                        + RSS_SLACK
                    )
                    row = {
                        "size": size,
                        "clients": num_clients,
                        "rank": args.adapters,
                        "method": method,
                        "output": output,
                        "process_seconds": seconds,
                        "process_peak_rss": rss,
                        "rss_bound": int(bound),
                        "within_bound": rss <= bound,
                        "model_bytes": inputs.model_bytes,
                        "largest_delta_bytes": inputs.largest_delta_bytes,
                        "adapter_bytes": inputs.adapter_bytes,
                    }
                    if output == "adapter":
                        row["max_relative_error"] = report["output"]["relative_error"]["max"]
                    rows.append(row)
                    shutil.rmtree(out, ignore_errors=True)
                    print(
                        f"{size} T={num_clients} r={args.adapters} {method:>15} → {output:7}: "
                        f"{seconds:6.2f} s, peak RSS {rss / GB:.2f} GB (bound {bound / GB:.2f} GB"
                        f"{', met' if rss <= bound else ', MISSED'})"
                        + (
                            f", max truncation error {row['max_relative_error']:.1e}"
                            if output == "adapter"
                            else ""
                        )
                    )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(out_root, ignore_errors=True)
    return {
        "environment": {
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        },
        "import_peak_rss": import_rss,
        "adapter_rows": rows,
    }


def open_weights(folders: Sequence[Path]) -> list[SafetensorsFile]:
    return [SafetensorsFile(folder / WEIGHTS_FILE) for folder in folders]


def time_add_loop(checkpoints: Checkpoints, num_clients: int, repeat: int) -> float:
    """A plain per-tensor ``acc.add_(x, alpha=w)`` loop over the same memory-mapped files:
    θ₀ + λ Σ_t (θ_t − θ₀) as (1 − λT)·θ₀ + Σ_t λ·θ_t into one reused buffer."""
    acc = torch.empty(checkpoints.largest_tensor_bytes // 4)

    def merge() -> None:
        base, *models = open_weights([checkpoints.base, *checkpoints.clients(num_clients)])
        for name in base:
            theta0 = base.get(name).reshape(-1)
            out = acc[: theta0.numel()]
            torch.mul(theta0, 1.0 - LAMBDA * num_clients, out=out)
            for model in models:
                out.add_(model.get(name).reshape(-1), alpha=LAMBDA)
            for file in (base, *models):
                file.release(name)

    # The fairest baseline: its best over one thread and torch's default (fl-sim uses one).
    default_threads = torch.get_num_threads()
    best = math.inf
    try:
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            best = min(best, best_seconds(merge, repeat))
    finally:
        torch.set_num_threads(default_threads)
    return best


def flower_records(checkpoints: Checkpoints, num_clients: int) -> tuple[list[object], list[str]]:
    """One RecordDict per client as a Flower ServerApp receives it (ArrayRecord + num-examples)."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    records = []
    for file in open_weights(checkpoints.clients(num_clients)):
        state = {name: file.get(name) for name in file}
        arrays = ArrayRecord(torch_state_dict=state)
        records.append(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}))
    return records, list(state)


def flower_fedavg(records: list[object]) -> object:
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    return aggregate_arrayrecords(records, "num-examples")


def flower_fedmedian(records: list[object], names: list[str]) -> object:
    """The body of Flower's ``FedMedian.aggregate_train`` (without popping, so the records
    can be reused): per array, ``np.median(np.stack(layers), axis=0)``."""
    from flwr.app import Array, ArrayRecord

    arrays = ArrayRecord()
    for name in names:
        layers = [record["arrays"][name].numpy() for record in records]
        arrays[name] = Array(np.asarray(np.median(np.stack(layers), axis=0)))
    return arrays


def mergekit_config(checkpoints: Checkpoints, num_clients: int, path: Path) -> Path:
    """mergekit's task_arithmetic θ₀ + Σ_t w_t τ_t with w_t = λ: fl-sim's ``--lambda λ``."""
    lines = [
        "merge_method: task_arithmetic",
        f"base_model: {checkpoints.base}",
        "dtype: float32",
        "models:",
    ]
    for model in checkpoints.clients(num_clients):
        lines += [f"  - model: {model}", f"    parameters: {{weight: {LAMBDA}}}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def max_abs_difference(left: Path, right: Path) -> tuple[float, list[str]]:
    """max |left − right| over the tensors two merged HF folders share, and the names only
    ``left`` has (mergekit's inferred BERT layout leaves the pooler out of its output)."""
    files = [SafetensorsFile(folder / WEIGHTS_FILE) for folder in (left, right)]
    worst = 0.0
    for name in files[0]:
        if name in files[1]:
            a, b = (f.get(name).double() for f in files)
            worst = max(worst, float((a - b).abs().max()))
    return worst, [name for name in files[0] if name not in files[1]]


def max_abs_difference_to_record(merged: Path, record: object) -> float:
    file = SafetensorsFile(merged / WEIGHTS_FILE)
    worst = 0.0
    for name in file:
        expected = torch.from_numpy(record[name].numpy()).double()
        worst = max(worst, float((file.get(name).double() - expected).abs().max()))
    return worst


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def passes_of(method: str) -> int:
    return 2 if method == "cclip" else 1  # cclip with L = 1: one pass for the norms, one to merge


def run_benchmark(args: argparse.Namespace) -> dict[str, object]:
    from tqdm.auto import tqdm

    devices = []
    for device in args.device:
        if device == "cuda" and not torch.cuda.is_available():
            print("device cuda: skipped (torch sees no GPU)")
            continue
        devices.append(device)
    workdir = Path(tempfile.mkdtemp(prefix="fl-sim-bench-", dir=args.workdir))
    out_root = Path(tempfile.mkdtemp(prefix="fl-sim-bench-out-", dir=args.out_dir))
    mergekit = args.mergekit_yaml or shutil.which("mergekit-yaml")
    if "mergekit" in args.skip:
        mergekit = None
    environment = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "devices": devices,
        "out_dir": str(out_root),
        "mergekit_yaml": mergekit,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs;")
    print(f"inputs in {workdir} (read once before timing: page cache); outputs in {out_root}")
    bandwidth = measure_bandwidth(args.bandwidth_bytes)
    reference = bandwidth["reference"]
    per_threads = ", ".join(
        f"{k.removeprefix('threads_')} thread(s) {v:.1f}"
        for k, v in bandwidth.items()
        if k.startswith("threads_")
    )
    print(
        f"memory-read bandwidth (torch.sum over {args.bandwidth_bytes / 2**30:.2f} GiB, best of "
        f"3): {per_threads} GB/s → reference {reference:.1f} GB/s"
    )

    rows: list[Row] = []
    baselines: list[Baselines] = []
    steps = len(args.sizes) * len(args.clients) * (len(args.methods) * len(devices) + 1)
    progress = tqdm(total=steps, desc="bench", unit="step", disable=args.no_progress)
    try:
        for size in args.sizes:
            progress.set_description(f"making {size} checkpoints")
            checkpoints = make_checkpoints(workdir, size, max(args.clients))
            warm_page_cache([checkpoints.base, *checkpoints.models])
            for num_clients in args.clients:
                for device in devices:
                    for method in args.methods:
                        progress.set_description(f"{size} T={num_clients} {method} {device}")
                        rows.append(
                            measure_fl_sim(checkpoints, num_clients, method, device, out_root, args)
                        )
                        progress.update()
                progress.set_description(f"{size} T={num_clients} baselines")
                baselines.append(
                    measure_baselines(checkpoints, num_clients, out_root, mergekit, args)
                )
                progress.update()
            shutil.rmtree(workdir / size, ignore_errors=True)
    finally:
        progress.close()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(out_root, ignore_errors=True)
    goals = evaluate_goals(rows, baselines, reference)
    return {
        "environment": environment,
        "bandwidth_gb_per_s": bandwidth,
        "rows": [asdict(r) for r in rows],
        "baselines": [asdict(b) for b in baselines],
        "goals": goals,
    }


def measure_fl_sim(
    checkpoints: Checkpoints,
    num_clients: int,
    method: str,
    device: str,
    out_root: Path,
    args: argparse.Namespace,
) -> Row:
    out = out_root / f"{checkpoints.size}-{num_clients}-{method}-{device}"
    row = Row(
        size=checkpoints.size,
        clients=num_clients,
        method=method,
        device=device,
        passes=passes_of(method),
        input_bytes=checkpoints.input_bytes(num_clients),
        rss_bound=checkpoints.rss_bound(num_clients),
    )
    row.engine_seconds = time_engine(
        checkpoints, num_clients, method, device=device, repeat=args.repeat
    )
    for statistics in (False, True):
        seconds = time_run_merge(
            checkpoints,
            num_clients,
            method,
            statistics=statistics,
            device=device,
            out=out,
            repeat=args.repeat,
        )
        if statistics:
            row.seconds_stats = seconds
        else:
            row.seconds_no_stats = seconds
    if "process" not in args.skip:
        row.process_seconds, row.process_peak_rss = time_fl_sim_process(
            checkpoints, num_clients, method, device=device, out=out
        )
    shutil.rmtree(out, ignore_errors=True)
    return row


def measure_baselines(
    checkpoints: Checkpoints,
    num_clients: int,
    out_root: Path,
    mergekit: str | None,
    args: argparse.Namespace,
) -> Baselines:
    result = Baselines(size=checkpoints.size, clients=num_clients)
    if "addloop" not in args.skip:
        result.add_loop_seconds = time_add_loop(checkpoints, num_clients, args.repeat)
    if "flower" not in args.skip:
        records, names = flower_records(checkpoints, num_clients)
        merged = out_root / "check-flsim"
        started = time.perf_counter()
        averaged = flower_fedavg(records)
        result.flower_fedavg_seconds = time.perf_counter() - started
        time_run_merge(
            checkpoints, num_clients, "fedavg", statistics=False, device="cpu", out=merged, repeat=1
        )
        result.checks["fedavg_vs_flower_fedavg"] = max_abs_difference_to_record(merged, averaged)
        del averaged
        started = time.perf_counter()
        medians = flower_fedmedian(records, names)
        result.flower_fedmedian_seconds = time.perf_counter() - started
        time_run_merge(
            checkpoints, num_clients, "median", statistics=False, device="cpu", out=merged, repeat=1
        )
        result.checks["median_vs_flower_fedmedian"] = max_abs_difference_to_record(merged, medians)
        del medians, records
        shutil.rmtree(merged, ignore_errors=True)
    if mergekit is not None:
        config = mergekit_config(checkpoints, num_clients, out_root / "mergekit.yml")
        merged_mk, merged_fl = out_root / "check-mergekit", out_root / "check-flsim-ta"
        shutil.rmtree(merged_mk, ignore_errors=True)
        # Its best of torch's default threads and one thread (-j 1), as fl-sim runs on one.
        for threads in ([], ["-j", "1"]):
            shutil.rmtree(merged_mk, ignore_errors=True)
            seconds, peak_rss = run_process([mergekit, str(config), str(merged_mk), *threads])
            if result.mergekit_seconds is None or seconds < result.mergekit_seconds:
                result.mergekit_seconds, result.mergekit_peak_rss = seconds, peak_rss
        result.flsim_process_no_stats_seconds, _ = time_fl_sim_process(
            checkpoints,
            num_clients,
            "task_arithmetic",
            device="cpu",
            out=merged_fl,
            statistics=False,
        )
        result.flsim_process_task_arithmetic_seconds, _ = time_fl_sim_process(
            checkpoints, num_clients, "task_arithmetic", device="cpu", out=merged_fl
        )
        difference, missing = max_abs_difference(merged_fl, merged_mk)
        result.checks["task_arithmetic_vs_mergekit"] = difference
        result.mergekit_missing_tensors = missing
        shutil.rmtree(merged_mk, ignore_errors=True)
        shutil.rmtree(merged_fl, ignore_errors=True)
    return result


def evaluate_goals(
    rows: list[Row], baselines: list[Baselines], reference: float
) -> list[dict[str, object]]:
    """Every goal on every measurement it applies to: target, measured figure, met or not.

    Bandwidth goals are judged on ``run_merge`` (statistics off, and separately on), median's on
    its time against Flower's FedMedian on the same T models, mergekit's on the T = 8 base merge.
    """
    goals: list[dict[str, object]] = []

    def add(goal: str, where: str, measured: float, target: float, row: Row | None) -> None:
        met = measured <= target if goal == "RSS" else measured >= target
        goals.append(
            {"goal": goal, "where": where, "measured": measured, "target": target, "met": met}
        )
        if row is not None:
            row.goals[goal] = met

    by_input = {(b.size, b.clients): b for b in baselines}
    for row in rows:
        where = f"{row.size} T={row.clients} {row.method} {row.device}"
        runs = (("", row.seconds_no_stats), (" stats", row.seconds_stats))
        for label, seconds in runs:
            fraction = row.input_bytes / seconds / GB / reference
            if row.method in LINEAR_METHODS:
                add(f"bw≥60%{label}", where, fraction, LINEAR_GOAL, row)
            if row.method in ROBUST_METHODS:
                add(f"bw≥25%{label}", where, fraction, ROBUST_GOAL, row)
            base = by_input.get((row.size, row.clients))
            if row.method == "median" and base and base.flower_fedmedian_seconds:
                speedup = base.flower_fedmedian_seconds / seconds
                add(f"≥5×FedMedian{label}", where, speedup, MEDIAN_GOAL, row)
        if row.process_peak_rss is not None and row.rss_bound is not None:
            add("RSS", where, row.process_peak_rss / GB, row.rss_bound / GB, row)
    for base in baselines:
        if base.mergekit_seconds and base.flsim_process_task_arithmetic_seconds:
            speedup = base.mergekit_seconds / base.flsim_process_task_arithmetic_seconds
            goal = "≥3×mergekit" if (base.size, base.clients) == ("base", 8) else "mergekit (info)"
            where = f"{base.size} T={base.clients} task_arithmetic cpu"
            add(goal, where, speedup, MERGEKIT_GOAL, None)
            if base.flsim_process_no_stats_seconds:
                speedup = base.mergekit_seconds / base.flsim_process_no_stats_seconds
                add(f"{goal} --no-stats", where, speedup, MERGEKIT_GOAL, None)
    return goals


# ---------------------------------------------------------------------------------------------
# Printing
# ---------------------------------------------------------------------------------------------


def throughput(nbytes: int, seconds: float | None, reference: float) -> str:
    """'12.34 (35%)': GB/s of input and its fraction of the reference bandwidth."""
    if not seconds:
        return "-"
    rate = nbytes / seconds / GB
    return f"{rate:.2f} ({100 * rate / reference:.0f}%)"


def print_report(report: dict[str, object]) -> None:
    reference = report["bandwidth_gb_per_s"]["reference"]
    rows = [Row(**r) for r in report["rows"]]
    baselines = [Baselines(**b) for b in report["baselines"]]
    header = (
        f"{'size':5} {'T':>2} {'method':15} {'dev':4} {'pass':>4} {'input':>6} "
        f"{'engine':>12} {'run_merge':>12} {'+stats':>12} {'proc s':>6} {'RSS/bound':>11}  goals"
    )
    print()
    print(
        f"fl-sim: GB/s of input (% of the {reference:.1f} GB/s bandwidth). engine = "
        "aggregate_model alone; run_merge = open, merge, write (stats off); +stats = with task-"
        "vector norms and cosines; proc = the fl-sim merge process (stats on); RSS in GB"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        rss = "-"
        if row.process_peak_rss is not None:
            rss = f"{row.process_peak_rss / GB:.2f}/{row.rss_bound / GB:.2f}"
        goals = " ".join(f"{g}:{'yes' if met else 'NO'}" for g, met in row.goals.items())
        print(
            f"{row.size:5} {row.clients:>2} {row.method:15} {row.device:4} {row.passes:>4} "
            f"{row.input_bytes / GB:>5.2f}G "
            f"{throughput(row.input_bytes, row.engine_seconds, reference):>12} "
            f"{throughput(row.input_bytes, row.seconds_no_stats, reference):>12} "
            f"{throughput(row.input_bytes, row.seconds_stats, reference):>12} "
            f"{f'{row.process_seconds:.2f}' if row.process_seconds else '-':>6} {rss:>11}  {goals}"
        )
        if row.passes > 1 and row.seconds_no_stats:
            streamed = row.passes * row.input_bytes / row.seconds_no_stats / GB
            print(f"{'':40}(reads its input {row.passes}×: run_merge streams {streamed:.2f} GB/s)")
    print()
    print("baselines on the same input (CPU), and fl-sim's speed-up over each")
    by_key = {(r.size, r.clients, r.method): r for r in rows if r.device == "cpu"}
    for base in baselines:
        model_bytes = next(r.input_bytes // (r.clients + 1) for r in rows if r.size == base.size)
        fedavg = by_key.get((base.size, base.clients, "fedavg"))
        task_arithmetic = by_key.get((base.size, base.clients, "task_arithmetic"))
        median = by_key.get((base.size, base.clients, "median"))
        print(f"  {base.size} T={base.clients}")
        if base.add_loop_seconds:
            line = throughput((base.clients + 1) * model_bytes, base.add_loop_seconds, reference)
            if task_arithmetic:
                engine = base.add_loop_seconds / task_arithmetic.engine_seconds
                merge = base.add_loop_seconds / task_arithmetic.seconds_no_stats
                line += f"; task_arithmetic engine {engine:.2f}×, run_merge {merge:.2f}×"
            print(f"    add_ loop (no write)     {line}")
        if base.flower_fedavg_seconds:
            line = f"{base.clients * model_bytes / base.flower_fedavg_seconds / GB:.2f} GB/s"
            line += f" of its T models, {base.flower_fedavg_seconds:.2f} s"
            if fedavg:
                speedup = base.flower_fedavg_seconds / fedavg.seconds_no_stats
                line += f"; fedavg run_merge {speedup:.1f}×"
            print(f"    Flower FedAvg            {line}")
        if base.flower_fedmedian_seconds:
            line = f"{base.clients * model_bytes / base.flower_fedmedian_seconds / GB:.2f} GB/s"
            line += f" of its T models, {base.flower_fedmedian_seconds:.2f} s"
            if median:
                plain = base.flower_fedmedian_seconds / median.seconds_no_stats
                stats = base.flower_fedmedian_seconds / median.seconds_stats
                line += f"; median run_merge {plain:.1f}× ({stats:.1f}× with stats)"
            print(f"    Flower FedMedian         {line}")
        if base.mergekit_seconds:
            ours = base.flsim_process_task_arithmetic_seconds
            lean = base.flsim_process_no_stats_seconds
            print(
                f"    mergekit-yaml process    {base.mergekit_seconds:.2f} s, peak RSS "
                f"{base.mergekit_peak_rss / GB:.2f} GB; fl-sim merge process {ours:.2f} s: "
                f"{base.mergekit_seconds / ours:.1f}× (--no-stats {lean:.2f} s: "
                f"{base.mergekit_seconds / lean:.1f}×)"
            )
            if base.mergekit_missing_tensors:
                missing = ", ".join(base.mergekit_missing_tensors)
                print(f"      (mergekit's output lacks {missing}; compared on the rest)")
        for check, value in base.checks.items():
            print(f"    same result: max|Δ| {check} = {value:.1e}")
    print()
    print("goals (each judged on every row it applies to)")
    summary: dict[str, list[dict[str, object]]] = {}
    for goal in report["goals"]:
        summary.setdefault(goal["goal"], []).append(goal)
    for name, items in summary.items():
        met = sum(bool(g["met"]) for g in items)
        worst = max(items, key=lambda g: g["measured"]) if name == "RSS" else None
        worst = worst or min(items, key=lambda g: g["measured"])
        if name.startswith("bw"):
            figure = f"{100 * worst['measured']:.0f}% of bandwidth"
        elif name == "RSS":
            figure = f"{worst['measured']:.2f} GB ≤ {worst['target']:.2f} GB bound"
        else:
            figure = f"{worst['measured']:.1f}×"
        print(f"  {name:26} met {met}/{len(items)}; worst: {worst['where']}, {figure}")


def parse_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=parse_list,
        default=["small", "base"],
        help=f"model sizes, from {', '.join(SIZES)} (default small,base)",
    )
    parser.add_argument(
        "--clients",
        type=lambda s: [int(x) for x in parse_list(s)],
        default=[2, 4, 8],
        help="values of T (default 2,4,8)",
    )
    parser.add_argument(
        "--methods", type=parse_list, default=list(RULE_NAMES), help="rules to time (default: all)"
    )
    parser.add_argument(
        "--device",
        type=parse_list,
        default=["cpu"],
        help="cpu, cuda or cpu,cuda (cuda rows are skipped without a GPU)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="best of N for in-process timings")
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="write every figure here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny model, T=2, one repeat, 256 MiB bandwidth test",
    )
    parser.add_argument("--workdir", default=None, help="where the checkpoints go (default TMPDIR)")
    parser.add_argument(
        "--out-dir",
        default="/dev/shm" if Path("/dev/shm").is_dir() else None,
        help="where merged outputs go (default /dev/shm: no disk, no fsync)",
    )
    parser.add_argument(
        "--mergekit-yaml",
        metavar="PATH",
        help="mergekit-yaml executable (default: on PATH; skipped if absent)",
    )
    parser.add_argument(
        "--skip",
        type=parse_list,
        default=[],
        help="skip some of: process, addloop, flower, mergekit",
    )
    parser.add_argument(
        "--adapters",
        type=int,
        metavar="RANK",
        help="measure the LoRA-adapter path instead, with adapters of this rank",
    )
    parser.add_argument("--bandwidth-bytes", type=int, default=2 << 30, help=argparse.SUPPRESS)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.sizes, args.clients, args.repeat = ["tiny"], [2], 1
        args.bandwidth_bytes = 256 << 20
    unknown = [s for s in args.sizes if s not in SIZES] + [
        m for m in args.methods if m not in RULE_NAMES
    ]
    if unknown or any(d not in ("cpu", "cuda") for d in args.device):
        raise SystemExit(f"bench_merge: unknown size, method or device {unknown or args.device}")
    if args.adapters is not None:
        report = run_adapter_benchmark(args)
    else:
        report = run_benchmark(args)
        print_report(report)
    if args.json:
        write_json(args.json, report, default=str)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
