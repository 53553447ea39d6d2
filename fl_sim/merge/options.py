"""The typed, validated options of ``fl-sim merge``, from flags or a mergekit-style YAML file.

Validated once here; the merge itself trusts them.

Scale conventions (docs/design.md, "λ ↦ β"): every rule returns a mean-like A, θ = θ₀ + β·A.
``--server-lr`` is β for every rule. ``--lambda`` is the paper's λ: for the rules whose paper
form sums task vectors (each rule's ``paper_scale`` in strategies/registry.py: task_arithmetic,
fedavg, fedgma, cclip, dare) β = λT; for the mean-like ones (fednova, median, ties) β = λ.
Without either, β = 1 (for task_arithmetic: λ = 1/T, the weight average).

Each rule's own knobs (``--rho``, ``--tau-c``, ``--density``...; YAML ``parameters:``) come from
its knob dataclass in the registry: the flags, the YAML names and the checks are derived from it.

Models may be PEFT LoRA adapter folders (fl_sim/merge/adapters.py); ``--to-adapter --rank r``
writes the merge as a rank-r adapter (fl_sim/merge/to_adapter.py) instead of a full model, and
``--max-shard-size`` (Hugging Face's ``5GB`` convention) shards a full model folder.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from fl_sim.checkpoints.sharding import parse_shard_size
from fl_sim.errors import ConfigError
from fl_sim.outputs import read_json
from strategies.fednova import A_NORMS
from strategies.paper_defaults import paper_values
from strategies.registry import (
    RULE_NAMES,
    RULES,
    RuleConfig,
    all_knob_infos,
    make_rule,
    rule_spec,
    server_lr_for_lambda,
)
from strategies.rule_spec import RuleKnobs

META_FILE = "fl_sim_meta.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICES = ("auto", "cpu", "cuda")
MERGEKIT_METHODS = {spec.mergekit: name for name, spec in RULES.items() if spec.mergekit}


@dataclass(frozen=True)
class TrainMeta:
    """What one fine-tuned model's training did: K_t and Σ_k η_t⁽ᵏ⁾ (either may be unknown)."""

    steps: float | None = None
    lr_sum: float | None = None

    def a_norm(self, kind: str) -> float | None:
        return self.steps if kind == "steps" else self.lr_sum


@dataclass(frozen=True)
class MergeOptions:
    method: str
    base: Path
    models: tuple[Path, ...]
    out: Path
    server_lr: float  # β
    lam: float | None  # the paper's λ when given
    weights: tuple[float, ...] | None
    knobs: RuleKnobs
    a_norm_kind: str = "lr-sum"
    train_meta: tuple[TrainMeta, ...] | None = None
    device: str = "auto"
    dtype: str | None = None
    allow_pickle: bool = False
    force: bool = False
    statistics: bool = True
    paper_defaults: bool = False  # --paper-defaults
    paper_set: tuple[tuple[str, str], ...] = ()  # (YAML name, value) the switch set
    max_shard_size: int | None = None  # bytes; None: 5GB for a folder OUT, one file for a file
    to_adapter: bool = False  # --to-adapter: OUT is a LoRA adapter of rank ``rank``
    rank: int | None = None

    @property
    def num_clients(self) -> int:
        return len(self.models)

    def rule_config(self) -> RuleConfig:
        a_norm = None
        if self.train_meta is not None:
            values = [m.a_norm(self.a_norm_kind) for m in self.train_meta]
            a_norm = None if any(v is None for v in values) else values
        if self.method == "fednova" and a_norm is None:
            missing = (
                self.models[[m.a_norm(self.a_norm_kind) for m in self.train_meta].index(None)]
                if self.train_meta
                else None
            )
            key = "steps" if self.a_norm_kind == "steps" else "lr_sum"
            where = f"{missing} has no {key!r}" if missing else "no training metadata was found"
            raise ConfigError(
                f"fednova needs every model's {key!r} ({where}): pass --train-meta META.json "
                f"or put {META_FILE} in each model folder (or choose --a-norm steps/lr-sum)"
            )
        return RuleConfig(self.method, self.weights, a_norm, knobs=self.knobs)


