"""``vit-digits``: a small ViT that fl-sim pre-trains itself on the digits pre-training pool.

The encoder is ``transformers.ViTModel`` (8×8 images, 2×2 patches, 1 channel, no pooler, no
dropout); its feature is the mean of the patch tokens after the final LayerNorm, L2-normalised
as CLIP's image embeddings are. That encoder is the federated ``backbone``.

Pre-training (``pretrain``), deterministic in ``seed`` on one CPU thread:

    z = f_θ(augment(x)),   logits_d = s · ⟨z, w_d / ‖w_d‖⟩,   minimise CE(logits, digit)

over the pre-training pool (fl_sim/suites/digits_data.py) with AdamW, linear warm-up then cosine
decay. ``augment`` passes each image through one of ``spec.pretrain_domains``, the domains θ₀ "has
seen"; the others (rot90, hflip, transpose by default) are new to it, as some of the paper's
datasets are new to CLIP. The unit prototypes w_d / ‖w_d‖ play CLIP's text embeddings of the
ten digits: the suite builds every task's zero-shot head from them (fl_sim/suites/digits.py).

Cache: ``$FL_SIM_CACHE`` (else ``$XDG_CACHE_HOME/fl-sim``, else ``~/.cache/fl-sim``) holds
``vit-digits-<key>.safetensors`` and a JSON sidecar with the content key (SHA-256 of the spec,
the seed, the digits data's hash, the pool's definition, ``CODE_VERSION`` and the torch and
transformers versions) and the SHA-256 of the safetensors file. A load checks both; a missing,
corrupt or mismatched file is pre-trained again and written atomically (temp file, fsync,
``os.replace``), under a file lock so that parallel clients pre-train once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.errors import ConfigError
from fl_sim.suites import digits_data
from fl_sim.suites.weights_cache import cached_weights

CODE_VERSION = 1  # bump when pre-training or the encoder changes, so old caches are rebuilt
MODEL_NAME = "vit-digits"
PROTOTYPES = "prototypes"  # the cache's extra tensor next to the encoder's weights
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ViTDigitsSpec:
    """The encoder's shape and its pre-training recipe; all of it goes into the cache key."""

    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    mlp_ratio: int = 2
    patch_size: int = 2
    logit_scale: float = 10.0  # s: pre-training's cosine classifier and the zero-shot heads
    pretrain_steps: int = 150
    pretrain_batch_size: int = 128
    pretrain_lr: float = 3e-3
    pretrain_weight_decay: float = 0.05
    pretrain_warmup_steps: int = 50
    pretrain_domains: tuple[str, ...] = ("identity", "invert", "blur", "noise", "quadrants")

    def __post_init__(self) -> None:
        unknown = [d for d in self.pretrain_domains if d not in digits_data.DOMAINS]
        if unknown or not self.pretrain_domains:
            raise ConfigError(
                f"vit-digits: unknown pre-training domains {unknown or '(none)'}; choose from "
                f"{', '.join(digits_data.DOMAINS)}"
            )
        if self.hidden_size % self.num_heads or 8 % self.patch_size:
            raise ConfigError(
                f"vit-digits: hidden_size {self.hidden_size} must divide by num_heads "
                f"{self.num_heads} and 8 by patch_size {self.patch_size}"
            )


