"""A task suite whose backbone is a pre-trained encoder from a local folder (text or images).

The shared machinery of the ``text`` and ``local`` suites: raw inputs are prepared once (texts
tokenized, images resized and normalised) and kept in memory; θ₀ is loaded once per suite and
copied for every ``build_model``; the heads are built once from θ₀ and frozen (the probes once
per process for the same model and head data, ``_PROBES``: every rule's suite shares them):

- CLIP (``clip:PATH``) on images: zero-shot heads from the class names (the paper's setting);
- every other encoder: a linear probe per task, fitted in closed form on θ₀'s features
  (``encoders.probe_head``) of the task's ``head`` examples, which no client trains
  on: a probe fitted on the training split would already fit it almost perfectly and leave
  fine-tuning little to learn. A task without head examples falls back to its training split.

θ₀ is the checkpoint, so ``build_model``'s seed changes nothing here. See
``fl_sim/suites/encoders.py`` for model specs and what ``federated_layers`` federates.

**Frozen-prefix cache** (``frozen_prefix_cache``, default on): when the federated part of a text
encoder sits on frozen layers (an integer ``federated_layers`` = k < all), each split's inputs
are stored as the frozen prefix's output (``encoders.TextEncoder.prefix``), computed once per
suite with θ₀, instead of as token ids; training batches and evaluation index into them as
before, and the models of ``build_model`` run only the top k blocks on them. Nothing of the
model changes (its state, the federated state, the heads: fitted on the head pool's token ids
by the template, as without the cache); only the inputs do. It is checked on a few examples
first (``encoders.check_prefix``), and whatever cannot be split (``"all"``, image encoders,
models without a layer stack and ``embeddings``) keeps the full forward pass.
``prefix_bytes`` is the memory the cached inputs take.

**On disk too** (``disk_cache``: the run's cache folder, ``<cache-dir>/suite-inputs``): every
process of a run builds the suite (the server and each Ray actor or SuperNode), and the prefix
pass and the probes' fits are most of that build (MiniLM, text suite, one thread: 9.7 s and 5.4 s
of ≈ 15 s per actor). The first process to make them stores them, content-keyed (the model spec,
the SHA-256 of θ₀'s encoder weights, the split point, the digest of the token ids or head data),
SHA-256-verified on every read and written atomically under a lock (fl_sim/suites/weights_cache.py);
the others read them: the very tensors, so every figure is the same as when each process
computes its own.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fl_sim.errors import ConfigError
from fl_sim.suites.base import SPLITS, TaskData, TaskSuite
from fl_sim.suites.encoders import (
    PretrainedModel,
    PretrainedTaskModel,
    check_prefix,
    federated_module_names,
    probe_head,
    zero_shot_head,
)
from fl_sim.suites.weights_cache import cached_weights


@dataclass
class RawTask:
    """One task before preparation: inputs (texts or images) and integer labels per split.

    Splits are "train", "val", "test" and optionally "head" (examples only the probe sees).
    """

    name: str
    classes: tuple[str, ...]
    inputs: dict[str, list]
    labels: dict[str, list[int]]


PREFIX_MEMO_SUITES = 2  # suites whose cached prefixes a process keeps (the latest ones)
# (model spec, first federated block, digest of the token ids) → every split's cached prefix:
# a server that runs several rules builds the same suite once per rule, and computes it once
_PREFIXES: OrderedDict[tuple[str, int, str], list[torch.Tensor]] = OrderedDict()
# (model spec, digest of every task's head examples and labels) → the fitted linear probes
# (θ₀'s full forward pass over the head pools): fitted once per process for every rule's
# suite, as the prefixes are; ``build_model`` copies them, nothing writes to them
_PROBES: OrderedDict[tuple[str, str], list[nn.Linear]] = OrderedDict()


def remember(memo: OrderedDict, key: object, value: object) -> None:
    """``memo[key] = value``, keeping the latest ``PREFIX_MEMO_SUITES`` entries."""
    memo[key] = value
    while len(memo) > PREFIX_MEMO_SUITES:
        memo.popitem(last=False)


def _digest(tensors: Sequence[torch.Tensor]) -> str:
    """SHA-256 over the tensors' shapes and bytes: which input sets a cached prefix is of."""
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(f"{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        hasher.update(tensor.contiguous().numpy().tobytes())
    return hasher.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state (names, dtypes, shapes, bytes): the θ₀ a stored input is of."""
    hasher = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        hasher.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        hasher.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


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
        frozen_prefix_cache: bool = True,
        disk_cache: str | Path | None = None,
    ) -> None:
        if not raw_tasks:
            raise ConfigError(f"suite {self.name!r} has no tasks")
        self.pretrained = model
        self.disk_cache = None if disk_cache is None else Path(disk_cache)
        self._weights_digest: str | None = None
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
        self.cached_from = self._cache_frozen_prefix(bool(frozen_prefix_cache))

    def _cache_frozen_prefix(self, enabled: bool) -> int | None:
        """Replace every split's inputs by the frozen prefix's output (module docstring).

        Returns the first federated block L − k the cached inputs enter, or None (not cached:
        switched off, nothing to split, or the check failed). One pass of blocks 0..L−k−1 over
        every split, once per process for the same model, split point and token ids
        (``_PREFIXES``: the latest ``PREFIX_MEMO_SUITES`` suites; the ClientApp also memoizes
        its suite). Suites share the cached tensors, which nothing writes to.
        """
        first = self.pretrained.encoder.prefix_start(self.federated_layers) if enabled else None
        if first is None:
            return None
        inputs = [task.split(split)[0] for task in self.tasks for split in SPLITS]
        key = (str(self.pretrained.spec), first, _digest(inputs))
        if key not in _PREFIXES:
            encoder = self.pretrained.fresh_encoder().eval()  # its own copy: hooks touch no other
            if not check_prefix(encoder, self.tasks[0].train_x, first):
                return None
            stored = self._on_disk(
                "frozen-prefix",
                {"first": first, "inputs": key[2]},
                lambda: {
                    str(i): encoder.prefix(x, first).contiguous() for i, x in enumerate(inputs)
                },
            )
            remember(_PREFIXES, key, [stored[str(i)] for i in range(len(inputs))])
        _PREFIXES.move_to_end(key)
        cached = iter(_PREFIXES[key])
        for task in self.tasks:
            for split in SPLITS:
                setattr(task, f"{split}_x", next(cached))
        return first

    @property
    def prefix_bytes(self) -> int:
        """Bytes the cached prefix outputs of every split take (0 without the cache)."""
        if self.cached_from is None:
            return 0
        return sum(task.split(split)[0].nbytes for task in self.tasks for split in SPLITS)

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
                self._heads = self._probes()
        return self._heads

    def _probes(self) -> list[nn.Linear]:
        """Task t's linear probe on θ₀'s features of its head examples (module docstring),
        from ``_PROBES`` when a suite of the same model and head data fitted them."""
        data = [tensor for pair in self._head_data for tensor in pair]
        key = (str(self.pretrained.spec), _digest(data))
        if key not in _PROBES:
            fitted: list[nn.Linear] = []

            def fit() -> dict[str, torch.Tensor]:
                encoder = self.pretrained.encoder.eval()
                with torch.no_grad():
                    fitted.extend(
                        probe_head(encoder(x), y, task.num_classes)
                        for (x, y), task in zip(self._head_data, self.tasks, strict=True)
                    )
                return {
                    f"{t}.{name}": tensor.detach()
                    for t, head in enumerate(fitted)
                    for name, tensor in head.state_dict().items()
                }

            stored = self._on_disk("probes", {"head-data": key[1]}, fit)
            remember(_PROBES, key, fitted or self._stored_probes(stored))
        _PROBES.move_to_end(key)
        return _PROBES[key]

    def _stored_probes(self, stored: dict[str, torch.Tensor]) -> list[nn.Linear]:
        """The probes of ``fit`` from their stored tensors; one ``nn.Linear`` per task, as
        ``probe_head`` makes them (so the global RNG advances as when they are fitted)."""
        probes = []
        for t, task in enumerate(self.tasks):
            head = nn.Linear(stored[f"{t}.weight"].shape[1], task.num_classes)
            head.load_state_dict({name: stored[f"{t}.{name}"] for name in ("weight", "bias")})
            probes.append(head)
        return probes

    def _on_disk(
        self,
        what: str,
        material: dict[str, object],
        make: Callable[[], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """``make()``; with ``disk_cache``, its tensors as an earlier process of the same key
        stored them, else made and stored (module docstring)."""
        if self.disk_cache is None:
            return make()
        if self._weights_digest is None:
            self._weights_digest = weights_digest(self.pretrained.encoder)
        material = {
            "what": what,
            "model": str(self.pretrained.spec),
            "weights-sha256": self._weights_digest,
            **material,
        }
        key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
        stem = f"{what}-{key[:32]}"
        return cached_weights(self.disk_cache, stem, key, material, make, what).tensors

    def build_model(self, seed: int | None = None) -> PretrainedTaskModel:
        heads = [copy.deepcopy(head) for head in self.heads()]
        return PretrainedTaskModel(
            self.pretrained.fresh_encoder(self.cached_from),
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
            "frozen-prefix-cached-from": self.cached_from,
            "frozen-prefix-bytes": self.prefix_bytes,
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
