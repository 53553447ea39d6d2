"""LoRA clients: any suite's model with ``peft`` LoRA adapters on the federated part's targets.

``adapter = "lora"`` (fl_sim/suites/lora_settings.py) wraps the suite: every model it builds is
the base suite's model with a LoRA layer (``peft.inject_adapter_in_model``) on each target, the
``nn.Linear`` (or transformers ``Conv1D``) modules of the *federated* part whose names end in a
``lora-target-modules`` suffix. On a target of weight W (m × n) the forward is

    W' x = W x + (α/r) · B A x,   A ∈ ℝ^{r×n},  B ∈ ℝ^{m×r}

with A₀ ~ U(−1/√n, 1/√n) (PEFT's Kaiming-uniform bound) drawn from a generator seeded with the
suite's seed, the same for every party and client, and B₀ = 0, so W'₀ = W. Only A and B train;
every other tensor of the model, federated or not, stays at θ₀. Targets are looked for inside
the federated modules only: the frozen part (and so the frozen-prefix cache of the text and
local suites, fl_sim/suites/pretrained.py) is never changed.

What is federated (``adapter-federation``):

- ``dense``: θ = the targets' weights W, keyed as without LoRA (``backbone.<module>.weight``).
  Every round the client puts a fresh adapter (A₀, B₀ = 0) over W = θʳ, trains it, and sends
  the weight-space task vector Δ_t = ΔW_t = (α/r)·B_t·A_t per target (for a Conv1D, whose
  weight is stored n × m, its transpose). A client is stateless and the server holds no
  adapter, so a fresh adapter is the only start every party agrees on; over R rounds the
  merged W moves in up to R·r directions per client. Every rule aggregates θ exactly as for
  full fine-tuning, and Task Arithmetic gives θ₀ + λ Σ_t (α/r) B_t A_t.
- ``adapter``: θ = the adapters, keyed ``backbone.<module>.lora_A.weight`` / ``.lora_B.weight``
  (PEFT's saved names), θ₀ = (A₀, 0); the client starts from the global (A, B) and sends
  Δ_t = (A_t − Aʳ, B_t − Bʳ). A rule aggregates A and B separately (FedIT, Zhang et al.,
  arXiv 2308.06522), and the global model is W₀ + (α/r)·B·A: with FedAvg weights p_t,
  (α/r)(Σ p_t B_t)(Σ p_t A_t) = Σ p_t (α/r) B_t A_t − (α/r) Σ_t p_t (B_t − B̄)(A_t − Ā),
  a bias that vanishes for T = 1 or identical clients (fl_sim/experiments/adapter_bias.py).

In round 1 both modes train the same adapters from the same (W₀, A₀, 0), so one set of client
trainings gives both merges.

Hugging Face folders (a base suite with ``save_model_folder``, the causal suite): the folder of
a state is the whole merged model (``LoraSuite.merged_state``: W, or W₀ + (α/r)·B·A), and in
adapter mode also the PEFT adapter (A, B) beside it, ``<folder>-adapter``, relative to hf/base
= W₀; so a run writes hf/base, hf/client_<t> and hf/global, each with its ``-adapter`` in
adapter mode, and ``fl-sim merge --base hf/base`` takes the client adapters directly.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fl_sim.errors import CheckpointError, ConfigError
from fl_sim.suites.base import MultiTaskModel, TaskData, TaskSuite, TrainingGroup
from fl_sim.suites.lora_settings import LoraSettings, lora_settings

ADAPTER_NAME = "default"  # PEFT's adapter name inside each LoRA layer
ADAPTER_SUFFIX = "-adapter"  # hf/<name>-adapter: the PEFT folder beside hf/<name>
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's saved key: base_model.model.<module>.lora_A.weight
LORA_HALVES = ("lora_A", "lora_B")
A_SEED_OFFSET = 7_919  # A₀'s generator: SeedSequence(seed, this, crc32 of the module name)
# the model families' attention projections, tried in order: the first whose every suffix
# names a target of the federated part is the default (PEFT uses the same per model type)
DEFAULT_TARGETS = (
    ("query", "value"),  # BERT, MiniLM
    ("q_proj", "v_proj"),  # Llama, Mistral, OPT, CLIP, ViT (vit-digits, transformers 5)
    ("c_attn",),  # GPT-2
    ("q_lin", "v_lin"),  # DistilBERT
    ("q", "v"),  # T5
    ("qkv",),  # timm-style ViTs
)


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is a dependency; a bare torch model has no Conv1D
        return None
    return Conv1D


def adaptable_modules(model: MultiTaskModel) -> dict[str, nn.Module]:
    """Full name (``backbone.<module>``) → every nn.Linear / Conv1D of the federated part."""
    kinds = tuple(k for k in (nn.Linear, _conv1d_type()) if k is not None)
    found: dict[str, nn.Module] = {}
    for prefix, module in model.federated_modules().items():
        for name, child in module.named_modules():
            if name and isinstance(child, kinds):
                found[prefix + name] = child
    return found


def _matches(name: str, suffix: str) -> bool:
    """PEFT's rule: the module's name is the suffix or ends in ``.suffix``."""
    return name == suffix or name.endswith("." + suffix)


def resolve_targets(model: MultiTaskModel, settings: LoraSettings) -> list[str]:
    """The target modules' full names, sorted; one-line errors name the available suffixes."""
    modules = adaptable_modules(model)
    available = sorted({name.rsplit(".", 1)[-1] for name in modules})
    if not modules:
        raise ConfigError(
            f"adapter=lora: the federated part of {type(model).__name__} has no nn.Linear or "
            "Conv1D module to put adapters on (use a suite with a transformer model)"
        )
    suffixes = settings.targets
    if not suffixes:
        suffixes = next(
            (f for f in DEFAULT_TARGETS if all(any(_matches(n, s) for n in modules) for s in f)),
            (),
        )
        if not suffixes:
            raise ConfigError(
                "adapter=lora: no default target modules for this model; set "
                f"lora-target-modules to some of its Linear modules: {', '.join(available)}"
            )
    for suffix in suffixes:
        if not any(_matches(name, suffix) for name in modules):
            raise ConfigError(
                f"lora-target-modules: {suffix!r} matches no Linear module of the federated part "
                f"(federated-layers); its Linear modules end in: {', '.join(available)}"
            )
    return sorted(name for name in modules if any(_matches(name, s) for s in suffixes))


