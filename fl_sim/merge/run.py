"""``fl-sim merge``: one-shot FL aggregation of real fine-tuned checkpoints.

    Δ_t = θ_t − θ₀,      θ = θ₀ + β · A(Δ₁..Δ_T)

with A any rule of ``strategies`` — the same functions a Flower round calls. Tensors stream
one name at a time from memory maps (``strategies.streaming``) into a streamed safetensors writer,
so peak memory is about T × the largest tensor, not T × the model.

PEFT LoRA adapters among the models (fl_sim/merge/adapters.py) give their Δ_t directly, one
materialised tensor at a time ((α/r)·B·A per target module, 0 elsewhere); a full fine-tune next
to them gives Δ_t = θ_t − θ₀ per tensor, the same numbers the models path computes. With
``--to-adapter`` the engine runs from θ₀ := 0 on the float tensors, so what it yields is the merged
ΔW = β·A(Δ₁..Δ_T) itself, cut to rank r per module (fl_sim/merge/to_adapter.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
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
from fl_sim.checkpoints.safetensors_io import save_tensors, write_safetensors
from fl_sim.checkpoints.sharding import (
    DEFAULT_MAX_SHARD_SIZE,
    parse_shard_size,
    tensor_bytes,
    write_model_weights,
)
from fl_sim.errors import CheckpointError, ConfigError
from fl_sim.merge.adapters import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PEFT_PREFIX,
    LoraAdapter,
    LoraModule,
    is_adapter_folder,
)
from fl_sim.merge.options import DTYPES, MergeOptions
from fl_sim.merge.to_adapter import adapter_config, adapter_tensors, write_adapter_config
from fl_sim.outputs import write_json
from strategies.heterogeneity import chi_square, effective_weights
from strategies.registry import make_rule
from strategies.streaming import (
    AggregationOptions,
    TensorPlan,
    UpdateStatistics,
    aggregate_model,
    compute_dtype,
    resolve_device,
)

REPORT_NAME = "merge_report.json"


@dataclass(frozen=True)
class MergeResult:
    model_path: Path  # the merged .safetensors file, the shards' index, or the adapter weights
    report_path: Path
    report: dict[str, object]


def report_path_for(out: Path, folder_output: bool) -> Path:
    """OUT/merge_report.json for a folder, OUT's sibling ``<stem>.merge_report.json`` for a file."""
    return out / REPORT_NAME if folder_output else out.with_name(f"{out.stem}.{REPORT_NAME}")


def run_merge(options: MergeOptions, *, progress: bool = False) -> MergeResult:
    """Merge ``options.models`` onto ``options.base`` and write OUT and its report atomically."""
    started = time.perf_counter()
    opened: list[Checkpoint | LoraAdapter] = []
    try:
        base = open_checkpoint(options.base, allow_pickle=options.allow_pickle)
        opened.append(base)
        models: list[Checkpoint | LoraAdapter] = []
        for path in options.models:
            if is_adapter_folder(path):
                models.append(LoraAdapter(path, base))
            else:
                models.append(open_checkpoint(path, allow_pickle=options.allow_pickle))
            opened.append(models[-1])
        names = check_compatible(base, [m for m in models if isinstance(m, Checkpoint)])
        return _merge(options, base, models, names, started, progress)
    finally:
        for checkpoint in opened:
            checkpoint.close()


