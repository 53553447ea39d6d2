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

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
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
        return self.head_for(task_index)(self.backbone(x))

    def head_for(self, task_index: int) -> nn.Module:
        """head_t: task ``task_index``'s head (the one head after ``use_shared_head``)."""
        return self.heads[0 if self.shared_head else task_index]

    def objective(
        self, task_index: int, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per-example (loss, score) of task ``task_index`` on (x, y) for a model whose objective
        is not its heads' cross-entropy and accuracy (the quadratic suite overrides it); None,
        the default: the cross-entropy of ``self(x, task_index)`` against y, and correctness."""
        return None

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

    def trained_parameters(self) -> list[nn.Parameter]:
        """What local training moves: the federated modules' trainable parameters (a model
        with LoRA adapters, fl_sim/suites/lora.py: the adapters)."""
        return [
            p
            for module in self.federated_modules().values()
            for p in module.parameters()
            if p.requires_grad
        ]


def federated_parameters(model: MultiTaskModel) -> list[nn.Parameter]:
    """The parameters local training moves (``MultiTaskModel.trained_parameters``)."""
    return model.trained_parameters()


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
    """L_t on a batch: the mean cross-entropy of head ``task_index`` on (x, y) (or the mean of
    the model's own ``objective``)."""
    own = model.objective(task_index, x, y)
    if own is not None:
        return own[0].mean()
    return F.cross_entropy(model(x, task_index), y)


def _loss_sums(
    model: MultiTaskModel, index: int, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, int]:
    """(Σ cross-entropy, number correct) of head ``index`` on (x, y), eval mode, without grad
    (or the sums of the model's own ``objective``: loss and score)."""
    was_training = model.training
    model.eval()
    total_loss, correct = 0.0, 0
    with torch.no_grad():
        for start in range(0, y.shape[0], batch_size):
            own = model.objective(
                index, x[start : start + batch_size], y[start : start + batch_size]
            )
            if own is not None:
                total_loss += float(own[0].sum())
                correct += float(own[1].sum())  # type: ignore[assignment]
                continue
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
