"""The simulation engine: T federated runs on Flower's simulation engine (Ray), one Ray start.

``simulate(configs)`` runs every config on one simulated federation, one SuperNode per task,
with the ServerApp (fl_sim/federation/server_app.py) in a thread of this process and the
ClientApp (clients/client_app.py) in Ray actors. ``fl-sim run``, ``fl-sim sweep`` and the
benchmarks call it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from fl_sim.config.run_config import RunConfig
from fl_sim.errors import ConfigError
from fl_sim.outputs import read_json

# Never let Flower build a venv per run (`uv sync`: CUDA torch) or write a telemetry id
# (docs/design.md, Running Flower).
FLOWER_ENVIRONMENT = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",  # silences Ray's FutureWarning; no GPUs asked
}


@contextmanager
def flower_environment() -> Iterator[None]:
    """FLOWER_ENVIRONMENT set for the block; PYTHONPATH restored (Flower's Ray backend edits it)."""
    saved = {key: os.environ.get(key) for key in (*FLOWER_ENVIRONMENT, "PYTHONPATH")}
    os.environ.update(FLOWER_ENVIRONMENT)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def simulate(
    configs: Sequence[RunConfig],
    *,
    num_supernodes: int | None = None,
    ray_address: str | None = None,
    client_cpus: float | None = None,
    client_gpus: float | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> list[dict[str, object]]:
    """Run ``configs`` on one simulated federation (one Ray start), the first config's
    ``concurrent-runs`` at once (fl_sim/federation/run_schedule.py: same results as one after
    the other).

    All configs must describe the same federation (task-suite, num-tasks, seed); each writes
    its own results-dir, so keep those distinct. Returns each run's results.json content. The
    first run that fails raises (a one-line ``FlSimError``); the runs before it, and those under
    way beside it, are written.
    With ``update-cache`` (the default) a client trains each (task, knobs, round, weights) once:
    later runs of the sweep that start from the same weights reuse its Δ_t.

    ``ray_address`` (else ``$RAY_ADDRESS``) joins an existing Ray cluster (``ray start --head``)
    instead of starting a private one; each client reserves the configs' ``client-num-cpus``
    CPUs and ``client-num-gpus`` GPUs of it (one Ray backend: the configs must agree), so at
    most ⌊cluster CPUs / client-num-cpus⌋ clients train at once. ``client_cpus`` /
    ``client_gpus``, when given, override those keys in every config (and so in results.json).
    """
    if not configs:
        raise ConfigError("simulate: no run configs given")
    changes = {
        key: float(value)
        for key, value in (("client-num-cpus", client_cpus), ("client-num-gpus", client_gpus))
        if value is not None
    }
    if changes:  # validated as the run-config keys, with their messages
        configs = [config.updated(changes) for config in configs]
    first = configs[0]
    for config in configs[1:]:
        if config.suite_config() != first.suite_config():
            raise ConfigError(
                "runs in one simulation must share task-suite, num-tasks and seed, got "
                f"{config.suite_config()} after {first.suite_config()}"
            )
        if _resources(config) != _resources(first):
            raise ConfigError(
                "runs in one simulation share one Ray backend and must agree on "
                f"client-num-cpus and client-num-gpus, got {_resources(config)} after "
                f"{_resources(first)}"
            )
    dirs = [Path(c.output.results_dir).resolve() for c in configs]
    if len(set(dirs)) != len(dirs):
        raise ConfigError("runs in one simulation need distinct results-dir values")
    n = first.suite.num_tasks if num_supernodes is None else num_supernodes
    if n != first.suite.num_tasks:
        raise ConfigError(
            f"--num-supernodes {n} but num-tasks = {first.suite.num_tasks}: one SuperNode per task "
            "(drop --num-supernodes or set num-tasks)"
        )

    from fl_sim.federation.server_app import make_sweep_server_app

    bar = _ProgressBar(configs) if progress else None
    init_args: dict[str, object] = {}
    ray_address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if ray_address:
        init_args["address"] = ray_address
    backend_config = {
        "client_resources": first.engine.client_resources(),
        "init_args": init_args,
    }
    flower_logger = logging.getLogger("flwr")
    level = flower_logger.level
    if not verbose:
        flower_logger.setLevel(logging.ERROR)  # also run_simulation's deprecation notice
        init_args.setdefault("logging_level", logging.ERROR)
        init_args.setdefault("log_to_driver", False)
    try:
        with flower_environment():
            from flwr.simulation import run_simulation

            from clients.client_app import app as client_app

            run_simulation(
                server_app=make_sweep_server_app(configs, on_round=bar.update if bar else None),
                client_app=client_app,
                num_supernodes=n,
                backend_config=backend_config,
                verbose_logging=verbose,
            )
    finally:
        flower_logger.setLevel(level)
        if bar is not None:
            bar.close()
    return [read_json(d / "results.json") for d in dirs]  # "inf" strings back to floats


def _resources(config: RunConfig) -> dict[str, float]:
    return {
        "client-num-cpus": config.engine.client_num_cpus,
        "client-num-gpus": config.engine.client_num_gpus,
    }


class _ProgressBar:
    """One tqdm bar over every round of every run."""

    def __init__(self, configs: Sequence[RunConfig]) -> None:
        from tqdm import tqdm

        total = sum(c.rule.num_rounds for c in configs)
        self.bar = tqdm(total=total, unit="round", desc="fl-sim run", dynamic_ncols=True)

    def update(self, server_round: int, num_rounds: int, metrics: Mapping[str, float]) -> None:
        if server_round > 0:
            self.bar.update(1)
        self.bar.set_postfix(round=f"{server_round}/{num_rounds}", acc=f"{metrics['accuracy']:.3f}")

    def close(self) -> None:
        self.bar.close()