def initial_a(shape: tuple[int, int], seed: int, name: str) -> torch.Tensor:
    """A₀ of target ``name``: U(−1/√n, 1/√n), n = shape[1], from (seed, name) alone."""
    entropy = [int(seed), A_SEED_OFFSET, zlib.crc32(name.encode())]
    generator = torch.Generator().manual_seed(
        int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])
    )
    bound = 1.0 / shape[1] ** 0.5
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).float()


def lora_delta(
    a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool
) -> torch.Tensor:
    """ΔW = (α/r)·B·A, shaped as the base weight (fan_in_fan_out, a Conv1D: transposed), in the
    dtype of A and B: what PEFT's ``get_delta_weight`` adds in ``merge_and_unload``."""
    product = scaling * (b @ a)
    return product.T if fan_in_fan_out else product


def delta_weight(layer: nn.Module, scaling: float) -> torch.Tensor:
    """ΔW = (α/r)·B·A of a LoRA layer, shaped as its base weight (Conv1D: transposed)."""
    a = layer.lora_A[ADAPTER_NAME].weight.detach()
    b = layer.lora_B[ADAPTER_NAME].weight.detach()
    return lora_delta(a, b, scaling, bool(getattr(layer, "fan_in_fan_out", False)))


def _register(root: nn.Module, path: str, leaf: str, parameter: nn.Parameter) -> None:
    """``parameter`` (shared, not copied) at ``<path>.<leaf>`` in the tree of ``root``."""
    parent = root
    for part in path.split("."):
        if part not in parent._modules:
            parent.add_module(part, nn.Module())
        parent = parent._modules[part]  # type: ignore[assignment]
    parent.register_parameter(leaf, parameter)


