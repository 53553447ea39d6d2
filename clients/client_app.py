"""The Flower ClientApp: client t fine-tunes task t from the global model and returns Δ_t.

A client is bound to one task by its node's ``partition-id`` (t = partition-id). It answers

- ``query``: its partition id, so the server can send every node its own knobs;
- ``train``: from the received θʳ (ArrayRecord "arrays") and its knobs (ConfigRecord "config",
  see ``strategies.flower_strategy``) it runs ``fine_tune`` and replies Δ_t = θ_t − θʳ
  (ArrayRecord "arrays") with a MetricRecord "metrics": num-examples n_t, local-steps K_t,
  a-norm ‖a_t‖₁ of the run's kind, a-norm-steps, a-norm-lr-sum, a-norm-exact, loss-before,
  loss-after, and cached (1 when Δ_t came from the update cache, clients/update_cache.py:
  ``update-cache`` and ``cache-dir`` in the ConfigRecord; off when the server sends none);
  Declared faults (clients/fault_injection.py) arrive in the ConfigRecord:
  ``inject-failure`` (raise), ``byzantine`` + ``attack-seed`` (the reply carries the attacked Δ_t,
  applied after
  honest training) and ``slow-seconds`` (sleep before replying);
- ``evaluate``: the loss and accuracy of the received model on its task's val or test split
  (shared-head: the one task's).

With ``adapter = "lora"`` (a suite key, fl_sim/suites/lora.py) the suite's model carries LoRA
adapters and Δ_t is ΔW_t = (α/r)·B_t·A_t per target module (``adapter-federation = "dense"``)
or the adapters' change (ΔA_t, ΔB_t) (``"adapter"``); nothing else of the handlers changes.

Everything the client needs arrives in the message's ConfigRecord (the server parsed the run
config once), so it runs the same under run_simulation, ``flwr run`` and deployment. The task
suite is built from the message's suite keys (``fl_sim.suites.registry.build_suite``: suite,
model,
data paths, federated layers, mixing, shared head, Dirichlet split), once per process and
config. One torch thread per client: clients share cores.
"""

from __future__ import annotations

import time
from functools import cache

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.fault_injection import attack_update
from clients.knobs import knobs_from_config
from clients.update_cache import UpdateCache, cached_fine_tune, suite_inputs_dir
from fl_sim.checkpoints.array_records import record_to_tensors, tensors_to_record
from fl_sim.errors import ConfigError
from fl_sim.suites.base import TaskSuite, evaluate, load_federated_state
from fl_sim.suites.registry import ConfigValue, build_suite, complete

app = ClientApp()


class InjectedClientFailure(RuntimeError):
    """Raised on purpose by the run-config fault-injection knobs crash / fail-client."""


@cache
def cached_suite(
    suite_config: tuple[tuple[str, ConfigValue], ...], disk_cache: str | None = None
) -> TaskSuite:
    """The task suite, built once per process (a Ray actor serves many messages); what every
    process computes alike is read from ``disk_cache`` when another made it (registry.py)."""
    return build_suite(dict(suite_config), disk_cache)


def suite_config_of(config: ConfigRecord) -> dict[str, ConfigValue]:
    """The suite keys of the message (fl_sim/suites/registry.py), optional ones defaulted."""
    return complete(config)


def suite_from_config(config: ConfigRecord) -> TaskSuite:
    """The message's suite, its shared inputs in <cache-dir>/suite-inputs (resolved on this node,
    as the update cache; none when the server sends no cache-dir)."""
    disk = str(suite_inputs_dir(str(config["cache-dir"]))) if "cache-dir" in config else None
    return cached_suite(tuple(suite_config_of(config).items()), disk)


def task_index_of(context: Context, suite: TaskSuite) -> int:
    """t = the node's partition-id, checked against the suite's T."""
    if "partition-id" not in context.node_config:
        raise ConfigError(
            "this node has no partition-id (start SuperNodes with "
            '--node-config "partition-id=<t> num-partitions=<T>")'
        )
    t = int(context.node_config["partition-id"])
    if not 0 <= t < suite.num_tasks:
        raise ConfigError(
            f"partition-id {t} but the suite has {suite.num_tasks} tasks "
            "(run as many SuperNodes as num-tasks)"
        )
    return t


def one_thread() -> None:
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Report this node's partition id (the server maps node ids to tasks with it)."""
    partition = int(context.node_config.get("partition-id", -1))
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": partition})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fine-tune task t from θʳ with this client's knobs; reply Δ_t and its figures.

    Besides the figures of ``FineTuneResult.metrics`` the reply times the client: train-seconds
    (local fine-tuning; ≈ 0 when the update came from the cache) and client-seconds (the whole
    handler: task suite, θʳ in, training, Δ_t out; not Flower's own transfer), and stamps the
    handler's start and end on the node's clock (client-start, client-end: epoch seconds) for
    the run's time breakdown (fl_sim/federation/timing.py).
    """
    start, started_at = time.perf_counter(), time.time()
    one_thread()
    config = msg.content["config"]
    suite = suite_from_config(config)
    t = task_index_of(context, suite)
    server_round = int(config["server-round"])
    if bool(config.get("inject-failure", False)):
        raise InjectedClientFailure(
            f"fault injection: client {t} fails in round {server_round} "
            "(run-config crash, or fail-client / fail-round)"
        )
    knobs = knobs_from_config(config)
    global_state = record_to_tensors(msg.content["arrays"], writable=True)
    use_cache = bool(config.get("update-cache", False))
    cache = UpdateCache(str(config.get("cache-dir", ""))) if use_cache else None
    train_start = time.perf_counter()
    result, cached = cached_fine_tune(
        cache,
        suite,
        suite_config_of(config),
        t,
        global_state,
        knobs,
        full_batch=bool(config.get("full-batch", False)),
        round_index=server_round,
    )
    train_seconds = time.perf_counter() - train_start
    update = result.update
    attack = str(config.get("byzantine", ""))
    if attack:  # after honest training: the cache above holds the honest Δ_t
        update = attack_update(update, attack, seed=int(config.get("attack-seed", 0)))
    slow_seconds = float(config.get("slow-seconds", 0.0))
    if slow_seconds > 0:
        time.sleep(slow_seconds)
    a_norm_kind = str(config.get("a-norm", "lr-sum"))
    metrics = result.metrics()
    metrics["a-norm"] = result.a_norm_steps if a_norm_kind == "steps" else result.a_norm_lr_sum
    metrics["a-norm-exact"] = int(metrics["a-norm-exact"])  # MetricRecord holds numbers only
    metrics["task-index"] = t
    metrics["cached"] = int(cached)
    arrays = tensors_to_record(update)
    metrics["train-seconds"] = train_seconds
    metrics["client-seconds"] = time.perf_counter() - start
    metrics["client-start"], metrics["client-end"] = started_at, time.time()  # epoch seconds
    content = RecordDict({"arrays": arrays, "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_task(msg: Message, context: Context) -> Message:
    """Loss and accuracy of the received model on task t's val or test split."""
    one_thread()
    config = msg.content["config"]
    suite = suite_from_config(config)
    t = task_index_of(context, suite)
    model = suite.build_model()
    load_federated_state(model, record_to_tensors(msg.content["arrays"]))
    split = str(config.get("eval-split", "val"))
    task = suite.eval_tasks[suite.eval_task_of(t)]
    loss, accuracy = evaluate(model, task, split)
    n = int(task.split(split)[1].shape[0])
    metrics = MetricRecord({"loss": loss, "accuracy": accuracy, "num-examples": n, "task-index": t})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
