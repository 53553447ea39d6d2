"""What a rule module declares, next to its math, so that every front end derives from it.

A rule module (``strategies/fedgma.py``, ``strategies/ties.py``, ...) holds the formula, the
``Rule`` that evaluates it chunk by chunk, and one ``RuleSpec``:

- ``name``: the rule's name in run configs, ``fl-sim merge --method`` and results;
- ``knobs``: a frozen ``RuleKnobs`` dataclass whose fields are the rule's own knobs, each made
  with ``knob(default, help, ...)``; its ``check`` validates them with messages that name the
  run-config key and the ``fl-sim merge`` flag, and it is called once, on construction;
- ``build``: ``RuleInputs`` (p_t, the knobs, ‖a_t‖₁, v₀, the seed) → the ``Rule``;
- ``linear``: A = Σ_t c_t Δ_t, so the engine may fuse it with the server step;
- ``paper_scale``: how the paper writes θ₀ + λ·τ*: ``"sum"`` (τ* a sum of task vectors: β = λT)
  or ``"mean"`` (τ* mean-like: β = λ);
- ``weighting``: ``"weighted"`` (p_t may be given), ``"uniform"`` (p_t = 1/T only) or
  ``"unweighted"`` (p_t is ignored, so giving weights is an error);
- ``mergekit``: the name of the same method in mergekit's YAML (``merge_method``), if any.

``strategies/registry.py`` lists the specs, one line each. From there come the run-config keys
and their help (fl_sim/config), the ``fl-sim merge`` flags and YAML parameters (fl_sim/merge),
the Flower strategy class (strategies/flower_strategy.py) and the rule table of the README and
``--help``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

import torch

from fl_sim.errors import ConfigError
from strategies.rule import Rule

KnobKind = Literal["float", "int", "bool", "str"]


def knob(
    default: float | int | bool | str,
    help: str,
    *,
    key: str | None = None,
    flag: str | None = None,
    yaml: str | None = None,
    choices: tuple[str, ...] = (),
) -> object:
    """A rule knob: a dataclass field with its default, one-line help and its names.

    ``yaml`` is the name in a mergekit-style YAML ``parameters:`` block (default: the field
    name); ``flag`` is the ``fl-sim merge`` flag (default: ``--`` + the YAML name, dashed);
    ``key`` is the run-config key (default: the rule name and the YAML name, dashed). Rules
    may share a flag or YAML name (``--density`` of ties and dare), never a run-config key.
    """
    kind: KnobKind = (
        "bool"
        if isinstance(default, bool)
        else "int"
        if isinstance(default, int)
        else "float"
        if isinstance(default, float)
        else "str"
    )
    return field(
        default=default,
        metadata={
            "help": help,
            "key": key,
            "flag": flag,
            "yaml": yaml,
            "kind": kind,
            "choices": tuple(choices),
        },
    )


@dataclass(frozen=True)
class KnobInfo:
    """One knob's names and type, as the front ends see it."""

    rule: str
    field: str
    key: str  # run-config key
    flag: str  # fl-sim merge flag
    yaml: str  # mergekit-style YAML parameter
    kind: KnobKind
    default: float | int | bool | str
    help: str
    choices: tuple[str, ...]


@dataclass(frozen=True)
class RuleKnobs:
    """Base of every rule's knob dataclass; subclasses add ``knob(...)`` fields and ``check``."""

    rule_name = ""  # set by RuleSpec

    def __post_init__(self) -> None:
        for info in self.knob_infos():
            value = getattr(self, info.field)
            object.__setattr__(self, info.field, coerce_knob(info, value))
            if info.choices and getattr(self, info.field) not in info.choices:
                raise self.error(
                    info.field,
                    f"must be one of {', '.join(info.choices)}, got {value!r}",
                    info.choices[0],
                )
        self.check()

    def check(self) -> None:
        """Validate the knobs; raise ``self.error(field, problem, example)``."""

    def check_runnable(self) -> None:
        """Valid knobs the rule still cannot run with (cclip without a radius): raise a one-line
        ConfigError. Called when the rule is chosen (a run's ``strategy``, a merge's method)."""

    @classmethod
    def knob_infos(cls) -> list[KnobInfo]:
        infos = []
        for spec in fields(cls):
            meta = spec.metadata
            yaml_name = meta["yaml"] or spec.name
            infos.append(
                KnobInfo(
                    rule=cls.rule_name,
                    field=spec.name,
                    key=meta["key"] or f"{cls.rule_name}-{yaml_name}".replace("_", "-"),
                    flag=meta["flag"] or "--" + yaml_name.replace("_", "-"),
                    yaml=yaml_name,
                    kind=meta["kind"],
                    default=spec.default if spec.default is not MISSING else None,
                    help=meta["help"],
                    choices=meta["choices"],
                )
            )
        return infos

    @classmethod
    def info(cls, field_name: str) -> KnobInfo:
        return next(i for i in cls.knob_infos() if i.field == field_name)

    @classmethod
    def error(cls, field_name: str, problem: str, example: object) -> ConfigError:
        """``<rule>: <key> <problem> (<how to set it in each front end>)``."""
        info = cls.info(field_name)
        return ConfigError(f"{info.rule}: {info.key} {problem} {_fix(info, example)}")

    @classmethod
    def from_values(cls, values: Mapping[str, object], *, by: str = "field") -> RuleKnobs:
        """The knobs from ``values`` keyed by field name (``by="field"``), run-config key
        (``"key"``) or YAML name (``"yaml"``); missing ones take their defaults."""
        infos = {getattr(i, by): i for i in cls.knob_infos()}
        unknown = sorted(set(values) - set(infos), key=str)
        if unknown:
            known = ", ".join(infos) or "none"
            raise ConfigError(f"{cls.rule_name} has no knob {unknown[0]!r} (its knobs: {known})")
        return cls(**{infos[name].field: value for name, value in values.items()})

    def as_dict(self) -> dict[str, object]:
        """Field name → value (for reports)."""
        return {i.field: getattr(self, i.field) for i in self.knob_infos()}


