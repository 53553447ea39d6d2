"""The docker-compose federation, run for real: image, TLS, node authentication, weights.

    Docker engine (started here when none answers, stopped by its PID)
    base image: python:3.11-slim when it can be pulled, else scripts/make_base_image.sh
    wheelhouse: scripts/make_wheelhouse.sh; image: Dockerfile, built offline from it
    scripts/make_certs.sh, scripts/make_node_keys.sh; docker-compose up (TLS, node auth on)
    flwr supernode register keys/supernode-{0,1}.pub; supernode-2 is never registered
    flwr run . compose (127.0.0.1:<free port>): one-shot and 2-round fedavg, T = 2 toy tasks
    a lost node: supernode-1's container killed in round 2 of a 5-round run and started again

Only supernode-0 and supernode-1 are started (T = 2, SHORT_RUN's federation): the ServerApp
wants exactly one node per task (fl_sim/federation/server_app.py, discover_tasks), and every
message starts a flwr-clientapp process (torch imported again), so 8 nodes on 2 cores would cost
minutes per round for no more coverage. The weights must equal ``simulate`` with the same run
config. Skips, with the reason, where no engine can run (no docker client, no dockerd and no
root). Everything made here is removed: ``docker-compose down -v``, the images built (the
base image too when made here), the engine when started here. Developers may reuse a base image
and a wheelhouse (FL_SIM_TEST_BASE_IMAGE, FL_SIM_TEST_WHEELHOUSE; neither is removed); CI sets
neither and builds both.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import SHORT_RUN, free_port, run_config_text, simulate_reference
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
T = SHORT_RUN["num-tasks"]  # 2: supernode-0 and supernode-1
FEDERATION = "compose"
DEFAULT_BASE = "python:3.11-slim"
ONE_SHOT = dict(SHORT_RUN)
MULTI_ROUND = {**SHORT_RUN, "num-rounds": 2}
LOST_NODE_ROUNDS = 5
LOST_NODE_RUN = {
    **SHORT_RUN,
    "num-rounds": LOST_NODE_ROUNDS,
    "min-clients": 1,
    # above Flower's 60 s node expiry: the SuperLink's Node Unavailable reply ends round 2
    "round-timeout": 150.0,
    # round 3 waits for the restarting node (back ~10-90 s after round 2's failure, with load)
    "node-wait": 300.0,
}
FLWR_RUN_TIMEOUT = 600  # seconds; ~40 s on an idle 2-core machine, minutes when it is loaded
BUILD_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md")
BUILD_DIRS = ("fl_sim", "clients", "strategies")


def sh(command: list[str], timeout: float, env: dict[str, str] | None = None, **kw):
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, check=False, env=env, **kw
    )


def engine_answers(env: dict[str, str]) -> bool:
    try:
        return sh(["docker", "info"], 30, env).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass
class Engine:
    env: dict[str, str]  # DOCKER_HOST when the engine is ours
    started: bool


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    """A Docker engine: the one that answers, else a private dockerd started here (own socket,
    data root and exec root in a temporary folder), stopped by its PID and its folder removed."""
    if not sys.platform.startswith("linux"):
        pytest.skip("Docker engines run on Linux")
    if shutil.which("docker") is None:
        pytest.skip("no docker client (apt-get install docker.io)")
    if shutil.which("docker-compose") is None:
        pytest.skip("no docker-compose (apt-get install docker-compose; .ci/run does as root)")
    env = {**os.environ}
    if engine_answers(env):
        yield Engine(env, started=False)
        return
    dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin")
    if dockerd is None:
        pytest.skip("no Docker engine answers and no dockerd (apt-get install docker.io)")
    if os.geteuid() != 0:
        pytest.skip("no Docker engine answers, and starting dockerd needs root")
    root = Path(tempfile.mkdtemp(prefix="fl-sim-dockerd-", dir="/var/tmp"))
    socket_path = root / "docker.sock"
    env["DOCKER_HOST"] = f"unix://{socket_path}"
    log = (root / "dockerd.log").open("wb")
    process = subprocess.Popen(
        [
            dockerd,
            "--host",
            env["DOCKER_HOST"],
            "--data-root",
            str(root / "data"),
            "--exec-root",
            str(root / "exec"),
            "--pidfile",
            str(root / "dockerd.pid"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    log.close()
    try:
        deadline = time.monotonic() + 60
        while not engine_answers(env):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (root / "dockerd.log").read_text(errors="replace")[-2000:]
                pytest.skip(f"dockerd did not start (exit {process.poll()}):\n{tail}")
            time.sleep(0.5)
        yield Engine(env, started=True)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        # unmounted by a clean shutdown; whatever is left is removed as far as it can be
        if (root / "exec").exists():
            sh(["umount", "-R", str(root / "exec")], 30)
        shutil.rmtree(root, ignore_errors=True)


def image_ids(env: dict[str, str]) -> set[str]:
    listed = sh(["docker", "images", "-q", "--no-trunc"], 60, env)
    return set(listed.stdout.split())


def remove_images(env: dict[str, str], images: list[str]) -> None:
    if images:
        sh(["docker", "rmi", "-f", *images], 300, env)


@pytest.fixture(scope="module")
def image(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The project's image, built from a wheelhouse (no package index reached in the build)."""
    env = engine.env
    made: list[str] = []  # images to remove, newest first
    tag = f"fl-sim-test:{uuid.uuid4().hex[:8]}"
    try:
        base = os.environ.get("FL_SIM_TEST_BASE_IMAGE", "")
        if not base:
            have = sh(["docker", "image", "inspect", DEFAULT_BASE], 60, env).returncode == 0
            try:
                have = have or sh(["docker", "pull", DEFAULT_BASE], 120, env).returncode == 0
            except subprocess.TimeoutExpired:
                have = False
            if have:
                base = DEFAULT_BASE
            else:  # no registry: a Debian base from the archive this machine's apt uses
                if os.geteuid() != 0 or shutil.which("debootstrap") is None:
                    pytest.skip(f"cannot pull {DEFAULT_BASE}, and debootstrap (root) is missing")
                base = f"fl-sim-test-base:{uuid.uuid4().hex[:8]}"
                made.append(base)
                done = sh(["bash", str(REPO / "scripts/make_base_image.sh"), base], 900, env)
                assert done.returncode == 0, done.stdout + done.stderr
        context = tmp_path_factory.mktemp("build-context")
        for name in BUILD_FILES:
            shutil.copy2(REPO / name, context / name)
        for name in BUILD_DIRS:
            shutil.copytree(
                REPO / name, context / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        wheels = os.environ.get("FL_SIM_TEST_WHEELHOUSE", "")
        if wheels:
            shutil.copytree(wheels, context / "wheelhouse")
        else:
            made_wheels = sh(
                ["bash", str(REPO / "scripts/make_wheelhouse.sh"), str(context / "wheelhouse")],
                900,
            )
            assert made_wheels.returncode == 0, made_wheels.stdout + made_wheels.stderr
        before = image_ids(env)
        build = [
            "docker",
            "build",
            "--build-arg",
            f"BASE_IMAGE={base}",
            "-t",
            tag,
            str(context),
        ]
        start = time.monotonic()
        built = sh(build, 1800, {**env, "DOCKER_BUILDKIT": "0"})
        # the first stage (installs from the wheelhouse) is left untagged: ours to remove too
        made[:0] = sorted(image_ids(env) - before)
        assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
        made.insert(0, tag)
        print(f"image {tag} on {base} built in {time.monotonic() - start:.0f} s")
        shutil.rmtree(context / "wheelhouse", ignore_errors=True)  # 500 MB
        version = sh(["docker", "run", "--rm", tag, "flower-superlink", "--version"], 120, env)
        assert version.returncode == 0 and "1.41" in version.stdout + version.stderr, version
        yield tag
    finally:
        remove_images(env, made)


@dataclass
class Stack:
    project: str
    folder: Path  # docker-compose.yml, certs/, keys/
    env: dict[str, str]  # for docker-compose and flwr (FLWR_HOME, FL_SIM_IMAGE, FL_SIM_PORT)
    port: int

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        command = ["docker-compose", "-p", self.project, *args]
        return sh(command, timeout, self.env, cwd=self.folder)

    def logs(self, *services: str) -> str:
        done = self.compose("logs", "--no-color", *services, timeout=120)
        return done.stdout + done.stderr

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return sh([str(BIN / "flwr"), *args], timeout, self.env, cwd=REPO)

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", service).stdout.strip()


def wait_for(predicate, seconds: float, what: str, stack: Stack) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} after {seconds:.0f} s:\n{stack.logs()[-6000:]}")
        time.sleep(1)