class ViTDigitsEncoder(nn.Module):
    """x ``(N, 1, 8, 8)`` → the unit feature ``(N, hidden)``: mean patch token, L2-normalised."""

    def __init__(self, spec: ViTDigitsSpec) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel  # slow import: only when the suite is used

        config = ViTConfig(
            image_size=8,
            patch_size=spec.patch_size,
            num_channels=1,
            hidden_size=spec.hidden_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            intermediate_size=spec.mlp_ratio * spec.hidden_size,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
        self.vit = ViTModel(config, add_pooling_layer=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.vit(pixel_values=x).last_hidden_state
        return F.normalize(tokens[:, 1:].mean(dim=1), dim=1)


def build_encoder(spec: ViTDigitsSpec, seed: int) -> ViTDigitsEncoder:
    """A freshly initialised encoder, seeded, leaving the global RNG as it found it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return ViTDigitsEncoder(spec)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical θ₀ whatever the caller's thread count
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pretrain(
    spec: ViTDigitsSpec, seed: int, images: torch.Tensor, digits: torch.Tensor
) -> dict[str, torch.Tensor]:
    """θ₀ (the encoder's state) and ``prototypes`` (10 × hidden, unit rows); module docstring."""
    with _one_thread():
        encoder = build_encoder(spec, seed)
        generator = torch.Generator().manual_seed(2_000_003 + int(seed))
        prototypes = nn.Parameter(torch.randn(10, spec.hidden_size, generator=generator))
        params = [*encoder.parameters(), prototypes]
        optimizer = torch.optim.AdamW(
            params, lr=spec.pretrain_lr, weight_decay=spec.pretrain_weight_decay
        )
        domains = [digits_data.DOMAINS[name] for name in spec.pretrain_domains]
        encoder.train()
        for step in range(spec.pretrain_steps):
            warmup = min(1.0, (step + 1) / max(spec.pretrain_warmup_steps, 1))
            cosine = 0.5 * (1 + math.cos(math.pi * step / spec.pretrain_steps))
            for group in optimizer.param_groups:
                group["lr"] = spec.pretrain_lr * warmup * cosine
            batch = torch.randint(len(digits), (spec.pretrain_batch_size,), generator=generator)
            x = digits_data.augment(images[batch], generator, domains)
            logits = spec.logit_scale * encoder(x) @ F.normalize(prototypes, dim=1).T
            loss = F.cross_entropy(logits, digits[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        state = {name: t.detach().clone().contiguous() for name, t in encoder.state_dict().items()}
        state[PROTOTYPES] = F.normalize(prototypes.detach(), dim=1).contiguous()
    return state


# ---------------------------------------------------------------------------------------------
# The cache
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$FL_SIM_CACHE``, else ``$XDG_CACHE_HOME/fl-sim``, else ``~/.cache/fl-sim``."""
    if os.environ.get("FL_SIM_CACHE"):
        return Path(os.environ["FL_SIM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "fl-sim"


def key_material(spec: ViTDigitsSpec, seed: int, data_sha256: str) -> dict[str, object]:
    """Everything θ₀ depends on; its canonical JSON's SHA-256 is the cache key."""
    import transformers

    return {
        "model": MODEL_NAME,
        "code_version": CODE_VERSION,
        "spec": asdict(spec),
        "seed": int(seed),
        "data_sha256": data_sha256,
        "pool": {"seed": digits_data.POOL_SEED, "fraction": digits_data.PRETRAIN_FRACTION},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def cache_key(material: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


@dataclass
class Pretrained:
    """θ₀ and the digit prototypes, with where they came from (for tests and reports)."""

    state: dict[str, torch.Tensor]  # the encoder's state_dict
    prototypes: torch.Tensor  # (10, hidden) unit rows
    key: str
    path: Path
    source: str  # "memory" | "disk" | "pretrained"
    pretrain_seconds: float  # as recorded when it was pre-trained


_MEMORY: dict[tuple[str, str], Pretrained] = {}


def pretrained(
    spec: ViTDigitsSpec | None = None, seed: int = 0, cache_dir: str | os.PathLike | None = None
) -> Pretrained:
    """θ₀ for (``spec``, ``seed``): from memory, else the verified cache, else pre-trained now."""
    spec = spec or ViTDigitsSpec()
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    images, digits = digits_data.load_images()
    key = cache_key(key_material(spec, seed, digits_data.data_hash(images, digits)))
    if (key, str(directory)) in _MEMORY:
        found = _MEMORY[(key, str(directory))]
        return Pretrained(**{**found.__dict__, "source": "memory"})
    pool = digits_data.pretrain_indices(len(images))
    cached = cached_weights(
        directory,
        f"{MODEL_NAME}-{key[:16]}",
        key,
        key_material(spec, seed, digits_data.data_hash(images, digits)),
        lambda: pretrain(spec, seed, images[pool], digits[pool]),
        MODEL_NAME,
    )
    tensors, weights = dict(cached.tensors), cached.path
    source, seconds = cached.source, cached.pretrain_seconds
    prototypes = tensors.pop(PROTOTYPES)
    result = Pretrained(tensors, prototypes, key, weights, source, seconds)
    _MEMORY[(key, str(directory))] = result
    return result


def forget_memory() -> None:
    """Drop the in-process copies, so the next ``pretrained`` reads (and verifies) the disk."""
    _MEMORY.clear()
