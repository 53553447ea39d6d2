"""``fl-sim merge``: one-shot FL aggregation of real fine-tuned checkpoints.

    Δ_t = θ_t − θ₀,      θ = θ₀ + β · A(Δ₁..Δ_T)

with A any rule of ``strategies`` — the same functions a Flower round calls. Tensors stream
one name at a time from memory maps (``strategies.streaming``) into a streamed safetensors writer,
so peak memory is about T × the largest tensor, not T × the model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_sim import __version__
from fl_sim.checkpoints.model_checkpoint import (
    Checkpoint,
    atomic_output,
    check_compatible,
    copy_model_files,
    open_checkpoint,
)
from fl_sim.checkpoints.safetensors_io import write_safetensors
from fl_sim.merge.options import DTYPES, MergeOptions
from fl_sim.outputs import write_json
from strategies.heterogeneity import chi_square, effective_weights
from strategies.registry import make_rule
from strategies.streaming import (
    AggregationOptions,
    TensorPlan,
    UpdateStatistics,
    aggregate_model,
    resolve_device,
)

REPORT_NAME = "merge_report.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass(frozen=True)
class MergeResult:
    model_path: Path  # the merged .safetensors file
    report_path: Path
    report: dict[str, object]


def report_path_for(out: Path, folder_output: bool) -> Path:
    """OUT/merge_report.json for a folder, OUT's sibling ``<stem>.merge_report.json`` for a file."""
    return out / REPORT_NAME if folder_output else out.with_name(f"{out.stem}.{REPORT_NAME}")


def run_merge(options: MergeOptions, *, progress: bool = False) -> MergeResult:
    """Merge ``options.models`` onto ``options.base`` and write OUT and its report atomically."""
    started = time.perf_counter()
    base = open_checkpoint(options.base, allow_pickle=options.allow_pickle)
    models = [open_checkpoint(m, allow_pickle=options.allow_pickle) for m in options.models]
    try:
        names = check_compatible(base, models)
        return _merge(options, base, models, names, started, progress)
    finally:
        for checkpoint in (base, *models):
            checkpoint.close()


def _merge(
    options: MergeOptions,
    base: Checkpoint,
    models: list[Checkpoint],
    names: list[str],
    started: float,
    progress: bool,
) -> MergeResult:
    num_clients = len(models)
    rule_config = options.rule_config()
    rule = make_rule(rule_config, num_clients)
    device = resolve_device(options.device)
    out_dtype = DTYPES[options.dtype] if options.dtype else None
    plans = [TensorPlan(n, base.shape(n), base.dtype(n)) for n in names]
    specs = [
        (p.name, out_dtype if (out_dtype and p.dtype.is_floating_point) else p.dtype, p.shape)
        for p in plans
    ]
    statistics = UpdateStatistics.empty(num_clients) if options.statistics else None
    input_bytes = base.nbytes + sum(m.nbytes for m in models)
    folder_output = base.is_folder
    bar = _progress_bar(progress, input_bytes * rule.num_passes, options.method)

    def tensor_done(plan: TensorPlan, pass_index: int) -> None:
        if bar is not None:
            bar.update(plan.numel * plan.dtype.itemsize * (num_clients + 1))
        # after every pass, not only the last: a multi-pass rule (cclip) would otherwise keep
        # the whole input mapped through its first passes
        for checkpoint in (base, *models):
            checkpoint.release(plan.name)

    merged = aggregate_model(
        rule,
        plans,
        base.get,
        [m.get for m in models],
        AggregationOptions(
            server_lr=options.server_lr,
            inputs="models",
            device=device,
            out_dtype=out_dtype,
            client_names=[f"checkpoint {m}" for m in options.models],
            base_name=f"checkpoint {options.base}",
        ),
        statistics=statistics,
        on_tensor_done=tensor_done,
    )
    report_path = report_path_for(options.out, folder_output)
    metadata = {"format": "pt", "fl_sim_method": options.method, "fl_sim_version": __version__}
    try:
        with atomic_output(options.out, is_dir=folder_output, force=options.force) as temp:
            model_path = temp / WEIGHTS_NAME if folder_output else temp
            if folder_output:
                copy_model_files(options.base, temp)
            merge_started = time.perf_counter()
            write_safetensors(model_path, merged, specs, metadata)
            merge_seconds = time.perf_counter() - merge_started
            if bar is not None:
                bar.close()
            report = build_report(
                options, rule, statistics, device, input_bytes, merge_seconds, started
            )
            if folder_output:
                write_json(temp / REPORT_NAME, report, default=str)
    finally:
        if bar is not None:
            bar.close()  # on an error too: the bar's line is cleared before the error is printed
    if not folder_output:
        write_json(report_path, report, default=str)
    final_model = options.out / WEIGHTS_NAME if folder_output else options.out
    return MergeResult(final_model, report_path, report)


def build_report(
    options: MergeOptions,
    rule: object,
    statistics: UpdateStatistics | None,
    device: torch.device,
    input_bytes: int,
    merge_seconds: float,
    started: float,
) -> dict[str, object]:
    """merge_report.json: what was merged, how, with which weights, and what it looked like."""
    p = rule.weights.tolist()
    a_norm = None
    if options.train_meta is not None:
        values = [m.a_norm(options.a_norm_kind) for m in options.train_meta]
        a_norm = None if any(v is None for v in values) else values
    heterogeneity: dict[str, object] = {"a_norm_kind": options.a_norm_kind, "a_norm": a_norm}
    if a_norm is not None:
        w = effective_weights(p, a_norm)
        heterogeneity |= {"effective_weights": w, "chi_square": chi_square(p, w)}
    else:
        heterogeneity |= {
            "effective_weights": None,
            "chi_square": None,
            "note": "no training metadata (--train-meta or fl_sim_meta.json): w_t unknown",
        }
    task_vectors: dict[str, object] | None = None
    if statistics is not None:
        task_vectors = {
            "norms": statistics.norms(),
            "cosine_similarity": statistics.cosines(),
            "coordinates": statistics.coordinates,
        }
    total_seconds = time.perf_counter() - started
    return {
        "fl_sim_version": __version__,
        "method": options.method,
        "base": str(options.base),
        "models": [str(m) for m in options.models],
        "out": str(options.out),
        "parameters": {
            "server_lr": options.server_lr,
            "lambda": options.lam,
            **options.knobs.as_dict(),
            "dtype": options.dtype,
        },
        "weights": p,
        "paper_defaults": {"enabled": options.paper_defaults, "set": dict(options.paper_set)},
        "heterogeneity": heterogeneity,
        "rule": rule.summary(),
        "task_vectors": task_vectors,
        "device": str(device),
        "input_bytes": input_bytes,
        "seconds": {"merge": merge_seconds, "total": total_seconds},
        "input_gb_per_s": (
            input_bytes * rule.num_passes / merge_seconds / 1e9 if merge_seconds > 0 else None
        ),
    }


def _progress_bar(enabled: bool, total: int, method: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: a bar only on a terminal, never in logs or captured stderr.
    return tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc=f"merge ({method})",
        leave=False,
        disable=None,
    )
