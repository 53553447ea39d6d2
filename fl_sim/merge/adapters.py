"""PEFT LoRA adapters as merge inputs: each target module's task vector, one tensor at a time.

An adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) fine-tuned from θ₀
stands for the model θ_t = θ₀ + Δ_t with, per target module m (PEFT's LoRA),

    Δ_t[m.weight] = s_m · B_m A_m          (Linear; the transpose if fan_in_fan_out)
    Δ_t[m.weight] = s_m · (B_m A_m)ᵀ       (Embedding: lora_embedding_A/B)
    s_m = α_m / r_m,  or α_m / √r_m with use_rslora

where r_m is the rank of A_m (checked against ``r`` / ``rank_pattern``) and α_m is
``alpha_pattern``'s value for m, else ``lora_alpha``. Tensors the adapter stores whole
(``modules_to_save``, trained biases, a saved ``base_layer``) replace θ₀'s: Δ_t = saved − θ₀,
added to the LoRA term when both exist. Every other tensor has Δ_t = 0. PEFT key names
``base_model.model.<module>.lora_A.weight`` are mapped onto the base's ``<module>.weight``.

Only ``delta(name)`` materialises anything: one tensor's Δ_t in the compute dtype, so a merge over
T adapters holds at most T × the largest materialised Δ at once.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_sim.checkpoints.model_checkpoint import Checkpoint, open_checkpoint
from fl_sim.checkpoints.safetensors_io import SafetensorsFile
from fl_sim.errors import CheckpointError, FlSimError
from strategies.streaming import compute_dtype

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# Config switches whose adapters are not θ₀ + s·BA on plain Linear/Embedding weights.
UNSUPPORTED_SWITCHES = {
    "use_dora": "DoRA (use_dora)",
    "lora_bias": "a bias on lora_B (lora_bias)",
    "layer_replication": "layer_replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "megatron_config": "Megatron layers (megatron_config)",
    "use_qalora": "QA-LoRA (use_qalora)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing (arrow_config)",
}
LORA_SUFFIXES = {
    ".lora_A.weight": ("linear", "A"),
    ".lora_B.weight": ("linear", "B"),
    ".lora_embedding_A": ("embedding", "A"),
    ".lora_embedding_B": ("embedding", "B"),
}
# Wrapper segments PEFT puts between a module and its parameter in saved whole tensors.
WRAPPER_SEGMENTS = (".modules_to_save.", ".base_layer.")


def is_adapter_folder(path: Path) -> bool:
    """A folder holding a PEFT adapter and no full model weights."""
    return (
        path.is_dir()
        and (path / ADAPTER_CONFIG).is_file()
        and not (path / "model.safetensors").is_file()
        and not (path / "model.safetensors.index.json").is_file()
    )


def pattern_value(
    patterns: dict[str, object], module: str, default: object, where: str = "adapter"
) -> object:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key k with ``(.*\\.)?(k)$``."""
    for key, value in patterns.items():
        try:
            matched = re.match(rf"(.*\.)?({key})$", module)
        except re.error as err:
            raise CheckpointError(
                f"{where}: pattern {key!r} of rank_pattern/alpha_pattern is not a regular "
                f"expression ({err}; fix {ADAPTER_CONFIG})"
            ) from None
        if matched:
            return value
    return default


@dataclass(frozen=True)
class LoraModule:
    """One target module: its A and B in the adapter file and how ΔW follows from them."""

    module: str  # the PEFT module name, e.g. model.layers.0.self_attn.q_proj
    kind: str  # "linear" or "embedding"
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scaling: float  # s_m = α_m / r_m (α_m / √r_m with use_rslora)
    transposed: bool  # ΔW on the base tensor is (B A)ᵀ: fan_in_fan_out, or an Embedding


