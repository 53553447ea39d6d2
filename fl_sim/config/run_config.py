"""Every knob of a federated run, typed, with its default, parsed and validated once.

A run's knobs come from one flat mapping of kebab-case keys (``num-rounds = 3``): Flower's
``context.run_config`` under ``flwr run`` (pyproject ``[tool.flwr.app.config]`` plus
``--run-config`` overrides), or, under ``fl-sim run``, a TOML file plus ``--set key=value``
overrides. ``run_simulation`` hands the ServerApp an *empty* run config, so the defaults live
here, not in pyproject. Unknown keys, wrong types and bad values are a one-line ``ConfigError``
that names the key and the fix; after ``RunConfig.from_mapping`` the values are trusted.

Only the ServerApp parses a RunConfig. Clients get what they need (their own knobs, the task
suite, the a-norm kind...) in the ConfigRecord of every message, so a client behaves the same
under ``run_simulation``, ``flwr run`` and the deployment engine.
"""

from __future__ import annotations

import contextlib
import math
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport Flower depends on
    import tomli as tomllib  # type: ignore[no-redef]

from clients.knobs import PRESETS, TrainingKnobs, client_knobs
from fl_sim.errors import ConfigError
from fl_sim.federation.fault_injection import parse_byzantine, parse_crash, parse_slow
from fl_sim.suites.registry import check_suite_config
from strategies.registry import A_NORMS, MEDIAN_MODES, RULE_NAMES

WEIGHTINGS = ("uniform", "examples")
SERVER_DEVICES = ("auto", "cpu", "cuda")
EVAL_SPLITS = ("val", "test")
EXPERIMENTS = ("compare", "single")
NO_PRESET = "none"
MAX_TASKS = 10_000  # a bound, so that a typo cannot build millions of clients' knobs
MAX_SEED = 2**32 - 1  # seeds go to torch.manual_seed and NumPy

ConfigValue = bool | int | float | str


@dataclass(frozen=True)
class Faults:
    """The run's declared faults: client t → attack, (t, round) crashes, client t → seconds."""

    byzantine: dict[int, str]
    crash: frozenset[tuple[int, int]]
    slow: dict[int, float]


def _knob(key: str, help: str, *, kind: str) -> dict[str, str]:
    return {"key": key, "help": help, "kind": kind}


