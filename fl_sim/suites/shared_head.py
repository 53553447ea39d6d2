"""Classic single-task FL: one task split over C clients, one shared head, all of it federated.

``shared-head = true`` turns any suite into this: task ``dirichlet-task`` of the base suite is
split over C = ``num-tasks`` clients by ``fl_sim.suites.partition.dirichlet_partition`` (α =
``dirichlet-alpha``; 0 = an IID equal split). Client c's ``TaskData`` is its shard of the
training split and the task's whole val and test splits. The model is the base suite's with
that task's head alone, shared by every client, trainable and federated with the backbone
(``MultiTaskModel.use_shared_head``: federated keys ``backbone.*`` and ``heads.0.*``).

The global model is evaluated on the one task (``eval_tasks``); each client's fine-tuned model
θ₀ + Δ_c is evaluated on the same whole val/test splits, so the ServerApp normalises by their
mean: normalised accuracy = acc(θ) / mean_c acc(θ₀ + Δ_c) (> 1: the federation beats the
average client training alone).
"""

from __future__ import annotations

from fl_sim.errors import ConfigError
from fl_sim.suites.base import MultiTaskModel, TaskData, TaskSuite
from fl_sim.suites.partition import dirichlet_partition


class SharedHeadSuite(TaskSuite):
    """Task ``task_index`` of ``base`` split over ``num_clients`` clients (module docstring)."""

    def __init__(
        self, base: TaskSuite, num_clients: int, *, task_index: int = 0, alpha: float = 0.0
    ) -> None:
        if not 0 <= task_index < base.num_tasks:
            raise ConfigError(
                f"dirichlet-task must be a task index < {base.num_tasks} of the {base.name} "
                f"suite, got {task_index}"
            )
        self.base_suite, self.task_index, self.alpha = base, int(task_index), float(alpha)
        self.name, self.seed = base.name, base.seed
        self.task = base.tasks[task_index]
        self.partition = dirichlet_partition(self.task.train_y, num_clients, alpha, base.seed)
        self.tasks = [
            TaskData(
                name=f"{self.task.name}@client{c}",
                num_classes=self.task.num_classes,
                train_x=self.task.train_x[index],
                train_y=self.task.train_y[index],
                val_x=self.task.val_x,
                val_y=self.task.val_y,
                test_x=self.task.test_x,
                test_y=self.task.test_y,
            )
            for c, index in enumerate(self.partition)
        ]

    @property
    def eval_tasks(self) -> list[TaskData]:
        return [self.task]

    def eval_task_of(self, client: int) -> int:
        return 0

    def build_model(self, seed: int | None = None) -> MultiTaskModel:
        model = self.base_suite.build_model(seed)
        model.use_shared_head(self.task_index, [self.task.name, *(t.name for t in self.tasks)])
        return model


__all__ = ["SharedHeadSuite"]
