"""The ``causal`` suite: T generated languages, one per client, on a small decoder-only LM.

The paper's second half merges fine-tunes of one causal LM (Llama-2-13B: WizardLM, WizardMath,
Code-Alpaca). This suite is that setting at a size a CPU runs in seconds:

- **Tasks** (fl_sim/suites/causal_data.py): task t is its own small language (add, reverse,
  sort, count, shift, plural, max, double), a prompt and its answer, with disjoint
  pre-training, train, val and test splits from the suite's seed. ``num_tasks = k`` keeps the
  first k.
- **Model**: ``llama-tiny`` (default; ``transformers.LlamaForCausalLM``, hidden 64, 4 layers,
  4 heads, MLP 128, untied lm_head) or ``gpt2-tiny`` (``GPT2LMHeadModel`` of the same size),
  built locally with a fixed seed and the suite's own character tokenizer (``char_tokenizer``:
  one token per character of ``causal_data.alphabet()`` plus <pad>, <s>, </s>; a
  ``PreTrainedTokenizerFast`` made here, nothing downloaded); or ``hf:PATH``, your own causal LM
  folder (``AutoModelForCausalLM`` + ``AutoTokenizer``, ``local_files_only``).
- **θ₀**: the built-in models are pre-trained by fl-sim on the mixture of every task's
  pre-training pool (all eight languages, whatever T), next-token cross-entropy on every token,
  AdamW with warm-up and cosine decay, ``DecoderSpec.pretrain_steps`` steps on one thread
  (deterministic in the seed; each step's batch from one task), and cached as the vit-digits
  encoder is: ``$FL_SIM_CACHE`` (else ``~/.cache/fl-sim``) holds
  ``causal-<model>-<key>.safetensors`` and a JSON sidecar with the content key and the file's
  SHA-256, both checked on every load. Pre-training is short on purpose: θ₀ knows the
  languages' alphabet and shapes but answers few prompts, so fine-tuning has something to learn
  and merging something to keep. An ``hf:`` model is θ₀ as loaded.
- **An example** is ``x = (ids, role)``, int64 ``(2, L)``: ``<s> prompt answer </s>`` padded with
  <pad>, and the role of each position (0 padding, 1 prompt, 2 answer and </s>). The objective is
  on the answer span only, teacher-forced: with logits ℓ_i predicting token i + 1,

      loss  = (1/|A|) Σ_{i ∈ A} −log softmax(ℓ_{i−1})[x_i]      A = the answer's positions
      token = (1/|A|) Σ_{i ∈ A} 1[argmax ℓ_{i−1} = x_i]          (metric = "token", default)
      exact = Π_{i ∈ A} 1[argmax ℓ_{i−1} = x_i]                   (metric = "exact")

  and "accuracy" is the mean score over examples: the share of answer tokens (end of sequence
  included) predicted right, or the share of prompts answered exactly, which is what greedy
  decoding would answer (under teacher forcing the first wrong token is the first token greedy
  decoding gets wrong). ``exp(loss)`` of one example is its answer's per-token perplexity.
- **What is federated** (``federated_layers``): as for the text encoders
  (fl_sim/suites/encoders.py), the top k decoder blocks (default 2 of the 4) and every module
  after the block stack — the final norm and ``lm_head`` — under their Hugging Face names
  (``backbone.model.layers.3.self_attn.q_proj.weight``, ``backbone.lm_head.weight``); the
  embeddings and lower blocks are frozen; ``"all"`` federates the whole LM. A model whose
  ``lm_head`` is tied to its input embeddings federates that one tensor (so the embedding moves
  with it). There are no per-task heads: the LM writes every task's answer itself.
  The whole forward pass runs at every step (no frozen-prefix cache); the model is a standard
  transformers model whose ``nn.Linear`` modules keep their names, so adapters can target them
  by suffix (q_proj, v_proj for Llama; c_attn for GPT-2).
- **Hugging Face folders**: ``save_model_folder(state, folder)`` writes the whole LM at a federated
  state (θ₀ with the federated tensors replaced) with ``save_pretrained`` and the tokenizer,
  atomically, loadable by ``AutoModelForCausalLM.from_pretrained``; a run writes ``hf/base``,
  ``hf/client_<t>`` (θ₀ + Δ_t of round 1) and ``hf/global`` (the final model), which
  ``fl-sim merge`` merges directly.

    make_suite("causal")                                   # 8 tasks, llama-tiny, top 2 blocks
    make_suite("causal", num_tasks=3, model="gpt2-tiny", federated_layers="all")
    make_suite("causal", model="hf:/models/llama-2-7b", federated_layers=4)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fl_sim.errors import CheckpointError, ConfigError
from fl_sim.suites import causal_data
from fl_sim.suites.base import (
    FEDERATED_PREFIX,
    SPLITS,
    MultiTaskModel,
    TaskData,
    TaskSuite,
    load_federated_state,
)
from fl_sim.suites.encoders import (
    PretrainedEncoder,
    PretrainedTaskModel,
    federated_module_names,
    parse_model_spec,
)
from fl_sim.suites.weights_cache import cached_weights

CODE_VERSION = 1  # bump when pre-training, the tokenizer or the models change: caches rebuild
DEFAULT_MODEL = "llama-tiny"
SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 of the character tokenizer
PAD, PROMPT, ANSWER = 0, 1, 2  # the role of a position (x[:, 1])
METRICS = ("token", "exact")
DEFAULT_FEDERATED_LAYERS = 2
EVAL_CHUNK = 256  # examples per forward pass when no gradient is needed
_log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------


@functools.cache
def char_tokenizer() -> object:
    """The suite's tokenizer: one token per character of ``causal_data.alphabet()``, after the
    specials <pad> (0), <s> (1) and </s> (2); a transformers ``PreTrainedTokenizerFast`` built
    from a ``tokenizers`` WordLevel model that splits text into single characters. It has no
    unknown token: ``encode_examples`` refuses a character outside the alphabet."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *causal_data.alphabet()])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    pad, bos, eos = SPECIALS
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad, bos_token=bos, eos_token=eos
    )


