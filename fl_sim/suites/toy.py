"""The ``toy`` suite: small, fast Gaussian tasks with conflicting teachers (tests, teaching)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.errors import ConfigError
from fl_sim.suites.base import (
    SPLITS,
    MultiTaskModel,
    TaskData,
    TaskSuite,
)

# ---------------------------------------------------------------------------------------------


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """An nn.Linear whose init does not touch the global RNG (we fill it from a Generator)."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features)


class ToySuite(TaskSuite):
    """Gaussian inputs; task t labels x by its own random teacher, so the tasks conflict.

    - x ~ N(0, I_dim); task t's label is argmax_c (x W_t)_c for its own random teacher
      W_t (dim × ``num_classes``, standard normal), so tasks pull the backbone different ways.
      Everything is drawn from one Generator seeded with ``seed``.
    - Splits: ``examples_per_task`` training examples (an int, or one per task), and half as
      many (at least 32) for validation and for test, each drawn independently.
    - Backbone: Linear(dim, hidden) → tanh → Linear(hidden, hidden) → tanh, initialised from
      ``build_model``'s seed (N(0, 1/fan_in) weights, zero biases): θ₀ is this seeded init.
    - Head t: a ridge least-squares probe from θ₀'s features of task t's training split to its
      one-hot labels, times ``logit_scale`` (as CLIP's zero-shot heads are scaled), frozen.
      θ₀ is therefore a fair but imperfect start and fine-tuning the backbone clearly helps.
    """

    name = "toy"

    def __init__(
        self,
        num_tasks: int = 4,
        dim: int = 16,
        hidden: int = 32,
        examples_per_task: int | Sequence[int] = 256,
        seed: int = 0,
        num_classes: int = 3,
        logit_scale: float = 4.0,
    ) -> None:
        if num_tasks < 1 or dim < 1 or hidden < 1 or num_classes < 2:
            raise ConfigError(
                f"toy suite needs num_tasks, dim, hidden ≥ 1 and num_classes ≥ 2, got "
                f"{num_tasks}, {dim}, {hidden}, {num_classes}"
            )
        sizes = (
            [int(examples_per_task)] * num_tasks
            if isinstance(examples_per_task, int)
            else [int(n) for n in examples_per_task]
        )
        if len(sizes) != num_tasks or min(sizes) < 1:
            raise ConfigError(
                f"examples-per-task: need one size ≥ 1 per task ({num_tasks}), got {sizes}"
            )
        self.dim, self.hidden, self.seed = dim, hidden, int(seed)
        self.logit_scale = float(logit_scale)
        g = torch.Generator().manual_seed(self.seed)
        self.tasks = []
        for t, n in enumerate(sizes):
            teacher = torch.randn(dim, num_classes, generator=g)
            splits = {}
            for split, size in zip(SPLITS, (n, max(n // 2, 32), max(n // 2, 32)), strict=True):
                x = torch.randn(size, dim, generator=g)
                splits[f"{split}_x"] = x
                splits[f"{split}_y"] = (x @ teacher).argmax(dim=1)
            self.tasks.append(TaskData(name=f"toy{t}", num_classes=num_classes, **splits))
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def _modules(self) -> MultiTaskModel:
        backbone = nn.Sequential(
            _linear(self.dim, self.hidden), nn.Tanh(), _linear(self.hidden, self.hidden), nn.Tanh()
        )
        heads = [_linear(self.hidden, task.num_classes) for task in self.tasks]
        return MultiTaskModel(backbone, heads, [task.name for task in self.tasks])

    def _pretrained_state(self, seed: int) -> dict[str, torch.Tensor]:
        if seed in self._cache:
            return self._cache[seed]
        model = self._modules()
        g = torch.Generator().manual_seed(1_000_003 + seed)
        with torch.no_grad():
            for layer in (model.backbone[0], model.backbone[2]):
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
                layer.weight.div_(math.sqrt(layer.in_features))
                layer.bias.zero_()
            for head, task in zip(model.heads, self.tasks, strict=True):
                features = model.backbone(task.train_x).double()
                features = torch.cat(
                    [features, torch.ones(len(features), 1, dtype=features.dtype)], 1
                )
                targets = F.one_hot(task.train_y, task.num_classes).double()
                ridge = 1e-2 * len(features) * torch.eye(features.shape[1], dtype=torch.float64)
                probe = torch.linalg.solve(features.T @ features + ridge, features.T @ targets)
                head.weight.copy_(self.logit_scale * probe[:-1].T)
                head.bias.copy_(self.logit_scale * probe[-1])
        self._cache[seed] = {k: v.clone() for k, v in model.state_dict().items()}
        return self._cache[seed]

    def build_model(self, seed: int | None = None) -> MultiTaskModel:
        model = self._modules()
        model.load_state_dict(self._pretrained_state(self.seed if seed is None else int(seed)))
        return model