@dataclass(frozen=True)
class RunConfig:
    """The run's knobs; field metadata holds each TOML key and its ``fl-sim run --help`` text."""

    # -- the experiment ------------------------------------------------------------------------
    experiment: str = field(
        default="compare",
        metadata=_knob(
            "experiment",
            "compare = every rule in `rules`, one-shot (β picked on val from compare-beta-grid) "
            "and multi-round (multi-rounds rounds at the same total steps), then a table and "
            "plots; single = one run of `strategy`",
            kind="str",
        ),
    )
    rules: str = field(
        default=",".join(RULE_NAMES),
        metadata=_knob("rules", "compare: the rules to run (comma list)", kind="str"),
    )
    compare_beta_grid: str = field(
        default="0.5,1,1.5,2,2.5,3,4",
        metadata=_knob(
            "compare-beta-grid",
            "compare: the β grid searched on val for every one-shot rule (task_arithmetic: "
            "λ = β/T); every rule's A is mean-like, so one grid serves all",
            kind="str",
        ),
    )
    multi_rounds: int = field(
        default=5,
        metadata=_knob(
            "multi-rounds",
            "compare: R of the multi-round runs, each with local-steps/R steps per round "
            "(the same total); 0 = one-shot only",
            kind="int",
        ),
    )
    multi_round_server_lr: float = field(
        default=1.0,
        metadata=_knob("multi-round-server-lr", "compare: β of the multi-round runs", kind="float"),
    )
    # -- the aggregation rule ------------------------------------------------------------------
    strategy: str = field(
        default="fedavg",
        metadata=_knob("strategy", f"aggregation rule A: {', '.join(RULE_NAMES)}", kind="str"),
    )
    num_rounds: int = field(
        default=1,
        metadata=_knob("num-rounds", "R, federated rounds (1 = one-shot merging)", kind="int"),
    )
    server_lr: float = field(
        default=1.0,
        metadata=_knob(
            "server-lr",
            "β, the server step: θʳ⁺¹ = θʳ + β·A (every rule but task_arithmetic)",
            kind="float",
        ),
    )
    lam: float = field(
        default=0.3,
        metadata=_knob(
            "lambda",
            "task_arithmetic's λ: θ₀ + λ Σ_t τ_t, run as fedavg with p_t = 1/T and β = λT",
            kind="float",
        ),
    )
    weighting: str = field(
        default="uniform",
        metadata=_knob(
            "weighting", "client weights p_t: uniform (1/T) or examples (∝ n_t)", kind="str"
        ),
    )
    rho: float = field(
        default=0.5,
        metadata=_knob("rho", "fedgma: sign-agreement threshold ρ ∈ [0, 1]", kind="float"),
    )
    tau_c: float = field(
        default=0.0,
        metadata=_knob(
            "tau-c",
            "cclip: clipping radius τ_c > 0 in units of ‖Δ_t‖₂ (0 = unset; results.json "
            "lists every round's update norms); inf gives fedavg",
            kind="float",
        ),
    )
    tau_c_auto: bool = field(
        default=False,
        metadata=_knob(
            "tau-c-auto",
            "cclip: each round, τ_c = the median over clients of ‖Δ_t − v₀‖₂ (needs tau-c = 0); "
            "a scale-free radius, recorded per round",
            kind="bool",
        ),
    )
    cclip_iters: int = field(
        default=1, metadata=_knob("cclip-iters", "cclip: iterations L ≥ 1", kind="int")
    )
    a_norm: str = field(
        default="lr-sum",
        metadata=_knob(
            "a-norm",
            "how ‖a_t‖₁ counts local work (fednova, effective weights w_t): lr-sum = Σ_k η_t⁽ᵏ⁾, "
            "steps = K_t (the paper's code)",
            kind="str",
        ),
    )
    median_mode: str = field(
        default="mean",
        metadata=_knob(
            "median-mode",
            "median with even T: mean of the two middle values, or the lower one",
            kind="str",
        ),
    )
    # -- β / λ selection on validation data (one-shot runs) -------------------------------------
    server_lr_grid: str = field(
        default="",
        metadata=_knob(
            "server-lr-grid",
            "β search (num-rounds = 1, every rule but task_arithmetic): a comma list of β; the "
            "server computes A once, evaluates θ₀ + β·A for each β on the val split and keeps "
            "the best mean normalised val accuracy (test is never used to select); '' = off",
            kind="grid",
        ),
    )
    lambda_grid: str = field(
        default="",
        metadata=_knob(
            "lambda-grid",
            "λ search for task_arithmetic (num-rounds = 1): a comma list of λ, each run as "
            "β = λT and selected on the val split as server-lr-grid; '' = off",
            kind="grid",
        ),
    )
    # -- local training (each: one value, a comma list with one per client, or a range) ------
    lr: float | str = field(
        default=1e-4,
        metadata=_knob(
            "lr",
            "η_t: a number, a comma list (one per client) or a range log:A:B / lin:A:B",
            kind="knob",
        ),
    )
    local_steps: int | str = field(
        default=200,
        metadata=_knob(
            "local-steps", "K_t: local steps per round (number, list or range)", kind="knob"
        ),
    )
    schedule: str = field(
        default="constant",
        metadata=_knob(
            "schedule", "learning-rate schedule per client (name or comma list)", kind="knob"
        ),
    )
    warmup_steps: int | str = field(
        default=0, metadata=_knob("warmup-steps", "warm-up steps per client", kind="knob")
    )
    optimizer: str = field(
        default="adamw",
        metadata=_knob("optimizer", "sgd, sgd-momentum or adamw (or a comma list)", kind="knob"),
    )
    momentum: float | str = field(
        default=0.9, metadata=_knob("momentum", "μ for sgd-momentum", kind="knob")
    )
    weight_decay: float | str = field(
        default=0.0, metadata=_knob("weight-decay", "weight decay per client", kind="knob")
    )
    batch_size: int | str = field(
        default=32, metadata=_knob("batch-size", "mini-batch size per client", kind="knob")
    )
    preset: str = field(
        default="lr-hetero",
        metadata=_knob(
            "preset",
            f"heterogeneity preset spreading one lr and local-steps: {NO_PRESET}, "
            f"{', '.join(PRESETS)}",
            kind="str",
        ),
    )
    full_batch: bool = field(
        default=False,
        metadata=_knob("full-batch", "clients take full-batch gradient steps", kind="bool"),
    )
    seed: int = field(
        default=0,
        metadata=_knob(
            "seed", "seed of θ₀ and the data; client t trains with seed + t", kind="int"
        ),
    )
    # -- tasks, engine, results ------------------------------------------------------------
    task_suite: str = field(
        default="digits",
        metadata=_knob("task-suite", "the task suite (clients = tasks)", kind="str"),
    )
    num_tasks: int = field(
        default=8,
        metadata=_knob(
            "num-tasks",
            "T, tasks = clients in the suite (shared-head: the number of clients the one task "
            "is split over)",
            kind="int",
        ),
    )
    model: str = field(
        default="",
        metadata=_knob(
            "model",
            "the pre-trained model: '' = the suite's default (digits: vit-digits; text, local: "
            "minilm); vit-digits (digits), minilm, hf:PATH (a local Hugging Face folder; text, "
            "local), clip:PATH (a local CLIP folder; local image tasks)",
            kind="str",
        ),
    )
    data_paths: str = field(
        default="",
        metadata=_knob(
            "data-paths",
            "task-suite=local only: comma list of CSV/JSONL files or folders, one per task "
            "(absolute paths: clients resolve relative ones from their own working directory)",
            kind="str",
        ),
    )
    federated_layers: str = field(
        default="",
        metadata=_knob(
            "federated-layers",
            "text and local suites: the encoder part that is trained and merged: '' = the "
            "suite's default (CLIP: all; others: the top 2 layers), an integer k (the top k "
            "layers) or all",
            kind="layers",
        ),
    )
    mixing: float = field(
        default=0.0,
        metadata=_knob(
            "mixing",
            "data heterogeneity: every client also trains on this fraction (a fixed seeded "
            "subset, the same for every client) of every other task's training data, each "
            "example scored by its own task's head; 0 = fully heterogeneous, 1 = every client "
            "trains on the union",
            kind="float",
        ),
    )
    shared_head: bool = field(
        default=False,
        metadata=_knob(
            "shared-head",
            "classic single-task FL: task dirichlet-task is split over num-tasks clients and "
            "its head is trained and federated with the backbone; the global model is "
            "evaluated on that task, normalised by the clients' mean own fine-tuned accuracy",
            kind="bool",
        ),
    )
    dirichlet_task: int = field(
        default=0,
        metadata=_knob(
            "dirichlet-task",
            "shared-head: the index of the task split over the clients",
            kind="int",
        ),
    )
    dirichlet_alpha: float = field(
        default=0.0,
        metadata=_knob(
            "dirichlet-alpha",
            "shared-head: label skew, per class Dirichlet(α) shares over the clients (small α: "
            "few classes per client); 0 = an IID equal split",
            kind="float",
        ),
    )
    results_dir: str = field(
        default="results",
        metadata=_knob(
            "results-dir", "folder for results.json, results.csv and the weights", kind="str"
        ),
    )
    min_clients: int = field(
        default=0,
        metadata=_knob(
            "min-clients",
            "a round goes on with failed clients if at least this many replied (0 = all)",
            kind="int",
        ),
    )
    server_device: str = field(
        default="auto",
        metadata=_knob("server-device", "where the server aggregates: auto, cpu, cuda", kind="str"),
    )
    client_num_cpus: float = field(
        default=1.0,
        metadata=_knob(
            "client-num-cpus",
            "CPUs Ray reserves per simulated client, > 0 (fl-sim run; under `flwr run` the "
            "federation's options.backend.client-resources decide)",
            kind="float",
        ),
    )
    client_num_gpus: float = field(
        default=0.0,
        metadata=_knob(
            "client-num-gpus",
            "GPUs Ray reserves per simulated client, ≥ 0, fractional allowed, e.g. 0.25 "
            "(fl-sim run; under `flwr run` the federation's options.backend.client-resources "
            "decide)",
            kind="float",
        ),
    )
    eval_split: str = field(
        default="val",
        metadata=_knob(
            "eval-split",
            "the headline split of results (mean_accuracy, progress bar); the server evaluates "
            "every round on both val and test and results keep both",
            kind="str",
        ),
    )
    update_cache: bool = field(
        default=True,
        metadata=_knob(
            "update-cache",
            "clients reuse a cached Δ_t when the same client would train the same task from "
            "the same weights with the same knobs (fine-tune once, merge many)",
            kind="bool",
        ),
    )
    cache_dir: str = field(
        default="",
        metadata=_knob(
            "cache-dir",
            "folder of the update cache (<cache-dir>/updates/); '' = each client's user cache "
            "dir: $FL_SIM_CACHE, else $XDG_CACHE_HOME/fl-sim, else ~/.cache/fl-sim",
            kind="str",
        ),
    )
    diagnostic_batch: int = field(
        default=256,
        metadata=_knob(
            "diagnostic-batch",
            "gradient diversity ζ² at θ₀ and at the final model: the first n training examples "
            "of every task (fixed, no sampling); 0 = skip the diagnostics",
            kind="int",
        ),
    )
    # -- fault injection (tests and demos only) ----------------------------------------------
    fail_client: int = field(
        default=-1,
        metadata=_knob(
            "fail-client",
            "FAULT INJECTION: the client (task index) that raises in fail-round (-1 = none)",
            kind="int",
        ),
    )
    fail_round: int = field(
        default=0,
        metadata=_knob(
            "fail-round", "FAULT INJECTION: the round in which fail-client raises", kind="int"
        ),
    )
    byzantine: str = field(
        default="",
        metadata=_knob(
            "byzantine",
            "FAULT INJECTION: Byzantine clients, a comma list of t:attack with attack scale:K "
            "(K·Δ_t), sign-flip (−Δ_t), gaussian:σ (Δ_t + N(0, σ²), seeded with seed + t + "
            "round) or nan; applied after honest training (the update cache keeps the honest "
            "Δ_t); non-finite updates are rejected by the server and recorded as failures",
            kind="str",
        ),
    )
    crash: str = field(
        default="",
        metadata=_knob(
            "crash",
            "FAULT INJECTION: a comma list of t:round, client t raises in that round (recorded "
            "as a failure; set min-clients so that the round goes on)",
            kind="str",
        ),
    )
    slow: str = field(
        default="",
        metadata=_knob(
            "slow",
            "FAULT INJECTION: a comma list of t:seconds, client t sleeps that long before "
            "replying in every round (with round-timeout: recorded as failed)",
            kind="str",
        ),
    )
    round_timeout: float = field(
        default=0.0,
        metadata=_knob(
            "round-timeout",
            "seconds the server waits for the clients' replies in each round; a client that "
            "has not replied is recorded as failed (0 = Flower's default, 3600 s)",
            kind="float",
        ),
    )
    resume: bool = field(
        default=False,
        metadata=_knob(
            "resume",
            "continue from results-dir/checkpoint (written atomically after every round) at "
            "the last finished round; the rest of the config must be the checkpoint's",
            kind="bool",
        ),
    )

    def __post_init__(self) -> None:
        self._validate()

    # -- parsing -----------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> RunConfig:
        """Parse a flat kebab-case mapping (Flower's run_config); missing keys take defaults."""
        by_key = {f.metadata["key"]: f for f in fields(cls)}
        kwargs: dict[str, object] = {}
        for key, value in values.items():
            if key not in by_key:
                raise ConfigError(f"unknown run-config key {key!r} (see fl-sim run --help)")
            spec = by_key[key]
            kwargs[spec.name] = _coerce(key, spec.metadata["kind"], value)
        return cls(**kwargs)

    @classmethod
    def from_sources(
        cls,
        toml_path: str | Path | None = None,
        overrides: Iterable[str] = (),
        base: Mapping[str, object] | None = None,
    ) -> RunConfig:
        """``base`` (e.g. Flower's run_config), then a TOML file, then ``key=value`` overrides."""
        values: dict[str, object] = dict(base or {})
        if toml_path is not None:
            values.update(read_toml(toml_path))
        for override in overrides:
            key, value = parse_override(override)
            values[key] = value
        return cls.from_mapping(values)

    def to_mapping(self) -> dict[str, ConfigValue]:
        """The kebab-case mapping ``from_mapping`` reads back (for results.json and TOML)."""
        return {f.metadata["key"]: getattr(self, f.name) for f in fields(self)}

    # -- what the run derives from the knobs ---------------------------------------------------

    def client_knobs(self) -> list[TrainingKnobs]:
        """One TrainingKnobs per task/client t = 0..T−1."""
        return client_knobs(
            self.num_tasks,
            lr=self.lr,
            local_steps=self.local_steps,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            optimizer=self.optimizer,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            seed=self.seed,
            preset=None if self.preset == NO_PRESET else self.preset,
        )

    def faults(self) -> Faults:
        """The declared faults (fl_sim/federation/fault_injection.py), fail-client/fail-round
        included.
        """
        crash = parse_crash(self.crash, self.num_tasks)
        if self.fail_client >= 0 and self.fail_round >= 1:
            crash.add((self.fail_client, self.fail_round))
        return Faults(
            byzantine=parse_byzantine(self.byzantine, self.num_tasks),
            crash=frozenset(crash),
            slow=parse_slow(self.slow, self.num_tasks),
        )

    def server_lr_candidates(self) -> list[float]:
        """The β grid (``server-lr-grid``); [] when the search is off."""
        return parse_grid("server-lr-grid", self.server_lr_grid)

    def lambda_candidates(self) -> list[float]:
        """The λ grid (``lambda-grid``, task_arithmetic); [] when the search is off."""
        return parse_grid("lambda-grid", self.lambda_grid)

    @property
    def searches_server_lr(self) -> bool:
        """True when round 1 picks β (or λ) on the val split."""
        return bool(self.server_lr_grid.strip() or self.lambda_grid.strip())

    def rule_names(self) -> list[str]:
        """The ``rules`` of a compare experiment, in order."""
        names = [name.strip() for name in self.rules.split(",") if name.strip()]
        if not names:
            raise ConfigError(f"rules must name at least one rule of {', '.join(RULE_NAMES)}")
        return names

    def suite_config(self) -> dict[str, ConfigValue]:
        """The keys a client needs to build the same task suite as the server."""
        return {
            "task-suite": self.task_suite,
            "num-tasks": self.num_tasks,
            "suite-seed": self.seed,
            "model": self.model,
            "data-paths": self.data_paths,
            "federated-layers": self.federated_layers,
            "mixing": self.mixing,
            "shared-head": self.shared_head,
            "dirichlet-task": self.dirichlet_task,
            "dirichlet-alpha": self.dirichlet_alpha,
        }

    # -- validation ------------------------------------------------------------------------------

    def _validate(self) -> None:
        _choice("experiment", self.experiment, EXPERIMENTS)
        for rule in self.rule_names():
            _choice("rules", rule, RULE_NAMES)
        parse_grid("compare-beta-grid", self.compare_beta_grid)
        _at_least("multi-rounds", self.multi_rounds, 0)
        if not (math.isfinite(self.multi_round_server_lr) and self.multi_round_server_lr > 0):
            raise ConfigError(
                f"multi-round-server-lr must be a finite number > 0, got "
                f"{self.multi_round_server_lr} (set multi-round-server-lr=1)"
            )
        if self.experiment == "compare" and self.strategy != "fedavg":
            raise ConfigError(
                f"experiment=compare runs every rule in `rules`; to run strategy={self.strategy} "
                f"alone set experiment=single (or compare a subset: rules={self.strategy},...)"
            )
        if self.experiment == "compare" and (self.num_rounds != 1 or self.searches_server_lr):
            raise ConfigError(
                "experiment=compare runs every rule itself (one-shot with compare-beta-grid, "
                "multi-round with multi-rounds); set experiment=single to choose num-rounds or "
                "a grid for one strategy"
            )
        _choice("strategy", self.strategy, RULE_NAMES)
        _choice("weighting", self.weighting, WEIGHTINGS)
        _choice("a-norm", self.a_norm, A_NORMS)
        _choice("median-mode", self.median_mode, MEDIAN_MODES)
        _choice("preset", self.preset, (NO_PRESET, *PRESETS))
        _choice("server-device", self.server_device, SERVER_DEVICES)
        _choice("eval-split", self.eval_split, EVAL_SPLITS)
        _at_least("num-rounds", self.num_rounds, 1)
        _at_least("num-tasks", self.num_tasks, 1)
        if self.num_tasks > MAX_TASKS:
            raise ConfigError(
                f"num-tasks must be ≤ {MAX_TASKS} (one simulated client per task), "
                f"got {self.num_tasks}"
            )
        if self.seed > MAX_SEED:
            raise ConfigError(f"seed must be an integer ≤ {MAX_SEED}, got {self.seed}")
        _at_least("cclip-iters", self.cclip_iters, 1)
        _at_least("min-clients", self.min_clients, 0)
        _at_least("seed", self.seed, 0)
        _at_least("fail-client", self.fail_client, -1)
        _at_least("fail-round", self.fail_round, 0)
        _at_least("diagnostic-batch", self.diagnostic_batch, 0)
        self._validate_search()
        if not (math.isfinite(self.server_lr) and self.server_lr > 0):
            raise ConfigError(
                f"server-lr must be a finite number > 0, got {self.server_lr} (set server-lr=1)"
            )
        if not (math.isfinite(self.lam) and self.lam > 0):
            raise ConfigError(
                f"lambda must be a finite number > 0, got {self.lam} (set lambda=0.3)"
            )
        if not 0.0 <= self.rho <= 1.0:
            raise ConfigError(f"rho must be in [0, 1], got {self.rho} (set rho=0.5)")
        if not self.tau_c >= 0:  # also rejects NaN
            raise ConfigError(f"tau-c must be > 0 (or 0 = unset), got {self.tau_c} (set tau-c=5)")
        if self.tau_c_auto and self.tau_c != 0:
            raise ConfigError(
                f"tau-c-auto picks τ_c itself; drop tau-c={self.tau_c} (or set tau-c-auto=false)"
            )
        if self.strategy == "cclip" and self.tau_c == 0 and not self.tau_c_auto:
            raise ConfigError(
                "cclip needs tau-c > 0, its clipping radius in units of ‖Δ_t‖₂ (set tau-c=..., "
                "or tau-c-auto=true for the median update norm; results.json lists them)"
            )
        if self.weighting == "examples" and self.strategy in ("task_arithmetic", "median"):
            raise ConfigError(
                f"{self.strategy} is unweighted; drop weighting=examples "
                "(or use strategy=fedavg with weighting=examples)"
            )
        if self.min_clients > self.num_tasks:
            raise ConfigError(
                f"min-clients must be ≤ num-tasks = {self.num_tasks}, got {self.min_clients} "
                "(0 = every client must reply)"
            )
        if not self.results_dir.strip():
            raise ConfigError("results-dir must name a folder, got '' (set results-dir=results)")
        if self.fail_client >= self.num_tasks:
            raise ConfigError(
                f"fail-client must be a task index < num-tasks = {self.num_tasks} or -1, "
                f"got {self.fail_client}"
            )
        if not (math.isfinite(self.client_num_cpus) and self.client_num_cpus > 0):
            raise ConfigError(
                f"client-num-cpus must be a finite number > 0, got {self.client_num_cpus} "
                "(set client-num-cpus=1)"
            )
        if not (math.isfinite(self.client_num_gpus) and self.client_num_gpus >= 0):
            raise ConfigError(
                f"client-num-gpus must be a finite number ≥ 0 (fractions share a GPU), got "
                f"{self.client_num_gpus} (set client-num-gpus=0)"
            )
        self.faults()  # byzantine, crash and slow entries are checked here, once
        if not (math.isfinite(self.round_timeout) and self.round_timeout >= 0):
            raise ConfigError(
                f"round-timeout must be a finite number of seconds ≥ 0 (0 = Flower's default), "
                f"got {self.round_timeout}"
            )
        check_suite_config(self.suite_config())
        try:
            self.client_knobs()  # lists, ranges and presets are checked here, once
        except OverflowError:  # e.g. local-steps = 1e999: name the knobs that were set
            knob_keys = [f.metadata["key"] for f in fields(self) if f.metadata["kind"] == "knob"]
            given = [k for k in knob_keys if getattr(self, _field_name(k)) != _DEFAULTS[k]]
            raise ConfigError(
                f"{', '.join(given) or 'a training knob'}: a value is out of range "
                "(give finite numbers of a sensible size)"
            ) from None

    def _validate_search(self) -> None:
        self.server_lr_candidates()
        self.lambda_candidates()
        if not self.searches_server_lr:
            return
        if self.num_rounds != 1:
            raise ConfigError(
                f"server-lr-grid / lambda-grid select β on round 1 of a one-shot run, but "
                f"num-rounds = {self.num_rounds} (set num-rounds=1 or drop the grid)"
            )
        if self.strategy == "task_arithmetic" and self.server_lr_grid.strip():
            raise ConfigError(
                "task_arithmetic searches λ, not β: use lambda-grid (β = λT), not server-lr-grid"
            )
        if self.strategy != "task_arithmetic" and self.lambda_grid.strip():
            raise ConfigError(
                f"lambda-grid is task_arithmetic's λ; {self.strategy} searches β: "
                "use server-lr-grid"
            )


