"""A node lost mid-round is recorded and the run goes on; restarted, it rejoins a later round.

The SuperLink answers for a SuperNode that stopped sending heartbeats (2 × 30 s in Flower 1.41)
with an error reply from its own node id (1, "Node Unavailable"); the strategy records it
against the node the message went to (round, node, task, reason) and the round goes on with
``min-clients``. A restarted SuperNode registers under a *new* node id: before each round the
strategy asks nodes it has not seen for their partition id, and the new node takes over the
task whose node failed the previous round (strategies/flower_strategy.py ``_rejoin``).

- in process (``InProcessGrid``, no Flower engine): the SuperLink's error reply and a new node id
  for task 2 after round 2, on the real ClientApp and ServerApp;
- on loopback (the deployment of tests/test_deployment.py, insecure): toy suite, T = 3, 3 rounds,
  min-clients = 2; supernode-2 and its children SIGKILLed by PID once it received its round-2
  message, started again (same partition-id) right away; round 2 records client 2 as failed,
  round 3 has all three clients, the run finishes *completed*.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict
from helpers import (
    SHORT_RUN,
    FlwrRun,
    InProcessGrid,
    assert_completed,
    config,
    deployment_processes,
    flwr_run,
    kill_tree,
    run_config_text,
    start_federation,
    start_supernode,
)

from fl_sim.federation.server_app import run_federation
from strategies.flower_strategy import FederationError

SUPERLINK_NODE_ID = 1  # flwr.common.constant: the SuperLink's own replies come from it
NODE_UNAVAILABLE = 5  # flwr.common.constant.ErrorCode.NODE_UNAVAILABLE


class LosingGrid(InProcessGrid):
    """Node 102 (task 2) is lost in round 2: the SuperLink answers its train message with Node
    Unavailable. It comes back as node 202 (a restarted SuperNode gets a new node id): after
    the loss, or (``early``) already after round 1, while 102 still works. Message ids are set
    on send, as Flower's grids do."""

    def __init__(self, early: bool = False) -> None:
        super().__init__(3)
        self.early = early
        self.queried: list[int] = []

    def restart(self) -> None:
        self.contexts[202] = Context(
            run_id=7,
            node_id=202,
            node_config=dict(self.contexts[102].node_config),
            state=RecordDict(),
            run_config={},
        )

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            if msg.metadata.message_type == "query":
                self.queried.append(msg.metadata.dst_node_id)
            train = msg.metadata.message_type == "train" and msg.metadata.dst_node_id == 102
            if not (train and msg.metadata.group_id == "2"):
                replies.extend(super().send_and_receive([msg], timeout=timeout))
                if train and self.early and msg.metadata.group_id == "1":
                    self.restart()
                continue
            error = Error(code=NODE_UNAVAILABLE, reason="Error: Node Unavailable")
            reply = Message(error, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            replies.append(reply)
            if not self.early:
                self.restart()
            del self.contexts[102]
        return replies


@pytest.mark.usefixtures("one_thread", "isolated_cache", "task_identity")
@pytest.mark.parametrize("early", [False, True], ids=["restart-after-loss", "spare-before-loss"])
def test_a_lost_node_is_recorded_once_and_its_restart_rejoins(tmp_path, early):
    grid = LosingGrid(early)
    cfg = config(strategy="fedavg", num_rounds=3, min_clients=2, results_dir=str(tmp_path))
    results = run_federation(grid, cfg)
    assert results["status"] == "completed"
    (failure,) = results["failures"]  # one record, for the node the message went to
    assert (failure["round"], failure["phase"], failure["node_id"], failure["task"]) == (
        2,
        "train",
        102,
        2,
    )
    assert "Node Unavailable" in failure["reason"]
    clients = [entry["training"]["clients"] for entry in results["rounds"][1:]]
    assert clients == [[0, 1, 2], [0, 1], [0, 1, 2]]
    assert grid.queried.count(202) == 1  # the new node is asked once (before round 3, or 2)


class OfflineGrid(InProcessGrid):
    """Node 102 (task 2) is lost in round 2 and stays offline until ``offline_s`` seconds after
    the server first looks at the connected nodes again (round 3 starts): not among
    ``get_node_ids`` (the SuperLink lists online nodes only), and every message to it gets the
    SuperLink's Node Unavailable reply. It then comes back under the *same* node id, as a
    SuperNode with node authentication does (its id is its key's)."""

    def __init__(self, offline_s: float) -> None:
        super().__init__(3)
        self.offline_s = offline_s
        self.lost = False
        self.back_at: float | None = None

    def offline(self) -> bool:
        return self.lost and (self.back_at is None or time.monotonic() < self.back_at)

    def get_node_ids(self) -> list[int]:
        if self.lost and self.back_at is None:
            self.back_at = time.monotonic() + self.offline_s
        return [node_id for node_id in self.contexts if node_id != 102 or not self.offline()]

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            lost = msg.metadata.dst_node_id == 102 and msg.metadata.message_type == "train"
            if lost and msg.metadata.group_id == "2" and not self.lost:
                self.lost = True
            elif not (msg.metadata.dst_node_id == 102 and self.offline()):
                replies.extend(super().send_and_receive([msg], timeout=timeout))
                continue
            reply = Message(Error(NODE_UNAVAILABLE, "Error: Node Unavailable"), reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
            replies.append(reply)
        return replies


@pytest.mark.usefixtures("one_thread", "isolated_cache", "task_identity")
@pytest.mark.parametrize(
    ("node_wait", "failed_rounds"),
    [(0.0, [2, 3]), (0.3, [2, 3]), (30.0, [2])],
    ids=["no-wait", "wait-too-short", "wait"],
)
def test_a_round_waits_node_wait_seconds_for_an_offline_node(tmp_path, node_wait, failed_rounds):
    """Round 3 starts while task 2's node is offline (for 1.5 s more): without node-wait, or
    with too short a one, its message fails; with node-wait the round waits, and trains all."""
    grid = OfflineGrid(offline_s=1.5)
    cfg = config(
        strategy="fedavg",
        num_rounds=3,
        min_clients=2,
        node_wait=node_wait,
        results_dir=str(tmp_path),
    )
    results = run_federation(grid, cfg)
    assert results["status"] == "completed"
    assert [(f["round"], f["node_id"], f["task"]) for f in results["failures"]] == [
        (r, 102, 2) for r in failed_rounds
    ]
    assert all("Node Unavailable" in f["reason"] for f in results["failures"])
    clients = [entry["training"]["clients"] for entry in results["rounds"][1:]]
    assert clients == [[0, 1, 2]] + [[0, 1] if r in failed_rounds else [0, 1, 2] for r in (2, 3)]


class QueryLossGrid(InProcessGrid):
    """Node 102 (task 2) is lost while it is asked for its partition id: the SuperLink answers
    that query with Node Unavailable (from its own node id), and 102 is offline for 0.5 s, then
    back under the same node id."""

    def __init__(self) -> None:
        super().__init__(3)
        self.queried: list[int] = []
        self.back_at: float | None = None

    def get_node_ids(self) -> list[int]:
        offline = self.back_at is not None and time.monotonic() < self.back_at
        return [node_id for node_id in self.contexts if not (offline and node_id == 102)]

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node_id = msg.metadata.dst_node_id
            if msg.metadata.message_type == "query":
                self.queried.append(node_id)
            if node_id == 102 and self.back_at is None:
                self.back_at = time.monotonic() + 0.5
                reply = Message(Error(NODE_UNAVAILABLE, "Error: Node Unavailable"), reply_to=msg)
                reply.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                replies.append(reply)
            else:
                replies.extend(super().send_and_receive([msg], timeout=timeout))
        return replies


@pytest.mark.usefixtures("one_thread", "isolated_cache", "task_identity")
def test_a_node_lost_during_task_discovery_is_asked_again_within_node_wait(tmp_path):
    grid = QueryLossGrid()
    cfg = config(strategy="fedavg", num_rounds=1, node_wait=30.0, results_dir=str(tmp_path))
    results = run_federation(grid, cfg)
    assert results["status"] == "completed" and results["failures"] == []
    assert results["rounds"][1]["training"]["clients"] == [0, 1, 2]
    assert sorted(grid.queried) == [100, 101, 102, 102]  # only the lost node is asked again


@pytest.mark.usefixtures("one_thread", "isolated_cache", "task_identity")
def test_without_node_wait_a_node_lost_during_task_discovery_fails_the_run_by_its_id(tmp_path):
    with pytest.raises(FederationError) as error:
        run_federation(QueryLossGrid(), config(strategy="fedavg", results_dir=str(tmp_path)))
    message = str(error.value)
    assert message.startswith("node 102 failed the partition-id query: Error: Node Unavailable")
    assert "set node-wait" in message


# ---------------------------------------------------------------------------------------------
# On loopback: a real SuperNode SIGKILLed in round 2 and started again
# ---------------------------------------------------------------------------------------------

T = 3
ROUNDS = 3
RUN_TIMEOUT = 420  # seconds for `flwr run`; ~3 min on 2 cores (round 2 waits for the heartbeat)
ROUND_2_TIMEOUT = 240  # seconds until supernode-2 receives its round-2 message
RUN_CONFIG = {
    **SHORT_RUN,
    "num-tasks": T,
    "num-rounds": ROUNDS,
    "min-clients": 2,
    # above Flower's 60 s node expiry, so the SuperLink's Node Unavailable reply ends round 2;
    # a healthy round takes ~15-30 s here
    "round-timeout": 150.0,
}


@pytest.fixture
def deployment_env(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    with deployment_processes(tmp_path) as home_env:
        yield home_env


def wait_for_text(log: Path, pattern: str, timeout: float, run: threading.Thread) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and run.is_alive():
        text = log.read_text(errors="replace") if log.exists() else ""
        if re.search(pattern, text):
            return text
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} not in {log.name} after {timeout:.0f} s")


@pytest.mark.slow
def test_a_supernode_killed_in_round_2_is_recorded_and_rejoins_round_3(tmp_path, deployment_env):
    home, env = deployment_env
    federation = start_federation(home, env, None, num_nodes=T)
    results_dir = (tmp_path / "run").resolve()
    run_config = run_config_text({**RUN_CONFIG, "results-dir": str(results_dir)})
    done: list[FlwrRun] = []
    thread = threading.Thread(
        target=lambda: done.append(flwr_run(federation, run_config, timeout=RUN_TIMEOUT)),
        daemon=True,
    )
    thread.start()
    try:
        text = wait_for_text(
            federation.logs / "supernode-2.log", r"ROUND 2\]", ROUND_2_TIMEOUT, thread
        )
        lost = federation.processes["supernode-2"]
        killed = kill_tree(lost.pid)
        lost.wait(timeout=30)
        killed_at = time.monotonic()
        old_ids = re.findall(r"SuperNode ID: (\d+)", text)
        start_supernode(federation, 2, T, name="supernode-2-restarted")
    finally:
        thread.join(RUN_TIMEOUT + 200)
    assert done, f"flwr run did not return:\n{federation.log_tails()}"
    (run,) = done
    assert_completed(run, federation)
    assert lost.pid in killed and len(killed) >= 1

    results = json.loads((results_dir / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "completed", results["error"]
    failures = results["failures"]
    assert len(failures) == 1, failures
    (failure,) = failures
    assert (failure["round"], failure["phase"], failure["task"]) == (2, "train", 2), failure
    assert failure["node_id"] != SUPERLINK_NODE_ID, failure
    if old_ids:  # the SuperNode logs its id at registration
        assert str(failure["node_id"]) == old_ids[-1], (failure, old_ids)
    assert failure["reason"], failure
    clients = [entry["training"]["clients"] for entry in results["rounds"][1:]]
    assert clients == [[0, 1, 2], [0, 1], [0, 1, 2]], clients
    restarted = (federation.logs / "supernode-2-restarted.log").read_text(errors="replace")
    assert re.search(r"ROUND 3\]", restarted), restarted[-2000:]
    assert "rejoins as client 2" in run.log, run.log[-3000:]
    print(  # durations in the -s / -rA output
        f"flwr run {run.seconds:.0f} s; round 2 ended "
        f"{results['rounds'][2]['timings']['round_seconds']} s after it started; "
        f"killed PIDs {sorted(killed)} at {killed_at:.0f}; failure: {failure}"
    )