def coerce_knob(info: KnobInfo, value: object) -> object:
    """``value`` as the knob's type: ints are taken for floats, whole floats for ints, and
    "true"/"false" and numeric strings as a command line or TOML gives them."""
    kind = info.kind
    problem = None
    if kind == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        if isinstance(value, bool):
            return value
        problem = "must be true or false"
    elif kind == "int":
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value)
        whole = isinstance(value, int) or (
            isinstance(value, float) and math.isfinite(value) and value == int(value)
        )
        if whole and not isinstance(value, bool):
            return int(value)  # type: ignore[arg-type]
        problem = "must be an integer"
    elif kind == "float":
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                problem = "is out of range"
        else:
            problem = "must be a number"
    elif isinstance(value, str):
        return value
    else:
        problem = "must be a string"
    text = repr(value)
    text = text if len(text) <= 60 else f"{text[:57]}..."
    raise ConfigError(f"{info.rule}: {info.key} {problem}, got {text} {_fix(info, info.default)}")


def _fix(info: KnobInfo, example: object) -> str:
    """Where to set the knob: the run-config key, the fl-sim merge flag, the YAML parameter."""
    shown = _shown(example)
    return (
        f"(run config: {info.key} = {shown}; fl-sim merge: {info.flag} {shown} "
        f"or parameters: {{{info.yaml}: {shown}}})"
    )


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class RuleInputs:
    """What ``RuleSpec.build`` gets for one aggregation."""

    weights: torch.Tensor  # p_t, float64, normalised
    knobs: RuleKnobs
    a_norm: torch.Tensor | None = None  # ‖a_t‖₁ per client, when the clients reported it
    center: Mapping[str, torch.Tensor] | None = None  # v₀ (cclip), None = 0
    seed: int = 0  # seeded rules (dare): the seed of this aggregation


@dataclass(frozen=True)
class RuleSpec:
    """A rule as the registry knows it (see the module docstring)."""

    name: str
    title: str  # e.g. "FedNova"
    paper: str  # e.g. "Wang et al., NeurIPS 2020"
    formula: str  # A(Δ₁..Δ_T) in one line, for tables
    knobs: type[RuleKnobs]
    build: Callable[[RuleInputs], Rule]
    linear: bool
    paper_scale: Literal["sum", "mean"]
    weighting: Literal["weighted", "uniform", "unweighted"] = "weighted"
    mergekit: str | None = None
    uses_lambda: bool = False  # task_arithmetic: β = λT always
    needs_a_norm: bool = False  # fednova: needs every client's ‖a_t‖₁
    carries_center: bool = False  # cclip: v₀ = the previous round's A
    seeded: bool = False  # dare: random, seeded per aggregation

    def __post_init__(self) -> None:
        # the knobs class learns its rule's name, for keys and messages
        if self.knobs.rule_name not in ("", self.name):
            raise TypeError(f"{self.knobs.__name__} already belongs to {self.knobs.rule_name}")
        self.knobs.rule_name = self.name

    def knob_infos(self) -> list[KnobInfo]:
        return self.knobs.knob_infos()

    def default_knobs(self) -> RuleKnobs:
        return self.knobs()


__all__ = [
    "KnobInfo",
    "RuleInputs",
    "RuleKnobs",
    "RuleSpec",
    "coerce_knob",
    "knob",
]