_DEFAULTS = {f.metadata["key"]: f.default for f in fields(RunConfig)}


def _field_name(key: str) -> str:
    return next(f.name for f in fields(RunConfig) if f.metadata["key"] == key)


def parse_grid(key: str, text: str) -> list[float]:
    """``"0.1, 0.2,0.5"`` → [0.1, 0.2, 0.5]; '' → []; every value finite and > 0, no repeats."""
    if not text.strip():
        return []
    values = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ConfigError(
                f"{key}: cannot read {item.strip()!r} as a number "
                f'(give a comma list, e.g. {key}="0.1,0.2,0.3")'
            ) from None
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{key}: every value must be a finite number > 0, got {value}")
        values.append(value)
    if len(set(values)) != len(values):
        raise ConfigError(f"{key}: {text!r} lists a value twice")
    return values


def _coerce(key: str, kind: str, value: object) -> object:
    """``value`` as the field's type; ints are accepted for floats, whole floats for ints."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key} must be true or false, got {_excerpt(value)} (set {key}=true)")
    if kind == "int":
        whole = isinstance(value, int) or (
            isinstance(value, float) and math.isfinite(value) and value == int(value)
        )
        if isinstance(value, bool) or not whole:
            raise ConfigError(
                f"{key} must be an integer, got {_excerpt(value)} (set {key}=<integer>)"
            )
        return int(value)  # type: ignore[arg-type]
    if kind == "float":
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)  # "inf" for tau-c
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {_excerpt(value)} (set {key}=<number>)")
        try:
            return float(value)
        except OverflowError:  # an integer beyond float range
            raise ConfigError(f"{key} is out of range, got {_excerpt(value)}") from None
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f'{key} must be a string, got {_excerpt(value)} (set {key}="...")')
        return value
    if kind == "layers":  # federated-layers: '', all, or an integer (kept as its string)
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(
                f'{key} must be an integer or "all", got {_excerpt(value)} (set {key}=2)'
            )
        return str(value)
    if kind == "grid":  # a comma list of numbers, kept as its string; one number is a grid of one
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(
                f"{key} must be a comma list of numbers, got {_excerpt(value)} "
                f'(set {key}="0.1,0.3")'
            )
        if isinstance(value, str):
            return value
        try:
            return repr(float(value))
        except OverflowError:
            raise ConfigError(f"{key} is out of range, got {_excerpt(value)}") from None
    # knob: a number, or a string holding a comma list, a range or a name
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(
            f"{key} must be a number or a string (comma list or log:A:B range), "
            f"got {_excerpt(value)}"
        )
    return value


def _excerpt(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters (a hostile value can be huge)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {key} {value!r}; choose one of {', '.join(choices)}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be an integer ≥ {low}, got {value} (set {key})")


def parse_override(text: str) -> tuple[str, ConfigValue]:
    """``key=value`` → (key, value); the value is read as TOML, else taken as a bare string."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not key=value (e.g. --set num-rounds=3)")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    if isinstance(value, (list, dict)) or not isinstance(value, (bool, int, float, str)):
        raise ConfigError(
            f"{key}: give a number, true/false or a string, got {raw!r} "
            '(write lists as a quoted comma string, e.g. lr="0.1,0.05")'
        )
    return key, value


