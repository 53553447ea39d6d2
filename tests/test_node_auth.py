"""Only enrolled SuperNodes get in: Flower 1.41's SuperNode authentication, on loopback.

    flower-superlink --enable-supernode-auth  (TLS: make_certs.sh; Flower refuses it without)
    flwr supernode register keys/supernode-t.pub deploy          # Control API, t = 0, 1
    flower-supernode --auth-supernode-private-key keys/supernode-t

The SuperLink refuses a node whose key was never registered (keys/supernode-2) and a node with
no key at all, and says so in its log; the two registered nodes come online with the node ids
the registration returned, a one-shot toy run on them completes, and a registered node stopped
and started again comes back under the same node id. The keys are the ones of
``scripts/make_node_keys.sh`` (the docker-compose stack's; tests/test_compose.py runs the same
checks in containers). Processes carry this test's FLWR_HOME and are stopped by PID
(tests/helpers.py), passed or failed.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SHORT_RUN, deployment_processes, free_port, make_certs, run_config_text

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FEDERATION = "deploy"
T = SHORT_RUN["num-tasks"]  # 2 registered nodes
EXIT_TIMEOUT = 90  # seconds for a refused SuperNode to give up
FLWR_RUN_TIMEOUT = 300


def make_keys(out: Path, count: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "make_node_keys.sh"), str(out), str(count)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_make_node_keys_gives_ec_key_pairs_flower_accepts_and_keeps_them(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    keys = tmp_path / "keys"
    done = make_keys(keys, 2)
    assert done.returncode == 0, done.stderr
    names = {p.name for p in keys.iterdir()}
    assert names == {"supernode-0", "supernode-0.pub", "supernode-1", "supernode-1.pub"}
    publics = set()
    for t in range(2):
        private = load_ssh_private_key((keys / f"supernode-{t}").read_bytes(), None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        # what `flwr supernode register` sends is the public half of the node's private key
        registered = try_load_public_key(keys / f"supernode-{t}.pub")
        assert registered == public_key_to_bytes(private.public_key())
        publics.add(registered)
    assert len(publics) == 2  # one identity per node
    before = (keys / "supernode-0").read_bytes()
    assert make_keys(keys, 2).returncode == 0
    assert (keys / "supernode-0").read_bytes() == before  # a node keeps its identity


@pytest.fixture
def auth_env(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """FLWR_HOME and environment for the processes of one test (tests/helpers.py
    ``deployment_processes``: stopped by PID afterwards), with a logs/ folder."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl for scripts/make_certs.sh (node authentication needs TLS)")
    with deployment_processes(tmp_path) as (home, env):
        (home / "logs").mkdir(parents=True)
        yield home, env


def start(home: Path, env: dict[str, str], name: str, command: list[str]) -> subprocess.Popen:
    with (home / "logs" / f"{name}.log").open("wb") as log:
        return subprocess.Popen(command, cwd=home, env=env, stdout=log, stderr=subprocess.STDOUT)


def log_of(home: Path, name: str) -> str:
    return (home / "logs" / f"{name}.log").read_text(errors="replace")


def all_logs(home: Path) -> str:
    return "\n".join(
        f"--- {log.name}\n{log.read_text(errors='replace')[-1500:]}"
        for log in sorted((home / "logs").glob("*.log"))
    )


def flwr(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "flwr"), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def online_node_ids(env: dict[str, str]) -> set[int]:
    listed = flwr(env, "supernode", "ls", FEDERATION, "--format", "json")
    try:
        nodes = json.loads(listed.stdout)["nodes"]
    except (json.JSONDecodeError, KeyError):
        return set()
    return {int(node["node-id"]) for node in nodes if node["status"] == "online"}


def supernode(certs: Path, port: int, t: int, key: Path | None) -> list[str]:
    command = [str(BIN / "flower-supernode"), "--root-certificates", str(certs / "ca.crt")]
    command += ["--superlink", f"127.0.0.1:{port}", "--host", "127.0.0.1"]
    command += ["--port", str(free_port()), "--node-config", f"partition-id={t} num-partitions={T}"]
    if key is not None:
        command += ["--auth-supernode-private-key", str(key)]
    return command