class LoraTaskModel(MultiTaskModel):
    """The base suite's model ``inner`` with LoRA adapters on its targets (module docstring).

    ``federated_state`` is the targets' weights (dense) or their A and B (adapter), held by a
    view that shares the tensors; ``state_dict()`` is the inner model's, adapters included.
    """

    def __init__(self, inner: MultiTaskModel, settings: LoraSettings, seed: int) -> None:
        nn.Module.__init__(self)  # the inner model holds backbone and heads
        from peft import LoraConfig, inject_adapter_in_model

        self.inner = inner
        self.settings = settings
        names = resolve_targets(inner, settings)
        conv1d = _conv1d_type()
        modules = adaptable_modules(inner)
        for prefix, module in inner.federated_modules().items():
            mine = [name[len(prefix) :] for name in names if name.startswith(prefix)]
            if not mine:
                module.requires_grad_(False)
                continue
            config = LoraConfig(
                r=settings.rank,
                lora_alpha=settings.alpha,
                lora_dropout=settings.dropout,
                target_modules=mine,
                fan_in_fan_out=conv1d is not None and isinstance(modules[prefix + mine[0]], conv1d),
                bias="none",
            )
            inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
        self.layers: dict[str, nn.Module] = {}
        for name in names:
            prefix = next(p for p in inner.federated_modules() if name.startswith(p))
            layer = inner.federated_modules()[prefix].get_submodule(name[len(prefix) :])
            with torch.no_grad():
                a = layer.lora_A[ADAPTER_NAME].weight
                a.copy_(initial_a(tuple(a.shape), seed, name))
                layer.lora_B[ADAPTER_NAME].weight.zero_()
            self.layers[name] = layer
        view = nn.Module()
        for name, layer in self.layers.items():
            if settings.federation == "dense":
                _register(view, name, "weight", layer.base_layer.weight)
            else:
                _register(view, f"{name}.lora_A", "weight", layer.lora_A[ADAPTER_NAME].weight)
                _register(view, f"{name}.lora_B", "weight", layer.lora_B[ADAPTER_NAME].weight)
        self.__dict__["_federated_view"] = view  # not a child: state_dict stays the inner's

    @property
    def task_names(self) -> list[str]:  # type: ignore[override]
        return self.inner.task_names

    @property
    def shared_head(self) -> bool:  # type: ignore[override]
        return self.inner.shared_head

    def forward(self, x: torch.Tensor, task_index: int) -> torch.Tensor:
        return self.inner(x, task_index)

    def objective(
        self, task_index: int, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        return self.inner.objective(task_index, x, y)

    def task_index(self, name: str) -> int:
        return self.inner.task_index(name)

    def train(self, mode: bool = True) -> LoraTaskModel:
        super().train(mode)
        for layer in self.layers.values():  # an encoder kept in eval mode still drops out here
            layer.lora_dropout.train(mode)
        return self

    def federated_modules(self) -> dict[str, nn.Module]:
        """One view whose tensors are the federated state, keyed with their full names."""
        return {"": self._federated_view}

    def trained_parameters(self) -> list[nn.Parameter]:
        """A and B of every target, in name order: all that local training moves."""
        return [
            p
            for layer in self.layers.values()
            for p in (layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight)
        ]

    def client_update(self, theta_r: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Δ_t after training from θʳ: dense, ΔW = (α/r)·B_t·A_t per target (B₀ = 0); adapter,
        (A_t − Aʳ, B_t − Bʳ)."""
        if self.settings.federation == "dense":
            return {
                f"{name}.weight": delta_weight(layer, self.settings.scaling)
                for name, layer in self.layers.items()
            }
        state = {name: t.detach() for name, t in self._federated_view.state_dict().items()}
        return {name: state[name] - theta_r[name] for name in theta_r}


@dataclass(frozen=True)
class TargetSize:
    """One target module of weight m × n: what a round sends per client in each mode."""

    name: str
    out_features: int  # m
    in_features: int  # n

    def adapter_parameters(self, rank: int) -> int:
        return rank * (self.out_features + self.in_features)  # r·(m + n)

    @property
    def dense_parameters(self) -> int:
        return self.out_features * self.in_features  # m·n


class LoraSuite(TaskSuite):
    """``base`` whose every model carries LoRA adapters (module docstring); data, tasks and
    heads are the base suite's."""

    def __init__(self, base: TaskSuite, settings: LoraSettings) -> None:
        self.base_suite = base
        self.settings = settings
        self.name, self.seed, self.tasks = base.name, base.seed, base.tasks
        model = self.build_model()  # the model-dependent checks (targets) fail here, at once
        # target full name → whether its weight is stored n × m (Conv1D: fan_in_fan_out)
        self.fan_in_fan_out = {
            name: bool(getattr(layer, "fan_in_fan_out", False))
            for name, layer in model.layers.items()
        }

    @property
    def mixing(self) -> float:  # type: ignore[override]
        return self.base_suite.mixing

    @mixing.setter
    def mixing(self, value: float) -> None:
        self.base_suite.mixing = value

    @property
    def eval_tasks(self) -> list[TaskData]:
        return self.base_suite.eval_tasks

    def eval_task_of(self, client: int) -> int:
        return self.base_suite.eval_task_of(client)

    def training_groups(self, client: int) -> list[TrainingGroup]:
        return self.base_suite.training_groups(client)

    def build_model(self, seed: int | None = None) -> LoraTaskModel:
        return LoraTaskModel(self.base_suite.build_model(seed), self.settings, self.seed)

    def target_sizes(self) -> list[TargetSize]:
        """Every target module and its weight's shape (m, n), in name order."""
        model = self.build_model()
        sizes = []
        for name, layer in model.layers.items():
            out_features, in_features = (
                layer.lora_B[ADAPTER_NAME].weight.shape[0],
                layer.lora_A[ADAPTER_NAME].weight.shape[1],
            )
            sizes.append(TargetSize(name, int(out_features), int(in_features)))
        return sizes

    def adapter_report(self) -> dict[str, object]:
        """For results.json: the settings, the targets, and the bytes a client sends per round
        in each mode, from the update's actual tensors (the federated state's) and the other
        mode's shapes: r·(m+n) against m·n values per target, and full fine-tuning's."""
        state = self.initial_state()
        sent = sum(t.numel() * t.element_size() for t in state.values())
        itemsize = next(iter(state.values())).element_size()
        sizes = self.target_sizes()
        rank = self.settings.rank
        adapter = sum(s.adapter_parameters(rank) for s in sizes) * itemsize
        dense = sum(s.dense_parameters for s in sizes) * itemsize
        full = sum(t.numel() * t.element_size() for t in self.base_suite.initial_state().values())
        return {
            "adapter": "lora",
            "federation": self.settings.federation,
            "rank": rank,
            "alpha": self.settings.alpha,
            "scaling": self.settings.scaling,
            "dropout": self.settings.dropout,
            "targets": [
                {
                    "module": s.name,
                    "shape": [s.out_features, s.in_features],
                    "adapter_values": s.adapter_parameters(rank),
                    "dense_values": s.dense_parameters,
                }
                for s in sizes
            ],
            "bytes_per_client_round": sent,
            "bytes_per_client_round_by_mode": {
                "adapter": adapter,
                "dense": dense,
                "full_fine_tuning": full,
            },
        }

    def metadata(self) -> dict[str, object]:
        own = getattr(self.base_suite, "metadata", None)
        return {**(own() if own is not None else {}), "lora": self.adapter_report()}

    # -- Hugging Face folders (a base suite that writes them: the causal suite) ---------------

    @property
    def save_model_folder(self) -> Callable[..., Path]:
        """``write_model_folders`` where the base suite has ``save_model_folder``; elsewhere an
        AttributeError, so ``getattr(suite, "save_model_folder", None)`` (the recorder's check)
        is None and the suite writes no folders, as without LoRA."""
        if getattr(self.base_suite, "save_model_folder", None) is None:
            raise AttributeError(f"{type(self.base_suite).__name__} writes no model folders")
        return self.write_model_folders

    def merged_state(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The base suite's federated state of the model that LoRA state ``state`` is: θ₀ (fresh
        copies; the suite's cached θ₀ is never changed) with each target's weight replaced by

            dense:    W                      (the state holds W = W₀ + Σ of the merged ΔW)
            adapter:  W₀ + (α/r) · B · A     (Conv1D: its transpose), PEFT's merge_and_unload

        so the base model at this state computes what the LoRA model does."""
        self._check_state(state)
        full = self.base_suite.initial_state()
        for name, fan_in_fan_out in self.fan_in_fan_out.items():
            key = f"{name}.weight"
            if key not in full:
                raise CheckpointError(
                    f"LoRA target {name!r} has no weight {key!r} in the base suite's federated "
                    "state (a tied weight?); leave that module out of lora-target-modules"
                )
            if self.settings.federation == "dense":
                full[key] = state[key].detach().clone()
                continue
            delta = lora_delta(
                state[f"{name}.lora_A.weight"].detach(),
                state[f"{name}.lora_B.weight"].detach(),
                self.settings.scaling,
                fan_in_fan_out,
            )
            if tuple(delta.shape) != tuple(full[key].shape):
                raise CheckpointError(
                    f"LoRA target {name!r}: (α/r)·B·A has shape {tuple(delta.shape)}, its weight "
                    f"{tuple(full[key].shape)} (build the state and the suite from the same keys)"
                )
            full[key] = full[key] + delta.to(full[key].dtype)
        return full

    def _check_state(self, state: Mapping[str, torch.Tensor]) -> None:
        own = set(self.state_keys())
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            raise CheckpointError(
                f"LoRA state does not fit adapter-federation={self.settings.federation}: missing "
                f"{missing[:3]}, unexpected {unexpected[:3]} (build both from the same suite keys)"
            )

    def state_keys(self) -> list[str]:
        """The federated state's names: ``<target>.weight`` (dense) or ``.lora_A.weight`` and
        ``.lora_B.weight`` (adapter) of every target."""
        if self.settings.federation == "dense":
            return [f"{name}.weight" for name in self.fan_in_fan_out]
        return [f"{name}.{half}.weight" for name in self.fan_in_fan_out for half in LORA_HALVES]

    def write_model_folders(
        self,
        state: Mapping[str, torch.Tensor],
        folder: str | os.PathLike,
        *,
        force: bool = False,
        base_folder: str | os.PathLike | None = None,
    ) -> Path:
        """``folder``: the whole model at LoRA state ``state`` (``merged_state``), written by the
        base suite's ``save_model_folder`` (a Hugging Face folder that
        ``AutoModelForCausalLM.from_pretrained`` loads). Adapter mode also writes the PEFT
        adapter (A, B) of the state as ``<folder>-adapter`` (``write_adapter_folder``), relative
        to ``base_folder`` (default: the sibling ``base``, the recorder's hf/base = W₀): since
        B₀ = 0, θ₀ + Δ_t of a client is the adapter (A_t, B_t) with ΔW_t = (α/r)·B_t·A_t, and
        the global (Ā, B̄) gives W₀ + (α/r)·B̄·Ā, which is what ``folder`` holds.

        Dense mode writes no adapter: the state holds W itself and the server never sees A and
        B (each client's fresh adapter stays on the client; the merged ΔW has rank up to T·r
        per round): ``fl-sim merge --to-adapter --rank r`` cuts a folder's ΔW into one."""
        folder = Path(folder)
        adapter = adapter_folder(folder)
        if self.settings.federation == "adapter" and not force and adapter.exists():
            raise ConfigError(
                f"output {adapter} already exists (pass a new path, or --force to replace it)"
            )
        self.base_suite.save_model_folder(self.merged_state(state), folder, force=force)  # type: ignore[attr-defined]
        if self.settings.federation == "adapter":
            base = Path(base_folder) if base_folder is not None else folder.parent / "base"
            self.write_adapter_folder(state, adapter, base_folder=base, force=force)
        return folder

    def write_adapter_folder(
        self,
        state: Mapping[str, torch.Tensor],
        folder: str | os.PathLike,
        *,
        base_folder: str | os.PathLike,
        force: bool = False,
    ) -> Path:
        """The adapter-mode state (A, B per target) as a PEFT LoRA folder, atomically:
        adapter_config.json (peft_type LORA, r, lora_alpha, lora_dropout, the targets' module
        paths, fan_in_fan_out, bias none, base_model_name_or_path = ``base_folder`` made
        absolute) and adapter_model.safetensors keyed as PEFT saves them,
        ``base_model.model.<module>.lora_A.weight``, <module> the target's name in the base
        suite's folder (``folder_name``). ``PeftModel.from_pretrained(base, folder)`` is then
        the LoRA model, and ``merge_and_unload()`` the full folder of the same state."""
        from peft import LoraConfig
        from safetensors.torch import save_file

        from fl_sim.checkpoints.model_checkpoint import atomic_output

        if self.settings.federation != "adapter":
            raise ConfigError(
                "a PEFT adapter folder needs adapter-federation=adapter: in dense mode the state "
                "holds W, not A and B (cut ΔW with fl-sim merge --to-adapter instead)"
            )
        self._check_state(state)
        folder_name = getattr(self.base_suite, "folder_name", None)
        if folder_name is None:
            raise ConfigError(
                f"suite {self.name} has no Hugging Face names for its federated modules, so "
                "its LoRA adapters cannot be saved as a PEFT folder"
            )
        kinds = set(self.fan_in_fan_out.values())
        if len(kinds) > 1:
            raise ConfigError(
                "lora-target-modules mixes Linear and Conv1D modules, which one "
                "adapter_config.json (fan_in_fan_out) cannot describe: target one kind"
            )
        modules = {name: folder_name(name) for name in self.fan_in_fan_out}
        tensors = {
            f"{PEFT_PREFIX}{module}.{half}.weight": state[f"{name}.{half}.weight"]
            .detach()
            .clone()
            .contiguous()
            for name, module in modules.items()
            for half in LORA_HALVES
        }
        config = LoraConfig(
            r=self.settings.rank,
            lora_alpha=self.settings.alpha,
            lora_dropout=self.settings.dropout,
            target_modules=sorted(modules.values()),  # full paths: exactly these modules
            fan_in_fan_out=kinds == {True},
            bias="none",
            task_type=getattr(self.base_suite, "peft_task_type", None),
            base_model_name_or_path=str(Path(base_folder).resolve()),
        )
        with atomic_output(folder, is_dir=True, force=force) as temp:
            config.save_pretrained(str(temp))
            save_file(tensors, str(temp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        return Path(folder)


def adapter_folder(folder: str | os.PathLike) -> Path:
    """Where ``write_model_folders`` puts the PEFT adapter of ``folder``: ``<folder>-adapter``."""
    folder = Path(folder)
    return folder.with_name(f"{folder.name}{ADAPTER_SUFFIX}")


def lora_suite(base: TaskSuite, config: Mapping[str, object]) -> TaskSuite:
    """``base`` with the LoRA adapters of the suite keys ``config``; ``base`` itself without."""
    settings = lora_settings(config)
    return base if settings is None else LoraSuite(base, settings)


__all__ = [
    "ADAPTER_SUFFIX",
    "DEFAULT_TARGETS",
    "LoraSuite",
    "LoraTaskModel",
    "TargetSize",
    "adaptable_modules",
    "adapter_folder",
    "delta_weight",
    "initial_a",
    "lora_delta",
    "lora_suite",
    "resolve_targets",
]
