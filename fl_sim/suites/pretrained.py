"""A task suite whose backbone is a pre-trained encoder from a local folder (text or images).

The shared machinery of the ``text`` and ``local`` suites: raw inputs are prepared once (texts
tokenized, images resized and normalised) and kept in memory; θ₀ is loaded once per suite and
copied for every ``build_model``; the heads are built once from θ₀ and frozen:

- CLIP (``clip:PATH``) on images: zero-shot heads from the class names (the paper's setting);
- every other encoder: a linear probe per task, fitted in closed form on θ₀'s features
  (``encoders.probe_head``) of the task's ``head`` examples, which no client trains
  on: a probe fitted on the training split would already fit it almost perfectly and leave
  fine-tuning little to learn. A task without head examples falls back to its training split.

θ₀ is the checkpoint, so ``build_model``'s seed changes nothing here. See
``fl_sim/suites/encoders.py`` for model specs and what ``federated_layers`` federates.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fl_sim.errors import ConfigError
from fl_sim.suites.base import SPLITS, TaskData, TaskSuite
from fl_sim.suites.encoders import (
    PretrainedModel,
    PretrainedTaskModel,
    federated_module_names,
    probe_head,
    zero_shot_head,
)


@dataclass
class RawTask:
    """One task before preparation: inputs (texts or images) and integer labels per split.

    Splits are "train", "val", "test" and optionally "head" (examples only the probe sees).
    """

    name: str
    classes: tuple[str, ...]
    inputs: dict[str, list]
    labels: dict[str, list[int]]


def default_federated_layers(model: PretrainedModel) -> int | str:
    """CLIP: the whole image encoder, as in the paper; others: the top 2 layers (CPU budget)."""
    return "all" if model.spec.kind == "clip" else 2


def chance_accuracy(labels: torch.Tensor, num_classes: int) -> float:
    """The majority class's share of ``labels``: what a constant guess scores."""
    if len(labels) == 0:
        return math.nan
    return float(torch.bincount(labels, minlength=num_classes).max()) / len(labels)


class PretrainedSuite(TaskSuite):
    """Tasks over raw inputs with a pre-trained encoder as the federated backbone."""

    def __init__(
        self,
        model: PretrainedModel,
        raw_tasks: Sequence[RawTask],
        *,
        federated_layers: int | str | None = None,
        seed: int = 0,
    ) -> None:
        if not raw_tasks:
            raise ConfigError(f"suite {self.name!r} has no tasks")
        self.pretrained = model
        self.seed = int(seed)
        self.federated_layers = (
            default_federated_layers(model) if federated_layers is None else federated_layers
        )
        self.federated_names = federated_module_names(model.encoder, self.federated_layers)
        self.class_names = [task.classes for task in raw_tasks]
        self.tasks = []
        self._head_data: list[tuple[torch.Tensor, torch.Tensor]] = []  # what the probes fit
        self.head_sizes: list[int] = []  # 0: the probe fits the training split
        for task in raw_tasks:
            splits = {}
            for split in SPLITS:
                if not task.labels[split]:
                    raise ConfigError(
                        f"task {task.name!r} has no {split} examples (give more data)"
                    )
                splits[f"{split}_x"] = model.prepare(task.inputs[split])
                splits[f"{split}_y"] = torch.tensor(task.labels[split], dtype=torch.int64)
            self.tasks.append(TaskData(task.name, len(task.classes), **splits))
            if task.labels.get("head") and model.class_weights is None:
                head_y = torch.tensor(task.labels["head"], dtype=torch.int64)
                self._head_data.append((model.prepare(task.inputs["head"]), head_y))
                self.head_sizes.append(len(head_y))
            else:
                self._head_data.append((splits["train_x"], splits["train_y"]))
                self.head_sizes.append(0)
        self._heads: list[nn.Linear] | None = None

    @property
    def uses_zero_shot_heads(self) -> bool:
        return self.pretrained.class_weights is not None

    def heads(self) -> list[nn.Linear]:
        """Task t's frozen head, built once from θ₀ (module docstring)."""
        if self._heads is None:
            if self.pretrained.class_weights is not None:
                self._heads = []
                for task, names in zip(self.tasks, self.class_names, strict=True):
                    weights = self.pretrained.class_weights(names)
                    if len(torch.unique(weights, dim=0)) < len(names):
                        raise ConfigError(
                            f"task {task.name!r}: the class names {', '.join(names)} give "
                            "identical zero-shot heads (the tokenizer cannot tell them apart; "
                            "use words it knows as labels)"
                        )
                    self._heads.append(zero_shot_head(weights))
            else:
                encoder = self.pretrained.encoder.eval()
                with torch.no_grad():
                    self._heads = [
                        probe_head(encoder(x), y, task.num_classes)
                        for (x, y), task in zip(self._head_data, self.tasks, strict=True)
                    ]
        return self._heads

    def build_model(self, seed: int | None = None) -> PretrainedTaskModel:
        heads = [copy.deepcopy(head) for head in self.heads()]
        return PretrainedTaskModel(
            self.pretrained.fresh_encoder(),
            self.federated_names,
            heads,
            [task.name for task in self.tasks],
        )

    def metadata(self) -> dict[str, object]:
        """What this suite is: model, federated part, and per-task sizes and chance levels."""
        model = self.build_model()
        federated = sum(t.numel() for t in model.backbone.state_dict().values())
        return {
            "suite": self.name,
            "seed": self.seed,
            "model": str(self.pretrained.spec),
            "modality": self.pretrained.modality,
            "federated-layers": self.federated_layers,
            "federated-modules": list(self.federated_names),
            "federated-parameters": federated,
            "encoder-parameters": sum(p.numel() for p in model.encoder.parameters()),
            "heads": "zero-shot" if self.uses_zero_shot_heads else "ridge-probe",
            "tasks": {
                task.name: {
                    "classes": list(names),
                    "num-head": head_size,
                    **{f"num-{split}": int(task.split(split)[1].shape[0]) for split in SPLITS},
                    "chance-test": chance_accuracy(task.test_y, task.num_classes),
                }
                for task, names, head_size in zip(
                    self.tasks, self.class_names, self.head_sizes, strict=True
                )
            },
        }