def read_toml(path: str | Path) -> dict[str, object]:
    """A run's TOML: flat keys, or a pyproject-style ``[tool.flwr.app.config]`` table."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"run config {path} does not exist (give --config FILE.toml)") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"run config {path} is not valid TOML: {error}") from None
    table = document.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if table is None:
        table = document
    nested = [key for key, value in table.items() if isinstance(value, dict)]
    if nested:
        raise ConfigError(
            f"run config {path}: table [{nested[0]}] is not a run-config key; "
            "write flat keys (num-rounds = 3) or a [tool.flwr.app.config] table"
        )
    return dict(table)


def help_text(width: int = 100) -> str:
    """Every key, its default and what it does, for ``fl-sim run --help``."""
    lines = []
    for spec in fields(RunConfig):
        key = spec.metadata["key"]
        default = _toml_value(spec.default)
        head = f"  {key} = {default}"
        body = textwrap.fill(
            spec.metadata["help"], width=width, initial_indent=" " * 6, subsequent_indent=" " * 6
        )
        lines.append(f"{head}\n{body}")
    return "\n".join(lines)


def toml_table(config: RunConfig | None = None) -> str:
    """``[tool.flwr.app.config]`` with every key (the defaults, or ``config``'s values)."""
    values = (config or RunConfig()).to_mapping()
    body = "\n".join(f"{key} = {_toml_value(value)}" for key, value in values.items())
    return f"[tool.flwr.app.config]\n{body}\n"


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return repr(value)


__all__ = [
    "EVAL_SPLITS",
    "SERVER_DEVICES",
    "WEIGHTINGS",
    "RunConfig",
    "help_text",
    "parse_grid",
    "parse_override",
    "read_toml",
    "toml_table",
]
