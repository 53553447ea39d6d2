"""A client's round: fine-tune the backbone on its task from θʳ and return Δ_t = θ_t − θʳ.

    for k = 0..K_t−1:   θ ← optimizer step on L_t(batch_k) with learning rate η_t⁽ᵏ⁾

with the schedule's η_t⁽ᵏ⁾ (clients/schedules.py), the client's optimizer, and minibatches drawn
without replacement from shuffled epochs of the client's training set by a torch.Generator seeded
from (knobs.seed, round_index). Same inputs give a bit-identical Δ_t on the CPU (the caller fixes
the number of torch threads; a text model's steps run their length pieces on the cores the machine
leaves free, with the very same floats: fl_sim/suites/piece_lanes.py). The heads are frozen;
only the backbone moves (and, with a shared head, that head: ``federated_parameters``). With LoRA
adapters (``adapter = "lora"``, fl_sim/suites/lora.py) only the adapters A, B move, and Δ_t is
ΔW_t = (α/r)·B_t·A_t per target (``adapter-federation = "dense"``) or (A_t − Aʳ, B_t − Bʳ)
(``"adapter"``); the minibatches and LoRA dropout (torch's global RNG, seeded here and restored
after) are seeded as above.

The training set is the suite's ``training_groups(t)``: groups (s, x, y) of task s's examples
(only (t, train split) unless ``mixing`` > 0), N = Σ_g n_g examples in all, numbered 0..N−1 in
group order. A batch is B indices drawn as above from 0..N−1, so each group's share of a batch
is n_g/N in expectation (exactly, summed over an epoch), and its loss is

    L(batch) = Σ_g (b_g / B) · mean CE of head s_g on the batch's b_g examples of group g

i.e. the batch's mean cross-entropy, every example scored by its own task's head. With one
group this is L_t(batch) itself, computed exactly as before the groups existed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from clients.a_norm import a_norm_of
from clients.knobs import TrainingKnobs
from clients.schedules import learning_rates
from fl_sim.suites.base import (
    MultiTaskModel,
    TaskSuite,
    batch_loss,
    federated_parameters,
    federated_state,
    load_federated_state,
    training_loss,
)
from fl_sim.suites.lora import LoraTaskModel
from fl_sim.suites.piece_lanes import PieceLanes


@dataclass
class LocalResult:
    """What a client reports: Δ_t and the figures FedNova and the results need."""

    update: dict[str, torch.Tensor]  # Δ_t = θ_t − θʳ on federated_state keys
    num_examples: int  # n_t
    local_steps: int  # K_t
    learning_rates: list[float]  # η_t⁽⁰⁾..η_t⁽ᴷᵗ⁻¹⁾
    a_norm_steps: float  # ‖a_t‖₁ with a-norm = "steps" (= K_t)
    a_norm_lr_sum: float  # ‖a_t‖₁ with a-norm = "lr-sum"
    a_norm_exact: bool  # False for AdamW (lr-sum is then an approximation)
    loss_before: float  # L_t on the whole training set at θʳ
    loss_after: float  # ... and at θ_t

    def metrics(self) -> dict[str, int | float | bool]:
        """The scalar figures, flat, with the kebab-case names the results use."""
        return {
            "num-examples": self.num_examples,
            "local-steps": self.local_steps,
            "a-norm-steps": self.a_norm_steps,
            "a-norm-lr-sum": self.a_norm_lr_sum,
            "a-norm-exact": self.a_norm_exact,
            "loss-before": self.loss_before,
            "loss-after": self.loss_after,
        }


def generator_seed(seed: int, round_index: int) -> int:
    """The minibatch generator's seed: (seed, round) mixed by NumPy's SeedSequence (portable)."""
    return int(np.random.SeedSequence([int(seed), int(round_index)]).generate_state(1)[0])


def make_optimizer(knobs: TrainingKnobs, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if knobs.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=knobs.lr, weight_decay=knobs.weight_decay)
    momentum = knobs.momentum if knobs.optimizer == "sgd-momentum" else 0.0
    return torch.optim.SGD(params, lr=knobs.lr, momentum=momentum, weight_decay=knobs.weight_decay)


def minibatches(
    num_examples: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Index batches from shuffled epochs, forever; the whole split when it fits in one batch."""
    if batch_size >= num_examples:
        everything = torch.arange(num_examples)
        while True:
            yield everything
    while True:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def fine_tune(
    suite: TaskSuite,
    task_index: int,
    global_state: Mapping[str, torch.Tensor],
    knobs: TrainingKnobs,
    *,
    full_batch: bool = False,
    round_index: int = 0,
) -> LocalResult:
    """Client ``task_index``'s local training from θʳ = ``global_state``; see the module doc.

    ``round_index`` is the round r, numbered from 1 as Flower's ``server_round`` (the reference
    loop numbers rounds the same way); it is mixed into the minibatch seed so rounds differ
    reproducibly. ``full_batch`` uses the whole training set at every step.
    """
    groups = suite.training_groups(task_index)
    offsets = np.cumsum([0] + [group.size for group in groups])[:-1].tolist()
    num_examples = sum(group.size for group in groups)
    model: MultiTaskModel = suite.build_model(suite.seed)
    load_federated_state(model, global_state)
    theta_r = federated_state(model)
    model.train()
    loss_before = training_loss(model, groups)

    etas = learning_rates(knobs.schedule, knobs.lr, knobs.local_steps, knobs.warmup_steps)
    # a text model's length pieces, and its optimizer's step, on the cores the machine leaves
    # free: the same gradients and the same update
    lanes = PieceLanes(model) if PieceLanes.applies(model, groups) else None
    if lanes is not None:
        optimizer = lanes.optimizer(lambda params: make_optimizer(knobs, params))
    else:
        optimizer = make_optimizer(knobs, federated_parameters(model))
    generator = torch.Generator().manual_seed(generator_seed(knobs.seed, round_index))
    batch_size = num_examples if full_batch else knobs.batch_size
    batches = minibatches(num_examples, batch_size, generator)
    closing = contextlib.closing(lanes) if lanes is not None else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]), closing:
        torch.manual_seed(generator_seed(knobs.seed, round_index))  # LoRA dropout: global RNG
        for eta in etas:
            for group in optimizer.param_groups:
                group["lr"] = eta
            index = next(batches)
            optimizer.zero_grad(set_to_none=True)
            if lanes is not None:
                lanes.backward(groups[0].task_index, groups[0].x[index], groups[0].y[index])
            else:
                batch_loss(model, groups, offsets, index).backward()
            optimizer.step()

    if isinstance(model, LoraTaskModel):  # dense: ΔW = (α/r)·B·A; adapter: ΔA, ΔB
        update = model.client_update(theta_r)
    else:
        theta_t = federated_state(model)
        # integer buffers are carried as values: the engine copies them, checks them unchanged
        update = {
            name: (theta_t[name] - theta_r[name])
            if theta_r[name].is_floating_point()
            else theta_t[name]
            for name in theta_r
        }
    lr_sum = a_norm_of("lr-sum", etas, knobs.optimizer, knobs.momentum)
    return LocalResult(
        update=update,
        num_examples=num_examples,
        local_steps=knobs.local_steps,
        learning_rates=etas,
        a_norm_steps=float(knobs.local_steps),
        a_norm_lr_sum=lr_sum.value,
        a_norm_exact=lr_sum.exact,
        loss_before=loss_before,
        loss_after=training_loss(model, groups),
    )
