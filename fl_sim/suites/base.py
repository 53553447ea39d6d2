"""Task suites: T tasks (one per client), a shared backbone that is federated, one head per task.

As with CLIP in the paper (Tao et al., arXiv 2411.18607), every task has its own classification
head, built once from θ₀ and frozen, and only the backbone is fine-tuned and merged. So a model
is ``head_t(backbone(x))``, the federated state is the backbone's ``state_dict`` under the prefix
``backbone.``, and the heads never travel: every party rebuilds them with
``suite.build_model()``, deterministically from the suite's seed.

A suite provides ``name``, ``seed``, ``tasks`` (their data splits) and ``build_model`` (θ₀ and
the frozen heads). ``ToySuite`` is a small, fast suite for tests and teaching; the vision and text
suites follow the same interface.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.errors import CheckpointError, ConfigError

SPLITS = ("train", "val", "test")
FEDERATED_PREFIX = "backbone."
SHARED_HEAD_PREFIX = "heads.0."


@dataclass
class TaskData:
    """One task's data: disjoint train/val/test splits of inputs x and integer labels y."""

    name: str
    num_classes: int
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in SPLITS:
            raise ConfigError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, f"{split}_x"), getattr(self, f"{split}_y")

    @property
    def num_train(self) -> int:
        """n_t: the number of training examples (``weighting = "examples"``)."""
        return int(self.train_y.shape[0])


@dataclass
class TrainingGroup:
    """Part of a client's training set: examples (x, y) of task ``task_index``, scored by its
    task's head."""

    task_index: int
    x: torch.Tensor
    y: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.y.shape[0])


class MultiTaskModel(nn.Module):
    """``head_t(backbone(x))``: a federated ``backbone`` and frozen per-task ``heads``.

    After ``use_shared_head`` there is one head, trainable and federated, for every task name.
    """

    def __init__(
        self, backbone: nn.Module, heads: Sequence[nn.Module], task_names: Sequence[str]
    ) -> None:
        super().__init__()
        if len(heads) != len(task_names):
            raise ConfigError(f"got {len(heads)} heads for {len(task_names)} tasks")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.heads.requires_grad_(False)
        self.task_names = list(task_names)
        self.shared_head = False

    def use_shared_head(self, head_index: int, task_names: Sequence[str]) -> None:
        """Keep head ``head_index`` alone, trainable and federated, for all of ``task_names``."""
        head = self.heads[head_index]
        head.requires_grad_(True)
        self.heads = nn.ModuleList([head])
        self.task_names = list(task_names)
        self.shared_head = True

    def forward(self, x: torch.Tensor, task_index: int) -> torch.Tensor:
        return self.heads[0 if self.shared_head else task_index](self.backbone(x))

    def task_index(self, name: str) -> int:
        if name not in self.task_names:
            raise ConfigError(f"unknown task {name!r}; this model has {', '.join(self.task_names)}")
        return 0 if self.shared_head else self.task_names.index(name)

    def federated_modules(self) -> dict[str, nn.Module]:
        """prefix → module of what is trained and merged: the backbone (and a shared head)."""
        modules: dict[str, nn.Module] = {FEDERATED_PREFIX: self.backbone}
        if self.shared_head:
            modules[SHARED_HEAD_PREFIX] = self.heads[0]
        return modules


def federated_parameters(model: MultiTaskModel) -> list[nn.Parameter]:
    """The parameters local training moves: the federated modules' trainable ones."""
    return [
        p
        for module in model.federated_modules().values()
        for p in module.parameters()
        if p.requires_grad
    ]


def _federated_tensors(model: MultiTaskModel) -> dict[str, torch.Tensor]:
    return {
        prefix + name: tensor
        for prefix, module in model.federated_modules().items()
        for name, tensor in module.state_dict().items()
    }


def federated_state(model: MultiTaskModel) -> dict[str, torch.Tensor]:
    """The backbone's parameters and buffers, keyed ``backbone.<name>`` (and a shared head's,
    keyed ``heads.0.<name>``), detached copies."""
    return {name: tensor.detach().clone() for name, tensor in _federated_tensors(model).items()}


