"""Declared faults for robustness runs: Byzantine updates, crashes and slow clients.

Run-config keys (every fault is declared, never random without the run's seed):

- ``byzantine = "t:attack, ..."``: client t replaces its honest update Δ_t after training with
  ``scale:K`` (K·Δ_t), ``sign-flip`` (−Δ_t), ``gaussian:σ`` (Δ_t + N(0, σ²), drawn from
  torch.Generator seeded with seed + t + round) or ``nan`` (every float entry NaN);
- ``crash = "t:round, ..."``: client t raises in that round (fail-client / fail-round is the
  one-entry form of it);
- ``slow = "t:seconds, ..."``: client t sleeps that long before replying (with ``round-timeout``
  the server stops waiting and records it as failed).

The attack is applied to a copy of the update in the ClientApp, so the update cache keeps the
honest Δ_t. Only floating-point tensors are attacked; integer buffers are left as they are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fl_sim.errors import ConfigError

ATTACKS = ("scale:K", "sign-flip", "gaussian:SIGMA", "nan")


def _entries(key: str, text: str, num_tasks: int) -> list[tuple[int, str]]:
    """``"0:a, 2:b"`` → [(0, "a"), (2, "b")]: every t an index < num_tasks, each t once."""
    entries: list[tuple[int, str]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        head, sep, value = item.partition(":")
        try:
            t = int(head.strip())
        except ValueError:
            t = -1
        if not sep or not value.strip() or not 0 <= t < num_tasks:
            raise ConfigError(
                f"{key}: cannot read {item!r}; give t:value entries with a client index "
                f'0 ≤ t < num-tasks = {num_tasks} (e.g. {key}="{_EXAMPLES[key]}")'
            )
        entries.append((t, value.strip()))
    seen = [t for t, _ in entries]
    if len(set(seen)) != len(seen) and key != "crash":
        raise ConfigError(f"{key}: {text!r} names a client twice (one entry per client)")
    return entries


_EXAMPLES = {"byzantine": "1:scale:-10,3:nan", "crash": "1:2,2:3", "slow": "1:30"}


def _number(key: str, item: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{key}: cannot read {text!r} in {item!r} as a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{key}: {item!r} needs a finite number, got {text!r}")
    return value


def check_attack(attack: str) -> str:
    """The attack, validated; a one-line ConfigError naming ``byzantine`` otherwise."""
    name, _, argument = attack.partition(":")
    if name in ("sign-flip", "nan") and not argument:
        return attack
    if name == "scale" and argument:
        _number("byzantine", attack, argument)
        return attack
    if name == "gaussian" and argument:
        if _number("byzantine", attack, argument) < 0:
            raise ConfigError(f"byzantine: gaussian σ must be ≥ 0, got {argument!r}")
        return attack
    raise ConfigError(f"byzantine: unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")


def parse_byzantine(text: str, num_tasks: int) -> dict[int, str]:
    """client t → its attack."""
    return {t: check_attack(attack) for t, attack in _entries("byzantine", text, num_tasks)}


def parse_crash(text: str, num_tasks: int) -> set[tuple[int, int]]:
    """(t, round) pairs in which client t raises."""
    crashes = set()
    for t, value in _entries("crash", text, num_tasks):
        try:
            server_round = int(value)
        except ValueError:
            server_round = 0
        if server_round < 1:
            raise ConfigError(f"crash: round must be an integer ≥ 1, got {value!r} for client {t}")
        crashes.add((t, server_round))
    return crashes


def parse_slow(text: str, num_tasks: int) -> dict[int, float]:
    """client t → seconds it sleeps before replying (every round)."""
    slow = {}
    for t, value in _entries("slow", text, num_tasks):
        seconds = _number("slow", f"{t}:{value}", value)
        if seconds < 0:
            raise ConfigError(f"slow: seconds must be ≥ 0, got {value!r} for client {t}")
        slow[t] = seconds
    return slow


def attack_update(
    update: Mapping[str, torch.Tensor], attack: str, *, seed: int
) -> dict[str, torch.Tensor]:
    """A new update: ``attack`` applied to every floating-point tensor of ``update``."""
    name, _, argument = check_attack(attack).partition(":")
    generator = torch.Generator().manual_seed(seed) if name == "gaussian" else None
    attacked: dict[str, torch.Tensor] = {}
    for key, delta in update.items():
        if not delta.is_floating_point():
            attacked[key] = delta.clone()
        elif name == "scale":
            attacked[key] = delta * float(argument)
        elif name == "sign-flip":
            attacked[key] = -delta
        elif name == "gaussian":
            noise = torch.randn(delta.shape, generator=generator, dtype=torch.float32)
            attacked[key] = delta + (float(argument) * noise).to(delta.dtype)
        else:  # nan
            attacked[key] = torch.full_like(delta, math.nan)
    return attacked


__all__ = [
    "ATTACKS",
    "attack_update",
    "check_attack",
    "parse_byzantine",
    "parse_crash",
    "parse_slow",
]
