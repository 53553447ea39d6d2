"""The digits data: scikit-learn's bundled 8×8 handwritten digits, split, transformed, relabelled.

``sklearn.datasets.load_digits`` ships 1797 grey 8×8 images (pixels 0..16) with the package, so
nothing is downloaded. Images become float tensors ``(N, 1, 8, 8)`` with pixels in [0, 1].

Splits of the 1797 source images (indices into ``load_digits``), all disjoint:

- pre-training pool: ``PRETRAIN_FRACTION`` = 40% (718 images), drawn by a permutation from the
  fixed seed ``POOL_SEED`` whatever the suite's seed, so one pre-trained θ₀ (per model seed)
  serves every data seed. Only the model's pre-training reads it.
- task pool: the other 1079 images, permuted by the suite's seed into train (649), val (179)
  and test (251) — 36% / 10% / 14% of 1797, rounded down for val and test. Every task uses
  the same source images in its split, each through its own domain transform and label
  function, so no task's val or test image is ever in any task's training split or in the
  pre-training pool.

A task is (domain transform, label function of the digit d). The eight tasks conflict as the
paper's eight vision tasks do: different input domains and different label sets.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fl_sim.errors import ConfigError

PRETRAIN_FRACTION = 0.40
VAL_FRACTION = 0.10
TEST_FRACTION = 0.14
POOL_SEED = 0
NOISE_STD = 0.3
MAX_TASKS = 8

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def identity(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x


def rot90(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rot90(x, 1, dims=(2, 3))


def hflip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x.flip(3)


def invert(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return 1.0 - x


def noise(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x + NOISE_STD * torch.randn(x.shape, generator=generator)


def quadrants(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Swap the diagonal 4×4 quadrants (top-left ↔ bottom-right, top-right ↔ bottom-left)."""
    return torch.roll(x, shifts=(4, 4), dims=(2, 3))


def transpose(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x.transpose(2, 3).contiguous()


def blur(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A 3×3 box blur (zero padding), then halved contrast around 0.5."""
    blurred = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=True)
    return 0.25 + 0.5 * blurred


DOMAINS: dict[str, Transform] = {
    "identity": identity,
    "rot90": rot90,
    "invert": invert,
    "hflip": hflip,
    "noise": noise,
    "quadrants": quadrants,
    "transpose": transpose,
    "blur": blur,
}

PRIMES = torch.tensor([0, 0, 1, 1, 0, 1, 0, 1, 0, 0])
# label function name → (number of classes, the label of digit d)
LABELS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "digit": (10, lambda d: d),
    "parity": (2, lambda d: d % 2),
    "mod3": (3, lambda d: d % 3),
    "ge5": (2, lambda d: (d >= 5).long()),
    "prime": (2, lambda d: PRIMES[d]),
    "mod4": (4, lambda d: d % 4),
    "pairs": (5, lambda d: d // 2),
}


@dataclass(frozen=True)
class DigitsTask:
    """One task: a domain transform of the image and a label function of its digit."""

    domain: str
    label: str

    @property
    def name(self) -> str:
        return f"{self.domain}-{self.label}"

    @property
    def num_classes(self) -> int:
        return LABELS[self.label][0]


# the first k are the suite's tasks when num_tasks = k; the order keeps small suites diverse
TASKS = (
    DigitsTask("identity", "digit"),
    DigitsTask("rot90", "parity"),
    DigitsTask("invert", "mod3"),
    DigitsTask("hflip", "ge5"),
    DigitsTask("noise", "prime"),
    DigitsTask("quadrants", "digit"),
    DigitsTask("transpose", "mod4"),
    DigitsTask("blur", "pairs"),
)


def load_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 images as float32 ``(N, 1, 8, 8)`` in [0, 1] and their digits as int64 ``(N,)``."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return images.contiguous(), torch.as_tensor(bunch.target, dtype=torch.int64)


def data_hash(images: torch.Tensor, digits: torch.Tensor) -> str:
    """SHA-256 of the images and digits, so a cache notices a different scikit-learn copy."""
    digest = hashlib.sha256()
    digest.update(images.numpy().tobytes())
    digest.update(digits.numpy().tobytes())
    return digest.hexdigest()


def pool_sizes(num_images: int) -> dict[str, int]:
    """How many source images each split gets (module docstring)."""
    pretrain = int(PRETRAIN_FRACTION * num_images)
    val = int(VAL_FRACTION * num_images)
    test = int(TEST_FRACTION * num_images)
    return {
        "pretrain": pretrain,
        "train": num_images - pretrain - val - test,
        "val": val,
        "test": test,
    }


def pretrain_indices(num_images: int) -> torch.Tensor:
    """The pre-training pool: fixed, whatever the suite's seed (module docstring)."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(POOL_SEED))
    return order[: pool_sizes(num_images)["pretrain"]].sort().values


def task_indices(num_images: int, seed: int) -> dict[str, torch.Tensor]:
    """The task pool's train/val/test source indices for ``seed`` (module docstring)."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(POOL_SEED))
    sizes = pool_sizes(num_images)
    rest = order[sizes["pretrain"] :]
    rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(int(seed)))]
    val_end = sizes["val"]
    test_end = val_end + sizes["test"]
    return {"val": rest[:val_end], "test": rest[val_end:test_end], "train": rest[test_end:]}


def task_generator(seed: int, task_index: int, split: str) -> torch.Generator:
    """The Generator a task's random transform (noise) draws from: fixed per seed, task, split."""
    split_code = ("train", "val", "test").index(split)
    return torch.Generator().manual_seed(10_007 * int(seed) + 101 * task_index + split_code + 1)


def task_split(
    task: DigitsTask,
    task_index: int,
    images: torch.Tensor,
    digits: torch.Tensor,
    index: torch.Tensor,
    seed: int,
    split: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of ``task`` on the source images ``index``: transformed and relabelled."""
    if task.domain not in DOMAINS or task.label not in LABELS:
        raise ConfigError(f"unknown digits task {task.name!r}")
    x = DOMAINS[task.domain](images[index], task_generator(seed, task_index, split))
    y = LABELS[task.label][1](digits[index])
    return x.contiguous(), y.long().contiguous()


def augment(
    x: torch.Tensor, generator: torch.Generator, domains: list[Transform] | None = None
) -> torch.Tensor:
    """Each image through one of ``domains`` (default: all), drawn uniformly: pre-training's
    augmentation."""
    domains = list(DOMAINS.values()) if domains is None else domains
    choice = torch.randint(len(domains), (x.shape[0],), generator=generator)
    out = torch.empty_like(x)
    for code, transform in enumerate(domains):
        rows = (choice == code).nonzero().flatten()
        if len(rows):
            out[rows] = transform(x[rows], generator)
    return out
