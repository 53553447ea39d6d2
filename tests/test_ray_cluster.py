"""`fl-sim run --ray-address ADDR` (or ``$RAY_ADDRESS``) runs on an existing Ray cluster.

    ray start --head --node-ip-address 127.0.0.1 --port P --num-cpus 2 --temp-dir DIR
    simulate([...], ray_address="127.0.0.1:P")

The cluster is this test's own: every port it opens is a free one picked here (other sessions
may run Ray on this machine), its processes carry a marker in their environment, and the
fixture stops them and their children by PID, never with `ray stop` (which stops every Ray of
this user). The run is a short toy federation; it must complete and leave the same weights as
the same run on a private Ray (the default), since the engine must not change the result.

A two-node cluster on loopback: a head (``--resources '{"node_a": 1}'``, 1 CPU) and a worker
joined with ``ray start --address`` (``'{"node_b": 1}'``, 1 CPU, its own temp dir and ports);
with one CPU per client, Flower's actor pool holds one ClientAppActor per node, so the T = 2
clients train on both. The placement is read from the cluster's GCS (``ray.nodes()`` and the
actor table, in a separate process joined to the cluster: the dashboard and its state API are
off), and the weights must equal a private-Ray run. Both nodes are stopped by PID.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


def ray_start(
    env: dict[str, str], temp_dir: str, num_cpus: int, head: str | None, **extra: str
) -> None:
    """`ray start` of one node on loopback, every port a free one: the head (``head`` None, on
    a free GCS port given as ``port``) or a worker joining ``head``."""
    command = [str(BIN / "ray"), "start", "--node-ip-address", "127.0.0.1"]
    command += ["--head", "--include-dashboard", "false"] if head is None else ["--address", head]
    command += ["--num-cpus", str(num_cpus), "--num-gpus", "0", "--disable-usage-stats"]
    command += ["--temp-dir", temp_dir]
    for flag, value in extra.items():
        command += [f"--{flag.replace('_', '-')}", value]
    flags = ["--dashboard-agent-listen-port", "--dashboard-agent-grpc-port"]
    flags += ["--runtime-env-agent-port", "--metrics-export-port"]
    flags += ["--object-manager-port", "--node-manager-port"]
    if head is None:
        flags.append("--ray-client-server-port")
    for flag in flags:
        command += [flag, str(free_port())]
    started = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=RAY_START_TIMEOUT, check=False
    )
    assert started.returncode == 0, f"ray start failed:\n{started.stderr[-3000:]}"


@contextmanager
def ray_cluster(nodes: list[tuple[int, str]]) -> Iterator[tuple[str, list[Path]]]:
    """A Ray cluster on loopback, one node per (num_cpus, resources JSON or ""), the first the
    head, each with its own temp dir: (address, temp dirs); stops every process after, by PID."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the process clean-up reads /proc")
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip(f"no ray CLI next to {sys.executable} (install flwr[simulation])")
    # short: Ray's unix sockets live under them (107-byte path limit)
    temp_dirs = [tempfile.mkdtemp(prefix="ray-", dir="/tmp") for _ in nodes]
    entry = f"FL_SIM_TEST_RAY={temp_dirs[0]}"
    env = {**os.environ, "FL_SIM_TEST_RAY": temp_dirs[0], "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    address = f"127.0.0.1:{free_port()}"
    try:
        for i, ((num_cpus, resources), temp_dir) in enumerate(zip(nodes, temp_dirs, strict=True)):
            extra = {"resources": resources} if resources else {}
            if i == 0:
                extra["port"] = address.rsplit(":", 1)[1]
            ray_start(env, temp_dir, num_cpus, None if i == 0 else address, **extra)
        yield address, [Path(d) for d in temp_dirs]
    finally:
        signalled = stop_processes(entry)
        time.sleep(0.5)
        left = started_under(entry) | {pid for pid in signalled if running(pid)}
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of this test's Ray cluster still running: {sorted(left)}"


@pytest.fixture
def ray_head() -> Iterator[tuple[str, Path]]:
    """A one-node Ray cluster on loopback: (address, temp dir); stops its processes after."""
    with ray_cluster([(2, "")]) as (address, temp_dirs):
        yield address, temp_dirs[0]


@pytest.fixture
def ray_two_nodes() -> Iterator[tuple[str, list[Path]]]:
    """Head (1 CPU, resource node_a) and one worker (1 CPU, node_b) on loopback."""
    with ray_cluster([(1, '{"node_a": 1}'), (1, '{"node_b": 1}')]) as cluster:
        yield cluster


# What a process joined to the cluster sees in its GCS: alive nodes with their node_* resource,
# and every actor's class, node and state (the dashboard, and so ray.util.state, is off).
PLACEMENT = """
import json, sys
import ray
from ray._private import state
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("node_"))
         for n in ray.nodes() if n["Alive"]}
actors = [{"class": a["ActorClassName"], "node": a["Address"]["NodeID"], "state": a["State"]}
          for a in state.actors().values()]
print(json.dumps({"nodes": nodes, "actors": actors}))
"""


def placement(address: str) -> dict[str, object]:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    seen = subprocess.run(
        [sys.executable, "-c", PLACEMENT, address],
        env=env,
        capture_output=True,
        text=True,
        timeout=RAY_START_TIMEOUT,
        check=False,
    )
    assert seen.returncode == 0, seen.stderr[-3000:]
    return json.loads(seen.stdout.strip().splitlines()[-1])


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


@pytest.mark.slow
def test_two_node_cluster_places_clients_on_both_nodes_and_equals_a_private_run(
    tmp_path, ray_two_nodes, monkeypatch
):
    address, temp_dirs = ray_two_nodes
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    before = placement(address)  # `ray start --address` returns once the worker registered
    assert sorted(before["nodes"].values()) == [["node_a"], ["node_b"]], before
    on_cluster = run(tmp_path / "cluster", tmp_path / "cache-cluster", ray_address=address)
    assert on_cluster["status"] == "completed", on_cluster.get("error")
    assert on_cluster["failures"] == [] and on_cluster["config"]["num-tasks"] == T

    after = placement(address)
    clients = [actor for actor in after["actors"] if actor["class"] == "ClientAppActor"]
    assert len(clients) == T, after  # one CPU each: one actor per node
    used = sorted(after["nodes"][actor["node"]][0] for actor in clients)
    assert used == ["node_a", "node_b"], after
    worker_logs = list(temp_dirs[1].glob("session_*/logs/worker-*"))
    assert worker_logs, f"no worker process ran on the second node ({temp_dirs[1]})"

    private = run(tmp_path / "private", tmp_path / "cache-private")
    assert private["status"] == "completed"
    expected = load_file(tmp_path / "private" / "global_model.safetensors")
    merged = load_file(tmp_path / "cluster" / "global_model.safetensors")
    assert sorted(merged) == sorted(expected)
    for key in expected:
        torch.testing.assert_close(merged[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


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