def _zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A Δ of 0 that allocates nothing: one element, expanded (the engine only reads it)."""
    return torch.zeros(1, dtype=compute_dtype(dtype)).expand(math.prod(shape))


def update_getters(
    base: Checkpoint, models: list[Checkpoint | LoraAdapter]
) -> list[Callable[[str], torch.Tensor]]:
    """Each model's Δ_t by tensor name, for ``inputs="updates"``; integer buffers as stored.

    A full fine-tune gives θ_t − θ₀ in the compute dtype (what the models path computes per
    chunk); an adapter its materialised Δ_t, or 0 where it touches nothing."""

    def of_model(model: Checkpoint) -> Callable[[str], torch.Tensor]:
        def get(name: str) -> torch.Tensor:
            dtype = base.dtype(name)
            if not dtype.is_floating_point:
                return model.get(name)
            work = compute_dtype(dtype)
            return model.get(name).to(work) - base.get(name).to(work)

        return get

    def of_adapter(adapter: LoraAdapter) -> Callable[[str], torch.Tensor]:
        def get(name: str) -> torch.Tensor:
            if not base.dtype(name).is_floating_point:
                return base.get(name)
            delta = adapter.delta(name)
            return _zeros(base.shape(name), base.dtype(name)) if delta is None else delta

        return get

    return [of_adapter(m) if isinstance(m, LoraAdapter) else of_model(m) for m in models]


def _merge(
    options: MergeOptions,
    base: Checkpoint,
    models: list[Checkpoint | LoraAdapter],
    names: list[str],
    started: float,
    progress: bool,
) -> MergeResult:
    num_clients = len(models)
    adapters = [m for m in models if isinstance(m, LoraAdapter)]
    if options.to_adapter and len(adapters) < num_clients:
        full = next(p for p, m in zip(options.models, models, strict=True) if m not in adapters)
        raise ConfigError(
            f"--to-adapter needs every model to be a LoRA adapter, but {full} is a full model "
            "(its Δ touches every tensor): drop --to-adapter to write the full merged model"
        )
    rule_config = options.rule_config()
    rule = make_rule(rule_config, num_clients)
    device = resolve_device(options.device)
    out_dtype = DTYPES[options.dtype] if options.dtype else None
    plans = [TensorPlan(n, base.shape(n), base.dtype(n)) for n in names]
    specs = [
        (p.name, out_dtype if (out_dtype and p.dtype.is_floating_point) else p.dtype, p.shape)
        for p in plans
    ]
    folder_output = base.is_folder or options.to_adapter
    max_shard_size = options.max_shard_size
    if max_shard_size is None and folder_output:
        max_shard_size = parse_shard_size(DEFAULT_MAX_SHARD_SIZE)
    total_bytes = sum(tensor_bytes(spec) for spec in specs)
    if not folder_output and options.max_shard_size is not None and total_bytes > max_shard_size:
        raise ConfigError(
            f"--max-shard-size {max_shard_size} bytes: the merged model has {total_bytes} bytes, "
            f"but OUT {options.out} is one .safetensors file (pass a folder BASE and OUT to shard)"
        )
    statistics = UpdateStatistics.empty(num_clients) if options.statistics else None
    input_bytes = base.nbytes + sum(m.nbytes for m in models)
    bar = _progress_bar(progress, input_bytes * rule.num_passes, options.method)

    def tensor_done(plan: TensorPlan, pass_index: int) -> None:
        if bar is not None:
            bar.update(plan.numel * plan.dtype.itemsize * (num_clients + 1))
        # after every pass, not only the last: a multi-pass rule (cclip) would otherwise keep
        # the whole input mapped through its first passes
        for checkpoint in (base, *models):
            checkpoint.release(plan.name)

    if adapters:  # each model's Δ_t, materialised one tensor at a time (the module docstring)
        inputs, getters = "updates", update_getters(base, models)
    else:
        inputs, getters = "models", [m.get for m in models]
    base_get = base.get
    if options.to_adapter:  # θ₀ := 0 on float tensors: the engine yields β·A(Δ₁..Δ_T) itself

        def base_get(name: str) -> torch.Tensor:
            if not base.dtype(name).is_floating_point:
                return base.get(name)
            return _zeros(base.shape(name), base.dtype(name))

        widest = torch.float64 if any(p.dtype == torch.float64 for p in plans) else None
        out_dtype = widest or torch.float32

    merged = aggregate_model(
        rule,
        plans,
        base_get,
        getters,
        AggregationOptions(
            server_lr=options.server_lr,
            inputs=inputs,
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
            merge_started = time.perf_counter()
            if options.to_adapter:
                output = write_merged_adapter(options, base, adapters, merged, temp, device)
                model_path = options.out / ADAPTER_WEIGHTS
            elif folder_output:
                copy_model_files(options.base, temp)
                files = write_model_weights(temp, merged, specs, metadata, max_shard_size)
                output = {
                    "kind": "model",
                    "files": [f.name for f in files],
                    "shards": max(1, len(files) - 1),
                    "max_shard_size": max_shard_size,
                    "total_size": total_bytes,
                }
                model_path = options.out / files[-1].name
            else:
                write_safetensors(temp, merged, specs, metadata)
                output = {"kind": "model", "files": [options.out.name], "shards": 1}
                model_path = options.out
            merge_seconds = time.perf_counter() - merge_started
            if bar is not None:
                bar.close()
            report = build_report(
                options, rule, statistics, device, input_bytes, merge_seconds, started
            )
            report["inputs"] = [
                m.summary() if isinstance(m, LoraAdapter) else {"kind": "model", "path": str(p)}
                for p, m in zip(options.models, models, strict=True)
            ]
            report["output"] = output
            if folder_output:
                write_json(temp / REPORT_NAME, report, default=str)
    finally:
        if bar is not None:
            bar.close()  # on an error too: the bar's line is cleared before the error is printed
    if not folder_output:
        write_json(report_path, report, default=str)
    return MergeResult(model_path, report_path, report)


def write_merged_adapter(
    options: MergeOptions,
    base: Checkpoint,
    adapters: list[LoraAdapter],
    merged: Iterator[tuple[str, torch.Tensor]],
    folder: Path,
    device: torch.device,
) -> dict[str, object]:
    """Cut each module's merged ΔW to rank r (fl_sim/merge/to_adapter.py) into ``folder``;
    return the report's ``output`` section with the truncation errors."""
    assert options.rank is not None  # checked by build_merge_options
    modules: dict[str, LoraModule] = {}
    for adapter in adapters:
        for name, entry in adapter.modules.items():
            first = modules.setdefault(name, entry)
            if (first.kind, first.transposed) != (entry.kind, entry.transposed):
                raise CheckpointError(
                    f"adapter {adapter.path}: module {entry.module!r} is a "
                    f"{entry.kind} (transposed={entry.transposed}) but another adapter has it as "
                    f"{first.kind} (transposed={first.transposed}); --to-adapter needs one layout"
                )
    saved_modules = sorted({m for a in adapters for m in (a.config.get("modules_to_save") or [])})
    dtype = DTYPES[options.dtype] if options.dtype else adapters[0].lora_dtype()
    tensors: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    for name, delta in merged:
        if not base.dtype(name).is_floating_point:
            continue
        if name in modules:
            # on the engine's one CPU thread: under load, 6× faster than two (README)
            lora, errors[modules[name].module] = adapter_tensors(
                modules[name], delta.view(base.shape(name)), options.rank, dtype, device
            )
            tensors.update(lora)
            continue
        peft_name = next((a.peft_name(name) for a in adapters if name in a.whole), None)
        if peft_name is not None and in_modules_to_save(peft_name, saved_modules):
            theta = base.get(name).to(delta.dtype) + delta.view(base.shape(name))
            saved_dtype = DTYPES[options.dtype] if options.dtype else base.dtype(name)
            tensors[PEFT_PREFIX + peft_name] = theta.to(saved_dtype)
        elif bool(delta.any()):
            raise ConfigError(
                f"--to-adapter: the merge changes tensor {name!r}, which is neither a LoRA target "
                "nor in modules_to_save, so an adapter cannot hold it (drop --to-adapter)"
            )
    save_tensors(folder / ADAPTER_WEIGHTS, tensors, {"format": "pt"})
    names = {a.config.get("base_model_name_or_path") for a in adapters}
    task_types = {a.config.get("task_type") for a in adapters}
    fan_in_fan_out = any(a.config.get("fan_in_fan_out") for a in adapters)
    write_adapter_config(
        folder,
        adapter_config(
            base_name=names.pop() if len(names) == 1 and None not in names else str(options.base),
            rank=options.rank,
            target_modules=[entry.module for entry in modules.values()],
            fan_in_fan_out=fan_in_fan_out,
            modules_to_save=saved_modules or None,
            task_type=task_types.pop() if len(task_types) == 1 else None,
        ),
    )
    values = list(errors.values())
    return {
        "kind": "lora_adapter",
        "files": [ADAPTER_WEIGHTS, ADAPTER_CONFIG],
        "rank": options.rank,
        "lora_alpha": options.rank,
        "sum_of_input_ranks": sum(max(a.ranks(), default=0) for a in adapters),
        "relative_error": {
            "max": max(values, default=0.0),
            "mean": sum(values) / len(values) if values else 0.0,
            "worst_module": max(errors, key=errors.__getitem__) if errors else None,
            "per_module": errors,
        },
    }


def in_modules_to_save(peft_name: str, saved_modules: list[str]) -> bool:
    module = peft_name.rpartition(".")[0]
    return any(module == m or module.endswith(f".{m}") for m in saved_modules)


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
