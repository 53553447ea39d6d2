"""Flat kebab-case run-config keys: declaring, coercing and reading them.

Flower's run-config is one flat mapping (``num-rounds = 3``): pyproject's
``[tool.flwr.app.config]``, ``flwr run --run-config`` overrides, or under ``fl-sim run`` a TOML
file plus ``--set key=value``. The typed sections of fl_sim/config/sections.py and
strategies/rule_section.py declare each key as a field with
``metadata=key_metadata(key, help, kind=...)``;
``coerce`` turns a raw value into the key's type with a one-line ``ConfigError``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport Flower depends on
    import tomli as tomllib  # type: ignore[no-redef]

from fl_sim.errors import ConfigError
from fl_sim.suites.registry import ConfigValue

KINDS = ("bool", "int", "float", "str", "layers", "grid", "knob", "seeds")


def key_metadata(key: str, help: str, *, kind: str) -> dict[str, str]:
    """A section field's metadata: its flat run-config ``key``, help, and ``kind`` (``coerce``)."""
    assert kind in KINDS, kind
    return {"key": key, "help": help, "kind": kind}


def coerce(key: str, kind: str, value: object) -> object:
    """``value`` as the field's type; ints are accepted for floats, whole floats for ints."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {excerpt(value)} (set {key}=true)")
    if kind == "int":
        whole = isinstance(value, int) or (
            isinstance(value, float) and math.isfinite(value) and value == int(value)
        )
        if isinstance(value, bool) or not whole:
            raise ConfigError(
                f"{key} must be an integer, got {excerpt(value)} (set {key}=<integer>)"
            )
        return int(value)  # type: ignore[arg-type]
    if kind == "float":
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # "inf" for tau-c
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {excerpt(value)} (set {key}=<number>)")
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range
            raise ConfigError(f"{key} is out of range, got {excerpt(value)}") from None
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f'{key} must be a string, got {excerpt(value)} (set {key}="...")')
        return value
    if kind == "layers":  # federated-layers: '', all, or an integer (kept as its string)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(
                f'{key} must be an integer or "all", got {excerpt(value)} (set {key}=2)'
            )
        return str(value)
    if kind == "grid":  # a comma list of numbers, kept as its string; one number is a grid of one
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(
                f'{key} must be a comma list of numbers, got {excerpt(value)} (set {key}="0.1,0.3")'
            )
        if isinstance(value, str):
            return value
        try:
            return repr(float(value))
        except OverflowError:
            raise ConfigError(f"{key} is out of range, got {excerpt(value)}") from None
    if kind == "seeds":  # a count (an integer) or a comma list of seeds (a string, kept as is)
        whole = isinstance(value, int) or (
            isinstance(value, float) and math.isfinite(value) and value == int(value)
        )
        if isinstance(value, bool) or not (whole or isinstance(value, str)):
            raise ConfigError(
                f"{key} must be a count or a comma list of seeds, got {excerpt(value)} "
                f'(set {key}=3 or {key}="0,1,2")'
            )
        return value if isinstance(value, str) else int(value)  # type: ignore[arg-type]
    # knob: a number, or a string holding a comma list, a range or a name
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(
            f"{key} must be a number or a string (comma list or log:A:B range), "
            f"got {excerpt(value)}"
        )
    return value


def excerpt(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile value can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")


def check_at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be an integer ≥ {low}, got {value} (set {key})")


def parse_override(text: str) -> tuple[str, ConfigValue]:
    """``key=value`` → (key, value); the value is read as TOML, else taken as a bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value (e.g. --set num-rounds=3)")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if isinstance(value, (list, dict)) or not isinstance(value, (bool, int, float, str)):
        raise ConfigError(
            f"{key}: give a number, true/false or a string, got {raw!r} "
            '(write lists as a quoted comma string, e.g. lr="0.1,0.05")'
        )
    return key, value


def read_toml(path: str | Path) -> dict[str, object]:
    """A run's TOML: flat keys, or a pyproject-style ``[tool.flwr.app.config]`` table."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"run config {path} does not exist (give --config FILE.toml)") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"run config {path} is not valid TOML: {error}") from None
    table = document.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if table is None:
        table = document
    nested = [key for key, value in table.items() if isinstance(value, dict)]
    if nested:
        raise ConfigError(
            f"run config {path}: table [{nested[0]}] is not a run-config key; "
            "write flat keys (num-rounds = 3) or a [tool.flwr.app.config] table"
        )
    return dict(table)


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)
