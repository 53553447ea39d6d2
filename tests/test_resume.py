"""Round checkpoints and ``resume``: a killed multi-round run ends as if it never stopped.

In-process first (a grid that dies in round 3, then ``resume = true``), for a stateful rule
(cclip keeps v₀ across rounds); then, marked slow, the real thing: ``fl-sim run`` on Ray in its
own session, SIGKILLed after the round-2 checkpoint, resumed with ``--resume``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from flwr.app import Message, MessageType
from helpers import InProcessGrid, config
from safetensors.torch import load_file

from fl_sim.errors import ConfigError
from fl_sim.federation.round_checkpoint import checkpoint_path, read_checkpoint
from fl_sim.federation.server_app import run_federation

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


class ServerDies(BaseException):
    """Stands for a SIGKILL of the server: nothing after it runs (not an Exception)."""


class DyingGrid(InProcessGrid):
    """Dies when asked to send the training messages of ``round``."""

    def __init__(self, num_nodes: int, round: int) -> None:
        super().__init__(num_nodes)
        self.round = round

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        messages = list(messages)
        if any(
            m.metadata.message_type == MessageType.TRAIN and m.metadata.group_id == str(self.round)
            for m in messages
        ):
            raise ServerDies
        return super().send_and_receive(messages, timeout=timeout)


def round_metrics(results: dict) -> list[dict]:
    """Per round: every split's per-task figures and the training record, timings dropped."""
    rows = []
    for entry in results["rounds"]:
        training = dict(entry.get("training") or {})
        for timing in (
            "aggregation_seconds",
            "train_seconds",
            "client_seconds",
            "wait_seconds",
            "busy_seconds",
        ):
            training.pop(timing, None)
        rows.append({"round": entry["round"], "splits": entry["splits"], "training": training})
    return rows


def test_resumed_run_equals_the_uninterrupted_one(tmp_path, task_identity):
    knobs = {"strategy": "cclip", "tau_c_auto": True, "num_rounds": 4, "crash": "2:3",
             "min_clients": 2, "update_cache": False}  # fmt: skip
    whole = run_federation(InProcessGrid(3), config(**knobs, results_dir=str(tmp_path / "a")))
    with pytest.raises(ServerDies):
        run_federation(DyingGrid(3, round=3), config(**knobs, results_dir=str(tmp_path / "b")))
    saved = read_checkpoint(tmp_path / "b", config(**knobs, results_dir=str(tmp_path / "b")))
    assert saved is not None and saved.round == 2 and saved.strategy_tensors  # cclip's v₀
    resumed = run_federation(
        InProcessGrid(3), config(**knobs, resume=True, results_dir=str(tmp_path / "b"))
    )
    a, b = (
        load_file(tmp_path / "a" / "global_model.safetensors"),
        load_file(tmp_path / "b" / "global_model.safetensors"),
    )
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert round_metrics(resumed) == round_metrics(whole)
    assert resumed["failures"] == whole["failures"]
    assert resumed["finetuned_splits"] == whole["finetuned_splits"]
    assert resumed["diagnostics"] == whole["diagnostics"]


def test_resume_without_a_checkpoint_starts_afresh_and_a_changed_config_is_refused(
    tmp_path, task_identity
):
    fresh = run_federation(
        InProcessGrid(3), config(num_rounds=2, resume=True, results_dir=str(tmp_path))
    )
    assert fresh["status"] == "completed" and checkpoint_path(tmp_path).exists()
    with pytest.raises(ConfigError) as error:
        run_federation(
            InProcessGrid(3), config(num_rounds=2, lr=0.1, resume=True, results_dir=str(tmp_path))
        )
    assert "resume: the checkpoint" in str(error.value) and "lr" in str(error.value)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------------------------
# The real thing: SIGKILL `fl-sim run` on Ray, then --resume
# ---------------------------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children first found first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def kill_tree(process: subprocess.Popen, tree: set[int]) -> None:
    """SIGKILL ``process`` and every process it started (by PID; Ray's raylet and workers too)."""
    pids = {process.pid, *tree, *descendants(process.pid)}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


RUN = [
    sys.executable, "-m", "fl_sim.cli.main", "run", "--no-progress",
    "--set", "experiment=single", "--set", "task-suite=toy", "--set", "optimizer=sgd",
    "--set", "preset=none", "--set", "lr=0.05", "--set", "local-steps=5",
    "--set", "num-tasks=2", "--set", "num-rounds=4", "--set", "update-cache=false",
    "--set", "diagnostic-batch=0",
]  # fmt: skip


@pytest.fixture
def processes():
    """Every `fl-sim run` started by a test, and what it started, killed in teardown."""
    started: list[tuple[subprocess.Popen, set[int]]] = []
    yield started
    for process, tree in started:
        kill_tree(process, tree)


def start_run(out: Path, processes, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FLWR_TELEMETRY_ENABLED": "0"}
    log = (out.parent / f"{out.name}-{len(processes)}.log").open("w")
    process = subprocess.Popen(
        [*RUN, "--set", f"results-dir={out}", *extra],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    processes.append((process, set()))
    return process


def wait_for_round(out: Path, process: subprocess.Popen, processes, wanted: int) -> None:
    """Until the checkpoint says round ≥ ``wanted``; the process tree is remembered as it grows."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        processes[-1][1].update(descendants(process.pid))
        path = out / "checkpoint" / "round.json"
        if path.exists():
            try:
                if json.loads(path.read_text())["round"] >= wanted:
                    return
            except ValueError:
                pass  # being replaced
        assert process.poll() is None, f"run ended early ({process.returncode})"
        time.sleep(0.05)
    raise AssertionError(f"no round-{wanted} checkpoint within 300 s")


@pytest.mark.slow
def test_sigkilled_run_resumes_to_the_same_model_and_metrics(tmp_path, processes):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    process = start_run(killed, processes)
    wait_for_round(killed, process, processes, 2)
    kill_tree(process, processes[-1][1])
    assert not (killed / "global_model.safetensors").exists()
    resumed = start_run(killed, processes, "--resume")
    assert resumed.wait(timeout=300) == 0
    uninterrupted = start_run(whole, processes)
    assert uninterrupted.wait(timeout=300) == 0
    a = load_file(whole / "global_model.safetensors")
    b = load_file(killed / "global_model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-7)
    ra = json.loads((whole / "results.json").read_text())
    rb = json.loads((killed / "results.json").read_text())
    assert rb["status"] == "completed" and len(rb["rounds"]) == 5
    assert round_metrics(rb) == round_metrics(ra)