def load_federated_state(model: MultiTaskModel, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` (keys as ``federated_state`` gives them) into the model's backbone."""
    own = _federated_tensors(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"federated state does not fit the backbone: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]} (build both from the same suite)"
        )
    for name, tensor in own.items():
        value = state[name]
        if tuple(value.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"federated tensor {name!r} has shape {tuple(value.shape)}, "
                f"the backbone needs {tuple(tensor.shape)} (build both from the same suite)"
            )
        with torch.no_grad():
            tensor.copy_(value)


def task_loss(
    model: MultiTaskModel, task_index: int, x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """L_t on a batch: the mean cross-entropy of head ``task_index`` on (x, y)."""
    return F.cross_entropy(model(x, task_index), y)


def _loss_sums(
    model: MultiTaskModel, index: int, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, int]:
    """(Σ cross-entropy, number correct) of head ``index`` on (x, y), eval mode, without grad."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, y.shape[0], batch_size):
            logits = model(x[start : start + batch_size], index)
            target = y[start : start + batch_size]
            total_loss += float(F.cross_entropy(logits, target, reduction="sum"))
            correct += int((logits.argmax(dim=1) == target).sum())
    model.train(was_training)
    return total_loss, correct


def evaluate(
    model: MultiTaskModel, task: TaskData, split: str = "test", batch_size: int = 4096
) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` on ``task``'s ``split``, in batches, without grad."""
    x, y = task.split(split)
    total_loss, correct = _loss_sums(model, model.task_index(task.name), x, y, batch_size)
    n = max(int(y.shape[0]), 1)
    return total_loss / n, correct / n


def training_loss(
    model: MultiTaskModel, groups: Sequence[TrainingGroup], batch_size: int = 4096
) -> float:
    """The mean cross-entropy over every example of ``groups``, each scored by its task's head."""
    total = 0.0
    for group in groups:
        total += _loss_sums(model, group.task_index, group.x, group.y, batch_size)[0]
    return total / max(sum(group.size for group in groups), 1)


def batch_loss(
    model: MultiTaskModel,
    groups: Sequence[TrainingGroup],
    offsets: Sequence[int],
    index: torch.Tensor,
) -> torch.Tensor:
    """Σ_g (b_g/B) · L_{s_g}: the mean CE of the batch ``index`` of the groups' examples, numbered
    0..N−1 in group order (group g starts at ``offsets[g]``), each scored by its task's head;
    one group: exactly ``task_loss``."""
    if len(groups) == 1:
        group = groups[0]
        return task_loss(model, group.task_index, group.x[index], group.y[index])
    loss = torch.zeros(())
    for group, start in zip(groups, offsets, strict=True):
        mine = index[(index >= start) & (index < start + group.size)] - start
        if len(mine):
            share = len(mine) / len(index)
            loss = loss + share * task_loss(model, group.task_index, group.x[mine], group.y[mine])
    return loss


class TaskSuite(ABC):
    """T tasks and the model that solves them; see the module docstring."""

    name: str = ""
    seed: int = 0
    mixing: float = 0.0  # the share of every other task's training data a client also sees
    tasks: list[TaskData]

    @abstractmethod
    def build_model(self, seed: int | None = None) -> MultiTaskModel:
        """θ₀ and the frozen heads, deterministic in ``seed`` (None: the suite's own seed)."""

    @property
    def num_tasks(self) -> int:
        """T: the number of tasks, one per client."""
        return len(self.tasks)

    @property
    def eval_tasks(self) -> list[TaskData]:
        """The tasks the global model is evaluated on (the clients' own; shared-head: one)."""
        return self.tasks

    def eval_task_of(self, client: int) -> int:
        """The index in ``eval_tasks`` of client ``client``'s task."""
        return client

    def training_groups(self, client: int) -> list[TrainingGroup]:
        """Client ``client``'s training set, in task order (module docstring: ``mixing``)."""
        if self.mixing == 0.0:
            task = self.tasks[client]
            return [TrainingGroup(client, task.train_x, task.train_y)]
        from fl_sim.suites.partition import mixing_subset

        groups = []
        for s, task in enumerate(self.tasks):
            if s == client:
                groups.append(TrainingGroup(s, task.train_x, task.train_y))
                continue
            index = mixing_subset(task.num_train, self.mixing, self.seed, s)
            if len(index):
                groups.append(TrainingGroup(s, task.train_x[index], task.train_y[index]))
        return groups

    def num_examples(self, client: int) -> int:
        """n_t: the size of client ``client``'s whole training set (``weighting = "examples"``)."""
        return sum(group.size for group in self.training_groups(client))

    def initial_state(self) -> dict[str, torch.Tensor]:
        """θ₀ as a federated state: what the server starts round 1 from."""
        return federated_state(self.build_model())

    # the module functions, reachable from a suite object as well
    federated_state = staticmethod(federated_state)
    load_federated_state = staticmethod(load_federated_state)
    task_loss = staticmethod(task_loss)
    evaluate = staticmethod(evaluate)


# ---------------------------------------------------------------------------------------------
# The toy suite
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


def _digits_suite(**kwargs: object) -> TaskSuite:
    # imported on use: fl_sim.suites.digits imports this module, and transformers is slow to load
    from fl_sim.suites.digits import DigitsSuite

    return DigitsSuite(**kwargs)


def _text_suite(**kwargs: object) -> TaskSuite:
    # imported on use, as digits: fl_sim.suites.text imports this module
    from fl_sim.suites.text import TextSuite

    return TextSuite(**kwargs)


def _local_suite(**kwargs: object) -> TaskSuite:
    from fl_sim.suites.local import LocalSuite

    return LocalSuite(**kwargs)


SUITES: dict[str, Callable[..., TaskSuite]] = {
    "toy": ToySuite,
    "digits": _digits_suite,
    "text": _text_suite,
    "local": _local_suite,
}


def make_suite(name: str, *, mixing: float = 0.0, **kwargs: object) -> TaskSuite:
    """The suite registered as ``name`` ("toy", "digits", "text", "local"), built with ``kwargs``.

    The text and local suites take ``model=`` "minilm", "hf:PATH" or "clip:PATH" (a local
    folder; see fl_sim/suites/encoders.py); local takes ``paths=[one per task]``.
    ``mixing`` shares that fraction of every task's training data with every client (module
    docstring). From a run config's keys: ``fl_sim.suites.suite_config.build_suite``.
    """
    if name not in SUITES:
        raise ConfigError(f"unknown task suite {name!r}; choose one of {', '.join(SUITES)}")
    suite = SUITES[name](**kwargs)
    suite.mixing = check_mixing(mixing)
    return suite


def check_mixing(mixing: object) -> float:
    """``mixing`` as a float in [0, 1], or a one-line ConfigError."""
    if isinstance(mixing, bool) or not isinstance(mixing, (int, float)) or not 0 <= mixing <= 1:
        raise ConfigError(f"mixing must be a number in [0, 1], got {mixing!r} (set mixing=0)")
    return float(mixing)