def control_api_answers(stack: Stack) -> bool:
    listed = stack.flwr("supernode", "ls", FEDERATION, "--format", "json")
    return '"success": true' in listed.stdout


def online_nodes(stack: Stack) -> list[dict]:
    listed = stack.flwr("supernode", "ls", FEDERATION, "--format", "json")
    with contextlib.suppress(json.JSONDecodeError):
        nodes = json.loads(listed.stdout).get("nodes", [])
        return [node for node in nodes if node.get("status") == "online"]
    return []


@pytest.fixture(scope="module")
def stack(engine: Engine, image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The compose stack: SuperLink (TLS, --enable-supernode-auth), ServerApp SuperExec, and
    supernode-0/1 registered through the Control API; `down -v` afterwards, passed or failed."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl for scripts/make_certs.sh")
    folder = tmp_path_factory.mktemp("compose")
    shutil.copy2(REPO / "docker-compose.yml", folder / "docker-compose.yml")
    for script, args in (("make_certs.sh", ["certs"]), ("make_node_keys.sh", ["keys", "3"])):
        done = sh(["bash", str(REPO / "scripts" / script), str(folder / args[0]), *args[1:]], 120)
        assert done.returncode == 0, done.stderr
    home = folder / "flwr-home"
    home.mkdir()
    port = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\n'
        f"root-certificates = {json.dumps(str(folder / 'certs' / 'ca.crt'))}\n",
        encoding="utf-8",
    )
    env = {
        **engine.env,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FL_SIM_IMAGE": image,
        "FL_SIM_PORT": str(port),
        "FL_SIM_INSECURE": "0",
        "FL_SIM_NODE_AUTH": "1",
    }
    stack = Stack(f"flsimtest{uuid.uuid4().hex[:8]}", folder, env, port)
    try:
        start = time.monotonic()
        up = stack.compose("up", "-d", "--no-build", "superlink", "superexec-serverapp")
        assert up.returncode == 0, up.stderr
        # docker-proxy accepts on the published port before the SuperLink listens: wait for
        # an answer of the Control API itself
        wait_for(lambda: control_api_answers(stack), 180, "no Control API answer", stack)
        for t in range(T):
            pub = str(folder / "keys" / f"supernode-{t}.pub")
            registered = stack.flwr("supernode", "register", pub, FEDERATION, "--format", "json")
            output = registered.stdout + registered.stderr
            # `flwr` can exit 0 on a failed request: the JSON answer is what counts
            assert registered.returncode == 0 and '"success": true' in output, output
        up = stack.compose("up", "-d", "--no-build", *[f"supernode-{t}" for t in range(T)])
        assert up.returncode == 0, up.stderr
        wait_for(lambda: len(online_nodes(stack)) == T, 300, f"not {T} nodes online", stack)
        print(
            f"compose stack up with {T} registered SuperNodes in {time.monotonic() - start:.0f} s"
        )
        yield stack
    finally:
        down = stack.compose("down", "-v", "--remove-orphans", "-t", "20", timeout=300)
        left = sh(
            [
                "docker",
                "ps",
                "-a",
                "-q",
                "--filter",
                f"label=com.docker.compose.project={stack.project}",
            ],
            60,
            engine.env,
        ).stdout.split()
        assert down.returncode == 0 and not left, f"compose down: {down.stderr}; left {left}"


