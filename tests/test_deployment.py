"""The deployment engine on loopback gives the same model as the simulation engine.

    flower-superlink --host 127.0.0.1 --port P                       # Fleet, Control, Runtime
    flower-supernode --superlink 127.0.0.1:P --port Q_t --node-config "partition-id=t ..."
    flwr run . deploy --stream --run-config '...'                    # $FLWR_HOME/config.toml

One-shot FedAvg over the toy suite's T = 2 tasks, clients really training (no update cache),
must give the weights that ``simulate`` (fl_sim/federation/simulation.py) gives for the same run
config and seeds. Two set-ups: plain ``--insecure`` (the SuperLink starts its own SuperExec), and
TLS with the certificates of ``scripts/make_certs.sh`` and the docker-compose layout (SuperLink
in ``--isolation process``, a separate ``flower-superexec`` for ServerApps, SuperNodes with
``--root-certificates``). Every process started here carries this test's FLWR_HOME in its
environment; the fixture stops them and their children by PID, passed or failed, and asserts
none is left (helpers from tests/helpers.py).

`flwr run --stream` exits 0 for a run that finished *failed* (it only streams the log until the
run is finished), so ``flwr_run`` reads the run's final status with `flwr ls --run-id` and
``assert_completed`` fails the test with the ServerApp's exception otherwise; a run whose
ServerApp raises (an unknown strategy) shows that it does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    SHORT_RUN,
    assert_completed,
    deployment_processes,
    flwr_run,
    make_certs,
    run_config_text,
    simulate_reference,
    start_federation,
)
from safetensors.torch import load_file

T = SHORT_RUN["num-tasks"]
FLWR_RUN_TIMEOUT = 420  # seconds; ~40 s on 2 idle cores, ~200 s at load average 28 (shared machine)
RUN_CONFIG = SHORT_RUN  # T = 2 toy clients, one-shot fedavg


@pytest.fixture
def deployment_env(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """FLWR_HOME and environment for the processes of one test; stops them all afterwards."""
    with deployment_processes(tmp_path) as home_env:
        yield home_env


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run on the simulation engine (in-process Ray): its results-dir."""
    results_dir = tmp_path_factory.mktemp("simulation") / "run"
    return simulate_reference(RUN_CONFIG, results_dir, tmp_path_factory.mktemp("fl-sim-cache"))


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["insecure", "tls"])
def test_deployment_engine_equals_simulation_for_one_shot_fedavg(
    transport, tmp_path, deployment_env, simulated
):
    home, env = deployment_env
    tls = make_certs(tmp_path) if transport == "tls" else None
    federation = start_federation(home, env, tls, num_nodes=T)

    results_dir = (tmp_path / "run").resolve()  # absolute: the ServerApp runs elsewhere
    run_config = run_config_text({**RUN_CONFIG, "results-dir": str(results_dir)})
    run = flwr_run(federation, run_config, timeout=FLWR_RUN_TIMEOUT)
    assert_completed(run, federation)  # the run's status, not `flwr run`'s exit code
    assert (results_dir / "results.json").exists(), federation.log_tails()

    results = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "completed", results["error"]
    assert results["config"]["strategy"] == "fedavg" and results["config"]["num-tasks"] == T
    assert results["failures"] == []
    reference = json.loads((simulated / "results.json").read_text(encoding="utf-8"))
    assert len(results["files"]["clients"]) == len(reference["files"]["clients"]) == T
    pairs = zip(results["files"]["clients"], reference["files"]["clients"], strict=True)
    for ours, theirs in pairs:
        deployed, simulated_client = load_file(results_dir / ours), load_file(simulated / theirs)
        for name in simulated_client:
            torch.testing.assert_close(deployed[name], simulated_client[name], msg=name)
    merged = load_file(results_dir / "global_model.safetensors")
    expected = load_file(simulated / "global_model.safetensors")
    assert sorted(merged) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["insecure", "tls"])