@dataclass(frozen=True)
class TokenIds:
    """The special ids an encoding needs: pad, end of sequence and (if the model has one) bos."""

    pad: int
    eos: int
    bos: int | None


def token_ids(tokenizer: object, where: str) -> TokenIds:
    """The tokenizer's pad/eos/bos ids; pad falls back to eos. One-line error without an eos."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise CheckpointError(
            f"{where}: the tokenizer has no end-of-sequence token (save one with the tokenizer: "
            "a causal LM must learn where its answer ends)"
        )
    pad = getattr(tokenizer, "pad_token_id", None)
    return TokenIds(pad=eos if pad is None else pad, eos=eos, bos=tokenizer.bos_token_id)  # type: ignore[attr-defined]


def encode_examples(
    tokenizer: object,
    examples: Sequence[causal_data.Example],
    ids: TokenIds,
    alphabet: str | None = None,
) -> torch.Tensor:
    """``(n, 2, L)`` int64: row 0 ``<s> prompt answer </s>`` then padding, row 1 the roles
    (module docstring), L the longest example. Prompts and answers are tokenized apart and
    joined, so the answer span is exact whatever the tokenizer. ``alphabet``: refuse characters
    outside it (the character tokenizer has no unknown token)."""
    if alphabet is not None:
        for prompt, answer in examples:
            bad = sorted(set(prompt + answer) - set(alphabet))
            if bad:
                raise ConfigError(
                    f"text {prompt + answer!r} has characters {bad} outside the tokenizer's "
                    "alphabet (the causal tasks write only those of causal_data.alphabet())"
                )
    if not examples:
        return torch.zeros(0, 2, 1, dtype=torch.int64)
    encode = tokenizer(  # type: ignore[operator]
        [text for example in examples for text in example], add_special_tokens=False
    )["input_ids"]
    head = [] if ids.bos is None else [ids.bos]
    rows = [
        (head + prompt, [*answer, ids.eos])
        for prompt, answer in zip(encode[0::2], encode[1::2], strict=True)
    ]
    x = torch.zeros(len(rows), 2, max(len(p) + len(a) for p, a in rows), dtype=torch.int64)
    x[:, 0] = ids.pad
    for i, (prompt, answer) in enumerate(rows):
        x[i, 0, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        x[i, 1, : len(prompt)] = PROMPT
        x[i, 1, len(prompt) : len(prompt) + len(answer)] = ANSWER
    return x


def decode_answer(tokenizer: object, x: torch.Tensor) -> str:
    """The answer span of one encoded example ``(2, L)``, without </s> (for reading, tests)."""
    answer = x[0][x[1] == ANSWER].tolist()[:-1]
    return tokenizer.decode(answer)  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------


def span_objective(
    lm: nn.Module, x: torch.Tensor, *, span: str = "answer", metric: str = "token"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example (mean next-token CE over ``span``, score): module docstring's formulas.

    ``span = "answer"`` scores the answer and </s> (the fine-tuning and evaluation objective);
    ``"all"`` every real token after the first (pre-training). Positions beyond the batch's
    longest example are dropped; the attention mask hides the padding.
    """
    roles = x[:, 1]
    width = max(int((roles > PAD).sum(dim=1).max()), 2)
    ids, roles = x[:, 0, :width], roles[:, :width]
    logits = lm(input_ids=ids, attention_mask=(roles > PAD).long()).logits[:, :-1]
    targets, target_roles = ids[:, 1:], roles[:, 1:]
    scored = (target_roles == ANSWER) if span == "answer" else (target_roles > PAD)
    ce = F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")
    counts = scored.sum(dim=1).clamp(min=1)
    loss = (ce * scored).sum(dim=1) / counts
    with torch.no_grad():
        right = (logits.argmax(dim=-1) == targets) & scored
        if metric == "exact":
            score = (right.sum(dim=1) == scored.sum(dim=1)).float()
        else:
            score = right.sum(dim=1).float() / counts
    return loss, score


