"""`flwr run .` end to end: the real Flower CLI, a local simulation SuperLink, the pyproject app.

    flwr run . local --stream --run-config '...' --federation-config 'num-supernodes=3 ...'

with ``$FLWR_HOME/config.toml`` naming a local simulation federation (FLOWER.md). One-shot
``task_arithmetic`` over T = 3 tasks must give θ₀ + λ Σ_t (θ_t − θ₀) from the checkpoints the run
saved. ``flwr run`` leaves a detached ``flower-superlink`` behind (FLOWER.md, trap 2), which
starts ``flower-superexec``, ``flwr-simulation`` and Ray: the fixture stops every process whose
environment holds this test's FLWR_HOME, by PID, after the test passes or fails. The SuperLink's
ports are free ones picked here, so a SuperLink left by someone else is never reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
LAM = 0.3
T = 3
FLWR_RUN_TIMEOUT = 240  # seconds; the run takes ~30 s on 2 cores
FEDERATION = "local"
CONFIG_TOML = f"""[superlink]
default = "{FEDERATION}"

[superlink.{FEDERATION}]
address = ":local:"
"""
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


@pytest.fixture
def flwr_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment of a `flwr run` with its own FLWR_HOME and ports; stops what it started."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the process clean-up reads /proc")
    flwr = Path(sys.executable).parent / "flwr"
    if not flwr.exists() or shutil.which("flower-superlink", path=str(flwr.parent)) is None:
        pytest.skip(f"no flwr CLI next to {sys.executable} (install flwr[simulation])")
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(CONFIG_TOML, encoding="utf-8")
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        # FLOWER.md trap 1, telemetry, and no update check (no network here)
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FL_SIM_CACHE": str(tmp_path / "fl-sim-cache"),  # clients' update cache: not ~/.cache
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        # the SuperLink is started as `flower-superlink` from PATH: this venv's
        "PATH": f"{flwr.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    entry = f"FLWR_HOME={home}"
    try:
        yield env
    finally:
        signalled = stop_processes(entry)
        time.sleep(0.5)
        left = started_under(entry) | {pid for pid in signalled if running(pid)}
        assert not left, f"processes of this test's FLWR_HOME still running: {sorted(left)}"


@pytest.mark.slow
def test_flwr_run_task_arithmetic_equals_theta0_plus_lambda_sum_of_task_vectors(tmp_path, flwr_env):
    results_dir = (tmp_path / "run").resolve()  # absolute: the ServerApp runs elsewhere
    run_config = run_config_text(
        {**SHORT_RUN, "strategy": "task_arithmetic", "lambda": LAM, "num-tasks": T,
         "update-cache": True, "results-dir": str(results_dir)}
    )  # fmt: skip
    federation_config = (
        f"num-supernodes={T} client-resources-num-cpus=1 client-resources-num-gpus=0.0"
    )
    command = [str(Path(sys.executable).parent / "flwr"), "run", ".", FEDERATION, "--stream"]
    command += ["--run-config", run_config, "--federation-config", federation_config]
    start = time.monotonic()
    done = subprocess.run(
        command,
        cwd=REPO,
        env=flwr_env,
        capture_output=True,
        text=True,
        timeout=FLWR_RUN_TIMEOUT,
        check=False,
    )
    seconds = time.monotonic() - start
    log = (done.stdout + done.stderr)[-4000:]
    assert done.returncode == 0, f"flwr run exited {done.returncode}:\n{log}"
    assert (results_dir / "results.json").exists(), f"no results.json after {seconds:.0f} s:\n{log}"

    results = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "completed", results["error"]
    assert results["config"]["strategy"] == "task_arithmetic"
    assert results["config"]["num-tasks"] == T and results["failures"] == []
    assert results["rounds"][1]["training"]["server_lr"] == pytest.approx(LAM * T)  # β = λT

    theta0 = load_file(results_dir / "base.safetensors")
    clients = [load_file(results_dir / path) for path in results["files"]["clients"]]
    assert len(clients) == T
    merged = load_file(results_dir / "global_model.safetensors")
    assert sorted(merged) == sorted(theta0)
    for name in theta0:
        task_arithmetic = theta0[name] + LAM * sum(c[name] - theta0[name] for c in clients)
        torch.testing.assert_close(merged[name], task_arithmetic, rtol=1e-5, atol=1e-5, msg=name)