def test_a_serverapp_that_raises_fails_the_run_check(transport, tmp_path, deployment_env):
    """An unknown strategy makes the ServerApp raise before it asks for nodes (none started):
    `flwr ls` says finished:failed with the exception, and ``assert_completed`` fails on it,
    whatever `flwr run --stream` exits with."""
    home, env = deployment_env
    tls = make_certs(tmp_path) if transport == "tls" else None
    federation = start_federation(home, env, tls, num_nodes=0)
    results_dir = (tmp_path / "run").resolve()
    values = {**RUN_CONFIG, "strategy": "no-such-rule", "results-dir": str(results_dir)}
    run = flwr_run(federation, run_config_text(values), timeout=FLWR_RUN_TIMEOUT)
    assert run.run_id is not None, run.log[-3000:]
    assert run.status == "finished:failed", (run.status, run.details, federation.log_tails())
    assert "ServerApp failed with exception" in run.details and "no-such-rule" in run.details
    with pytest.raises(AssertionError, match="no-such-rule"):
        assert_completed(run, federation)
    assert not (results_dir / "results.json").exists()


def compose_command() -> list[str] | None:
    """`docker compose` (the v2 plugin), else Debian's `docker-compose` 1.29, else None.

    Neither needs a Docker engine for `config`: it loads the file, interpolates the environment
    and validates it against the Compose schema.
    """
    if shutil.which("docker") is not None:
        version = subprocess.run(
            ["docker", "compose", "version"], capture_output=True, text=True, check=False
        )
        if version.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose") is not None:
        return ["docker-compose"]
    return None


def compose_config(command: list[str], cwd: Path, insecure: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command, "config", "-q"],
        cwd=cwd,
        env={**os.environ, "FL_SIM_INSECURE": insecure},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_docker_compose_config_validates_the_file_and_rejects_a_broken_copy(tmp_path):
    """`docker compose config -q` (no engine needed) on the repo's file, TLS and insecure; a copy
    with a misspelt service key must fail. Skipped without `docker compose` or `docker-compose`
    (.ci/run installs Debian's docker-compose where apt can)."""
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    for insecure in ("0", "1"):
        done = compose_config(command, REPO, insecure)
        assert done.returncode == 0, done.stderr
    text = (REPO / "docker-compose.yml").read_text(encoding="utf-8")
    broken = text.replace("  restart: on-failure\n", "  restart: on-failure\n  entrypont: [sh]\n")
    assert broken != text
    (tmp_path / "docker-compose.yml").write_text(broken, encoding="utf-8")
    done = compose_config(command, tmp_path, "0")
    assert done.returncode != 0
    assert "entrypont" in done.stderr + done.stdout


def test_compose_has_a_superlink_a_serverapp_superexec_and_one_tls_supernode_per_task():
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))["services"]
    scripts = {name: " ".join(service["entrypoint"]) for name, service in services.items()}
    assert "--isolation process" in scripts["superlink"]
    assert "--ssl-certfile /app/certs/server.pem" in scripts["superlink"]
    assert "--runtime-api-address superlink:9093" in scripts["superexec-serverapp"]
    nodes = sorted(name for name in services if name.startswith("supernode-"))
    assert [services[name]["command"] for name in nodes] == [[str(t)] for t in range(8)]
    for name in nodes:
        assert '--node-config "partition-id=$$0 num-partitions=8"' in scripts[name]
    for script in scripts.values():  # --insecure only behind the explicit switch
        assert 'if [ "$$FL_SIM_INSECURE" = 1 ]; then tls=--insecure;' in script
    # SuperNode authentication on unless switched off (and off without TLS: Flower refuses it)
    auth_on = 'if [ "$$FL_SIM_INSECURE" != 1 ] && [ "$$FL_SIM_NODE_AUTH" != 0 ]; then'
    assert f"{auth_on} auth=--enable-supernode-auth; fi;" in scripts["superlink"]
    for name in nodes:
        key = '--auth-supernode-private-key /app/keys/supernode-$$0"; fi;'
        assert f'{auth_on} auth="{key}' in scripts[name]
        assert "./keys:/app/keys:ro" in services[name]["volumes"]
    assert services["superlink"]["environment"]["FL_SIM_NODE_AUTH"] == "${FL_SIM_NODE_AUTH:-1}"


def test_make_certs_gives_a_server_certificate_for_superlink_localhost_and_loopback(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("no openssl")
    certs = tmp_path / "certs"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "make_certs.sh"), str(certs)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    assert {p.name for p in certs.iterdir()} == {"ca.crt", "ca.key", "server.pem", "server.key"}
    san = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "server.pem"), "-noout", "-ext", "subjectAltName"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in ("DNS:superlink", "DNS:localhost", "IP Address:127.0.0.1"):
        assert name in san
    verify = ["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.pem")]
    assert subprocess.run(verify, capture_output=True, check=False).returncode == 0