class DecoderLM(PretrainedEncoder):
    """A Hugging Face causal LM as the federated root: ``root`` is the LM itself, so federated
    names are its own (``model.layers.3.mlp.down_proj``, ``lm_head``). It has no features: its
    task model scores the LM's own next-token predictions (``span_objective``)."""

    modality = "text"

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    @property
    def root(self) -> nn.Module:
        return self.lm

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise ConfigError("a causal LM has no pooled features; score it with span_objective")


class CausalTaskModel(PretrainedTaskModel):
    """The LM with its federated part under ``backbone``; no heads (one parameterless identity
    per task keeps the multi-task interface); every loss and score is ``span_objective``."""

    def __init__(
        self, lm: nn.Module, federated_names: Sequence[str], task_names: Sequence[str], metric: str
    ) -> None:
        heads = [nn.Identity() for _ in task_names]
        super().__init__(DecoderLM(lm), federated_names, heads, task_names)
        self.metric = metric

    @property
    def lm(self) -> nn.Module:
        return self.encoder.lm  # type: ignore[return-value]

    def forward(self, x: torch.Tensor, task_index: int) -> torch.Tensor:
        """The LM's next-token logits ``(n, L, V)`` on the token ids of ``x``."""
        roles = x[:, 1]
        return self.lm(input_ids=x[:, 0], attention_mask=(roles > PAD).long()).logits

    def objective(
        self, task_index: int, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per example: (answer-span CE, exact match or token accuracy); in chunks of
        ``EVAL_CHUNK`` without grad."""
        if torch.is_grad_enabled() or len(x) <= EVAL_CHUNK:
            return span_objective(self.lm, x, metric=self.metric)
        parts = [
            span_objective(self.lm, x[s : s + EVAL_CHUNK], metric=self.metric)
            for s in range(0, len(x), EVAL_CHUNK)
        ]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# ---------------------------------------------------------------------------------------------
# The built-in models and their pre-training
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecoderSpec:
    """A built-in decoder's shape and its pre-training recipe; all of it goes into the cache key."""

    family: str  # "llama" | "gpt2"
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 128
    max_positions: int = 64
    pretrain_steps: int = 300
    pretrain_batch_size: int = 32
    pretrain_lr: float = 3e-3
    pretrain_warmup_steps: int = 30
    pretrain_weight_decay: float = 0.01
    pretrain_span: str = "all"  # span_objective's span: "answer" or "all" tokens


SPECS = {"llama-tiny": DecoderSpec("llama"), "gpt2-tiny": DecoderSpec("gpt2")}


def decoder_config(spec: DecoderSpec, vocab_size: int, ids: TokenIds) -> object:
    """The transformers config of ``spec``: no dropout, lm_head untied from the embeddings."""
    from transformers import GPT2Config, LlamaConfig

    if spec.family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=spec.max_positions,
            tie_word_embeddings=False,
            pad_token_id=ids.pad,
            bos_token_id=ids.bos,
            eos_token_id=ids.eos,
        )
    if spec.family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=spec.hidden_size,
            n_inner=spec.intermediate_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_positions=spec.max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=False,
            pad_token_id=ids.pad,
            bos_token_id=ids.bos,
            eos_token_id=ids.eos,
        )
    raise ConfigError(f"unknown decoder family {spec.family!r}; choose llama or gpt2")