def server_lr_for(
    method: str, num_clients: int, lam: float | None, server_lr: float | None
) -> float:
    """β from --server-lr, or from the paper's λ (see the module docstring), or 1."""
    if lam is not None and server_lr is not None:
        raise ConfigError("give --lambda or --server-lr, not both (β = λT for task_arithmetic)")
    for name, value in (("lambda", lam), ("server-lr", server_lr)):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name} must be a finite number, got {value}")
    if server_lr is not None:
        return float(server_lr)
    if lam is not None:
        return server_lr_for_lambda(method, float(lam), num_clients)
    return 1.0


def parse_weights(text: str | Sequence[float] | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    items = text.split(",") if isinstance(text, str) else list(text)
    try:
        return tuple(float(w) for w in items)
    except (TypeError, ValueError, OverflowError):
        raise ConfigError(
            f"--weights must be comma-separated numbers, got {text!r}"[:300]
        ) from None


def read_train_meta(
    meta_path: Path | None, models: Sequence[Path], given_as: Sequence[str]
) -> tuple[TrainMeta, ...] | None:
    """Each model's TrainMeta from META.json (by position, by path as given, or by resolved
    path), else from ``fl_sim_meta.json`` in its folder; None when neither says anything."""
    table: dict[str, object] | list[object] | None = None
    if meta_path is not None:
        table = load_json(meta_path, "--train-meta")
        if not isinstance(table, (dict, list)):
            raise ConfigError(
                f"--train-meta {meta_path}: expected a list (one entry per model) or an object "
                'keyed by model path, e.g. {"ft1": {"steps": 500, "lr_sum": 0.5}}'
            )
        if isinstance(table, list) and len(table) != len(models):
            raise ConfigError(
                f"--train-meta {meta_path}: has {len(table)} entries for {len(models)} models"
            )
    metas: list[TrainMeta] = []
    found = False
    for index, (model, given) in enumerate(zip(models, given_as, strict=True)):
        entry: object = None
        source = str(meta_path)
        if isinstance(table, list):
            entry = table[index]
        elif isinstance(table, dict):
            for key in (given, str(model), str(model.resolve()), model.name, str(index)):
                if key in table:
                    entry = table[key]
                    break
        if entry is None and (model / META_FILE).is_file():
            source = str(model / META_FILE)
            entry = load_json(model / META_FILE, META_FILE)
        if entry is None:
            metas.append(TrainMeta())
            continue
        found = True
        metas.append(parse_meta_entry(entry, source, given))
    return tuple(metas) if found else None


def parse_meta_entry(entry: object, source: str, model: str) -> TrainMeta:
    if not isinstance(entry, dict):
        raise ConfigError(
            f'{source}: entry for {model} must be an object like {{"steps": 500, "lr_sum": 0.5}}'
        )
    # "task": the client's task index, written by a run's clients/train_meta.json (not used)
    unknown = sorted(set(entry) - {"steps", "lr_sum", "lr-sum", "a_norm_exact", "task"})
    if unknown:
        raise ConfigError(
            f"{source}: unknown key {unknown[0]!r} for {model} (expected 'steps' and/or 'lr_sum')"
        )
    values: dict[str, float | None] = {}
    for key in ("steps", "lr_sum"):
        value = entry.get(key, entry.get(key.replace("_", "-")))
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(
                    f"{source}: {key} for {model} must be a number > 0, got {value!r}"
                )
            if isinstance(value, int) and value > 2**53:  # also beyond float range
                raise ConfigError(f"{source}: {key} for {model} is out of range")
            if not math.isfinite(value):
                raise ConfigError(f"{source}: {key} for {model} must be finite, got {value!r}")
            value = float(value)
        values[key] = value
    return TrainMeta(steps=values["steps"], lr_sum=values["lr_sum"])


def load_json(path: Path, what: str) -> object:
    try:
        return read_json(path)  # "inf" strings of fl-sim's own files back to floats
    except FileNotFoundError:
        raise ConfigError(f"{what}: file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{what}: {path} is not valid JSON ({err})") from None


def build_merge_options(
    *,
    method: str,
    base: str,
    models: Sequence[str],
    out: str,
    lam: float | None = None,
    server_lr: float | None = None,
    weights: str | Sequence[float] | None = None,
    a_norm: str | None = None,
    train_meta: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    allow_pickle: bool = False,
    force: bool = False,
    statistics: bool = True,
    paper_defaults: bool = False,
    max_shard_size: str | int | None = None,
    to_adapter: bool = False,
    rank: int | None = None,
    **knobs: object,
) -> MergeOptions:
    """Validate every knob once and return the options the merge trusts.

    ``knobs`` are the method's own knobs by their YAML names (``rho=0.5``, ``tau_c=5``,
    ``density=0.2``...; see ``fl-sim merge --help``); a knob of another rule is an error.
    ``paper_defaults`` sets the paper's authors' choices (strategies/paper_defaults.py) that were
    not given: ``a_norm`` when it is None, the method's own knobs when absent from ``knobs``."""
    if method not in RULE_NAMES:
        raise ConfigError(f"unknown --method {method!r}; choose one of {', '.join(RULE_NAMES)}")
    spec = rule_spec(method)
    paper_set: dict[str, str] = {}
    if paper_defaults:
        own = {info.yaml for info in all_knob_infos() if info.rule == method}
        given = set(knobs) | ({"a_norm"} if a_norm is not None else set())
        paper_set = {
            k: v for k, v in paper_values(given, by="yaml").items() if k == "a_norm" or k in own
        }
        a_norm = paper_set.get("a_norm", a_norm)
        knobs = {**knobs, **{k: v for k, v in paper_set.items() if k != "a_norm"}}
    a_norm = "lr-sum" if a_norm is None else a_norm
    rule_knobs = spec.knobs.from_values(knobs, by="yaml")
    if len(models) < 2:
        raise ConfigError(
            f"merging needs at least 2 fine-tuned models after --base, got {len(models)}"
        )
    if a_norm not in A_NORMS:
        raise ConfigError(f"--a-norm must be one of {', '.join(A_NORMS)}, got {a_norm!r}")
    if device not in DEVICES:
        raise ConfigError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not out:
        raise ConfigError("no output path: pass --out OUT (a folder or a .safetensors file)")
    shard_bytes = None if max_shard_size is None else parse_shard_size(max_shard_size)
    check_adapter_output(bool(to_adapter), rank, Path(out), shard_bytes)
    model_paths = tuple(Path(m) for m in models)
    options = MergeOptions(
        method=method,
        base=Path(base),
        models=model_paths,
        out=Path(out),
        server_lr=server_lr_for(method, len(models), lam, server_lr),
        lam=lam,
        weights=parse_weights(weights),
        knobs=rule_knobs,
        a_norm_kind=a_norm,
        train_meta=read_train_meta(Path(train_meta) if train_meta else None, model_paths, models),
        device=device,
        dtype=dtype,
        allow_pickle=allow_pickle,
        force=force,
        statistics=statistics,
        paper_defaults=bool(paper_defaults),
        paper_set=tuple(paper_set.items()),
        max_shard_size=shard_bytes,
        to_adapter=bool(to_adapter),
        rank=rank,
    )
    # the rule's own checks (τ_c set, weights allowed, fednova's a-norm) run now
    make_rule(options.rule_config(), options.num_clients)
    return options


def check_adapter_output(
    to_adapter: bool, rank: object, out: Path, max_shard_size: int | None
) -> None:
    """--to-adapter needs --rank r ≥ 1 and a folder OUT; --rank means nothing without it."""
    if not to_adapter:
        if rank is not None:
            raise ConfigError("--rank is the rank of --to-adapter's output: pass --to-adapter too")
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(
            f"--to-adapter needs --rank R, an integer ≥ 1, got {rank!r} (R ≥ the sum of the "
            "inputs' ranks is exact for linear rules)"
        )
    if out.suffix == ".safetensors":
        raise ConfigError(
            f"--to-adapter writes an adapter folder, but --out {out} is a .safetensors file "
            "(pass a folder path)"
        )
    if max_shard_size is not None:
        raise ConfigError(
            "--max-shard-size shards a full model; --to-adapter writes one adapter file "
            "(drop one of them)"
        )


# parameters of every method, and each rule's own knobs by their YAML names (the registry)
YAML_PARAMETERS = {
    "lambda": "lam",
    "server_lr": "server_lr",
    "a_norm": "a_norm",
    "paper_defaults": "paper_defaults",
} | {info.yaml: info.yaml for info in all_knob_infos()}
YAML_KINDS = {
    "lambda": "float",
    "server_lr": "float",
    "a_norm": "str",
    "paper_defaults": "bool",
} | {info.yaml: info.kind for info in all_knob_infos()}
MODEL_PARAMETERS = ("weight", "density")  # per-model parameters (mergekit's names)
YAML_KEYS = {"merge_method", "base_model", "models", "parameters", "dtype", "out", "train_meta"}


def _yaml_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        float(value)
    except OverflowError:  # an integer beyond float range
        return False
    return True


def _same_model(a: str, b: str) -> bool:
    return a == b or Path(a).resolve() == Path(b).resolve()


def options_from_yaml(path: str, overrides: Mapping[str, object]) -> dict[str, object]:
    """Keyword arguments for ``build_merge_options`` from a mergekit-style YAML file.

    ``merge_method`` is a rule name or mergekit's name for it (``ties``, ``dare_linear``,
    ``task_arithmetic``). ``models[i].parameters.weight`` becomes p_t. For ``task_arithmetic``
    (mergekit computes θ₀ + λ Σ_t w_t τ_t, its ``lambda`` defaulting to 1), equal weights w mean
    our λ = λ·w; unequal ones become fedavg with p ∝ w and β = λ Σ_t w_t, the same arithmetic.
    mergekit's other sum-scaled method (dare_linear: Σ_t w_t τ̃_t) gets p ∝ w and β = λ Σ_t w_t
    too; ties (normalized, mean-scaled) only p ∝ w; our other rules take the weights as p_t. A
    per-model ``density`` must be the same for every model (one density per merge). A model
    entry that is the base itself is skipped (its τ is 0). Flags on the command line win.
    """
    try:
        document = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"merge config {path} does not exist") from None
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise ConfigError(f"merge config {path} is not valid YAML ({first})") from None
    if not isinstance(document, dict):
        raise ConfigError(f"merge config {path}: expected a mapping with merge_method, models, ...")
    unknown = sorted(set(document) - YAML_KEYS, key=str)  # YAML keys may be numbers
    if unknown:
        raise ConfigError(
            f"merge config {path}: unknown key {unknown[0]!r} "
            f"(known: {', '.join(sorted(YAML_KEYS))})"
        )
    kwargs: dict[str, object] = {}
    kwargs["method"] = document.get("merge_method")
    kwargs["base"] = document.get("base_model")
    if isinstance(kwargs["method"], str):
        kwargs["method"] = MERGEKIT_METHODS.get(kwargs["method"], kwargs["method"])
    if kwargs["method"] is None or kwargs["base"] is None:
        raise ConfigError(f"merge config {path}: needs both merge_method and base_model")
    for key, value in (("merge_method", kwargs["method"]), ("base_model", kwargs["base"])):
        if not isinstance(value, str):
            raise ConfigError(f"merge config {path}: {key} must be a string, got {value!r}")
    models = document.get("models") or []
    if not isinstance(models, list):
        raise ConfigError(f"merge config {path}: models must be a list of {{model: PATH}}")
    paths: list[str] = []
    weights: list[float] = []
    densities: list[float] = []
    for entry in models:
        if isinstance(entry, str):
            entry = {"model": entry}
        if not isinstance(entry, dict) or "model" not in entry:
            raise ConfigError(f"merge config {path}: each models entry needs a 'model' path")
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict) or set(parameters) - set(MODEL_PARAMETERS):
            raise ConfigError(
                f"merge config {path}: per-model parameters support only "
                f"{', '.join(MODEL_PARAMETERS)}, got {parameters!r}"[:300]
            )
        if _same_model(str(entry["model"]), str(kwargs["base"])):
            continue  # mergekit configs may list the base among the models: its τ is 0
        paths.append(str(entry["model"]))
        if "weight" in parameters:
            if not _yaml_number(parameters["weight"]):
                raise ConfigError(
                    f"merge config {path}: weight of {entry['model']} must be a number, "
                    f"got {parameters['weight']!r}"
                )
            weights.append(parameters["weight"])
        if "density" in parameters:
            if not _yaml_number(parameters["density"]):
                raise ConfigError(
                    f"merge config {path}: density of {entry['model']} must be a number, "
                    f"got {parameters['density']!r}"
                )
            densities.append(float(parameters["density"]))
    if weights and len(weights) != len(paths):
        raise ConfigError(f"merge config {path}: give a weight to every model or to none")
    if densities and (len(densities) != len(paths) or len(set(densities)) > 1):
        raise ConfigError(
            f"merge config {path}: per-model density must be given for every model and be the "
            f"same (got {densities}); or set parameters: {{density: ...}} once"
        )
    kwargs["models"] = paths
    parameters = document.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise ConfigError(f"merge config {path}: parameters must be a mapping")
    for key, value in parameters.items():
        if key not in YAML_PARAMETERS:
            raise ConfigError(
                f"merge config {path}: unknown parameter {key!r} "
                f"(known: {', '.join(YAML_PARAMETERS)})"
            )
        kind = YAML_KINDS[key]
        wrong = {
            "float": not _yaml_number(value),
            "int": isinstance(value, bool) or not isinstance(value, int),
            "bool": not isinstance(value, bool),
            "str": not isinstance(value, str),
        }[kind]
        if wrong:
            name = {"float": "a number", "int": "an integer", "bool": "true or false"}
            raise ConfigError(
                f"merge config {path}: parameter {key!r} must be "
                f"{name.get(kind, 'a string')}, got {value!r}"[:300]
            )
        kwargs[YAML_PARAMETERS[key]] = value
    if densities:
        kwargs.setdefault("density", densities[0])
    method = kwargs["method"]
    if weights:
        if method == "task_arithmetic":
            scale = float(kwargs.pop("lam", 1.0))  # mergekit's lambda scales Σ_t w_t τ_t
            if len(set(weights)) == 1:
                kwargs["lam"] = scale * float(weights[0])
            else:
                kwargs["method"] = "fedavg"
                kwargs.setdefault("server_lr", scale * float(sum(weights)))
                kwargs["weights"] = weights
        else:
            kwargs["weights"] = weights
            spec = RULES.get(method)
            if spec and spec.mergekit and spec.paper_scale == "sum" and "server_lr" not in kwargs:
                # mergekit's methods that sum w_t τ_t (dare_linear): p = w / Σ w, β = λ Σ_t w_t
                kwargs["server_lr"] = float(kwargs.pop("lam", 1.0)) * float(sum(weights))
    for key in ("dtype", "out", "train_meta"):
        if document.get(key) is not None:
            kwargs[key] = str(document[key])
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if kwargs.get("out") is None:
        raise ConfigError(f"merge config {path}: no output path: pass --out OUT (or set out:)")
    return kwargs
