"""`flwr run .` end to end: the real Flower CLI, a local simulation SuperLink, the pyproject app.

    flwr run . local --stream --run-config '...' --federation-config 'num-supernodes=3 ...'

with ``$FLWR_HOME/config.toml`` naming a local simulation federation (docs/design.md). One-shot
``task_arithmetic`` over T = 3 tasks must give θ₀ + λ Σ_t (θ_t − θ₀) from the checkpoints the run
saved. ``flwr run`` leaves a detached ``flower-superlink`` behind (docs/design.md), which
starts ``flower-superexec``, ``flwr-simulation`` and Ray: the fixture stops every process whose
environment holds this test's FLWR_HOME, by PID, after the test passes or fails. The SuperLink's
ports are free ones picked here, so a SuperLink left by someone else is never reused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import SHORT_RUN, free_port, run_config_text, running, started_under, stop_processes
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
        # no venv per run (`uv sync` would pull CUDA torch), no telemetry, no update check
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
