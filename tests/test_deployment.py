"""The deployment engine on loopback gives the same model as the simulation engine.

    flower-superlink --host 127.0.0.1 --port P                       # Fleet, Control, Runtime
    flower-supernode --superlink 127.0.0.1:P --port Q_t --node-config "partition-id=t ..."
    flwr run . deploy --stream --run-config '...'                    # $FLWR_HOME/config.toml

One-shot FedAvg over the toy suite's T = 2 tasks, clients really training (no update cache),
must give the weights that ``simulate`` (fl_sim/federation/simulation.py) gives for the same run
config and
seeds. Two set-ups: plain ``--insecure`` (the SuperLink starts its own SuperExec), and TLS with
the certificates of ``scripts/make_certs.sh`` and the docker-compose layout (SuperLink in
``--isolation process``, a separate ``flower-superexec`` for ServerApps, SuperNodes with
``--root-certificates``). Every process started here carries this test's FLWR_HOME in its
environment; the fixture stops them and their children by PID, passed or failed, and asserts
none is left (helpers from tests/helpers.py).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import (
    SHORT_RUN,
    free_port,
    run_config_text,
    running,
    started_under,
    stop_processes,
)
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
T = SHORT_RUN["num-tasks"]
FEDERATION = "deploy"
START_TIMEOUT = 60  # seconds for the SuperLink to listen
FLWR_RUN_TIMEOUT = 180  # seconds; ~40 s on 2 cores (a flwr-clientapp process per message)
RUN_CONFIG = SHORT_RUN  # T = 2 toy clients, one-shot fedavg


@dataclass
class Federation:
    """A SuperLink and T SuperNodes on loopback, and the environment `flwr run` needs."""

    home: Path
    env: dict[str, str]
    logs: Path
    processes: list[subprocess.Popen] = field(default_factory=list)

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("wb")
        process = subprocess.Popen(
            command, cwd=self.home, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.processes.append(process)
        return process

    def log_tails(self, chars: int = 1500) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}"
            for log in sorted(self.logs.glob("*.log"))
        )


def wait_for_port(port: int, process: subprocess.Popen, federation: Federation) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"flower-superlink exited {process.returncode}:\n{federation.log_tails()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"flower-superlink not listening on {port} after {START_TIMEOUT} s")


@pytest.fixture
def deployment_env(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """FLWR_HOME and environment for the processes of one test; stops them all afterwards."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the process clean-up reads /proc")
    if shutil.which("flower-supernode", path=str(BIN)) is None:
        pytest.skip(f"no flower-supernode next to {sys.executable} (install flwr[simulation])")
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        # no venv per run (`uv sync` would pull CUDA torch), no telemetry, no update check
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FL_SIM_CACHE": str(tmp_path / "fl-sim-cache"),
        "HF_HUB_OFFLINE": "1",
        # the SuperLink and SuperNodes start `flower-superexec` from PATH: this venv's
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    entry = f"FLWR_HOME={home}"
    try:
        yield home, env
    finally:
        signalled = stop_processes(entry)
        time.sleep(0.5)
        left = started_under(entry) | {pid for pid in signalled if running(pid)}
        assert not left, f"processes of this test's FLWR_HOME still running: {sorted(left)}"


def start_federation(home: Path, env: dict[str, str], tls: Path | None) -> Federation:
    """SuperLink on a free port, then T SuperNodes; with ``tls`` (a make_certs.sh dir) the
    docker-compose layout: TLS everywhere and a separate SuperExec for ServerApps."""
    logs = home / "logs"
    logs.mkdir()
    federation = Federation(home=home, env=env, logs=logs)
    port = free_port()
    superlink = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port)]
    superlink.append("--disable-runtime-dependency-installation")
    if tls is None:
        superlink.append("--insecure")
        client_tls = ["--insecure"]
        connection = "insecure = true"
    else:
        superlink += ["--ssl-ca-certfile", str(tls / "ca.crt")]
        superlink += ["--ssl-certfile", str(tls / "server.pem")]
        superlink += ["--ssl-keyfile", str(tls / "server.key")]
        superlink += ["--isolation", "process"]
        client_tls = ["--root-certificates", str(tls / "ca.crt")]
        connection = f"root-certificates = {json.dumps(str(tls / 'ca.crt'))}"
    process = federation.start("superlink", superlink)
    wait_for_port(port, process, federation)
    if tls is not None:
        superexec = [str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{port}"]
        federation.start("superexec-serverapp", superexec + client_tls)
    for t in range(T):
        supernode = [str(BIN / "flower-supernode"), *client_tls]
        supernode += ["--superlink", f"127.0.0.1:{port}"]
        supernode += ["--host", "127.0.0.1", "--port", str(free_port())]
        supernode += ["--node-config", f"partition-id={t} num-partitions={T}"]
        federation.start(f"supernode-{t}", supernode)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\n{connection}\n',
        encoding="utf-8",
    )
    return federation


