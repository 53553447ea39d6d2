"""What several test files share that is not a fixture (the fixtures are in conftest.py).

- ``config`` / ``BASE``: a toy-suite RunConfig of T = 3 tasks; ``InProcessGrid``: a Grid whose
  nodes run the real ClientApp in this process (no Ray), for in-process federations;
  ``assert_states_close``;
- ``SHORT_RUN`` and ``run_config_text``: a short one-shot toy federation as ``--run-config``
  text, for the end-to-end tests of the engines (``flwr run``, deployment, Ray cluster);
- ``free_port``, ``started_under``, ``running``, ``stop_processes``: ports and the clean-up, by
  PID, of every process started under one environment entry (FLWR_HOME=..., read from /proc);
- ``cclip``: CCLIP over a whole model held in memory, in plain torch, the reference the chunked
  ``strategies.cclip.CClip`` and ``fl-sim merge --method cclip`` are checked against.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from flwr.app import Context, Error, Message, RecordDict

from clients.client_app import app as client_app
from fl_sim.config.run_config import RunConfig

T = 3

BASE = {
    "experiment": "single",
    "task-suite": "toy",
    "optimizer": "sgd",
    "preset": "none",
    "num-tasks": T,
    "local-steps": 8,
    "lr": 0.05,
}


def config(**values: object) -> RunConfig:
    return RunConfig.from_mapping({**BASE, **{k.replace("_", "-"): v for k, v in values.items()}})


def assert_states_close(actual, expected, atol=1e-6):
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=atol, msg=name)


class InProcessGrid:
    """A Grid whose nodes run the real ClientApp in this process (node id 100 + t → task t)."""

    def __init__(self, num_nodes: int) -> None:
        self.contexts = {
            100 + t: Context(
                run_id=7,
                node_id=100 + t,
                node_config={"partition-id": t, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for t in range(num_nodes)
        }

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            try:
                replies.append(client_app(msg, self.contexts[msg.metadata.dst_node_id]))
            except Exception as error:  # as Flower's engines do: an error reply, not a crash
                replies.append(
                    Message(Error(code=2, reason=f"{type(error).__name__}: {error}"), reply_to=msg)
                )
        return replies


# A short one-shot federation on the toy suite: the end-to-end tests of other engines (the
# deployment engine, a Ray cluster) run it and compare with the simulation.
SHORT_RUN = {
    "experiment": "single",
    "task-suite": "toy",
    "optimizer": "sgd",
    "preset": "none",
    "lr": 0.05,
    "local-steps": 8,
    "num-tasks": 2,
    "strategy": "fedavg",
    "num-rounds": 1,
    "update-cache": False,  # clients must train, not replay a cached Δ_t
}


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string
    return repr(value)


def run_config_text(values: dict[str, object]) -> str:
    """``values`` as `flwr run --run-config` text: key=value pairs, TOML values."""
    return " ".join(f"{key}={toml_value(value)}" for key, value in values.items())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def processes_with_env(entry: str) -> set[int]:
    """PIDs (ours: others' /proc/<pid>/environ is unreadable) whose environment holds ``entry``."""
    needle = entry.encode()
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environ = (proc / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if needle in environ.split(b"\0"):
            found.add(int(proc.name))
    return found


def parent_and_state(pid: int) -> tuple[int, str] | None:
    """(ppid, state) from /proc/<pid>/stat; None once the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[1]), fields[0]


def running(pid: int) -> bool:
    info = parent_and_state(pid)
    return info is not None and info[1] not in ("Z", "X")


def started_under(entry: str) -> set[int]:
    """The processes holding ``entry`` and all their descendants. Ray's agents overwrite their
    environment with their process title, so they are found as the raylet's children."""
    roots = processes_with_env(entry)
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and (info := parent_and_state(int(proc.name))):
            children.setdefault(info[0], []).append(int(proc.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found and pid != os.getpid():
            found.add(pid)
            todo.extend(children.get(pid, []))
    return {pid for pid in found if running(pid)}


def stop_processes(entry: str, grace: float = 10.0) -> set[int]:
    """SIGTERM every process started under ``entry`` (FLWR_HOME=...), SIGKILL what outlives
    ``grace`` seconds; returns every PID that was signalled."""
    signalled: set[int] = set()
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        alive = started_under(entry) | {pid for pid in signalled if running(pid)}
        if not alive:
            return signalled
        for pid in alive - signalled:  # collected before any dies: orphans stay known
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        signalled |= alive
        time.sleep(0.2)
    for pid in started_under(entry) | signalled:
        if running(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return signalled


def cclip(
    deltas: Mapping[str, torch.Tensor],
    weights: torch.Tensor,
    tau_c: float,
    iters: int = 1,
    center: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """CCLIP on a model in memory: ``deltas[name]`` is ``[T, ...]`` (Δ_t per row), v₀ = center.

    v ← v + Σ_t p_t s_t (Δ_t − v), s_t = min(1, τ_c / ‖Δ_t − v‖₂) over every tensor, L times;
    written here with no code of strategies/cclip.py, on the device and dtype of ``deltas``.
    """
    first = next(iter(deltas.values()))
    p = weights.to(device=first.device, dtype=first.dtype)
    v = {
        name: torch.zeros_like(d[0]) if center is None else center[name].to(d)
        for name, d in deltas.items()
    }
    for _ in range(iters):
        squared = sum((d - v[name]).double().flatten(1).pow(2).sum(1) for name, d in deltas.items())
        distance = squared.sqrt()
        scale = torch.where(distance > tau_c, tau_c / distance, torch.ones_like(distance))
        ps = p * scale.to(p)
        v = {name: v[name] + torch.tensordot(ps, d - v[name], dims=1) for name, d in deltas.items()}
    return v
