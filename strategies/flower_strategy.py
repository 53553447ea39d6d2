"""Flower strategies for every rule: thin glue around ``make_rule`` and ``aggregate_model``.

    θʳ⁺¹ = θʳ + β · A(Δ₁..Δ_T)        (docs/design.md; the rules live in strategies/<rule>.py)

``RuleStrategy`` does what every rule shares: it sends each node its ConfigRecord (the server
knows node → task from the clients' partition ids, and gives each task's own knobs through
``client_config``), collects Δ_t, records failed clients, and calls the same
``aggregate_model(inputs="updates")`` as an offline ``fl-sim merge``, on the server device.

The streaming server (``AggregationSettings.streaming``, run-config ``server-streaming``, the
default; docs/design.md, "The streaming server") takes replies as they arrive (``train_round``:
``Grid.push_messages``, then ``Grid.pull_messages`` until every reply is in or the round's
timeout has passed) and, once a reply is checked, folds its Δ_t into a running float64 sum (the
linear rules, strategies/round_accumulator.py) or spills it to a safetensors file that the
engine reads back memory-mapped (the other rules, and round 1, whose Δ_t the recorder reads one
by one; strategies/spill.py), then drops the message: the server never holds T replies. Spill
files go when the round ends, also when it fails. Without it a round is Flower's
``send_and_receive`` and ``aggregate_train`` on every reply at once.
It receives the run's rule section (strategies/rule_section.py: the rule, its knobs, β or λ, the
grids) and the aggregation settings, nothing else of the run config. Every registered rule
(strategies/registry.py) gets its class, ``STRATEGIES[name]``, derived from its spec:

- ``uses_lambda`` (task_arithmetic): p_t = 1/T and β = λT, so one round from θ₀ is θ₀ + λ Σ_t τ_t;
- ``needs_a_norm`` (fednova): ‖a_t‖₁ from the clients' "a-norm" metric (every rule records it);
- ``carries_center`` (cclip): v₀ = the previous round's A (0 in round 1), kept in checkpoints;
- ``seeded`` (dare): the rule's seed knob + the round index − 1, recorded in the round's summary.

Every round records p_t, ‖a_t‖₁, the effective weights w_t = p_t‖a_t‖₁ / Σ_i p_i‖a_i‖₁ and
χ²(p‖w) = Σ_t (p_t − w_t)²/w_t, ‖Δ_t‖₂, which clients answered from the update cache, the rule's
own figures and the aggregation time.

β search (``server-lr-grid``; task_arithmetic: ``lambda-grid``, β = λT), one-shot runs only: round
1 aggregates A once (``strategies/server_step.py``), the ``select_server_lr`` callback (the
ServerApp, on validation data) picks β from the grid or, when the grid's best is at an end,
beyond it (``search_server_lr``), and the round's model is θ₀ + β·A.
Declared faults (``byzantine``, ``crash``, ``slow``; clients/fault_injection.py) go to
each client in its ConfigRecord. ``start`` can resume at a later round
(fl_sim/federation/round_checkpoint.py) with the state of ``checkpoint_state``/``restore_state``.
A failed client (an error reply, a reply without Δ_t, an update whose tensors do not match θʳ,
a non-finite update, checked before aggregation: "non-finite update", or no reply before
``round-timeout``) is logged and recorded (round, node, task, reason); the round goes on if at
least ``min-clients`` replied (0: all), otherwise ``FederationError``. Nothing is dropped silently.
A lost node (no heartbeat) is answered for by the SuperLink (an error reply from node 1, "Node
Unavailable"): it is recorded against the node the message was sent to. A SuperNode restarted
after a loss registers under a new node id: before each round, a node not seen before is asked
its partition id, and takes over task t when t's node has left the federation or failed the
previous round (logged; until then it is kept as a spare, with a warning).
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from typing import ClassVar

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log

from fl_sim.checkpoints.array_records import array_to_tensor, record_to_tensors, tensors_to_record
from fl_sim.errors import FlSimError
from strategies.cclip import next_center
from strategies.heterogeneity import chi_square, effective_weights
from strategies.registry import RULES, RuleConfig, make_rule, rule_spec
from strategies.round_accumulator import LinearFold, fold_factor
from strategies.rule import Chunk, Rule, client_weights
from strategies.rule_section import RuleSection
from strategies.server_step import SelectServerLr, ServerLrCandidate, server_step
from strategies.spill import SpilledUpdate, SpillFolder
from strategies.streaming import AggregationOptions, TensorPlan, aggregate_model, resolve_device

UpdatesCallback = Callable[[int, dict[int, Mapping[str, torch.Tensor]]], None]
ConfigValue = bool | int | float | str
# (task t, round) → what client t gets in that round's ConfigRecord (its knobs, the suite, faults)
ClientConfig = Callable[[int, int], Mapping[str, ConfigValue]]
PULL_INTERVAL = 0.1  # s between pulls of a streaming round (InMemoryGrid's own pull_interval)
NODE_POLL_INTERVAL = 0.5  # s between looks at the connected nodes while a round waits for one


@dataclass(frozen=True)
class AggregationSettings:
    """How the server aggregates, whatever the rule."""

    device: str = "auto"  # auto, cpu or cuda (strategies/streaming.py resolve_device)
    min_clients: int = 0  # a round goes on if at least this many replied (0 = all)
    streaming: bool = True  # take replies as they arrive: fold or spill each (module docstring)
    spill_dir: str = ""  # the run's scratch folder for spill files ('' = a temporary folder)
    node_wait: float = 0.0  # s a round waits for its tasks' offline nodes before sending


class FederationError(FlSimError):
    """A round that cannot go on: too few clients replied."""


@dataclass
class ClientFailure:
    """One client that did not deliver in one round."""

    round: int
    phase: str  # "train" | "evaluate"
    node_id: int
    task: int | None
    reason: str


@dataclass
class RoundRecord:
    """What the server measured in one training round (clients in task order)."""

    round: int
    clients: list[int]  # task indices t that replied
    server_lr: float  # β
    weights: list[float]  # p_t
    num_examples: list[int]  # n_t
    local_steps: list[int]  # K_t
    a_norm: list[float]  # ‖a_t‖₁ of the run's kind
    a_norm_exact: list[bool]
    lr_sum: list[float]  # Σ_k η_t⁽ᵏ⁾ (whatever the a-norm kind)
    effective_weights: list[float]  # w_t
    chi_square: float  # χ²(p‖w)
    update_norms: list[float]  # ‖Δ_t‖₂ over the federated vector
    loss_before: list[float]
    loss_after: list[float]
    rule_summary: dict[str, object]
    aggregation_seconds: float
    failures: int = 0
    cached: list[bool] = field(default_factory=list)  # Δ_t came from the update cache
    client_evaluation: dict[int, dict[str, float]] = field(default_factory=dict)
    train_seconds: list[float] = field(default_factory=list)  # each client's local training
    client_seconds: list[float] = field(default_factory=list)  # each client's whole handler
    wait_seconds: float = 0.0  # train messages sent → every reply held (server's clock)
    busy_seconds: float = 0.0  # of that wait: some client handler ran (fl_sim/federation/timing.py)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class Delivery:
    """What a streaming round keeps of one valid reply once its Δ_t is folded or spilled."""

    task: int
    metrics: dict[str, object]
    update_norm: float  # ‖Δ_t‖₂


@dataclass
class RoundIntake:
    """One streaming round's replies so far: the running fold or the spill files."""

    fold: LinearFold | None = None
    spill: SpillFolder | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    answered: set[int] = field(default_factory=set)  # node ids that replied, usable or not
    sent_to: dict[str, int] | None = None  # message id → node id, once the messages are pushed
    seconds: float = 0.0  # folding or spilling, on arrival

    def close(self) -> None:
        """Remove the spill files (success or failure) and drop the fold."""
        if self.spill is not None:
            self.spill.remove()
        self.fold = None