def build_decoder(spec: DecoderSpec, seed: int) -> nn.Module:
    """A freshly initialised built-in decoder, seeded, leaving the global RNG as it found it."""
    from transformers import AutoModelForCausalLM

    tokenizer = char_tokenizer()
    config = decoder_config(spec, len(tokenizer), token_ids(tokenizer, spec.family))  # type: ignore[arg-type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        lm = AutoModelForCausalLM.from_config(config)
    return lm.eval()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identical θ₀ whatever the caller's thread count
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def pretraining_corpus(seed: int) -> list[list[causal_data.Example]]:
    """Every task's pre-training pool, in catalogue order (module docstring: θ₀)."""
    return [causal_data.task_splits(name, seed)["pretrain"] for name in causal_data.CAUSAL_TASKS]


def pretrain(
    spec: DecoderSpec, seed: int, corpus: Sequence[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """θ₀: ``spec.pretrain_steps`` AdamW steps of next-token CE on every token, linear warm-up
    then cosine decay, one thread. ``corpus`` holds each task's encoded pool; a step's batch
    is drawn from one task, chosen at random (so a batch is as long as its task's examples,
    not the longest task's), then its examples at random."""
    with _one_thread():
        lm = build_decoder(spec, seed)
        generator = torch.Generator().manual_seed(3_000_017 + int(seed))
        optimizer = torch.optim.AdamW(
            lm.parameters(), lr=spec.pretrain_lr, weight_decay=spec.pretrain_weight_decay
        )
        for step in range(spec.pretrain_steps):
            warmup = min(1.0, (step + 1) / max(spec.pretrain_warmup_steps, 1))
            cosine = 0.5 * (1 + math.cos(math.pi * step / spec.pretrain_steps))
            for group in optimizer.param_groups:
                group["lr"] = spec.pretrain_lr * warmup * cosine
            pool = corpus[int(torch.randint(len(corpus), (1,), generator=generator))]
            batch = torch.randint(len(pool), (spec.pretrain_batch_size,), generator=generator)
            loss = span_objective(lm, pool[batch], span=spec.pretrain_span)[0].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return {name: t.detach().clone().contiguous() for name, t in lm.state_dict().items()}


def default_cache_dir() -> Path:
    """``$FL_SIM_CACHE``, else ``$XDG_CACHE_HOME/fl-sim``, else ``~/.cache/fl-sim``."""
    from fl_sim.suites.vit_digits import default_cache_dir as shared_cache_dir

    return shared_cache_dir()


def key_material(
    name: str, spec: DecoderSpec, seed: int, corpus: torch.Tensor
) -> dict[str, object]:
    """Everything θ₀ depends on; its canonical JSON's SHA-256 is the cache key."""
    import transformers

    return {
        "model": name,
        "code_version": CODE_VERSION,
        "spec": asdict(spec),
        "seed": int(seed),
        "corpus_sha256": [hashlib.sha256(pool.numpy().tobytes()).hexdigest() for pool in corpus],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


@dataclass
class PretrainedDecoder:
    """θ₀ of a built-in decoder and where it came from (for tests and reports)."""

    state: dict[str, torch.Tensor]
    key: str
    path: Path
    source: str  # "memory" | "disk" | "pretrained"
    pretrain_seconds: float  # as recorded when it was pre-trained


_MEMORY: dict[tuple[str, str], PretrainedDecoder] = {}


def pretrained_decoder(
    name: str,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    spec: DecoderSpec | None = None,
) -> PretrainedDecoder:
    """θ₀ of built-in model ``name`` (its ``SPECS`` entry, or ``spec``) for ``seed``: from
    memory, else the verified cache, else pre-trained now and written atomically, under a file
    lock (parallel clients pre-train once)."""
    if name not in SPECS:
        raise ConfigError(f"unknown built-in causal model {name!r}; choose {', '.join(SPECS)}")
    spec = spec or SPECS[name]
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    tokenizer = char_tokenizer()
    ids = token_ids(tokenizer, name)
    alphabet = causal_data.alphabet()
    corpus = [
        encode_examples(tokenizer, pool, ids, alphabet=alphabet)
        for pool in pretraining_corpus(seed)
    ]
    material = key_material(name, spec, seed, corpus)
    key = hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()
    if (key, str(directory)) in _MEMORY:
        return PretrainedDecoder(**{**_MEMORY[(key, str(directory))].__dict__, "source": "memory"})
    cached = cached_weights(
        directory,
        f"causal-{name}-{key[:16]}",
        key,
        material,
        lambda: pretrain(spec, seed, corpus),
        "causal θ₀",
    )
    state, weights = cached.tensors, cached.path
    source, seconds = cached.source, cached.pretrain_seconds
    result = PretrainedDecoder(state, key, weights, source, seconds)
    _MEMORY[(key, str(directory))] = result
    return result


def forget_memory() -> None:
    """Drop the in-process copies of θ₀, so the next ``pretrained_decoder`` reads the disk."""
    _MEMORY.clear()


# ---------------------------------------------------------------------------------------------
# Your own causal LM: hf:PATH
# ---------------------------------------------------------------------------------------------


def _quiet_transformers() -> None:
    """Local folders only (never the Hub), and no progress bars or warnings in a run's output."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def load_causal_lm(model: str) -> tuple[nn.Module, object]:
    """(LM, tokenizer) of ``hf:PATH``: ``AutoModelForCausalLM`` and ``AutoTokenizer`` from the
    local folder (``local_files_only``; nothing is downloaded), the LM in eval mode."""
    spec = parse_model_spec(model)
    if spec.kind != "hf":
        raise ConfigError(
            f"task-suite=causal takes model {', '.join(SPECS)} or hf:PATH, got {model!r}"
        )
    _quiet_transformers()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def failure(what: str, error: Exception) -> CheckpointError:
        lines = str(error).strip().splitlines()
        reason = lines[0] if lines else type(error).__name__
        return CheckpointError(
            f"model {spec}: cannot load the {what} from {spec.path}: {reason} (save a causal LM "
            "and its tokenizer there with save_pretrained)"
        )

    try:
        lm = AutoModelForCausalLM.from_pretrained(str(spec.path), local_files_only=True)
    except Exception as error:  # any failure: the same one-line fix
        raise failure("causal LM", error) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(spec.path), local_files_only=True)
    except Exception as error:
        raise failure("tokenizer", error) from None
    return lm.eval(), tokenizer


def max_positions(lm: nn.Module) -> int | None:
    """The longest sequence the LM's positions allow (None: no limit in its config)."""
    config = lm.config  # type: ignore[union-attr]
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


# ---------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------


class CausalSuite(TaskSuite):
    """Generated languages on a decoder-only LM; see the module docstring."""

    name = "causal"

    def __init__(
        self,
        num_tasks: int | None = None,
        seed: int = 0,
        *,
        model: str = DEFAULT_MODEL,
        federated_layers: int | str | None = None,
        metric: str = "token",
        cache_dir: str | os.PathLike | None = None,
        spec: DecoderSpec | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ConfigError(
                f"causal suite: unknown metric {metric!r}; choose {', '.join(METRICS)}"
            )
        names = causal_data.task_names(num_tasks)
        self.seed, self.model_name, self.metric = int(seed), str(model), metric
        self.cache_dir = cache_dir
        self.pretrain_source: str | None = None  # built-ins: memory, disk or pretrained
        self.spec = (spec or SPECS[self.model_name]) if self.model_name in SPECS else None
        if self.model_name in SPECS:
            self.tokenizer = char_tokenizer()
            self._theta0 = {self.seed: self._pretrained_lm(self.seed)}
            alphabet: str | None = causal_data.alphabet()
        elif self.model_name.startswith("hf:"):
            lm, self.tokenizer = load_causal_lm(self.model_name)
            self._theta0 = {self.seed: lm}
            alphabet = None
        else:
            raise ConfigError(
                f"task-suite=causal takes model {', '.join(SPECS)} or hf:PATH, got {model!r}"
            )
        self.ids = token_ids(self.tokenizer, self.model_name)
        template = self._theta0[self.seed]
        self.federated_layers = (
            DEFAULT_FEDERATED_LAYERS if federated_layers is None else federated_layers
        )
        self.federated_names = federated_module_names(DecoderLM(template), self.federated_layers)
        self.cached_from = None  # no frozen-prefix cache: the whole LM runs at every step
        raw = {name: causal_data.task_splits(name, self.seed) for name in names}
        encoded = {
            name: {
                split: encode_examples(
                    self.tokenizer, raw[name][split], self.ids, alphabet=alphabet
                )
                for split in SPLITS
            }
            for name in names
        }
        length = max(x.shape[2] for splits in encoded.values() for x in splits.values())
        limit = max_positions(template)
        if limit is not None and length > limit:
            raise ConfigError(
                f"model {self.model_name}: the causal tasks need {length} positions, its config "
                f"allows {limit} (use a model with more positions)"
            )
        self.tasks = []
        for name in names:
            splits: dict[str, torch.Tensor] = {}
            for split in SPLITS:
                x = encoded[name][split]
                x = F.pad(x, (0, length - x.shape[2]))  # pad id 0 = role PAD; ids re-padded below
                x[:, 0][x[:, 1] == PAD] = self.ids.pad
                splits[f"{split}_x"] = x
                splits[f"{split}_y"] = (x[:, 1] == ANSWER).sum(dim=1)  # answer tokens, </s> too
            self.tasks.append(TaskData(name, len(self.tokenizer), **splits))  # type: ignore[arg-type]

    def _pretrained_lm(self, seed: int) -> nn.Module:
        found = pretrained_decoder(self.model_name, seed, self.cache_dir, self.spec)
        self.pretrain_source = self.pretrain_source or found.source
        lm = build_decoder(self.spec, seed)  # type: ignore[arg-type]
        lm.load_state_dict(found.state)
        return lm

    def theta0_lm(self, seed: int | None = None) -> nn.Module:
        """The LM at θ₀ of ``seed`` (None: the suite's), a template never trained; an ``hf:``
        model has one θ₀, whatever the seed."""
        seed = self.seed if seed is None or self.spec is None else int(seed)
        if seed not in self._theta0:
            self._theta0[seed] = self._pretrained_lm(seed)
        return self._theta0[seed]

    def build_model(self, seed: int | None = None) -> MultiTaskModel:
        lm = copy.deepcopy(self.theta0_lm(seed))
        return CausalTaskModel(lm, self.federated_names, [t.name for t in self.tasks], self.metric)

    peft_task_type = "CAUSAL_LM"  # a LoRA run's PEFT adapter folders (fl_sim/suites/lora.py)

    @staticmethod
    def folder_name(name: str) -> str:
        """The Hugging Face name, in a ``save_model_folder`` folder, of federated tensor or
        module ``name``: ``backbone.model.layers.3.self_attn.q_proj`` → ``model.layers.3...``."""
        if not name.startswith(FEDERATED_PREFIX):
            raise ConfigError(f"{name!r} is not a federated name (they start {FEDERATED_PREFIX!r})")
        return name[len(FEDERATED_PREFIX) :]

    def save_model_folder(
        self, state: dict[str, torch.Tensor], folder: str | os.PathLike, *, force: bool = False
    ) -> Path:
        """The whole LM at federated ``state`` (θ₀ elsewhere) and the tokenizer as a Hugging
        Face folder (``save_pretrained``: config.json, model.safetensors, tokenizer files),
        written atomically; ``force`` replaces an existing folder."""
        from fl_sim.checkpoints.model_checkpoint import atomic_output

        _quiet_transformers()
        model = self.build_model()
        load_federated_state(model, state)
        with atomic_output(folder, is_dir=True, force=force) as temp:
            model.lm.save_pretrained(temp)  # type: ignore[attr-defined]
            self.tokenizer.save_pretrained(temp)  # type: ignore[attr-defined]
        return Path(folder)

    def metadata(self) -> dict[str, object]:
        """What this suite is: model, federated part, metric, and per-task split sizes."""
        model = self.build_model()
        return {
            "suite": self.name,
            "seed": self.seed,
            "model": self.model_name,
            "metric": self.metric,
            "federated-layers": self.federated_layers,
            "federated-modules": list(self.federated_names),
            "federated-parameters": sum(t.numel() for t in model.backbone.state_dict().values()),
            "lm-parameters": sum(p.numel() for p in model.lm.parameters()),
            "vocab-size": len(self.tokenizer),  # type: ignore[arg-type]
            "sequence-length": int(self.tasks[0].train_x.shape[2]),
            "tasks": {
                task.name: {f"num-{split}": int(task.split(split)[1].shape[0]) for split in SPLITS}
                for task in self.tasks
            },
        }
