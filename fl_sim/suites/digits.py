"""The ``digits`` suite: eight conflicting vision tasks on scikit-learn's digits, and vit-digits.

Tasks (fl_sim/suites/digits_data.py for the transforms and the exact splits), in order:

    identity-digit (10)  rot90-parity (2)  invert-mod3 (3)  hflip-ge5 (2)
    noise-prime (2)      quadrants-digit (10)  transpose-mod4 (4)  blur-pairs (5)

``num_tasks = k`` keeps the first k. Each task reads the same 649 / 179 / 251 train / val / test
source images of the task pool (by the suite's seed) through its own domain transform and label
function; the 718-image pre-training pool is disjoint from all of them.

Model: the backbone is the vit-digits encoder (fl_sim/suites/vit_digits.py) at θ₀, pre-trained by
fl-sim and cached; ``build_model(seed)`` pre-trains with that seed. Heads, frozen:

- ``heads = "zero-shot"`` (default), CLIP's recipe: class c of task t is embedded as the
  normalised mean of the unit digit prototypes w_d of its digits {d : label_t(d) = c}, and
  head_t = s · E_t (no bias), s = ``spec.logit_scale``. No task data is used.
- ``heads = "probe"``: a ridge least-squares probe (``probe_head``) on θ₀'s features of the
  task's training split to its one-hot labels, times s (as the toy suite's heads).

Measured (seed 0, default spec, CPU, one thread on a busy 2-core box; AdamW lr 1e-4, 200 local
steps, batch 32): pre-training 10–15 s (150 steps), once per cache; fine-tuning ≈ 17 ms a step
plus ≈ 0.45 s per client for building the model and the loss before/after, so ≈ 4 s a client.
Test accuracy per task, in the order above, then the mean:

    θ₀, zero-shot heads:      .77 .58 .61 .44 .77 .58 .43 .54   .589
    θ₀, ridge linear probe:   .87 .85 .76 .85 .83 .82 .82 .83   .827
    fine-tuned on own task:   .90 .94 .84 .92 .89 .90 .88 .84   .888
    TA θ₀ + λΣτ, λ = 0.1:     .81 .64 .61 .45 .79 .63 .49 .49   .614  (normalised .690)
                 λ = 0.2:     .76 .69 .65 .47 .81 .62 .62 .41   .628  (normalised .707)
                 λ = 0.3:     .65 .58 .66 .51 .77 .55 .59 .33   .580  (normalised .653)
                 λ = 0.5:     .28 .50 .62 .49 .65 .29 .40 .18   .426  (normalised .479)

(normalised = merged / own fine-tuned accuracy, averaged). As in the paper (zero-shot 48%,
fine-tuned 90%, TA ≈ 69% for ViT-B/32), TA lands between θ₀ and fine-tuning, best near λ = 0.2.
With probe heads the merge barely beats θ₀ (+2–3 points in our runs; every
task vector moves the features the other tasks' frozen probes read), so zero-shot heads are the
default. Plain SGD fine-tunes this ViT poorly (lr 0.1: .78 mean); use AdamW.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.errors import ConfigError
from fl_sim.suites import digits_data
from fl_sim.suites.base import SPLITS, MultiTaskModel, TaskData, TaskSuite
from fl_sim.suites.vit_digits import MODEL_NAME, ViTDigitsSpec, build_encoder, pretrained

HEADS = ("zero-shot", "probe")


def zero_shot_head(
    prototypes: torch.Tensor, task: digits_data.DigitsTask, logit_scale: float
) -> nn.Linear:
    """head_t = s · E_t with E_t[c] = normalise(mean of w_d over digits d of class c)."""
    labels = digits_data.LABELS[task.label][1](torch.arange(10))
    embeddings = torch.stack([prototypes[labels == c].mean(dim=0) for c in range(task.num_classes)])
    head = nn.utils.skip_init(nn.Linear, prototypes.shape[1], task.num_classes, bias=False)
    with torch.no_grad():
        head.weight.copy_(logit_scale * F.normalize(embeddings, dim=1))
    return head


def probe_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, logit_scale: float
) -> nn.Linear:
    """Ridge regression (ridge 1e-2·n) of one-hot ``labels`` on standardised ``features``,
    folded back into one Linear on the raw features and times s; the bias is not penalised."""
    x = features.double()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-8)
    z = (x - mean) / std
    targets = F.one_hot(labels, num_classes).double()
    ridge = 1e-2 * len(z) * torch.eye(z.shape[1], dtype=torch.float64)
    coef = torch.linalg.solve(z.T @ z + ridge, z.T @ (targets - targets.mean(dim=0)))
    weight = coef / std[:, None]
    bias = targets.mean(dim=0) - mean @ weight
    head = nn.utils.skip_init(nn.Linear, features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(logit_scale * weight.T)
        head.bias.copy_(logit_scale * bias)
    return head


class DigitsSuite(TaskSuite):
    """The default vision suite; see the module docstring."""

    name = "digits"

    def __init__(
        self,
        num_tasks: int = 8,
        seed: int = 0,
        model: str = MODEL_NAME,
        heads: str = "zero-shot",
        cache_dir: str | os.PathLike | None = None,
        spec: ViTDigitsSpec | None = None,
    ) -> None:
        if not 1 <= int(num_tasks) <= digits_data.MAX_TASKS:
            raise ConfigError(
                f"digits suite has 1..{digits_data.MAX_TASKS} tasks, got num_tasks={num_tasks}"
            )
        if model != MODEL_NAME:
            raise ConfigError(f"digits suite: unknown model {model!r}; choose {MODEL_NAME}")
        if heads not in HEADS:
            raise ConfigError(f"digits suite: unknown heads {heads!r}; choose one of {HEADS}")
        self.seed, self.model, self.heads_kind = int(seed), model, heads
        self.spec = spec or ViTDigitsSpec()
        self.cache_dir = cache_dir
        self.task_specs = digits_data.TASKS[: int(num_tasks)]
        images, digits = digits_data.load_images()
        indices = digits_data.task_indices(len(images), self.seed)
        self.source_indices = indices  # the task pool's source images, per split
        self.tasks = []
        for t, task in enumerate(self.task_specs):
            splits = {}
            for split in SPLITS:
                x, y = digits_data.task_split(
                    task, t, images, digits, indices[split], self.seed, split
                )
                splits[f"{split}_x"], splits[f"{split}_y"] = x, y
            self.tasks.append(TaskData(name=task.name, num_classes=task.num_classes, **splits))
        self._states: dict[int, dict[str, torch.Tensor]] = {}

    def _modules(self, seed: int) -> MultiTaskModel:
        encoder = build_encoder(self.spec, seed)
        heads = [
            nn.utils.skip_init(
                nn.Linear, self.spec.hidden_size, t.num_classes, bias=self.heads_kind == "probe"
            )
            for t in self.task_specs
        ]
        return MultiTaskModel(encoder, heads, [t.name for t in self.task_specs])

    def _pretrained_state(self, seed: int) -> dict[str, torch.Tensor]:
        if seed in self._states:
            return self._states[seed]
        theta0 = pretrained(self.spec, seed, self.cache_dir)
        model = self._modules(seed)
        model.backbone.load_state_dict(theta0.state)
        model.eval()
        with torch.no_grad():
            for t, (head, task) in enumerate(zip(model.heads, self.task_specs, strict=True)):
                if self.heads_kind == "zero-shot":
                    built = zero_shot_head(theta0.prototypes, task, self.spec.logit_scale)
                else:
                    features = model.backbone(self.tasks[t].train_x)
                    built = probe_head(
                        features, self.tasks[t].train_y, task.num_classes, self.spec.logit_scale
                    )
                head.load_state_dict(built.state_dict())
        self._states[seed] = {k: v.clone() for k, v in model.state_dict().items()}
        return self._states[seed]

    def build_model(self, seed: int | None = None) -> MultiTaskModel:
        seed = self.seed if seed is None else int(seed)
        model = self._modules(seed)
        model.load_state_dict(self._pretrained_state(seed))
        return model


def linear_probe_accuracy(
    suite: DigitsSuite, seed: int | None = None, split: str = "test"
) -> list[float]:
    """Per task: the accuracy on ``split`` of a ridge probe fitted on θ₀'s training features."""
    model = suite.build_model(seed)
    model.eval()
    accuracies = []
    with torch.no_grad():
        for task in suite.tasks:
            probe = probe_head(model.backbone(task.train_x), task.train_y, task.num_classes, 1.0)
            x, y = task.split(split)
            accuracies.append(float((probe(model.backbone(x)).argmax(1) == y).float().mean()))
    return accuracies