def run_on_stack(stack: Stack, values: dict[str, object], name: str, out: Path) -> Path:
    """`flwr run . compose` with ``values``; the results copied out of the ServerApp's volume."""
    run_config = run_config_text({**values, "results-dir": f"/app/results/{name}"})
    start = time.monotonic()
    try:
        done = stack.flwr(
            "run", ".", FEDERATION, "--stream", "--run-config", run_config, timeout=FLWR_RUN_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run took over {FLWR_RUN_TIMEOUT} s:\n{stack.logs()[-6000:]}")
    seconds = time.monotonic() - start
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-3000:]
    # `flwr run --stream` exits 0 once the stream ends, finished or not, completed or failed:
    # the run's own status is what counts (as tests/helpers.py flwr_run does on loopback)
    found = re.search(r"Successfully started run (\d+)", log)
    assert found, log[-3000:]
    status, details = run_status(stack, int(found.group(1)))
    assert status == "finished:completed", (
        f"run {found.group(1)} is {status!r} after {seconds:.0f} s: {details}\n{log[-3000:]}\n"
        f"{stack.logs('superexec-serverapp')[-4000:]}"
    )
    container = stack.container("superexec-serverapp")
    copied = sh(["docker", "cp", f"{container}:/app/results/{name}", str(out)], 120, stack.env)
    assert copied.returncode == 0 and (out / "results.json").exists(), (
        f"no results after {seconds:.0f} s ({copied.stderr}):\n"
        f"{(done.stdout + done.stderr)[-3000:]}\n{stack.logs('superexec-serverapp')[-4000:]}"
    )
    (out / "flwr-run.log").write_text(log, encoding="utf-8")  # the ServerApp's streamed log
    print(f"flwr run {name} on the compose stack: {seconds:.0f} s")
    return out