def run_statuses(env: dict[str, str]) -> str:
    """`flwr ls` of the test's federation as JSON (status and sub-status of every run)."""
    try:
        listed = subprocess.run(
            [str(BIN / "flwr"), "ls", FEDERATION, "--format", "json"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "(flwr ls timed out)"
    return (listed.stdout or listed.stderr).strip()[-2000:]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same run on the simulation engine (in-process Ray): its results-dir."""
    from fl_sim.config.run_config import RunConfig
    from fl_sim.federation.simulation import simulate

    results_dir = tmp_path_factory.mktemp("simulation") / "run"
    cache = tmp_path_factory.mktemp("fl-sim-cache")
    saved = os.environ.get("FL_SIM_CACHE")
    os.environ["FL_SIM_CACHE"] = str(cache)
    try:
        config = RunConfig.from_mapping({**RUN_CONFIG, "results-dir": str(results_dir)})
        (results,) = simulate([config], progress=False)
    finally:
        if saved is None:
            os.environ.pop("FL_SIM_CACHE", None)
        else:
            os.environ["FL_SIM_CACHE"] = saved
    assert results["status"] == "completed", results.get("error")
    return results_dir


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["insecure", "tls"])
def test_deployment_engine_equals_simulation_for_one_shot_fedavg(
    transport, tmp_path, deployment_env, simulated
):
    home, env = deployment_env
    tls = None
    if transport == "tls":
        if shutil.which("openssl") is None:
            pytest.skip("no openssl for scripts/make_certs.sh")
        tls = tmp_path / "certs"
        made = subprocess.run(
            ["bash", str(REPO / "scripts" / "make_certs.sh"), str(tls)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert made.returncode == 0, made.stderr
    federation = start_federation(home, env, tls)

    results_dir = (tmp_path / "run").resolve()  # absolute: the ServerApp runs elsewhere
    run_config = run_config_text({**RUN_CONFIG, "results-dir": str(results_dir)})
    command = [str(BIN / "flwr"), "run", ".", FEDERATION, "--stream", "--run-config", run_config]
    # KNOWN FLAKE (seen once in three full runs, TLS case): the SuperExec-launched ServerApp
    # exited after ~1.6 s without writing results.json and without an error in any log. Not yet
    # diagnosed; one retry of `flwr run` on the same federation, and the first log is printed.
    for attempt in (1, 2):
        start = time.monotonic()
        try:
            done = subprocess.run(
                command,
                cwd=REPO,
                env=env,
                capture_output=True,
                text=True,
                timeout=FLWR_RUN_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"flwr run took over {FLWR_RUN_TIMEOUT} s:\n{federation.log_tails()}")
        seconds = time.monotonic() - start
        log = (done.stdout + done.stderr)[-3000:]
        if attempt == 1 and done.returncode == 0 and not (results_dir / "results.json").exists():
            # `flwr run --stream` ends with 0 when the run is finished, whatever its sub-status:
            # record the runs' statuses and the logs in the warnings summary, then retry
            warnings.warn(
                f"flwr run attempt 1 ({seconds:.1f} s) wrote no results.json; retrying. "
                f"Runs: {run_statuses(env)}\n{log}\n{federation.log_tails()}",
                stacklevel=1,
            )
            continue
        break
    assert done.returncode == 0, f"flwr run exited {done.returncode}:\n{log}"
    assert (results_dir / "results.json").exists(), (
        f"no results.json after {seconds:.0f} s; runs: {run_statuses(env)}\n{log}\n"
        f"{federation.log_tails()}"
    )

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
