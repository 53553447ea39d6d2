"""``fl-sim merge --to-adapter --rank r``: the merged task vector as a PEFT LoRA adapter.

Per target module m the merged ΔW_m = β·A(Δ₁..Δ_T)[m] (in PEFT's orientation M = ΔW_m, or ΔW_mᵀ
for fan_in_fan_out and Embedding layers) is cut by its truncated SVD

    M ≈ U_r S_r V_rᵀ,    B = U_r S_r^{1/2},    A = S_r^{1/2} V_rᵀ,    lora_alpha = r,

so that PEFT's (α/r)·B A = U_r S_r V_rᵀ. The relative Frobenius error of the cut is
‖M − U_r S_r V_rᵀ‖_F / ‖M‖_F = √(Σ_{i>r} s_i²) / √(Σ_i s_i²): 0 (to float rounding) when r is at
least the rank of M, which for a linear rule (fedavg, task_arithmetic, fednova) is at most the
sum of the inputs' ranks Σ_t r_t. A module narrower than r gets zero-padded factors (exact).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_sim.merge.adapters import ADAPTER_CONFIG, PEFT_PREFIX, LoraModule
from fl_sim.outputs import write_json


@dataclass(frozen=True)
class LowRankFactors:
    b: torch.Tensor  # [out, r]
    a: torch.Tensor  # [r, in]
    relative_error: float  # ‖M − B A‖_F / ‖M‖_F of the truncation (0 for M = 0)


def truncate(matrix: torch.Tensor, rank: int, device: torch.device | None = None) -> LowRankFactors:
    """B, A of rank ``rank`` with B A = U_r S_r V_rᵀ, the best rank-r approximation (a full
    SVD, on ``device``: the GPU when the merge runs there); B and A come back on the CPU."""
    work = matrix.to(
        device=device or matrix.device,
        dtype=torch.float64 if matrix.dtype == torch.float64 else torch.float32,
    )
    if work.shape[0] < work.shape[1]:  # LAPACK is ≈ 3× faster on the tall orientation
        v, s, uh = torch.linalg.svd(work.T, full_matrices=False)
        u, vh = uh.T, v.T
    else:
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
    keep = min(rank, s.numel())
    root = s[:keep].sqrt()
    b = work.new_zeros(work.shape[0], rank)
    a = work.new_zeros(rank, work.shape[1])
    b[:, :keep] = u[:, :keep] * root
    a[:keep] = root[:, None] * vh[:keep]
    energy = float(s.double().square().sum())
    tail = float(s[keep:].double().square().sum())
    error = math.sqrt(tail / energy) if energy > 0 else 0.0
    return LowRankFactors(b.cpu(), a.cpu(), error)


def adapter_tensors(
    entry: LoraModule,
    delta_w: torch.Tensor,
    rank: int,
    dtype: torch.dtype,
    device: torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], float]:
    """The saved A and B of module ``entry`` for the merged ΔW (on the base tensor's layout)."""
    matrix = delta_w.T if entry.transposed else delta_w
    factors = truncate(matrix, rank, device)
    if entry.kind == "embedding":
        keys = (f".{entry.module}.lora_embedding_A", f".{entry.module}.lora_embedding_B")
    else:
        keys = (f".{entry.module}.lora_A.weight", f".{entry.module}.lora_B.weight")
    prefix = PEFT_PREFIX.rstrip(".")
    tensors = {
        prefix + keys[0]: factors.a.to(dtype).contiguous(),
        prefix + keys[1]: factors.b.to(dtype).contiguous(),
    }
    return tensors, factors.relative_error


def adapter_config(
    *,
    base_name: str,
    rank: int,
    target_modules: list[str],
    fan_in_fan_out: bool,
    modules_to_save: list[str] | None,
    task_type: str | None,
) -> dict[str, object]:
    """adapter_config.json of the merged adapter; lora_alpha = r makes PEFT's scale α/r = 1."""
    return {
        "peft_type": "LORA",
        "base_model_name_or_path": base_name,
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "target_modules": sorted(target_modules),
        "fan_in_fan_out": fan_in_fan_out,
        "modules_to_save": modules_to_save,
        "bias": "none",
        "lora_dropout": 0.0,
        "rank_pattern": {},
        "alpha_pattern": {},
        "task_type": task_type,
        "inference_mode": True,
        "init_lora_weights": True,
    }


def write_adapter_config(folder: str | os.PathLike[str], config: dict[str, object]) -> Path:
    path = Path(folder) / ADAPTER_CONFIG
    write_json(path, config)
    return path