def run_status(stack: Stack, run_id: int, timeout: float = 180) -> tuple[str, str]:
    """(status, status-details) of ``run_id`` from `flwr ls`, polled until ``finished:*``."""
    deadline = time.monotonic() + timeout
    status, details = "", ""
    while time.monotonic() < deadline:
        listed = stack.flwr("ls", FEDERATION, "--run-id", str(run_id), "--format", "json")
        with contextlib.suppress(json.JSONDecodeError, KeyError, ValueError):
            (row,) = json.loads(listed.stdout)["runs"]
            status, details = str(row["status"]), str(row["status-details"])
            if status.startswith("finished"):
                break
        time.sleep(1)
    return status, details


def assert_same_weights(deployed: Path, simulated: Path, rounds: int) -> None:
    results = json.loads((deployed / "results.json").read_text(encoding="utf-8"))
    reference = json.loads((simulated / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "completed", results["error"]
    assert results["failures"] == []
    assert results["config"]["num-tasks"] == T and results["config"]["num-rounds"] == rounds
    assert len(results["rounds"]) == len(reference["rounds"])
    ours, theirs = results["files"]["clients"], reference["files"]["clients"]
    assert len(ours) == len(theirs) == T
    for mine, other in zip(ours, theirs, strict=True):
        got, expected = load_file(deployed / mine), load_file(simulated / other)
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], msg=name)
    merged = load_file(deployed / "global_model.safetensors")
    expected = load_file(simulated / "global_model.safetensors")
    assert sorted(merged) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_an_unregistered_supernode_is_refused_and_the_refusal_is_logged(stack):
    """supernode-2 has a key pair (keys/supernode-2) that was never registered: the SuperLink
    refuses to activate it, the node exits with Flower's connection error."""
    done = stack.compose("run", "--rm", "--no-deps", "supernode-2", timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "Failed to activate SuperNode" in output, output[-3000:]
    superlink = stack.logs("superlink")
    assert "No SuperNode found with the given public key" in superlink, superlink[-3000:]
    assert len(online_nodes(stack)) == T  # the registered ones are still in


def test_compose_one_shot_fedavg_equals_simulation(stack, tmp_path):
    deployed = run_on_stack(stack, ONE_SHOT, "one-shot", tmp_path / "deployed")
    simulated = simulate_reference(ONE_SHOT, tmp_path / "simulated", tmp_path / "cache")
    assert_same_weights(deployed, simulated, rounds=1)


def test_compose_two_round_fedavg_equals_simulation(stack, tmp_path):
    deployed = run_on_stack(stack, MULTI_ROUND, "two-rounds", tmp_path / "deployed")
    simulated = simulate_reference(MULTI_ROUND, tmp_path / "simulated", tmp_path / "cache")
    assert_same_weights(deployed, simulated, rounds=2)


def container_log(stack: Stack, container: str) -> str:
    logged = sh(["docker", "logs", container], 60, stack.env)
    return logged.stdout + logged.stderr


def node_ids(stack: Stack) -> set[str]:
    return {node["node-id"] for node in online_nodes(stack)}


def test_compose_a_killed_supernode_is_recorded_and_its_restart_rejoins(stack, tmp_path):
    """supernode-1's container is SIGKILLed (`docker kill`) once its ClientApp has the round-2
    message, and started again at once. The SuperLink answers for it with Node Unavailable when
    its heartbeat expires (~60 s): the round records the failure (round, node, task, reason)
    and goes on with min-clients = 1. With node authentication the restarted node may activate
    only once the SuperLink has marked its key offline; until then the container exits and
    `restart: on-failure` retries, and it comes back under the *same* node id (the key's), so
    later rounds reach it again without a rejoin. Round 3 starts while it is still offline and
    waits for it (node-wait; without the wait its message would fail at once, the SuperLink
    answering for an offline node): round 2 is the only failure, rounds 3-5 train both."""
    before = node_ids(stack)
    assert len(before) == T
    container = stack.container("supernode-1")
    done: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            done.append(run_on_stack(stack, LOST_NODE_RUN, "lost-node", tmp_path / "deployed"))
        except BaseException as error:  # pytest.fail included: re-raised below
            errors.append(error)

    # the container's log holds the earlier tests' rounds too: wait for one more "ROUND 2]"
    seen = container_log(stack, container).count("ROUND 2]")
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + FLWR_RUN_TIMEOUT
    while container_log(stack, container).count("ROUND 2]") <= seen:
        assert thread.is_alive() and time.monotonic() < deadline, (
            f"supernode-1 never got its round-2 message: {errors}\n{stack.logs()[-4000:]}"
        )
        time.sleep(1)
    killed = sh(["docker", "kill", container], 60, stack.env)
    assert killed.returncode == 0, killed.stderr
    killed_at = time.monotonic()
    started = sh(["docker", "start", container], 120, stack.env)
    assert started.returncode == 0, started.stderr
    thread.join(FLWR_RUN_TIMEOUT + 120)
    assert not thread.is_alive(), "flwr run did not return"
    if errors:
        raise errors[0]
    (deployed,) = done
    results = json.loads((deployed / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "completed", results["error"]
    failures = results["failures"]
    assert [(f["round"], f["phase"], f["task"]) for f in failures] == [(2, "train", 1)], failures
    lost = {str(f["node_id"]) for f in failures}
    assert lost <= before, (failures, before)
    clients = [entry["training"]["clients"] for entry in results["rounds"][1:]]
    assert clients == [[0, 1], [0]] + [[0, 1]] * (LOST_NODE_ROUNDS - 2), clients
    wait_for(lambda: node_ids(stack) == before, 180, "not the same node ids online", stack)
    restarts = sh(["docker", "inspect", "-f", "{{.RestartCount}}", container], 60, stack.env)
    streamed = (deployed / "flwr-run.log").read_text(encoding="utf-8")
    waited = re.findall(r"round \d: (?:waiting|every task's node online|the nodes).*", streamed)
    print(
        f"lost node {lost}; clients per round {clients}; "
        f"container restarts after the kill {restarts.stdout.strip()}; {waited}; "
        f"run ended {time.monotonic() - killed_at:.0f} s after the kill"
    )