class LoraAdapter:
    """A PEFT LoRA adapter read lazily from its safetensors file, mapped onto a base."""

    def __init__(self, path: Path, base: Checkpoint) -> None:
        self.path = path
        self.config = read_adapter_config(path)
        self.base_check = check_base_name(self.config, path, base)
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickled = path / "adapter_model.bin"
            hint = (
                "it holds a pickled adapter_model.bin: re-save it with save_pretrained "
                "(safetensors)"
                if pickled.is_file()
                else f"no {ADAPTER_WEIGHTS} next to {ADAPTER_CONFIG}"
            )
            raise CheckpointError(f"adapter {path}: {hint}")
        self.file = SafetensorsFile(weights)
        try:
            self.modules, self.whole = self._map_keys(base)
        except BaseException:
            self.file.close()
            raise
        self._base = base

    # -- mapping -------------------------------------------------------------------------

    def _map_keys(self, base: Checkpoint) -> tuple[dict[str, LoraModule], dict[str, str]]:
        """Base tensor name → its LoRA module, and base tensor name → a whole saved tensor."""
        config = self.config
        halves: dict[str, dict[str, str]] = {}
        kinds: dict[str, str] = {}
        whole: dict[str, str] = {}
        for key in self.file:
            if not key.startswith(PEFT_PREFIX):
                raise CheckpointError(
                    f"adapter {self.path}: key {key!r} does not start with {PEFT_PREFIX!r} "
                    "(not a PEFT LoRA adapter saved with save_pretrained)"
                )
            rest = key[len(PEFT_PREFIX) :]
            suffix = next((s for s in LORA_SUFFIXES if rest.endswith(s)), None)
            if suffix is not None:
                module = rest[: -len(suffix)]
                kind, half = LORA_SUFFIXES[suffix]
                if kinds.setdefault(module, kind) != kind:
                    raise CheckpointError(
                        f"adapter {self.path}: module {module!r} has both Linear and Embedding "
                        "LoRA weights (re-save the adapter)"
                    )
                halves.setdefault(module, {})[half] = key
                continue
            if ".lora_" in rest or "trainable_tokens" in rest:
                raise CheckpointError(
                    f"adapter {self.path}: tensor {key!r} is not a LoRA A/B matrix fl-sim "
                    "supports (only plain LoRA on Linear, Conv1D and Embedding layers)"
                )
            name = rest
            for segment in WRAPPER_SEGMENTS:
                name = name.replace(segment, ".")
            target = base_tensor_name(name, base)
            if target is None:
                raise CheckpointError(
                    f"adapter {self.path}: saved tensor {key!r} has no counterpart {name!r} in "
                    f"the base {base.path} (is --base the model this adapter was trained on?)"
                )
            if self.file.shape(key) != base.shape(target):
                raise CheckpointError(
                    f"adapter {self.path}: saved tensor {key!r} has shape "
                    f"{list(self.file.shape(key))} but the base's {target!r} has "
                    f"{list(base.shape(target))} (the adapter was trained on another base)"
                )
            whole[target] = key
        modules: dict[str, LoraModule] = {}
        for module, pair in halves.items():
            if set(pair) != {"A", "B"}:
                missing = "B" if "A" in pair else "A"
                raise CheckpointError(
                    f"adapter {self.path}: module {module!r} has no lora_{missing} weight "
                    "(the adapter file is incomplete; re-save it)"
                )
            entry = self._module(module, kinds[module], pair["A"], pair["B"], base, config)
            target = base_tensor_name(f"{module}.weight", base)
            if target is None:
                raise CheckpointError(
                    f"adapter {self.path}: target module {module!r} is not in the base "
                    f"{base.path} (no tensor {module + '.weight'!r}; is --base the model this "
                    "adapter was trained on?)"
                )
            self._check_shape(entry, target, base)
            modules[target] = entry
        return modules, whole

    def _module(
        self, module: str, kind: str, a_key: str, b_key: str, base: Checkpoint, config: dict
    ) -> LoraModule:
        a_shape, b_shape = self.file.shape(a_key), self.file.shape(b_key)
        if len(a_shape) != 2 or len(b_shape) != 2:
            raise CheckpointError(
                f"adapter {self.path}: module {module!r} has {len(a_shape)}-D LoRA weights "
                "(convolution LoRA is not supported; only Linear, Conv1D and Embedding layers)"
            )
        rank = a_shape[0]
        if rank == 0:
            raise CheckpointError(
                f"adapter {self.path}: module {module!r} has rank 0 (re-save the adapter)"
            )
        if b_shape[1] != rank:
            raise CheckpointError(
                f"adapter {self.path}: module {module!r}: lora_A has rank {rank} but lora_B "
                f"has {b_shape[1]} columns (re-save the adapter)"
            )
        expected = pattern_value(
            config.get("rank_pattern") or {}, module, config.get("r"), f"adapter {self.path}"
        )
        if expected is not None and expected != rank:
            raise CheckpointError(
                f"adapter {self.path}: module {module!r} has rank {rank} but adapter_config.json "
                f"says r = {expected} (fix r / rank_pattern)"
            )
        alpha = pattern_value(
            config.get("alpha_pattern") or {},
            module,
            config.get("lora_alpha"),
            f"adapter {self.path}",
        )
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0:
            raise CheckpointError(
                f"adapter {self.path}: lora_alpha for {module!r} must be a number > 0, "
                f"got {alpha!r} (fix adapter_config.json)"
            )
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        transposed = kind == "embedding" or bool(config.get("fan_in_fan_out"))
        return LoraModule(module, kind, a_key, b_key, rank, float(alpha), scaling, transposed)

    def _check_shape(self, entry: LoraModule, target: str, base: Checkpoint) -> None:
        b_rows, a_cols = self.file.shape(entry.b_key)[0], self.file.shape(entry.a_key)[1]
        shape = (a_cols, b_rows) if entry.transposed else (b_rows, a_cols)
        if base.shape(target) != shape:
            how = "(B A)ᵀ" if entry.transposed else "B A"
            hint = (
                "; fan_in_fan_out in adapter_config.json looks wrong"
                if base.shape(target) == shape[::-1]
                else " (the adapter was trained on another base)"
            )
            raise CheckpointError(
                f"adapter {self.path}: module {entry.module!r} gives ΔW = {how} of shape "
                f"{list(shape)} but the base's {target!r} has {list(base.shape(target))}{hint}"
            )

    # -- Δ_t -----------------------------------------------------------------------------

    def lora_delta(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW = s_m · B A (or its transpose) of the base tensor ``name``, in ``dtype``."""
        entry = self.modules[name]
        a = self.file.get(entry.a_key).to(dtype)
        b = self.file.get(entry.b_key).to(dtype)
        product = b @ a  # PEFT's get_delta_weight: transpose(B @ A, fan_in_fan_out) · scaling
        return (product.T if entry.transposed else product) * entry.scaling

    def delta(self, name: str) -> torch.Tensor | None:
        """Δ_t of the base tensor ``name`` in its compute dtype, or None where it is 0."""
        if name not in self.modules and name not in self.whole:
            return None
        dtype = compute_dtype(self._base.dtype(name))
        delta = self.lora_delta(name, dtype) if name in self.modules else None
        if name in self.whole:
            saved = self.file.get(self.whole[name]).to(dtype)
            whole = saved - self._base.get(name).to(dtype)
            delta = whole if delta is None else delta.add_(whole)
        return delta

    def peft_name(self, name: str) -> str:
        """The module-relative name PEFT saves a whole tensor of base tensor ``name`` under."""
        rest = self.whole[name][len(PEFT_PREFIX) :]
        for segment in WRAPPER_SEGMENTS:
            rest = rest.replace(segment, ".")
        return rest

    def lora_dtype(self) -> torch.dtype:
        """The dtype of the adapter's LoRA matrices (float32 when it has none)."""
        entry = next(iter(self.modules.values()), None)
        return self.file.dtype(entry.a_key) if entry else torch.float32

    @property
    def nbytes(self) -> int:
        return sum(self.file.nbytes(key) for key in self.file)

    def ranks(self) -> list[int]:
        return sorted({entry.rank for entry in self.modules.values()})

    def summary(self) -> dict[str, object]:
        """What merge_report.json says about this input."""
        ranks = self.ranks()
        return {
            "kind": "lora_adapter",
            "path": str(self.path),
            "rank": ranks[0] if len(ranks) == 1 else {"min": ranks[0], "max": ranks[-1]},
            "lora_alpha": self.config.get("lora_alpha"),
            "use_rslora": bool(self.config.get("use_rslora")),
            "fan_in_fan_out": bool(self.config.get("fan_in_fan_out")),
            "target_modules": len(self.modules),
            "whole_tensors": sorted(self.whole),
            "base_model_name_or_path": self.config.get("base_model_name_or_path"),
            "base_check": self.base_check,
        }

    def release(self, name: str) -> None:
        entry = self.modules.get(name)
        for key in (entry.a_key, entry.b_key) if entry else ():
            self.file.release(key)
        if name in self.whole:
            self.file.release(self.whole[name])

    def close(self) -> None:
        self.file.close()


def base_tensor_name(name: str, base: Checkpoint) -> str | None:
    """``name`` in the base, or with its first component dropped (a base saved without the
    task head's wrapper, e.g. ``model.`` or ``bert.``); None when neither exists."""
    if name in base:
        return name
    _, _, rest = name.partition(".")
    return rest if rest and rest in base else None


def read_adapter_config(path: Path) -> dict:
    """adapter_config.json, refused when it is not plain LoRA."""
    config_path = path / ADAPTER_CONFIG
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(
            f"adapter {path}: {ADAPTER_CONFIG} is unreadable ({type(err).__name__}; re-save it)"
        ) from None
    if not isinstance(config, dict):
        raise CheckpointError(f"adapter {path}: {ADAPTER_CONFIG} must be a JSON object")
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise CheckpointError(
            f"adapter {path}: peft_type is {peft_type!r}; fl-sim merges LoRA adapters only "
            "(merge it into its base with merge_and_unload() and pass the full model)"
        )
    for patterns in ("rank_pattern", "alpha_pattern"):
        value = config.get(patterns)
        if value is not None and not (
            isinstance(value, dict) and all(isinstance(k, str) for k in value)
        ):
            raise CheckpointError(
                f"adapter {path}: {patterns} must map module patterns to numbers, got "
                f"{str(value)[:60]} (fix {ADAPTER_CONFIG})"
            )
    for switch, what in UNSUPPORTED_SWITCHES.items():
        if config.get(switch):
            raise CheckpointError(
                f"adapter {path}: {what} is not supported (merge it into its base with "
                "merge_and_unload() and pass the full model instead)"
            )
    return config


def check_base_name(config: dict, path: Path, base: Checkpoint) -> str:
    """Compare ``base_model_name_or_path`` with --base where that can be checked; say how.

    A local folder other than --base must hold the same weights (compared on the smallest and
    the largest float tensors: a copy matches, another fine-tune of the same architecture does
    not); a Hub id must match a Hub-cache --base (``models--org--name``). Otherwise unchecked.
    """
    named = config.get("base_model_name_or_path")
    if not named or not isinstance(named, str):
        return "unchecked: adapter_config.json names no base_model_name_or_path"
    base_path = Path(base.path)
    given = Path(named).expanduser()
    mismatch = (
        f"adapter {path} was trained on {named!r} (base_model_name_or_path) but --base is "
        f"{base_path}"
    )
    if given.exists():
        if given.resolve() == base_path.resolve():
            return "same path"
        try:
            other = open_checkpoint(given)
        except FlSimError:
            return f"unchecked: {named} is not a checkpoint fl-sim can read"
        with other:
            return compare_weights(other, base, mismatch)
    cache = re.search(r"models--([^/]+)--([^/]+)", str(base_path.resolve()))
    if cache:
        cached = f"{cache.group(1)}/{cache.group(2)}"
        if cached != named:
            raise CheckpointError(f"{mismatch}, the Hub cache of {cached!r} (pass --base {named})")
        return "Hub id matches the cache folder of --base"
    return f"unchecked: {named!r} is not a local path"


def compare_weights(other: Checkpoint, base: Checkpoint, mismatch: str) -> str:
    names = [n for n in base if base.dtype(n).is_floating_point and n in other]
    if not names or set(other.keys()) != set(base.keys()):
        raise CheckpointError(f"{mismatch}, which has other tensors (pass the right --base)")
    by_size = sorted(names, key=lambda n: math.prod(base.shape(n)))
    for name in dict.fromkeys((by_size[0], by_size[-1])):
        if other.shape(name) != base.shape(name) or not torch.equal(
            other.get(name), base.get(name)
        ):
            raise CheckpointError(
                f"{mismatch}, whose tensor {name!r} differs (pass the right --base)"
            )
    return "same weights as base_model_name_or_path (smallest and largest tensor compared)"
