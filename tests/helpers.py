"""What several test files share that is not a fixture (the fixtures are in conftest.py).

- ``config`` / ``BASE``: a toy-suite RunConfig of T = 3 tasks; ``InProcessGrid``: a Grid whose
  nodes run the real ClientApp in this process (no Ray), for in-process federations;
  ``assert_states_close``;
- ``SHORT_RUN`` and ``run_config_text``: a short one-shot toy federation as ``--run-config``
  text, for the end-to-end tests of the engines (``flwr run``, deployment, Ray cluster);
- ``free_port``, ``started_under``, ``running``, ``stop_processes``: ports and the clean-up, by
  PID, of every process started under one environment entry (FLWR_HOME=..., read from /proc);
- ``cclip``: CCLIP over a whole model held in memory, in plain torch, the reference the chunked
  ``strategies.cclip.CClip`` and ``fl-sim merge --method cclip`` are checked against;
- ``deployment_processes``, ``start_federation``, ``start_supernode``, ``flwr_run``: a loopback
  deployment (SuperLink + SuperNodes, insecure or TLS) for tests/test_deployment.py and
  tests/test_node_loss.py, and `flwr run --stream` that fails unless the run *finished:completed*
  (`flwr run --stream` itself exits 0 whatever the run's sub-status).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
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


# ---------------------------------------------------------------------------------------------
# A loopback deployment: SuperLink + SuperNodes, and `flwr run` checked by the run's final status
# ---------------------------------------------------------------------------------------------

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]
FEDERATION = "deploy"
START_TIMEOUT = 60  # seconds for the SuperLink to listen
FINISH_TIMEOUT = 180  # seconds for a run to reach `finished:*` once `flwr run --stream` returned


@dataclass
class Federation:
    """A SuperLink and its SuperNodes on loopback, and the environment `flwr run` needs."""

    home: Path
    env: dict[str, str]
    logs: Path
    port: int = 0
    client_tls: list[str] = field(default_factory=list)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("ab")  # a restarted node appends to its log
        process = subprocess.Popen(
            command, cwd=self.home, env=self.env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.processes[name] = process
        return process

    def log_tails(self, chars: int = 1500) -> str:
        return "\n".join(
            f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}"
            for log in sorted(self.logs.glob("*.log"))
        )


def make_certs(tmp_path: Path) -> Path:
    """TLS certificates from scripts/make_certs.sh in tmp_path/certs (skips without openssl)."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl for scripts/make_certs.sh")
    certs = tmp_path / "certs"
    made = subprocess.run(
        ["bash", str(REPO / "scripts" / "make_certs.sh"), str(certs)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    return certs


def simulate_reference(values: dict[str, object], results_dir: Path, cache: Path) -> Path:
    """``values`` run by ``simulate`` (in-process Ray) into ``results_dir``, with FL_SIM_CACHE at
    ``cache`` for the run (restored after): what a deployment's weights are checked against."""
    from fl_sim.federation.simulation import simulate

    saved = os.environ.get("FL_SIM_CACHE")
    os.environ["FL_SIM_CACHE"] = str(cache)
    try:
        config = RunConfig.from_mapping({**values, "results-dir": str(results_dir)})
        (results,) = simulate([config], progress=False)
    finally:
        if saved is None:
            os.environ.pop("FL_SIM_CACHE", None)
        else:
            os.environ["FL_SIM_CACHE"] = saved
    assert results["status"] == "completed", results.get("error")
    return results_dir


@contextlib.contextmanager
def deployment_processes(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """FLWR_HOME and environment for the processes of one test; stops them all afterwards, by
    PID, and asserts none is left. Skips where /proc or flower-supernode is missing."""
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


def start_supernode(
    federation: Federation, t: int, num_nodes: int, name: str | None = None
) -> subprocess.Popen:
    """SuperNode ``name`` (default ``supernode-<t>``; its log ``<name>.log``), partition-id t,
    on a free port."""
    supernode = [str(BIN / "flower-supernode"), *federation.client_tls]
    supernode += ["--superlink", f"127.0.0.1:{federation.port}"]
    supernode += ["--host", "127.0.0.1", "--port", str(free_port())]
    supernode += ["--node-config", f"partition-id={t} num-partitions={num_nodes}"]
    return federation.start(name or f"supernode-{t}", supernode)


def start_federation(
    home: Path, env: dict[str, str], tls: Path | None, num_nodes: int
) -> Federation:
    """SuperLink on a free port, then ``num_nodes`` SuperNodes; with ``tls`` (a make_certs.sh
    dir) the docker-compose layout: TLS everywhere and a separate SuperExec for ServerApps."""
    logs = home / "logs"
    logs.mkdir()
    federation = Federation(home=home, env=env, logs=logs, port=free_port())
    port = federation.port
    superlink = [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(port)]
    superlink.append("--disable-runtime-dependency-installation")
    if tls is None:
        superlink.append("--insecure")
        federation.client_tls = ["--insecure"]
        connection = "insecure = true"
    else:
        superlink += ["--ssl-ca-certfile", str(tls / "ca.crt")]
        superlink += ["--ssl-certfile", str(tls / "server.pem")]
        superlink += ["--ssl-keyfile", str(tls / "server.key")]
        superlink += ["--isolation", "process"]
        federation.client_tls = ["--root-certificates", str(tls / "ca.crt")]
        connection = f"root-certificates = {json.dumps(str(tls / 'ca.crt'))}"
    process = federation.start("superlink", superlink)
    wait_for_port(port, process, federation)
    if tls is not None:
        superexec = [str(BIN / "flower-superexec"), "--runtime-api-address", f"127.0.0.1:{port}"]
        federation.start("superexec-serverapp", superexec + federation.client_tls)
    for t in range(num_nodes):
        start_supernode(federation, t, num_nodes)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{FEDERATION}"\n\n'
        f'[superlink.{FEDERATION}]\naddress = "127.0.0.1:{port}"\n{connection}\n',
        encoding="utf-8",
    )
    return federation


def flwr_ls(env: dict[str, str], run_id: int | None = None) -> list[dict[str, object]]:
    """`flwr ls` of the test's federation (``--run-id``: that run only), parsed from JSON."""
    command = [str(BIN / "flwr"), "ls", FEDERATION, "--format", "json"]
    if run_id is not None:
        command += ["--run-id", str(run_id)]
    listed = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=False
    )
    try:
        return json.loads(listed.stdout)["runs"]
    except (ValueError, KeyError):
        raise AssertionError(
            f"flwr ls failed ({listed.returncode}): {listed.stderr[-2000:]}"
        ) from None


@dataclass
class FlwrRun:
    """One `flwr run --stream` and the run's status once it finished."""

    returncode: int
    log: str  # stdout + stderr of `flwr run` (the streamed ServerApp log)
    seconds: float  # until `flwr run` returned
    run_id: int | None
    status: str  # `flwr ls`: "finished:completed", "finished:failed", ...
    details: str  # `flwr ls` status-details: the ServerApp's exception for a failed run
    finished_after_stream: bool  # the stream ended before the run was finished


def flwr_run(federation: Federation, run_config: str, timeout: float) -> FlwrRun:
    """`flwr run . deploy --stream --run-config ...`, then the run's final status from `flwr ls
    --run-id` (polled until ``finished:*``). `flwr run --stream` returns 0 for a finished run
    whatever its sub-status, so only the status tells a failed ServerApp from a completed one;
    ``assert_completed`` checks it."""
    command = [str(BIN / "flwr"), "run", ".", FEDERATION, "--stream", "--run-config", run_config]
    start = time.monotonic()
    try:
        done = subprocess.run(
            command,
            cwd=REPO,
            env=federation.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run took over {timeout:.0f} s:\n{federation.log_tails()}")
    seconds = time.monotonic() - start
    log = done.stdout + done.stderr
    found = re.search(r"Successfully started run (\d+)", log)
    run = FlwrRun(done.returncode, log, seconds, None, "", "", False)
    if found is None:
        return run
    run.run_id = int(found.group(1))
    deadline = time.monotonic() + FINISH_TIMEOUT
    while True:
        (row,) = flwr_ls(federation.env, run.run_id)
        run.status, run.details = str(row["status"]), str(row["status-details"])
        if run.status.startswith("finished") or time.monotonic() > deadline:
            break
        run.finished_after_stream = True
        time.sleep(1.0)
    if run.finished_after_stream:  # evidence for the TLS flake of tests/test_deployment.py
        warnings.warn(
            f"`flwr run --stream` returned after {seconds:.1f} s while run {run.run_id} was "
            f"not finished; it then ended {run.status!r}",
            stacklevel=2,
        )
    return run


def descendants(pid: int) -> set[int]:
    """``pid`` and every process below it (from /proc), running ones only."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and (info := parent_and_state(int(proc.name))):
            children.setdefault(info[0], []).append(int(proc.name))
    found, todo = set(), [pid]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo.extend(children.get(current, []))
    return {p for p in found if running(p)}


def kill_tree(pid: int) -> set[int]:
    """SIGKILL ``pid`` and its descendants (collected first: orphans stay known); their PIDs."""
    tree = descendants(pid)
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)
    return tree


def assert_completed(run: FlwrRun, federation: Federation) -> None:
    """The run finished with sub-status ``completed``; else the ServerApp's error and the logs."""
    assert run.returncode == 0 and run.run_id is not None and run.status == "finished:completed", (
        f"flwr run exited {run.returncode} after {run.seconds:.1f} s, run {run.run_id} is "
        f"{run.status or '?'!r}: {run.details}\n{run.log[-3000:]}\n{federation.log_tails()}"
    )


TINY_BERT_WORDS = (
    "return", "the", "list", "of", "files", "open", "a", "class", "value", "name", "if"
)  # fmt: skip


def save_tiny_bert(folder: Path) -> Path:
    """A random 3-block BERT (seed 0) with a word-level tokenizer of TINY_BERT_WORDS, saved
    as a local Hugging Face model folder at ``folder``."""
    from transformers import BertConfig, BertModel, BertTokenizer

    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *TINY_BERT_WORDS]
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
    )
    BertModel(config).save_pretrained(folder)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(folder)
    return folder
