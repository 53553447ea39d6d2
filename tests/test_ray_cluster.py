"""`fl-sim run --ray-address ADDR` (or ``$RAY_ADDRESS``) runs on an existing Ray cluster.

    ray start --head --node-ip-address 127.0.0.1 --port P --num-cpus 2 --temp-dir DIR
    simulate([...], ray_address="127.0.0.1:P")

The cluster is this test's own: every port it opens is a free one picked here (other sessions
may run Ray on this machine), its processes carry a marker in their environment, and the
fixture stops them and their children by PID, never with `ray stop` (which stops every Ray of
this user). The run is a short toy federation; it must complete and leave the same weights as
the same run on a private Ray (the default), since the engine must not change the result.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import SHORT_RUN, free_port, running, started_under, stop_processes
from safetensors.torch import load_file

from fl_sim.config.run_config import RunConfig
from fl_sim.errors import ConfigError
from fl_sim.federation.simulation import simulate

BIN = Path(sys.executable).parent
T = SHORT_RUN["num-tasks"]
RAY_START_TIMEOUT = 120  # seconds; ~10 s on 2 cores
RUN_CONFIG = SHORT_RUN  # T = 2 toy clients, one-shot fedavg


@pytest.fixture
def ray_head() -> Iterator[tuple[str, Path]]:
    """A one-node Ray cluster on loopback: (address, temp dir); stops its processes after."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the process clean-up reads /proc")
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip(f"no ray CLI next to {sys.executable} (install flwr[simulation])")
    # short: Ray's unix sockets live under it (107-byte path limit)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    entry = f"FL_SIM_TEST_RAY={temp_dir}"
    port = free_port()
    command = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1"]
    command += ["--port", str(port), "--num-cpus", "2", "--num-gpus", "0"]
    command += ["--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", temp_dir]
    for flag in (
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--object-manager-port",
        "--node-manager-port",
    ):
        command += [flag, str(free_port())]
    env = {**os.environ, "FL_SIM_TEST_RAY": temp_dir, "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    try:
        started = subprocess.run(
            command,
            env=env,
            capture_output=True,
            text=True,
            timeout=RAY_START_TIMEOUT,
            check=False,
        )
        assert started.returncode == 0, f"ray start failed:\n{started.stderr[-3000:]}"
        yield f"127.0.0.1:{port}", Path(temp_dir)
    finally:
        signalled = stop_processes(entry)
        time.sleep(0.5)
        left = started_under(entry) | {pid for pid in signalled if running(pid)}
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of this test's Ray cluster still running: {sorted(left)}"


def run(results_dir: Path, cache: Path, **engine: object) -> dict[str, object]:
    """One toy run; run-config keys (kebab-case) go to the config, the rest to simulate."""
    keys = {key: engine.pop(key) for key in list(engine) if "-" in key}
    saved = os.environ.get("FL_SIM_CACHE")
    os.environ["FL_SIM_CACHE"] = str(cache)
    try:
        config = RunConfig.from_mapping({**RUN_CONFIG, "results-dir": str(results_dir), **keys})
        (results,) = simulate([config], progress=False, **engine)
    finally:
        if saved is None:
            os.environ.pop("FL_SIM_CACHE", None)
        else:
            os.environ["FL_SIM_CACHE"] = saved
    return results


@pytest.mark.slow
def test_run_on_an_existing_ray_cluster_equals_a_private_ray_run(tmp_path, ray_head, monkeypatch):
    address, temp_dir = ray_head
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    on_cluster = run(tmp_path / "cluster", tmp_path / "cache-cluster", ray_address=address)
    assert on_cluster["status"] == "completed", on_cluster.get("error")
    assert on_cluster["failures"] == [] and on_cluster["config"]["num-tasks"] == T

    # $RAY_ADDRESS is the same switch as --ray-address (Ray's own convention)
    monkeypatch.setenv("RAY_ADDRESS", address)
    by_env = run(tmp_path / "env", tmp_path / "cache-env", **{"client-num-cpus": 2.0})
    assert by_env["status"] == "completed", by_env.get("error")
    assert by_env["config"]["client-num-cpus"] == 2.0
    monkeypatch.delenv("RAY_ADDRESS")
    drivers = list(temp_dir.glob("session_*/logs/python-core-driver-*.log"))
    assert len(drivers) >= 2, f"the runs did not join the cluster in {temp_dir}: {drivers}"

    private = run(tmp_path / "private", tmp_path / "cache-private")
    expected = load_file(tmp_path / "private" / "global_model.safetensors")
    for name in ("cluster", "env"):
        merged = load_file(tmp_path / name / "global_model.safetensors")
        assert sorted(merged) == sorted(expected)
        for key in expected:
            torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
    assert private["status"] == "completed"


# ---------------------------------------------------------------------------------------------
# Client resources: run-config keys client-num-cpus / client-num-gpus, Flower's backend_config
# ---------------------------------------------------------------------------------------------


class _Captured(Exception):
    """Raised by the fake run_simulation once it has the backend_config: no Ray is started."""


@pytest.fixture
def backend_config(monkeypatch) -> dict[str, object]:
    """run_simulation replaced (simulate imports it from flwr.simulation when it runs)."""
    import flwr.simulation

    captured: dict[str, object] = {}

    def fake_run_simulation(**kwargs: object) -> None:
        captured.update(kwargs["backend_config"])  # type: ignore[arg-type]
        raise _Captured

    monkeypatch.setattr(flwr.simulation, "run_simulation", fake_run_simulation)
    return captured


def config_with(tmp_path: Path, **keys: object) -> RunConfig:
    return RunConfig.from_mapping({**RUN_CONFIG, "results-dir": str(tmp_path), **keys})


def test_client_resources_are_run_config_keys(tmp_path):
    assert (RunConfig().engine.client_num_cpus, RunConfig().engine.client_num_gpus) == (1.0, 0.0)
    toml = tmp_path / "run.toml"
    toml.write_text("client-num-cpus = 2\nclient-num-gpus = 0.5\n")
    from_file = RunConfig.from_sources(toml, ["client-num-gpus=0.25"])
    assert (from_file.engine.client_num_cpus, from_file.engine.client_num_gpus) == (2.0, 0.25)
    assert from_file.to_mapping()["client-num-cpus"] == 2.0
    given = RunConfig.from_mapping({"client-num-cpus": "0.5", "client-num-gpus": 1})
    assert (given.engine.client_num_cpus, given.engine.client_num_gpus) == (0.5, 1.0)


def test_client_resources_reach_flowers_backend_config(tmp_path, backend_config):
    config = config_with(tmp_path, **{"client-num-cpus": 0.5, "client-num-gpus": 0.25})
    with pytest.raises(_Captured):
        simulate([config], progress=False)
    assert backend_config["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.25}

    backend_config.clear()  # simulate's keywords override the configs' keys
    with pytest.raises(_Captured):
        simulate([config], client_cpus=2, progress=False)
    assert backend_config["client_resources"] == {"num_cpus": 2.0, "num_gpus": 0.25}


def test_client_flags_are_shortcuts_that_override_the_run_config(tmp_path, backend_config):
    from fl_sim.cli.main import build_parser

    def fl_sim_run(*argv: str) -> dict[str, float]:
        backend_config.clear()
        args = build_parser().parse_args(["run", "--no-progress", *base, *argv])
        with pytest.raises(_Captured):
            args.func(args)
        return backend_config["client_resources"]  # type: ignore[return-value]

    base = [f"--set={key}={value}" for key, value in RUN_CONFIG.items()]
    base += [f"--set=results-dir={tmp_path}"]
    assert fl_sim_run() == {"num_cpus": 1.0, "num_gpus": 0.0}
    resources = ["--set", "client-num-cpus=0.5", "--set", "client-num-gpus=0.25"]
    assert fl_sim_run(*resources) == {"num_cpus": 0.5, "num_gpus": 0.25}
    assert fl_sim_run(*resources, "--client-cpus", "3") == {"num_cpus": 3.0, "num_gpus": 0.25}
    assert fl_sim_run(*resources, "--client-gpus", "1") == {"num_cpus": 0.5, "num_gpus": 1.0}
    with pytest.raises(ConfigError, match="client-num-gpus"):
        fl_sim_run("--client-gpus", "-1")


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("client-num-cpus", 0),
        ("client-num-cpus", -1),
        ("client-num-cpus", float("nan")),
        ("client-num-cpus", float("inf")),
        ("client-num-gpus", -0.5),
        ("client-num-gpus", float("nan")),
        ("client-num-gpus", float("inf")),
        ("client-num-gpus", "half"),
    ],
)
def test_client_resources_are_validated(key, value):
    with pytest.raises(ConfigError, match=key) as error:
        RunConfig.from_mapping({**RUN_CONFIG, key: value})
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_sources(overrides=[f"{key}={value}"])


@pytest.mark.parametrize(
    ("keyword", "key", "value"),
    [
        ("client_cpus", "client-num-cpus", 0),
        ("client_cpus", "client-num-cpus", float("nan")),
        ("client_gpus", "client-num-gpus", -0.5),
    ],
)
def test_simulate_resource_overrides_are_validated(tmp_path, keyword, key, value):
    with pytest.raises(ConfigError, match=key):
        simulate([config_with(tmp_path)], progress=False, **{keyword: value})


def test_runs_of_one_simulation_must_agree_on_client_resources(tmp_path, backend_config):
    first = config_with(tmp_path / "a")
    for key, value in (("client-num-cpus", 2), ("client-num-gpus", 0.5)):
        other = config_with(tmp_path / "b", **{key: value})
        with pytest.raises(ConfigError, match="client-num-cpus and client-num-gpus"):
            simulate([first, other], progress=False)
    assert backend_config == {}
    # an override sets every run's resources, so they agree again
    other = config_with(tmp_path / "b", **{"client-num-cpus": 2})
    with pytest.raises(_Captured):
        simulate([first, other], client_cpus=0.5, progress=False)
    assert backend_config["client_resources"] == {"num_cpus": 0.5, "num_gpus": 0.0}