@pytest.mark.slow
def test_only_registered_supernodes_get_in_and_run(tmp_path, auth_env):
    home, env = auth_env
    certs, keys = make_certs(tmp_path), tmp_path / "keys"
    assert make_keys(keys, T + 1).returncode == 0  # supernode-2: a key never registered
    port = free_port()
    superlink = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port)]
    superlink += ["--ssl-ca-certfile", str(certs / "ca.crt")]
    superlink += ["--ssl-certfile", str(certs / "server.pem")]
    superlink += ["--ssl-keyfile", str(certs / "server.key")]
    superlink += ["--disable-runtime-dependency-installation", "--enable-supernode-auth"]
    link = start(home, env, "superlink", superlink)
    deadline = time.monotonic() + 60
    while True:
        assert link.poll() is None, f"flower-superlink exited:\n{all_logs(home)}"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        assert time.monotonic() < deadline, f"SuperLink not listening:\n{all_logs(home)}"
        time.sleep(0.2)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
        f'address = "127.0.0.1:{port}"\n'
        f"root-certificates = {json.dumps(str(certs / 'ca.crt'))}\n",
        encoding="utf-8",
    )
    registered = set()
    for t in range(T):
        done = flwr(env, "supernode", "register", str(keys / f"supernode-{t}.pub"), "--format=json")
        answer = json.loads(done.stdout)  # `flwr` exits 0 on a failed request too
        assert done.returncode == 0 and answer["success"], done.stdout + done.stderr
        registered.add(int(answer["node-id"]))

    # refused: a key the SuperLink does not know, and no key at all
    stranger = start(home, env, "stranger", supernode(certs, port, T, keys / f"supernode-{T}"))
    keyless = start(home, env, "keyless", supernode(certs, port, T, None))
    for name, process in (("stranger", stranger), ("keyless", keyless)):
        try:
            code = process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {name} SuperNode was not refused:\n{all_logs(home)}")
        assert code != 0, all_logs(home)
    assert "Failed to activate SuperNode" in log_of(home, "stranger"), all_logs(home)
    assert "SuperNode authentication is enabled" in log_of(home, "keyless"), all_logs(home)
    superlink_log = log_of(home, "superlink")
    assert "No SuperNode found with the given public key" in superlink_log, superlink_log[-3000:]
    assert "ApiError:2001" in superlink_log, superlink_log[-3000:]  # registration disabled

    # admitted: the registered keys, under the node ids their registration gave
    nodes = [
        start(home, env, f"supernode-{t}", supernode(certs, port, t, keys / f"supernode-{t}"))
        for t in range(T)
    ]
    deadline = time.monotonic() + 120
    while (online := online_node_ids(env)) != registered:
        assert time.monotonic() < deadline, f"online {online} != {registered}:\n{all_logs(home)}"
        time.sleep(1)

    results_dir = (tmp_path / "run").resolve()
    run_config = run_config_text({**SHORT_RUN, "results-dir": str(results_dir)})
    try:
        command = ["run", ".", FEDERATION, "--stream", "--run-config", run_config]
        done = flwr(env, *command, timeout=FLWR_RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run took over {FLWR_RUN_TIMEOUT} s:\n{all_logs(home)}")
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert (results_dir / "results.json").exists(), (
        f"{(done.stdout + done.stderr)[-3000:]}\n{all_logs(home)}"
    )
    results = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "completed", results["error"]
    assert results["failures"] == []
    assert len(results["files"]["clients"]) == T
    assert online_node_ids(env) == registered  # no stranger got in meanwhile

    # a registered node that stops and starts again comes back under the same node id
    nodes[0].terminate()
    nodes[0].wait(timeout=60)
    deadline = time.monotonic() + 120
    while len(online_node_ids(env)) != T - 1:
        assert time.monotonic() < deadline, f"supernode-0 still online:\n{all_logs(home)}"
        time.sleep(1)
    start(home, env, "supernode-0-again", supernode(certs, port, 0, keys / "supernode-0"))
    deadline = time.monotonic() + 120
    while (online := online_node_ids(env)) != registered:
        assert time.monotonic() < deadline, f"online {online} != {registered}:\n{all_logs(home)}"
        time.sleep(1)


@pytest.mark.slow
def test_superlink_refuses_node_authentication_without_tls(tmp_path, auth_env):
    """Why FL_SIM_INSECURE=1 turns node authentication off in docker-compose.yml."""
    home, env = auth_env
    command = [str(BIN / "flower-superlink"), "--insecure", "--enable-supernode-auth"]
    command += ["--host", "127.0.0.1", "--port", str(free_port())]
    command += ["--disable-runtime-dependency-installation"]
    process = start(home, env, "superlink", command)
    try:
        code = process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"flower-superlink ran with --insecure --enable-supernode-auth:\n{all_logs(home)}"
        )
    assert code != 0
    assert "requires encrypted TLS" in log_of(home, "superlink"), log_of(home, "superlink")