class RuleStrategy(Strategy):
    """The Flower side shared by every rule; subclasses set ``rule_name`` and their knobs."""

    rule_name: ClassVar[str] = ""

    def __init__(
        self,
        rule: RuleSection,
        node_tasks: Mapping[int, int],
        *,
        settings: AggregationSettings | None = None,
        client_config: ClientConfig | None = None,
        evaluate_config: Mapping[str, ConfigValue] | None = None,
        evaluate_on_clients: bool = False,
        on_updates: UpdatesCallback | None = None,
        select_server_lr: SelectServerLr | None = None,
        wants_updates: Callable[[int], bool] | None = None,
    ) -> None:
        if rule.strategy != self.rule_name:
            raise FlSimError(
                f"{type(self).__name__} runs {self.rule_name!r}, config says {rule.strategy!r}"
            )
        self.rule = rule
        self.spec = rule_spec(self.rule_name)
        self.settings = settings or AggregationSettings()
        self.node_tasks = dict(node_tasks)
        self.client_config = client_config or (lambda t, server_round: {})
        self.evaluate_config = dict(evaluate_config or {})
        self.device = resolve_device(self.settings.device)
        self.evaluate_on_clients = evaluate_on_clients
        self.on_updates = on_updates
        self.select_server_lr = select_server_lr
        # the rounds whose individual Δ_t ``on_updates`` reads (None: every round)
        self.wants_updates = wants_updates
        self.rounds: list[RoundRecord] = []
        self.failures: list[ClientFailure] = []
        self._theta: dict[str, torch.Tensor] = {}
        self._sent: dict[int, int] = {}
        self._messages: list[Message] = []  # this round's sent messages (ids set by the grid)
        self._seen = set(self.node_tasks)  # node ids asked for their partition id
        self._spares: dict[int, int] = {}  # node id → task t, of nodes that did not take t over
        self._query_timeout = 3600.0  # the round timeout, set by ``start``
        self._sent_at = time.time()
        self.previous_update: dict[str, torch.Tensor] | None = None  # v₀ of carries_center rules

    # -- what the rule's spec says ------------------------------------------------------------

    def rule_config(
        self, weights: list[float] | None, a_norm: list[float], server_round: int
    ) -> RuleConfig:
        """This round's RuleConfig for the replying clients (``weights`` None = uniform)."""
        return self.rule.rule_config(weights, a_norm, server_round)

    def server_lr(self, num_clients: int) -> float:
        """β for a round with ``num_clients`` replies (task_arithmetic: λT)."""
        return self.rule.server_lr_for(num_clients)

    def server_lr_candidates(self, num_clients: int) -> list[ServerLrCandidate]:
        """The β grid searched in round 1 (``server-lr-grid``, or λ ↦ λT); [] = no search."""
        return self.rule.search_candidates(num_clients)

    def center(self) -> Mapping[str, torch.Tensor] | None:
        """v₀ of the rules that carry it (cclip): the previous round's A; None otherwise."""
        return self.previous_update if self.spec.carries_center else None

    def after_round(
        self, theta: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor], beta: float
    ) -> None:
        """cclip keeps A = (θʳ⁺¹ − θʳ)/β for the next round's v₀."""
        if self.spec.carries_center:
            self.previous_update = next_center(theta, merged, beta)

    # -- checkpoint (fl_sim/federation/round_checkpoint.py) -----------------------------------

    def checkpoint_state(self) -> tuple[dict[str, object], dict[str, torch.Tensor]]:
        """What a resumed run needs besides θʳ: the JSON part and the tensors (cclip's v₀)."""
        state = {
            "rounds": [record.to_json() for record in self.rounds],
            "failures": [asdict(failure) for failure in self.failures],
            "has_center": self.previous_update is not None,
        }
        return state, dict(self.previous_update or {})

    def restore_state(
        self, state: Mapping[str, object], tensors: Mapping[str, torch.Tensor]
    ) -> None:
        """The inverse of ``checkpoint_state``."""
        self.rounds = []
        for entry in state["rounds"]:  # type: ignore[union-attr]
            record = RoundRecord(**entry)
            record.client_evaluation = {int(t): v for t, v in record.client_evaluation.items()}
            self.rounds.append(record)
        self.failures = [ClientFailure(**entry) for entry in state["failures"]]  # type: ignore[union-attr]
        self.previous_update = (
            {name: tensor.clone() for name, tensor in tensors.items()}
            if state.get("has_center")
            else None
        )

    # -- Flower's Strategy ---------------------------------------------------------------------

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
        *,
        first_round: int = 1,
    ) -> Result:
        """Flower's ``Strategy.start`` loop, able to resume: rounds ``first_round``..R from
        ``initial_arrays`` = θ^(first_round − 1) (round 0 is evaluated only from θ₀). With
        ``streaming`` (the default) every training round takes its replies as they arrive
        (``train_round``); without it, round 1 onwards is Flower's own loop."""
        self._query_timeout = timeout
        if first_round == 1 and not self.settings.streaming:
            return super().start(
                grid,
                initial_arrays,
                num_rounds,
                timeout,
                train_config,
                evaluate_config,
                evaluate_fn,
            )
        if first_round == 1:
            log(INFO, "Starting %s strategy (streaming server):", type(self).__name__)
        else:
            log(INFO, "Resuming %s at round %d of %d", type(self).__name__, first_round, num_rounds)
        self.summary()
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        result = Result()
        result.arrays = arrays = initial_arrays
        if first_round == 1 and evaluate_fn:
            res = evaluate_fn(0, initial_arrays)
            if res is not None:
                result.evaluate_metrics_serverapp[0] = res
        for current_round in range(first_round, num_rounds + 1):
            merged, train_metrics = self.train_round(
                current_round, grid, arrays, train_config, timeout
            )
            if merged is not None:
                result.arrays = arrays = merged
            if train_metrics is not None:
                result.train_metrics_clientapp[current_round] = train_metrics
            replies = grid.send_and_receive(
                messages=self.configure_evaluate(current_round, arrays, evaluate_config, grid),
                timeout=timeout,
            )
            evaluate_metrics = self.aggregate_evaluate(current_round, replies)
            if evaluate_metrics is not None:
                result.evaluate_metrics_clientapp[current_round] = evaluate_metrics
            if evaluate_fn:
                res = evaluate_fn(current_round, arrays)
                if res is not None:
                    result.evaluate_metrics_serverapp[current_round] = res
        return result

    def train_round(
        self,
        server_round: int,
        grid: Grid,
        arrays: ArrayRecord,
        config: ConfigRecord,
        timeout: float,
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """One training round. Streaming: push every node its message, then pull replies as
        they arrive until all are in or ``timeout`` s have passed (``Grid.send_and_receive``'s
        semantics), each one validated and folded or spilled on arrival, then released.
        Otherwise ``send_and_receive`` and ``aggregate_train`` on every reply at once."""
        messages = self.configure_train(server_round, arrays, config, grid)
        if not self.settings.streaming:
            replies = grid.send_and_receive(messages=messages, timeout=timeout)
            return self.aggregate_train(server_round, replies)
        if not hasattr(grid, "push_messages"):  # a grid that only sends and receives (tests)
            return self.aggregate_train(
                server_round, grid.send_and_receive(messages=messages, timeout=timeout)
            )
        intake = self._open_intake(server_round)
        try:
            pending = {str(i) for i in grid.push_messages(messages) if i}
            del messages  # self._messages keeps them, for the reply → node mapping
            deadline = time.time() + timeout
            interval = float(getattr(grid, "pull_interval", PULL_INTERVAL))
            while pending and time.time() < deadline:
                pulled = deque(grid.pull_messages(pending))
                while pulled:
                    reply = pulled.popleft()
                    pending.discard(reply.metadata.reply_to_message_id)
                    self._take_reply(server_round, intake, reply)
                    del reply  # its Δ_t is folded or on disk: nothing keeps the message
                if pending:
                    time.sleep(interval)
            return self._finish_intake(server_round, intake, time.time())
        finally:
            intake.close()

    def summary(self) -> None:
        log(
            INFO,
            "\t├── Rule: %s (β = %s, weighting = %s, knobs = %s)",
            self.rule_name,
            self.server_lr(len(self.node_tasks)),
            self.rule.weighting,
            self.rule.rule_knobs.as_dict(),
        )
        log(
            INFO,
            "\t├── Clients: %d nodes → tasks %s",
            len(self.node_tasks),
            sorted(self.node_tasks.values()),
        )
        log(INFO, "\t├── min-clients: %d (0 = all)", self.settings.min_clients)
        log(INFO, "\t├── node-wait: %.0f s", self.settings.node_wait)
        log(INFO, "\t└── Aggregation device: %s", self.device)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One message per node: θʳ and that client's own knobs."""
        self._await_nodes(server_round, grid)
        self._theta = record_to_tensors(arrays)  # read-only views of θʳ, no copy
        self._sent = dict(self.node_tasks)
        self._sent_at = time.time()
        messages = []
        for node_id, t in sorted(self.node_tasks.items(), key=lambda item: item[1]):
            record = ConfigRecord(dict(config))
            record.update(dict(self.client_config(t, server_round)))
            record["server-round"] = server_round
            content = RecordDict({"arrays": arrays, "config": record})
            messages.append(
                Message(content, node_id, MessageType.TRAIN, group_id=str(server_round))
            )
        self._messages = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """θʳ⁺¹ = θʳ + β·A over the clients that delivered; failures recorded. With
        ``streaming`` the replies go one by one through the streaming round's intake (folded or
        spilled, as ``train_round`` does with replies pulled as they arrive)."""
        received_at = time.time()
        if self.settings.streaming:
            intake = self._open_intake(server_round)
            try:
                for reply in replies:
                    self._take_reply(server_round, intake, reply)
                return self._finish_intake(server_round, intake, received_at)
            finally:
                intake.close()
        valid = self._valid_replies(server_round, replies, phase="train")
        self._require_enough(server_round, len(valid))
        valid.sort(key=lambda item: item[0])
        tasks = [t for t, _ in valid]
        metrics = [msg.content["metrics"] for _, msg in valid]
        updates = [record_to_tensors(msg.content["arrays"]) for _, msg in valid]
        p, rule = self._round_rule(server_round, metrics)
        if self.on_updates is not None:  # before aggregating: a β search needs the clients' θ_t
            self.on_updates(server_round, dict(zip(tasks, updates, strict=True)))

        def aggregate(beta: float, zero_base: bool) -> dict[str, torch.Tensor]:
            return self._aggregate(server_round, rule, tasks, updates, beta, zero_base=zero_base)

        merged, beta, seconds = self._server_step(server_round, len(valid), aggregate)
        self.after_round(self._theta, merged, beta)
        record = self._record_round(
            server_round,
            tasks,
            metrics,
            p,
            beta,
            [update_norm(u) for u in updates],
            rule.summary(),
            seconds,
            received_at,
        )
        return tensors_to_record(merged), self._round_summary(record, p)

    def _record_round(
        self,
        server_round: int,
        tasks: list[int],
        metrics: Sequence[Mapping[str, object]],
        p: list[float],
        beta: float,
        norms: list[float],
        rule_summary: dict[str, object],
        seconds: float,
        received_at: float,
    ) -> RoundRecord:
        """This round's RoundRecord, appended to ``rounds`` (clients in task order)."""
        num_examples = [int(m["num-examples"]) for m in metrics]
        a_norm = [float(m["a-norm"]) for m in metrics]
        w = effective_weights(p, a_norm)
        self.rounds.append(
            RoundRecord(
                round=server_round,
                clients=tasks,
                server_lr=beta,
                weights=p,
                num_examples=num_examples,
                local_steps=[int(m["local-steps"]) for m in metrics],
                a_norm=a_norm,
                a_norm_exact=[bool(m["a-norm-exact"]) for m in metrics],
                lr_sum=[float(m["a-norm-lr-sum"]) for m in metrics],
                effective_weights=w,
                chi_square=chi_square(p, w),
                update_norms=norms,
                loss_before=[float(m["loss-before"]) for m in metrics],
                loss_after=[float(m["loss-after"]) for m in metrics],
                rule_summary=rule_summary,
                aggregation_seconds=seconds,
                failures=sum(f.round == server_round for f in self.failures),
                cached=[bool(m.get("cached", 0)) for m in metrics],
                train_seconds=[float(m.get("train-seconds", 0.0)) for m in metrics],
                client_seconds=[float(m.get("client-seconds", 0.0)) for m in metrics],
                wait_seconds=received_at - self._sent_at,
                busy_seconds=busy_seconds(
                    [
                        (float(m["client-start"]), float(m["client-end"]))
                        for m in metrics
                        if "client-start" in m and "client-end" in m
                    ],
                    self._sent_at,
                    received_at,
                ),
            )
        )
        return self.rounds[-1]

    def _round_summary(self, record: RoundRecord, p: list[float]) -> MetricRecord:
        """The round's MetricRecord for Flower's Result (p-weighted losses, χ², timing)."""
        seconds = record.aggregation_seconds
        return MetricRecord(
            {
                "clients": len(record.clients),
                "loss-before": sum(x * q for x, q in zip(record.loss_before, p, strict=True)),
                "loss-after": sum(x * q for x, q in zip(record.loss_after, p, strict=True)),
                "chi-square": record.chi_square if math.isfinite(record.chi_square) else -1.0,
                "aggregation-seconds": seconds,
            }
        )

    def _aggregate(
        self,
        server_round: int,
        rule: Rule,
        tasks: list[int],
        updates: Sequence[Mapping[str, torch.Tensor]],
        beta: float,
        *,
        zero_base: bool,
    ) -> dict[str, torch.Tensor]:
        """θʳ + β·A through ``aggregate_model``; ``zero_base``: A·β alone (θʳ's integers kept).
        Spilled updates (strategies/spill.py) have their pages released after every chunk, so
        the engine holds T chunks of them at a time, not T models."""
        theta = self._theta

        def base(name: str) -> torch.Tensor:
            tensor = theta[name]
            return torch.zeros_like(tensor) if zero_base and tensor.is_floating_point() else tensor

        plans = [TensorPlan(n, tuple(x.shape), x.dtype) for n, x in theta.items()]
        options = AggregationOptions(
            server_lr=beta,
            inputs="updates",
            device=self.device,
            client_names=[f"client {t} (round {server_round})" for t in tasks],
        )
        spilled = [u for u in updates if isinstance(u, SpilledUpdate)]

        def release(plan: TensorPlan, chunk: Chunk, pass_index: int) -> None:
            # after every chunk: the pages read so far go, and a later pass reads them back from
            # the page cache, so the engine holds T chunks of the files, not T tensors
            for update in spilled:
                update.release(plan.name)

        return {
            name: tensor.clone()
            for name, tensor in aggregate_model(
                rule,
                plans,
                base,
                [u.__getitem__ for u in updates],
                options,
                on_chunk_done=release if spilled else None,
            )
        }

    # -- the streaming round (``AggregationSettings.streaming``) ----------------------------

    def _wants_updates(self, server_round: int) -> bool:
        """Whether ``on_updates`` reads this round's individual Δ_t."""
        if self.on_updates is None:
            return False
        return self.wants_updates is None or self.wants_updates(server_round)

    def _open_intake(self, server_round: int) -> RoundIntake:
        """Fold (a linear rule, no one reading the Δ_t alone) or spill (the rest)."""
        if self.spec.linear and not self._wants_updates(server_round):
            return RoundIntake(fold=LinearFold(self._theta, self.device))
        return RoundIntake(spill=SpillFolder(self.settings.spill_dir or None, server_round))

    def _take_reply(self, server_round: int, intake: RoundIntake, msg: Message) -> None:
        """Validate one reply (as ``_valid_replies``), then fold or spill its Δ_t, keeping only
        its metrics and ‖Δ_t‖₂; a bad reply becomes a failure and is neither folded nor spilled."""
        if intake.sent_to is None:  # message ids exist once the grid has pushed the messages
            intake.sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._messages}
        node_id, t, reason = self._check_reply(msg, ("arrays", "metrics"), intake.sent_to, "train")
        intake.answered.add(node_id)
        if reason is not None or t is None:
            self._fail(server_round, "train", node_id, t, str(reason))
            return
        metrics = dict(msg.content["metrics"])
        update = record_to_tensors(msg.content["arrays"])  # views of the reply's bytes
        norm = update_norm(update)
        start = time.perf_counter()
        if intake.fold is not None:
            factor = fold_factor(
                int(metrics["num-examples"]),  # type: ignore[call-overload]
                float(metrics["a-norm"]),  # type: ignore[arg-type]
                weighted=self.rule.weighting == "examples",
                normalised=self.spec.needs_a_norm,
            )
            intake.fold.add(t, factor, update, f"client {t} (round {server_round})")
        else:
            intake.spill.write(t, update)  # type: ignore[union-attr]
        intake.seconds += time.perf_counter() - start
        intake.deliveries.append(Delivery(t, metrics, norm))

    def _finish_intake(
        self, server_round: int, intake: RoundIntake, received_at: float
    ) -> tuple[ArrayRecord, MetricRecord]:
        """θʳ⁺¹ from the folded sum or the spill files; the same records as ``aggregate_train``."""
        for node_id, t in self._sent.items():
            if node_id not in intake.answered:
                self._fail(server_round, "train", node_id, t, "no reply before the round's timeout")
        self._require_enough(server_round, len(intake.deliveries))
        deliveries = sorted(intake.deliveries, key=lambda d: d.task)
        tasks = [d.task for d in deliveries]
        metrics = [d.metrics for d in deliveries]
        p, rule = self._round_rule(server_round, metrics)
        fold = intake.fold
        if fold is None:
            updates = [intake.spill.open(t) for t in tasks]  # type: ignore[union-attr]
            if self._wants_updates(server_round):  # before aggregating, as aggregate_train
                self.on_updates(server_round, dict(zip(tasks, updates, strict=True)))  # type: ignore[misc]

            def aggregate(beta: float, zero_base: bool) -> dict[str, torch.Tensor]:
                return self._aggregate(
                    server_round, rule, tasks, updates, beta, zero_base=zero_base
                )
        else:
            scale = fold.scale(tasks, rule.linear_coefficients())  # type: ignore[arg-type]

            def aggregate(beta: float, zero_base: bool) -> dict[str, torch.Tensor]:
                return fold.merged(scale, beta, zero_base=zero_base)

        merged, beta, seconds = self._server_step(server_round, len(tasks), aggregate)
        seconds += intake.seconds  # + folding/spilling on arrival
        self.after_round(self._theta, merged, beta)
        record = self._record_round(
            server_round,
            tasks,
            metrics,
            p,
            beta,
            [d.update_norm for d in deliveries],
            rule.summary(),
            seconds,
            received_at,
        )
        record_out = ArrayRecord()
        for name in list(merged):  # θʳ⁺¹ into the record tensor by tensor: one model, not two
            record_out.update(tensors_to_record({name: merged.pop(name)}))
        return record_out, self._round_summary(record, p)

    def _round_rule(
        self, server_round: int, metrics: Sequence[MetricRecord]
    ) -> tuple[list[float], Rule]:
        """p_t of the delivering clients (uniform, or by their examples) and the rule built for
        them (FedNova's ‖a_t‖₁ included), in task order."""
        num_examples = [int(m["num-examples"]) for m in metrics]  # type: ignore[call-overload]
        a_norm = [float(m["a-norm"]) for m in metrics]  # type: ignore[arg-type]
        given = num_examples if self.rule.weighting == "examples" else None
        p = client_weights(len(metrics), given).tolist()
        rule_config = self.rule_config(given, a_norm, server_round)
        return p, make_rule(rule_config, len(metrics), self.center())

    def _server_step(
        self,
        server_round: int,
        num_clients: int,
        aggregate: Callable[[float, bool], dict[str, torch.Tensor]],
    ) -> tuple[dict[str, torch.Tensor], float, float]:
        """(θʳ⁺¹, β, seconds): θʳ + β·A with ``aggregate(β, zero_base)``; in round 1 with a β
        grid, A itself (zero base, β = 1) and θ₀ + β·A at the β the search selects."""
        candidates = self.server_lr_candidates(num_clients) if server_round == 1 else []
        start = time.perf_counter()
        if not candidates:
            beta = self.server_lr(num_clients)
            return aggregate(beta, False), beta, time.perf_counter() - start
        if self.select_server_lr is None:
            raise FlSimError(
                "server-lr-grid / lambda-grid need a select_server_lr callback (the ServerApp)"
            )
        update = aggregate(1.0, True)  # A itself, then θ₀ + β·A per grid point
        seconds = time.perf_counter() - start
        beta = self.select_server_lr(self._theta, update, candidates).beta  # grid or beyond
        start = time.perf_counter()
        merged = server_step(self._theta, update, beta)
        return merged, beta, seconds + time.perf_counter() - start

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Client-side evaluation of θʳ on each client's task (off unless asked for)."""
        if not self.evaluate_on_clients:
            self._sent, self._messages = {}, []
            return []
        self._sent = dict(self.node_tasks)
        messages = []
        for node_id, _ in sorted(self.node_tasks.items(), key=lambda item: item[1]):
            record = ConfigRecord(dict(config))
            record.update(self.evaluate_config)
            record["server-round"] = server_round
            content = RecordDict({"arrays": arrays, "config": record})
            messages.append(
                Message(content, node_id, MessageType.EVALUATE, group_id=str(server_round))
            )
        self._messages = messages
        return messages

    def aggregate_evaluate(
        self, server_round: int, replies: Iterable[Message]
    ) -> MetricRecord | None:
        """Per-task loss and accuracy into this round's record; their plain means returned."""
        valid = self._valid_replies(server_round, replies, phase="evaluate")
        if not valid:
            return None
        per_task = {
            t: {
                "loss": float(msg.content["metrics"]["loss"]),
                "accuracy": float(msg.content["metrics"]["accuracy"]),
            }
            for t, msg in valid
        }
        for record in self.rounds:
            if record.round == server_round:
                record.client_evaluation = per_task
        n = len(per_task)
        return MetricRecord(
            {
                "loss": sum(v["loss"] for v in per_task.values()) / n,
                "accuracy": sum(v["accuracy"] for v in per_task.values()) / n,
            }
        )

    # -- failures ------------------------------------------------------------------------------

    def _valid_replies(
        self, server_round: int, replies: Iterable[Message], *, phase: str
    ) -> list[tuple[int, Message]]:
        """(task, reply) for every usable reply; every other sent message becomes a failure."""
        need = ("arrays", "metrics") if phase == "train" else ("metrics",)
        valid: list[tuple[int, Message]] = []
        answered: set[int] = set()
        # the SuperLink answers for a lost node from its own node id: map back by message id
        sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in self._messages}
        for msg in replies:
            node_id, t, reason = self._check_reply(msg, need, sent_to, phase)
            answered.add(node_id)
            if reason is None and t is not None:
                valid.append((t, msg))
            else:
                self._fail(server_round, phase, node_id, t, str(reason))
        for node_id, t in self._sent.items():
            if node_id not in answered:
                self._fail(server_round, phase, node_id, t, "no reply before the round's timeout")
        return valid

    def _check_reply(
        self, msg: Message, need: Sequence[str], sent_to: Mapping[str, int], phase: str
    ) -> tuple[int, int | None, str | None]:
        """(node id, task t, why the reply is unusable or None) of one reply: the node it
        answers for (a reply from the SuperLink's node 1 is mapped back by message id)."""
        node_id = replied_for(msg, self._sent, sent_to)
        t = self._sent.get(node_id)
        reason = None
        if msg.has_error():
            reason = f"error reply (code {msg.error.code}): {error_summary(msg.error.reason)}"
        elif not msg.has_content():
            reason = "reply without content"
        elif missing := [key for key in need if key not in msg.content]:
            reason = f"reply lacks {', '.join(repr(k) for k in missing)}"
        elif phase == "train":
            reason = self._check_update(msg.content["arrays"])
        if t is None and reason is None:
            reason = "reply from a node that was not sent this round's message"
        return node_id, t, reason

    def _await_nodes(self, server_round: int, grid: Grid) -> None:
        """Before round r's messages: each task's node is online, or a new node takes the task
        over (``_rejoin``). A task whose node is offline (lost, its SuperNode restarting) is
        waited for up to ``node_wait`` s; past that the round is sent as it is, and the offline
        node's message fails (recorded as any other failure)."""
        connected = self._rejoin(server_round, grid)
        if connected is None or self.settings.node_wait <= 0:
            return
        if not (missing := self._offline(connected)):
            return
        log(
            INFO,
            "round %d: waiting up to %.0f s (node-wait) for the nodes of tasks %s",
            server_round,
            self.settings.node_wait,
            missing,
        )
        start = time.monotonic()
        while missing and time.monotonic() - start < self.settings.node_wait:
            time.sleep(NODE_POLL_INTERVAL)
            missing = self._offline(self._rejoin(server_round, grid))
        waited = time.monotonic() - start
        if missing:
            log(
                WARNING,
                "round %d: the nodes of tasks %s still offline after %.0f s: sent anyway",
                server_round,
                missing,
                waited,
            )
        else:
            log(INFO, "round %d: every task's node online after %.1f s", server_round, waited)

    def _offline(self, connected: set[int]) -> list[int]:
        """Tasks t whose node is not among the ``connected`` (online) nodes."""
        return sorted(t for node_id, t in self.node_tasks.items() if node_id not in connected)

    def _rejoin(self, server_round: int, grid: Grid) -> set[int] | None:
        """Nodes not seen before report their partition id; a node of task t takes t over when
        t's node left the federation or failed the previous round (a SuperNode restarted after
        a loss gets a new node id); until then it is kept as a spare. Without a grid (the
        strategy driven by hand, as in tests) there is no one to ask. Returns the connected node
        ids it saw (None without a grid)."""
        if grid is None:
            return None
        connected = set(grid.get_node_ids())
        new = sorted(connected - self._seen)
        self._seen |= set(new)
        queries = [Message(RecordDict(), node_id, MessageType.QUERY) for node_id in new]
        for reply in grid.send_and_receive(queries, timeout=self._query_timeout) if new else []:
            node_id = reply.metadata.src_node_id
            if reply.has_error() or not reply.has_content() or "metrics" not in reply.content:
                log(WARNING, "round %d: new node %d sent no partition id", server_round, node_id)
            else:
                self._spares[node_id] = int(reply.content["metrics"]["partition-id"])
        task_nodes = {t: node_id for node_id, t in self.node_tasks.items()}
        failed = {f.node_id for f in self.failures if f.round == server_round - 1}
        for node_id, t in sorted(self._spares.items()):
            old = task_nodes.get(t)
            if node_id in connected and old is not None and (old not in connected or old in failed):
                del self._spares[node_id], self.node_tasks[old]
                self.node_tasks[node_id] = task_nodes[t] = t
                log(
                    INFO,
                    "round %d: node %d rejoins as client %d (was node %d)",
                    server_round,
                    node_id,
                    t,
                    old,
                )
            elif node_id in new:
                log(
                    WARNING, "round %d: node %d (task %d) kept as a spare", server_round, node_id, t
                )
        return connected

    def _check_update(self, arrays: ArrayRecord) -> str | None:
        names = set(arrays.keys())
        if names != set(self._theta):
            missing = sorted(set(self._theta) - names)[:3]
            extra = sorted(names - set(self._theta))[:3]
            return f"update tensors do not match the model: missing {missing}, unexpected {extra}"
        for name, array in arrays.items():
            if tuple(array.shape) != tuple(self._theta[name].shape):
                return (
                    f"update {name!r} has shape {tuple(array.shape)}, "
                    f"the model's is {tuple(self._theta[name].shape)}"
                )
        for name, array in arrays.items():
            # before aggregation: one NaN/Inf would poison every rule but median
            tensor = array_to_tensor(array)
            if tensor.dtype != self._theta[name].dtype:
                return (
                    f"update {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                    f"the model's is {str(self._theta[name].dtype).removeprefix('torch.')}"
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                return f"non-finite update (NaN or Inf in {name!r})"
        return None

    def _fail(
        self, server_round: int, phase: str, node_id: int, t: int | None, reason: str
    ) -> None:
        reason = " ".join(str(reason).split())  # one line in logs and results
        self.failures.append(ClientFailure(server_round, phase, node_id, t, reason))
        log(
            WARNING,
            "round %d %s: client %s (node %d) failed: %s",
            server_round,
            phase,
            t,
            node_id,
            reason,
        )

    def _require_enough(self, server_round: int, replied: int) -> None:
        sent = len(self._sent)
        need = self.settings.min_clients or sent
        if replied >= max(need, 1):
            return
        failed = [f for f in self.failures if f.round == server_round and f.phase == "train"]
        first = f"; first: client {failed[0].task}: {failed[0].reason}" if failed else ""
        raise FederationError(
            f"round {server_round}: only {replied} of {sent} clients delivered an update, "
            f"min-clients = {self.settings.min_clients} (0 = all){first}"[:2000]
        )


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def busy_seconds(intervals: Sequence[tuple[float, float]], start: float, end: float) -> float:
    """|∪ [a_i, b_i] ∩ [start, end]|: how long at least one interval was open in the window
    (a round's client training within its wait; fl_sim/federation/timing.py)."""
    total, reach = 0.0, start
    for a, b in sorted(intervals):
        a, b = max(a, reach), min(b, end)
        if b > a:
            total += b - a
            reach = b
    return total


def replied_for(msg: Message, sent_nodes: Container[int], sent_to: Mapping[str, int]) -> int:
    """The node a reply answers for: its source when that is one of ``sent_nodes``, else (the
    reply the SuperLink sends from its own node id for a lost node) the node the message went
    to (``sent_to``: message id → node id)."""
    node_id = msg.metadata.src_node_id
    if node_id not in sent_nodes:
        node_id = sent_to.get(msg.metadata.reply_to_message_id, node_id)
    return node_id


def error_summary(reason: str) -> str:
    """The client's own exception message out of Flower's error reason (Ray wraps it in a
    traceback: "... ClientAppException occurred. Message: <the client's message>'>")."""
    reason = ANSI_ESCAPE.sub("", str(reason))
    marker = "occurred. Message:"
    if marker in reason:
        reason = reason.rsplit(marker, 1)[1].strip().removesuffix("'>").strip()
    return reason[:500]


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """‖Δ_t‖₂ over every floating-point tensor of the update."""
    total = 0.0
    for tensor in update.values():
        if tensor.is_floating_point():
            total += float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2
    return math.sqrt(total)


def strategy_class(name: str) -> type[RuleStrategy]:
    """The Flower strategy of the registered rule ``name`` (``TaskArithmeticStrategy``, ...)."""
    spec = rule_spec(name)
    words = re.split(r"[^0-9A-Za-z]+", spec.title)
    class_name = "".join(w[:1].upper() + w[1:] for w in words if w) + "Strategy"
    doc = f"{spec.title} ({spec.paper}): A = {spec.formula}."
    return type(class_name, (RuleStrategy,), {"rule_name": name, "__doc__": doc})


STRATEGIES: dict[str, type[RuleStrategy]] = {name: strategy_class(name) for name in RULES}


def make_strategy(
    rule: RuleSection,
    node_tasks: Mapping[int, int],
    **kwargs: object,
) -> RuleStrategy:
    """The strategy of ``rule.strategy`` (keyword arguments: see ``RuleStrategy``)."""
    return STRATEGIES[rule.strategy](rule, node_tasks, **kwargs)  # type: ignore[arg-type]


__all__ = [
    "STRATEGIES",
    "AggregationSettings",
    "ClientConfig",
    "ClientFailure",
    "FederationError",
    "RoundRecord",
    "RuleStrategy",
    "make_strategy",
    "strategy_class",
]
