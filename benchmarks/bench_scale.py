"""How one federated round's time and memory grow with the clients T and the model size.

    python benchmarks/bench_scale.py [--models minilm,base] [--clients 2,4,8,16,32,64]
        [--streaming on] [--held-clients 2,4,8,16,32,64] [--rounds 2] [--local-steps 1]
        [--batch-size 4] [--memory-budget-gib 18] [--json OUT] [--csv OUT] [--plot OUT.png]

Every point (model, T) is one ``fl-sim run`` job in a fresh process (``fl_sim.federation.simulation
.simulate``: Flower's simulation engine on a private Ray, one client per task, one CPU each):
fedavg, ``--rounds`` rounds, the whole encoder federated (``federated-layers = all``, so the
update Δ_t is model-sized), AdamW, the update cache off so that every client trains.

- Models: ``minilm`` is the shipped all-MiniLM-L6-v2 (22.7M parameters, 384 wide, 6 layers);
  ``base`` is a BERT-base-shaped encoder (109M: 768 wide, 12 layers, 12 heads, 3072 FFN,
  BERT's 30,522-token vocabulary) made here with a fixed seed and saved as a local Hugging Face
  folder with MiniLM's tokenizer (the same vocabulary). Its weights are random: a round's cost
  depends on the shapes alone, and no accuracy is reported.
- Data: T small generated text tasks (``--rows`` rows each, two classes), one CSV file per task,
  through the ``local`` suite, i.e. the same code path as a user's own files.
- Server: ``--streaming on`` runs the streaming server (``server-streaming = true``, the default:
  each reply folded or spilled on arrival), ``off`` the server that holds every reply until the
  round aggregates; ``--streaming on,off`` measures both in one run, ``off`` only at the T of
  ``--held-clients``, so the two can be compared point by point on the same machine and load.

Per point the script reports, from the run's results.json: each round's wall time without the
evaluation (``round_seconds``: send θʳ, T clients train, receive, aggregate, checkpoint), the
aggregation alone, the evaluation, and the clients' own seconds (``client-seconds`` of every
reply: task suite, θʳ in, local training, Δ_t out); round 1 is cold (every Ray actor builds its
task suite and model on its first message; the server writes the T fine-tuned checkpoints), so
the steady figure is the last round. Memory is sampled every 0.2 s by this process: the
proportional set size (PSS) summed over the job's process tree (the driver with the ServerApp,
Ray's services and its worker actors; shared pages counted once), the machine's used memory
(MemTotal − MemAvailable, which also holds Ray's object store in /dev/shm) above its level
before the job, and /dev/shm's own use above its level (Ray's object store alone); the driver's
own peak RSS comes from the job itself.

The baseline is the first point measured (the smallest model at the smallest T): every point
prints its steady round time and peak memory as ratios to it, beside the ratio of the work
(T × parameters), so a reader sees how cost grows with the work, on this machine, in this run.
A point whose projected peak memory exceeds ``--memory-budget-gib`` is not run and is reported
as skipped with its projection: the line through the same model's last two measured points, or
from one point COPIES_PER_CLIENT update sizes per extra client (about what the first runs here
showed; STREAMING_COPIES_PER_CLIENT for the streaming server), or before any
COPIES_PER_CLIENT · T · U + BASE_GIB. A point whose used-memory rise
passes the budget + 2 GiB while it runs is killed (before the kernel's OOM killer picks a victim)
and reported as such. The machine has 24 GiB; the default budget leaves 6 GiB to the rest.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fl_sim.outputs import atomic_path, dumps_json, loads_json, read_json, write_csv, write_json

REPO = Path(__file__).resolve().parents[1]
MODELS = ("minilm", "base")
BASE_SHAPE = {  # bert-base-uncased's encoder
    "vocab_size": 30522,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 512,
}
TOKENIZER_FILES = (
    "vocab.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
VOCABULARY = (  # the generated tasks' words: plain words, one or two word pieces each
    "river stone light cloud green paper music window garden winter summer table chair road "
    "city forest water fire metal glass bread apple horse bird ocean mountain letter number "
    "market school doctor engine signal mirror candle basket ladder rocket planet silver"
)
WORDS = VOCABULARY.split()
GIB = 2**30
COPIES_PER_CLIENT = 3  # memory per client in update sizes, for a projection before measuring
# (the held server, measured: +1.22 GiB of used memory per BERT-base client, T = 4 → 8, ≈ 3 U)
STREAMING_COPIES_PER_CLIENT = 0.2  # likewise, streaming server (minilm T 8 → 16: ≈ 0.24 U)
BASE_GIB = 4.0  # Ray, the driver and two actors with their models, likewise


# ---------------------------------------------------------------------------------------------
# Inputs: the generated tasks and the BERT-base-shaped model folder
# ---------------------------------------------------------------------------------------------


def write_tasks(folder: Path, count: int, rows: int, seed: int = 0) -> list[Path]:
    """``count`` CSV files (text,label): class c of task t draws words from its own half."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for t in range(count):
        rng = random.Random(seed * 100_003 + t)
        words = rng.sample(WORDS, len(WORDS))
        halves = (words[: len(words) // 2], words[len(words) // 2 :])
        path = folder / f"task_{t:02d}.csv"
        lines = []
        for i in range(rows):
            label = i % 2
            text = " ".join(rng.choice(halves[label]) for _ in range(rng.randint(6, 10)))
            lines.append({"text": f"{text} {i}", "label": "yes" if label else "no"})
        write_csv(path, lines, ["text", "label"])
        paths.append(path)
    return paths


def write_base_model(folder: Path, seed: int = 0, shape: Mapping[str, int] = BASE_SHAPE) -> Path:
    """A BERT-base-shaped ``BertModel`` (random, seeded) + MiniLM's tokenizer, as an HF folder."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import BertConfig, BertModel

    from fl_sim.suites.encoders import minilm_folder

    torch.manual_seed(seed)
    model = BertModel(BertConfig(**shape), add_pooling_layer=False)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    for name in TOKENIZER_FILES:
        source = minilm_folder() / name
        if source.is_file():
            shutil.copy2(source, partial / name)
    os.replace(partial, folder)
    return folder


# ---------------------------------------------------------------------------------------------
# One point, in its own process
# ---------------------------------------------------------------------------------------------


def run_point(spec: Mapping[str, object]) -> dict[str, object]:
    """Run one job (in this process) and return its figures (module docstring)."""
    from safetensors import safe_open

    from fl_sim.config.run_config import RunConfig
    from fl_sim.federation.simulation import simulate

    results_dir = Path(str(spec["results_dir"]))
    config = RunConfig.from_mapping(
        {
            "experiment": "single",
            "strategy": "fedavg",
            "task-suite": "local",
            "data-paths": ",".join(str(p) for p in spec["data_paths"]),  # type: ignore[union-attr]
            "model": str(spec["model"]),
            "federated-layers": "all",
            "num-tasks": int(spec["clients"]),  # type: ignore[arg-type]
            "num-rounds": int(spec["rounds"]),  # type: ignore[arg-type]
            "local-steps": int(spec["local_steps"]),  # type: ignore[arg-type]
            "batch-size": int(spec["batch_size"]),  # type: ignore[arg-type]
            "preset": "homogeneous",
            "update-cache": False,
            "server-device": "cpu",
            "server-streaming": bool(spec.get("streaming", True)),
            "save-clients": bool(spec.get("save_clients", True)),
            "results-dir": str(results_dir),
        }
    )
    start = time.perf_counter()
    [result] = simulate([config], progress=False)
    wall = time.perf_counter() - start
    if result["status"] != "completed":
        raise RuntimeError(f"the job did not complete: {result['error']}")
    with safe_open(str(results_dir / "global_model.safetensors"), framework="pt") as file:
        federated = sum(math.prod(file.get_slice(name).get_shape()) for name in file.keys())  # noqa: SIM118
    with safe_open(str(results_dir / "base.safetensors"), framework="pt") as file:
        shapes = [file.get_slice(name).get_shape() for name in file.keys()]  # noqa: SIM118
    rounds = []
    for entry in result["rounds"]:  # type: ignore[union-attr]
        timings, training = entry["timings"], entry.get("training") or {}
        if timings.get("round_seconds") is None or "aggregation_seconds" not in timings:
            continue  # round 0: θ₀'s evaluation
        client = [float(x) for x in training.get("client_seconds", [])]
        train = [float(x) for x in training.get("train_seconds", [])]
        rounds.append(
            {
                "round": entry["round"],
                "round_seconds": timings["round_seconds"],
                "aggregation_seconds": timings["aggregation_seconds"],
                "evaluation_seconds": timings["evaluation_seconds"],
                "client_seconds_sum": sum(client),
                "client_seconds_max": max(client, default=0.0),
                "train_seconds_sum": sum(train),
                "clients": len(client),
            }
        )
    return {
        "federated_parameters": federated,
        "base_parameters": sum(math.prod(shape) for shape in shapes),
        "rounds": rounds,
        "job_seconds": wall,
        "total_seconds": result["timings"]["total_seconds"],  # type: ignore[index]
        "driver_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
    }


# ---------------------------------------------------------------------------------------------
# Memory of a process tree, sampled from /proc
# ---------------------------------------------------------------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def tree_pss(root: int) -> tuple[int, int]:
    """(PSS bytes summed over ``root`` and its descendants, the largest single one)."""
    children, stack, total, largest = _children_map(), [root], 0, 0
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    kib = int(line.split()[1]) * 1024
                    total += kib
                    largest = max(largest, kib) if pid != root else largest
                    break
        except OSError:
            continue
    return total, largest


def shm_used() -> int:
    """Bytes in use in /dev/shm (Ray's object store lives there), 0 where it does not exist."""
    try:
        stat = os.statvfs("/dev/shm")
    except OSError:
        return 0
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def used_memory() -> int:
    """MemTotal − MemAvailable in bytes."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) * 1024
    return fields["MemTotal"] - fields["MemAvailable"]


class MemorySampler(threading.Thread):
    """Peak tree PSS, peak single descendant PSS and peak used-memory rise, every ``period`` s."""

    def __init__(self, pid: int, limit: float, period: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.limit, self.period = pid, limit, period
        self.baseline, self.shm_baseline = used_memory(), shm_used()
        self.peak_pss = self.peak_worker = self.peak_used = self.peak_shm = 0
        self.killed = False
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            total, largest = tree_pss(self.pid)
            self.peak_pss = max(self.peak_pss, total)
            self.peak_worker = max(self.peak_worker, largest)
            self.peak_used = max(self.peak_used, used_memory() - self.baseline)
            self.peak_shm = max(self.peak_shm, shm_used() - self.shm_baseline)
            if self.peak_used > self.limit and not self.killed:  # before the OOM killer acts
                self.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
            self._halt.wait(self.period)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def measure_point(
    spec: Mapping[str, object], timeout: float, limit_gib: float
) -> dict[str, object]:
    """Run ``spec`` in a child process under a MemorySampler; its figures plus the memory."""
    spec_file = Path(str(spec["results_dir"])).with_suffix(".spec.json")
    spec_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(spec_file, spec)
    command = [sys.executable, str(Path(__file__).resolve()), "--point", str(spec_file)]
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    sampler = MemorySampler(child.pid, limit_gib * GIB)
    sampler.start()
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, 9)
        child.communicate()
        raise RuntimeError(
            f"point {spec['model']} T={spec['clients']}: over {timeout:.0f} s"
        ) from None
    finally:
        sampler.stop()
    if sampler.killed:
        raise MemoryError(
            f"killed: the machine's used memory rose past {limit_gib:.1f} GiB "
            f"(peak {sampler.peak_used / GIB:.1f} GiB)"
        )
    if child.returncode != 0:
        tail = err.strip().splitlines()[-1:] or ["(no stderr)"]
        raise RuntimeError(f"point {spec['model']} T={spec['clients']} failed: {tail[0]}")
    figures = loads_json(out.strip().splitlines()[-1])
    figures.update(
        peak_tree_pss_gib=sampler.peak_pss / GIB,
        peak_worker_pss_gib=sampler.peak_worker / GIB,
        peak_used_rise_gib=sampler.peak_used / GIB,
        peak_shm_rise_gib=sampler.peak_shm / GIB,
    )
    return figures


# ---------------------------------------------------------------------------------------------
# The grid, the projection that skips a point, the table
# ---------------------------------------------------------------------------------------------


def projected_gib(
    measured: Sequence[tuple[int, float]],
    clients: int,
    update_gib: float,
    copies: float = COPIES_PER_CLIENT,
) -> float:
    """Peak memory at T = ``clients`` from the same model's (and server's) measured (T, GiB).

    Two or more: the line through the last two. One: that point plus ``copies`` updates per
    extra client. None: ``copies`` · T · U + BASE_GIB. ``copies``: COPIES_PER_CLIENT for the
    server that holds the replies, STREAMING_COPIES_PER_CLIENT for the streaming one.
    """
    if len(measured) >= 2:
        (t0, m0), (t1, m1) = measured[-2], measured[-1]
        return m1 + (m1 - m0) / (t1 - t0) * (clients - t1)
    if measured:
        t1, m1 = measured[-1]
        return m1 + copies * update_gib * (clients - t1)
    return copies * clients * update_gib + BASE_GIB


def steady(point: Mapping[str, object]) -> Mapping[str, float]:
    return point["rounds"][-1]  # type: ignore[index,return-value]


def server_of(point: Mapping[str, object]) -> str:
    """``streaming`` or ``held`` (points saved before the streaming server: held)."""
    return str(point.get("server", "held"))


def comparison(points: Sequence[Mapping[str, object]]) -> list[dict[str, object]]:
    """Streaming against held at every (model, T) measured both ways: the ratios."""
    measured = {(p["model"], p["clients"], server_of(p)): p for p in points if "rounds" in p}
    rows = []
    for (model, clients, server), on in measured.items():
        off = measured.get((model, clients, "held"))
        if server != "streaming" or off is None:
            continue
        rows.append(
            {
                "model": model,
                "clients": clients,
                "steady_round": steady(on)["round_seconds"] / steady(off)["round_seconds"],
                "round_1": on["rounds"][0]["round_seconds"] / off["rounds"][0]["round_seconds"],  # type: ignore[index]
                "used_rise": float(on["peak_used_rise_gib"]) / float(off["peak_used_rise_gib"]),  # type: ignore[arg-type]
                "driver_rss": float(on["driver_peak_rss_gib"])  # type: ignore[arg-type]
                / float(off["driver_peak_rss_gib"]),  # type: ignore[arg-type]
            }
        )
    return rows


def table(points: Sequence[Mapping[str, object]]) -> str:
    measured = [p for p in points if "rounds" in p]
    if not measured:
        return "no point was measured"
    base = measured[0]
    base_work = int(base["clients"]) * int(base["federated_parameters"])  # type: ignore[call-overload]
    base_round = steady(base)["round_seconds"]
    base_memory = float(base["peak_used_rise_gib"])  # type: ignore[arg-type]
    header = (
        f"{'model':<7} {'T':>3} {'server':<9} {'params':>7} {'Δ MB':>6} {'round 1 s':>9} "
        f"{'round s':>8} {'agg s':>6} {'client s':>8} {'eval s':>7} {'tree GiB':>8} "
        f"{'used GiB':>8} {'shm GiB':>7} {'driver GiB':>10} {'work ×':>7} {'time ×':>7} "
        f"{'mem ×':>6}"
    )
    lines = [header, "-" * len(header)]
    for p in points:
        if "rounds" not in p:
            lines.append(
                f"{p['model']:<7} {p['clients']:>3} {server_of(p):<9}  skipped: {p['skipped']}"
            )
            continue
        first, last = p["rounds"][0], steady(p)  # type: ignore[index]
        params = int(p["federated_parameters"])  # type: ignore[call-overload]
        work = int(p["clients"]) * params / base_work  # type: ignore[call-overload]
        lines.append(
            f"{p['model']:<7} {p['clients']:>3} {server_of(p):<9} {params / 1e6:>6.1f}M "
            f"{params * 4 / 1e6:>6.0f} {first['round_seconds']:>9.1f} "
            f"{last['round_seconds']:>8.1f} {last['aggregation_seconds']:>6.2f} "
            f"{last['client_seconds_sum']:>8.1f} "
            f"{last['evaluation_seconds']:>7.1f} {p['peak_tree_pss_gib']:>8.2f} "
            f"{p['peak_used_rise_gib']:>8.2f} {p.get('peak_shm_rise_gib', math.nan):>7.2f} "
            f"{p['driver_peak_rss_gib']:>10.2f} "
            f"{work:>7.1f} {last['round_seconds'] / base_round:>7.2f} "
            f"{float(p['peak_used_rise_gib']) / base_memory:>6.2f}"  # type: ignore[arg-type]
        )
    lines.append(
        "round s: the last round's wall time without evaluation; client s: the clients' "
        "handler seconds summed (they run in parallel, one per core); tree/used/shm GiB: peak "
        "PSS of the job's processes / peak rise of the machine's used memory / of /dev/shm (Ray's "
        "object store); × columns: ratios "
        f"to {base['model']} T={base['clients']} of this run."
    )
    for row in comparison(points):
        lines.append(
            f"streaming / held, {row['model']} T={row['clients']}: steady round "
            f"{row['steady_round']:.2f}×, round 1 {row['round_1']:.2f}×, used memory "
            f"{row['used_rise']:.2f}×, driver RSS {row['driver_rss']:.2f}×"
        )
    return "\n".join(lines)


def write_points_csv(points: Sequence[Mapping[str, object]], path: Path) -> None:
    columns = [
        "model", "clients", "server", "federated_parameters", "round", "round_seconds",
        "aggregation_seconds", "evaluation_seconds", "client_seconds_sum", "client_seconds_max",
        "train_seconds_sum", "peak_tree_pss_gib", "peak_used_rise_gib", "peak_shm_rise_gib",
        "peak_worker_pss_gib",
        "driver_peak_rss_gib", "skipped",
    ]  # fmt: skip
    rows = [
        {**p, "server": server_of(p), **entry}
        for p in points
        for entry in p.get("rounds") or [{}]  # type: ignore[attr-defined]
    ]
    write_csv(path, rows, columns)


def plot(points: Sequence[Mapping[str, object]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for model, server in dict.fromkeys((p["model"], server_of(p)) for p in points):
        rows = [
            p for p in points if p["model"] == model and server_of(p) == server and "rounds" in p
        ]
        if not rows:
            continue
        clients = [int(p["clients"]) for p in rows]  # type: ignore[call-overload]
        size = int(rows[0]["federated_parameters"]) / 1e6  # type: ignore[call-overload]
        label = f"{model} ({size:.0f}M), {server}"
        time_axis.plot(clients, [steady(p)["round_seconds"] for p in rows], "o-", label=label)
        memory_axis.plot(clients, [p["peak_used_rise_gib"] for p in rows], "o-", label=label)
    for axis, title in (
        (time_axis, "steady round (s, without evaluation)"),
        (memory_axis, "peak memory rise (GiB)"),
    ):
        axis.set_xlabel("clients T")
        axis.set_xlim(left=0)
        axis.set_ylim(bottom=0)
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    try:
        with atomic_path(path) as temp:  # the temp name has no .png: give the format
            figure.savefig(temp, format=path.suffix[1:] or "png", dpi=110)
    finally:
        plt.close(figure)


def parse_list(text: str, kind: type) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench_scale.py",
        description=__doc__.split("\n\n", 2)[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--models", default="minilm,base", help=f"comma list of {MODELS}")
    parser.add_argument("--clients", default="2,4,8,16,32,64", help="comma list of T")
    parser.add_argument(
        "--streaming",
        default="on",
        help="comma list of on (server-streaming = true) and off (the server holds every reply)",
    )
    parser.add_argument(
        "--held-clients", help="the T at which --streaming off runs (default: --clients)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds per job (≥ 2: a steady one)")
    parser.add_argument("--local-steps", type=int, default=1, help="K, AdamW steps per client")
    parser.add_argument("--batch-size", type=int, default=4, help="texts per step")
    parser.add_argument("--rows", type=int, default=30, help="rows per generated task")
    parser.add_argument(
        "--memory-budget-gib",
        type=float,
        default=18.0,
        help="skip points projected above it; kill a point whose used memory passes it + 2",
    )
    parser.add_argument(
        "--no-save-clients",
        action="store_true",
        help="save-clients = false: no T fine-tuned checkpoints on disk (T × the model's size; "
        "64 BERT-base clients write 28 GB), so large T fit the disk",
    )
    parser.add_argument("--point-timeout", type=float, default=1800.0, help="seconds per point")
    parser.add_argument("--work-dir", help="keep inputs and runs here (default: a temp dir)")
    parser.add_argument("--json", metavar="OUT", help="write every figure to OUT")
    parser.add_argument("--csv", metavar="OUT", help="one row per point and round")
    parser.add_argument("--plot", metavar="OUT.png", help="time and memory against T")
    parser.add_argument(
        "--from-json", metavar="IN", help="no runs: print, --csv and --plot a saved --json"
    )
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point
    args = parser.parse_args(argv)
    if args.point is None and args.from_json is None:
        models = parse_list(args.models, str)
        unknown = [m for m in models if m not in MODELS]
        if unknown or not models:
            parser.error(f"--models takes a comma list of {', '.join(MODELS)}, got {args.models}")
        clients = parse_list(args.clients, int)
        if not clients or min(clients) < 1:
            parser.error(f"--clients takes a comma list of integers ≥ 1, got {args.clients}")
        if args.rounds < 2:
            parser.error("--rounds must be ≥ 2 (round 1 is cold; the last is the steady figure)")
        args.model_list, args.client_list = models, sorted(set(clients))
        modes = parse_list(args.streaming, str)
        if not modes or any(m not in ("on", "off") for m in modes):
            parser.error(f"--streaming takes a comma list of on, off, got {args.streaming}")
        held = parse_list(args.held_clients, int) if args.held_clients else clients
        if not held or min(held) < 1:
            parser.error(f"--held-clients takes integers ≥ 1, got {args.held_clients}")
        args.mode_list, args.held_list = modes, sorted(set(held))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.point is not None:
        figures = run_point(read_json(Path(args.point)))
        print(dumps_json(figures, indent=None))  # one line, strict JSON: the parent reads it
        return 0
    if args.from_json is not None:
        points = read_json(Path(args.from_json))["points"]
        print(table(points))
        if args.csv:
            write_points_csv(points, Path(args.csv))
        if args.plot:
            plot(points, Path(args.plot))
        return 0
    from tqdm import tqdm

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-scale-")).resolve()
    data = write_tasks(work / "data", max(args.client_list + args.held_list), args.rows)
    model_specs = {"minilm": "minilm"}
    if "base" in args.model_list:
        model_specs["base"] = f"hf:{write_base_model(work / 'bert-base-shaped')}"
    update_gib = {"minilm": 22.7e6 * 4 / GIB, "base": 109.5e6 * 4 / GIB}
    # per model and T: the held server first, then the streaming one, under the same load
    grid = [
        (m, t, server)
        for m in args.model_list
        for t in sorted(set(args.client_list) | set(args.held_list))
        for mode, server in (("off", "held"), ("on", "streaming"))
        if mode in args.mode_list and t in (args.held_list if mode == "off" else args.client_list)
    ]
    points: list[dict[str, object]] = []
    for model, clients, server in tqdm(grid, desc="points", unit="job"):
        point: dict[str, object] = {"model": model, "clients": clients, "server": server}
        same = [p for p in points if p["model"] == model and server_of(p) == server]
        measured = [
            (int(p["clients"]), float(p["peak_used_rise_gib"]))  # type: ignore[call-overload]
            for p in same
            if "rounds" in p
        ]
        copies = STREAMING_COPIES_PER_CLIENT if server == "streaming" else COPIES_PER_CLIENT
        projection = projected_gib(measured, clients, update_gib[model], copies)
        if any("skipped" in p for p in same):
            point["skipped"] = f"not run: a smaller T of {model} was over the memory budget"
            points.append(point)
            continue
        if projection > args.memory_budget_gib:
            point["skipped"] = (
                f"projected peak memory {projection:.1f} GiB > --memory-budget-gib "
                f"{args.memory_budget_gib:g}"
            )
            points.append(point)
            continue
        spec = {
            "model": model_specs[model],
            "clients": clients,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "batch_size": args.batch_size,
            "data_paths": [str(p) for p in data[:clients]],
            "results_dir": str(work / "runs" / f"{model}-{clients}-{server}"),
            "streaming": server == "streaming",
            "save_clients": not args.no_save_clients,
        }
        try:
            point.update(measure_point(spec, args.point_timeout, args.memory_budget_gib + 2))
        except MemoryError as error:
            point["skipped"] = str(error)
            points.append(point)
            continue
        point["model"], point["server"] = model, server
        points.append(point)
        last = steady(point)
        tqdm.write(
            f"{model} T={clients} {server}: steady round {last['round_seconds']:.1f} s, peak used "
            f"+{point['peak_used_rise_gib']:.2f} GiB, driver {point['driver_peak_rss_gib']:.2f} GiB"
        )
        shutil.rmtree(work / "runs" / f"{model}-{clients}-{server}", ignore_errors=True)
    print(table(points))
    report = {
        "settings": {
            key: getattr(args, key)
            for key in ("rounds", "local_steps", "batch_size", "rows", "memory_budget_gib")
        },
        "command": " ".join(["python", "benchmarks/bench_scale.py", *(argv or sys.argv[1:])]),
        "comparison": comparison(points),
        "cpus": os.cpu_count(),
        "points": points,
    }
    if args.json:
        write_json(Path(args.json), report)
    if args.csv:
        write_points_csv(points, Path(args.csv))
    if args.plot:
        plot(points, Path(args.plot))
    if args.work_dir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
