"""The run config's sections, each a small frozen dataclass validated on construction.

Every field is one flat kebab-case run-config key (its metadata holds the key, its help and its
kind, fl_sim/config/keys.py). The rule section lives beside the rules (strategies/rule_section.py);
fl_sim/config/run_config.py composes all of them into a ``RunConfig`` and checks what spans
sections (e.g. ``min-clients ≤ num-tasks``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from clients.a_norm import A_NORM_KINDS
from clients.fault_injection import parse_byzantine, parse_crash, parse_slow
from clients.knobs import PRESETS
from fl_sim.config.keys import ConfigValue, check_at_least, check_choice, key_metadata
from fl_sim.errors import ConfigError
from fl_sim.suites.lora_settings import lora_settings
from fl_sim.suites.registry import check_suite_config
from strategies.registry import PAPER_RULES, RULE_NAMES
from strategies.server_step import parse_grid

SERVER_DEVICES = ("auto", "cpu", "cuda")
EVAL_SPLITS = ("val", "test")
EXPERIMENTS = ("compare", "single")
NO_PRESET = "none"
MAX_TASKS = 10_000  # a bound, so that a typo cannot build millions of clients' knobs
MAX_SEED = 2**32 - 1  # seeds go to torch.manual_seed and NumPy
MAX_SEEDS = 1000  # repeats of one experiment


@dataclass(frozen=True)
class Faults:
    """The run's declared faults: client t → attack, (t, round) crashes, client t → seconds."""

    byzantine: dict[int, str]
    crash: frozenset[tuple[int, int]]
    slow: dict[int, float]


@dataclass(frozen=True)
class ExperimentSection:
    """What ``fl-sim run`` runs: one strategy, or the compare experiment over ``rules``."""

    kind: str = field(
        default="compare",
        metadata=key_metadata(
            "experiment",
            "compare = every rule in `rules`, one-shot (β picked on val from compare-beta-grid) "
            "and multi-round (multi-rounds rounds at the same total steps), then a table and "
            "plots; single = one run of `strategy`",
            kind="str",
        ),
    )
    rules: str = field(
        default=",".join(PAPER_RULES),
        metadata=key_metadata(
            "rules",
            f"compare: the rules to run (comma list of {', '.join(RULE_NAMES)})",
            kind="str",
        ),
    )
    compare_beta_grid: str = field(
        default="0.5,1,1.5,2,2.5,3,4",
        metadata=key_metadata(
            "compare-beta-grid",
            "compare: the β grid searched on val for every one-shot rule (task_arithmetic: "
            "λ = β/T); every rule's A is mean-like, so one grid serves all",
            kind="str",
        ),
    )
    multi_rounds: int = field(
        default=5,
        metadata=key_metadata(
            "multi-rounds",
            "compare: R of the multi-round runs, each with local-steps/R steps per round "
            "(the same total); 0 = one-shot only",
            kind="int",
        ),
    )
    multi_round_server_lr: float = field(
        default=1.0,
        metadata=key_metadata(
            "multi-round-server-lr", "compare: β of the multi-round runs", kind="float"
        ),
    )
    seeds: int | str = field(
        default=1,
        metadata=key_metadata(
            "seeds",
            "repeats of the experiment: a count n (training seeds seed, seed+1, ..., seed+n−1) "
            'or a comma list of training seeds ("0,1,2"); each repeat retrains the clients '
            "with its training seed (θ₀ and the splits stay those of seed); n > 1 reports the "
            "mean and a 95% Student-t CI over seeds and writes each to seed-<s>/",
            kind="seeds",
        ),
    )

    def __post_init__(self) -> None:
        check_choice("experiment", self.kind, EXPERIMENTS)
        for rule in self.rule_names():
            check_choice("rules", rule, RULE_NAMES)
        parse_grid("compare-beta-grid", self.compare_beta_grid)
        check_at_least("multi-rounds", self.multi_rounds, 0)
        if not (math.isfinite(self.multi_round_server_lr) and self.multi_round_server_lr > 0):
            raise ConfigError(
                f"multi-round-server-lr must be a finite number > 0, got "
                f"{self.multi_round_server_lr} (set multi-round-server-lr=1)"
            )
        self.seed_list(0)  # counts and lists are checked here, once

    def seed_list(self, seed: int) -> list[int]:
        """The training seeds of the repeats: ``seeds`` = n gives seed .. seed + n − 1."""
        if isinstance(self.seeds, int):
            if not 1 <= self.seeds <= MAX_SEEDS:
                raise ConfigError(
                    f"seeds must be a count in 1..{MAX_SEEDS} or a comma list of seeds, got "
                    f"{self.seeds} (set seeds=3)"
                )
            return [seed + r for r in range(self.seeds)]
        items = [item.strip() for item in self.seeds.split(",")]
        if not all(item.isascii() and item.isdigit() for item in items):
            raise ConfigError(
                f"seeds must be a count or a comma list of integers ≥ 0, got {self.seeds!r} "
                '(set seeds=3 or seeds="0,1,2")'
            )
        values = [int(item) for item in items]
        if len(set(values)) != len(values) or len(values) > MAX_SEEDS:
            raise ConfigError(
                f"seeds must list at most {MAX_SEEDS} distinct seeds, got {self.seeds!r}"
            )
        if max(values) > MAX_SEED:
            raise ConfigError(f"seeds must be ≤ {MAX_SEED}, got {max(values)}")
        return values

    def rule_names(self) -> list[str]:
        """The ``rules`` of a compare experiment, in order."""
        names = [name.strip() for name in self.rules.split(",") if name.strip()]
        if not names:
            raise ConfigError(f"rules must name at least one rule of {', '.join(RULE_NAMES)}")
        return names

    def beta_grid(self) -> list[float]:
        """``compare-beta-grid`` as numbers."""
        return parse_grid("compare-beta-grid", self.compare_beta_grid)


@dataclass(frozen=True)
class TrainingSection:
    """How each client trains: the heterogeneity knobs (one value, a list or a range each),
    the a-norm kind it reports, and the update cache."""

    lr: float | str = field(
        default=1e-4,
        metadata=key_metadata(
            "lr",
            "η_t: a number, a comma list (one per client) or a range log:A:B / lin:A:B",
            kind="knob",
        ),
    )
    local_steps: int | str = field(
        default=200,
        metadata=key_metadata(
            "local-steps", "K_t: local steps per round (number, list or range)", kind="knob"
        ),
    )
    schedule: str = field(
        default="constant",
        metadata=key_metadata(
            "schedule", "learning-rate schedule per client (name or comma list)", kind="knob"
        ),
    )
    warmup_steps: int | str = field(
        default=0, metadata=key_metadata("warmup-steps", "warm-up steps per client", kind="knob")
    )
    optimizer: str = field(
        default="adamw",
        metadata=key_metadata(
            "optimizer", "sgd, sgd-momentum or adamw (or a comma list)", kind="knob"
        ),
    )
    momentum: float | str = field(
        default=0.9, metadata=key_metadata("momentum", "μ for sgd-momentum", kind="knob")
    )
    weight_decay: float | str = field(
        default=0.0, metadata=key_metadata("weight-decay", "weight decay per client", kind="knob")
    )
    batch_size: int | str = field(
        default=32, metadata=key_metadata("batch-size", "mini-batch size per client", kind="knob")
    )
    preset: str = field(
        default="lr-hetero",
        metadata=key_metadata(
            "preset",
            f"heterogeneity preset spreading one lr and local-steps: {NO_PRESET}, "
            f"{', '.join(PRESETS)}",
            kind="str",
        ),
    )
    full_batch: bool = field(
        default=False,
        metadata=key_metadata("full-batch", "clients take full-batch gradient steps", kind="bool"),
    )
    a_norm: str = field(
        default="lr-sum",
        metadata=key_metadata(
            "a-norm",
            "how ‖a_t‖₁ counts local work (fednova, effective weights w_t): lr-sum = Σ_k η_t⁽ᵏ⁾, "
            "steps = K_t (the paper's code)",
            kind="str",
        ),
    )
    update_cache: bool = field(
        default=True,
        metadata=key_metadata(
            "update-cache",
            "clients reuse a cached Δ_t when the same client would train the same task from "
            "the same weights with the same knobs (fine-tune once, merge many)",
            kind="bool",
        ),
    )
    cache_dir: str = field(
        default="",
        metadata=key_metadata(
            "cache-dir",
            "folder of the update cache (<cache-dir>/updates/) and of the text and local "
            "suites' stored inputs (<cache-dir>/suite-inputs/); '' = each node's user cache "
            "dir: $FL_SIM_CACHE, else $XDG_CACHE_HOME/fl-sim, else ~/.cache/fl-sim",
            kind="str",
        ),
    )
    training_seed: int = field(
        default=-1,
        metadata=key_metadata(
            "training-seed",
            "client t trains (minibatch order and sampling, noise) with training-seed + t; "
            "-1 = seed. A repeat of `seeds` sets it; θ₀ and the splits follow seed only",
            kind="int",
        ),
    )

    def __post_init__(self) -> None:
        check_choice("a-norm", self.a_norm, A_NORM_KINDS)
        if not -1 <= self.training_seed <= MAX_SEED:
            raise ConfigError(
                f"training-seed must be -1 (= seed) or an integer in 0..{MAX_SEED}, got "
                f"{self.training_seed} (set training-seed=-1)"
            )
        check_choice("preset", self.preset, (NO_PRESET, *PRESETS))
        # lists, ranges and presets need T: RunConfig checks them with the suite's num-tasks


@dataclass(frozen=True)
class SuiteSection:
    """The task suite every party builds: tasks = clients, θ₀, data and data heterogeneity."""

    seed: int = field(
        default=0,
        metadata=key_metadata(
            "seed",
            "seed of θ₀ and the data; client t trains with seed + t (training-seed + t when "
            "that is set, as each repeat of `seeds` does)",
            kind="int",
        ),
    )
    task_suite: str = field(
        default="digits",
        metadata=key_metadata("task-suite", "the task suite (clients = tasks)", kind="str"),
    )
    num_tasks: int = field(
        default=8,
        metadata=key_metadata(
            "num-tasks",
            "T, tasks = clients in the suite (shared-head: the number of clients the one task "
            "is split over)",
            kind="int",
        ),
    )
    model: str = field(
        default="",
        metadata=key_metadata(
            "model",
            "the pre-trained model: '' = the suite's default (digits: vit-digits; text, local: "
            "minilm; causal: llama-tiny); vit-digits (digits), minilm, hf:PATH (a local Hugging "
            "Face folder; text, local, causal), clip:PATH (a local CLIP folder; local image "
            "tasks), llama-tiny, gpt2-tiny (causal: small decoders fl-sim pre-trains itself)",
            kind="str",
        ),
    )
    data_paths: str = field(
        default="",
        metadata=key_metadata(
            "data-paths",
            "task-suite=local only: comma list of CSV/JSONL files or folders, one per task "
            "(absolute paths: clients resolve relative ones from their own working directory)",
            kind="str",
        ),
    )
    federated_layers: str = field(
        default="",
        metadata=key_metadata(
            "federated-layers",
            "text, local and causal suites: the encoder (causal: decoder) part that is trained "
            "and merged: '' = the suite's default (CLIP: all; others: the top 2 layers, and for "
            "causal the final norm and lm_head), an integer k (the top k layers) or all",
            kind="layers",
        ),
    )
    frozen_prefix_cache: bool = field(
        default=True,
        metadata=key_metadata(
            "frozen-prefix-cache",
            "text and local suites with an integer federated-layers k: compute the frozen "
            "layers' output under the top k once per process and train and evaluate from it "
            "(the same results to float rounding, faster; memory: 4·tokens·(hidden+1) bytes "
            "per example); false = the full forward pass at every step",
            kind="bool",
        ),
    )
    mixing: float = field(
        default=0.0,
        metadata=key_metadata(
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
        metadata=key_metadata(
            "shared-head",
            "classic single-task FL: task dirichlet-task is split over num-tasks clients and "
            "its head is trained and federated with the backbone; the global model is "
            "evaluated on that task, normalised by the clients' mean own fine-tuned accuracy",
            kind="bool",
        ),
    )
    dirichlet_task: int = field(
        default=0,
        metadata=key_metadata(
            "dirichlet-task",
            "shared-head: the index of the task split over the clients",
            kind="int",
        ),
    )
    dirichlet_alpha: float = field(
        default=0.0,
        metadata=key_metadata(
            "dirichlet-alpha",
            "shared-head: label skew, per class Dirichlet(α) shares over the clients (small α: "
            "few classes per client); 0 = an IID equal split",
            kind="float",
        ),
    )
    quadratic_dim: int = field(
        default=50,
        metadata=key_metadata(
            "quadratic-dim",
            "task-suite=quadratic: d, the dimension of θ (L_t(θ) = ½ Σ_j h_t,j (θ_j − c_t,j)²)",
            kind="int",
        ),
    )
    quadratic_spread: float = field(
        default=1.0,
        metadata=key_metadata(
            "quadratic-spread",
            "task-suite=quadratic: data heterogeneity, c_t = c̄ + spread · N(0, I) around a "
            "common centre c̄ (0: one common minimiser; ζ² grows with it)",
            kind="float",
        ),
    )
    quadratic_curvature_spread: float = field(
        default=4.0,
        metadata=key_metadata(
            "quadratic-curvature-spread",
            "task-suite=quadratic: s ≥ 1, the curvatures h_t,j are log-uniform on [1/√s, √s] "
            "(1: h = 1; 4: [0.5, 2])",
            kind="float",
        ),
    )
    quadratic_noise: float = field(
        default=0.0,
        metadata=key_metadata(
            "quadratic-noise",
            "task-suite=quadratic: σ, seeded Gaussian gradient noise per training example "
            "(a batch averages it; the full batch is exact); 0 = exact gradients",
            kind="float",
        ),
    )
    causal_metric: str = field(
        default="token",
        metadata=key_metadata(
            "causal-metric",
            "task-suite=causal: the accuracy of an answer, teacher-forced on its span: token = "
            "the share of its tokens (and end of sequence) predicted right; exact = 1 when all "
            "are (what greedy decoding would answer exactly)",
            kind="str",
        ),
    )

    adapter: str = field(
        default="none",
        metadata=key_metadata(
            "adapter",
            "none = full fine-tuning of the federated part; lora = clients train LoRA adapters "
            "(peft) on the target modules of the federated part, W' = W + (α/r)·B·A, and only "
            "those move (transformer suites: digits, text, local, ...)",
            kind="str",
        ),
    )
    lora_rank: int = field(
        default=8,
        metadata=key_metadata("lora-rank", "adapter=lora: r, the rank of B·A", kind="int"),
    )
    lora_alpha: float = field(
        default=16.0,
        metadata=key_metadata("lora-alpha", "adapter=lora: α, B·A is scaled by α/r", kind="float"),
    )
    lora_dropout: float = field(
        default=0.0,
        metadata=key_metadata(
            "lora-dropout",
            "adapter=lora: dropout on the adapters' input in training, in [0, 1)",
            kind="float",
        ),
    )
    lora_target_modules: str = field(
        default="",
        metadata=key_metadata(
            "lora-target-modules",
            "adapter=lora: comma list of module-name suffixes of the Linear (or GPT-2 Conv1D) "
            "modules of the federated part to adapt; '' = the model family's attention "
            "projections (query,value for BERT/MiniLM; q_proj,v_proj for Llama and ViT; c_attn "
            "for GPT-2)",
            kind="str",
        ),
    )
    adapter_federation: str = field(
        default="dense",
        metadata=key_metadata(
            "adapter-federation",
            "adapter=lora: what is federated; dense = the targets' weights W (a client sends "
            "ΔW = (α/r)·B·A, every rule merges W as for full fine-tuning); adapter = A and B, "
            "aggregated separately (FedIT; the global model is W₀ + (α/r)·B·A)",
            kind="str",
        ),
    )

    def __post_init__(self) -> None:
        check_at_least("num-tasks", self.num_tasks, 1)
        if self.num_tasks > MAX_TASKS:
            raise ConfigError(
                f"num-tasks must be ≤ {MAX_TASKS} (one simulated client per task), "
                f"got {self.num_tasks}"
            )
        check_at_least("seed", self.seed, 0)
        if self.seed > MAX_SEED:
            raise ConfigError(f"seed must be an integer ≤ {MAX_SEED}, got {self.seed}")
        check_suite_config(self.suite_config())
        lora_settings(self.suite_config())  # adapter and lora-* (the model's checks: at build)

    def suite_config(self) -> dict[str, ConfigValue]:
        """The keys a client needs to build the same task suite as the server
        (fl_sim/suites/registry.py)."""
        return {
            "task-suite": self.task_suite,
            "num-tasks": self.num_tasks,
            "suite-seed": self.seed,
            "model": self.model,
            "data-paths": self.data_paths,
            "federated-layers": self.federated_layers,
            "frozen-prefix-cache": self.frozen_prefix_cache,
            "mixing": self.mixing,
            "shared-head": self.shared_head,
            "dirichlet-task": self.dirichlet_task,
            "dirichlet-alpha": self.dirichlet_alpha,
            "quadratic-dim": self.quadratic_dim,
            "quadratic-spread": self.quadratic_spread,
            "quadratic-curvature-spread": self.quadratic_curvature_spread,
            "quadratic-noise": self.quadratic_noise,
            "causal-metric": self.causal_metric,
            "adapter": self.adapter,
            "lora-rank": self.lora_rank,
            "lora-alpha": self.lora_alpha,
            "lora-dropout": self.lora_dropout,
            "lora-target-modules": self.lora_target_modules,
            "adapter-federation": self.adapter_federation,
        }


@dataclass(frozen=True)
class FaultSection:
    """Declared faults (tests and demos): crashes, Byzantine updates, slow clients."""

    fail_client: int = field(
        default=-1,
        metadata=key_metadata(
            "fail-client",
            "FAULT INJECTION: the client (task index) that raises in fail-round (-1 = none)",
            kind="int",
        ),
    )
    fail_round: int = field(
        default=0,
        metadata=key_metadata(
            "fail-round", "FAULT INJECTION: the round in which fail-client raises", kind="int"
        ),
    )
    byzantine: str = field(
        default="",
        metadata=key_metadata(
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
        metadata=key_metadata(
            "crash",
            "FAULT INJECTION: a comma list of t:round, client t raises in that round (recorded "
            "as a failure; set min-clients so that the round goes on)",
            kind="str",
        ),
    )
    slow: str = field(
        default="",
        metadata=key_metadata(
            "slow",
            "FAULT INJECTION: a comma list of t:seconds, client t sleeps that long before "
            "replying in every round (with round-timeout: recorded as failed)",
            kind="str",
        ),
    )

    def __post_init__(self) -> None:
        check_at_least("fail-client", self.fail_client, -1)
        check_at_least("fail-round", self.fail_round, 0)

    def faults(self, num_tasks: int) -> Faults:
        """The declared faults for T = ``num_tasks`` clients (clients/fault_injection.py),
        fail-client/fail-round included; one-line errors for bad entries."""
        if self.fail_client >= num_tasks:
            raise ConfigError(
                f"fail-client must be a task index < num-tasks = {num_tasks} or -1, "
                f"got {self.fail_client}"
            )
        crash = parse_crash(self.crash, num_tasks)
        if self.fail_client >= 0 and self.fail_round >= 1:
            crash.add((self.fail_client, self.fail_round))
        return Faults(
            byzantine=parse_byzantine(self.byzantine, num_tasks),
            crash=frozenset(crash),
            slow=parse_slow(self.slow, num_tasks),
        )


@dataclass(frozen=True)
class EngineSection:
    """Where and how the federation runs: aggregation device, failed clients, Ray resources."""

    min_clients: int = field(
        default=0,
        metadata=key_metadata(
            "min-clients",
            "a round goes on with failed clients if at least this many replied (0 = all)",
            kind="int",
        ),
    )
    round_timeout: float = field(
        default=0.0,
        metadata=key_metadata(
            "round-timeout",
            "seconds the server waits for the clients' replies in each round; a client that "
            "has not replied is recorded as failed (0 = Flower's default, 3600 s)",
            kind="float",
        ),
    )
    node_wait: float = field(
        default=0.0,
        metadata=key_metadata(
            "node-wait",
            "seconds a round waits, before sending, for a task whose node is offline (lost, "
            "restarting) to be back, then sends anyway; and how long a node lost while asked "
            "for its partition id is asked again (0 = no wait: it fails at once)",
            kind="float",
        ),
    )
    server_device: str = field(
        default="auto",
        metadata=key_metadata(
            "server-device", "where the server aggregates: auto, cpu, cuda", kind="str"
        ),
    )
    client_num_cpus: float = field(
        default=1.0,
        metadata=key_metadata(
            "client-num-cpus",
            "CPUs Ray reserves per simulated client, > 0 (fl-sim run; under `flwr run` the "
            "federation's options.backend.client-resources decide)",
            kind="float",
        ),
    )
    client_num_gpus: float = field(
        default=0.0,
        metadata=key_metadata(
            "client-num-gpus",
            "GPUs Ray reserves per simulated client, ≥ 0, fractional allowed, e.g. 0.25 "
            "(fl-sim run; under `flwr run` the federation's options.backend.client-resources "
            "decide)",
            kind="float",
        ),
    )
    eval_workers: int = field(
        default=0,
        metadata=key_metadata(
            "eval-workers",
            "threads the server evaluates on, each with its own model copy and one torch "
            "thread (0 = one per core this process may use; 1 = serial, torch's own threads)",
            kind="int",
        ),
    )
    concurrent_runs: int = field(
        default=1,
        metadata=key_metadata(
            "concurrent-runs",
            "how many of an experiment's runs the server drives at once on the federation, "
            "≥ 1 (1 = one after the other; the results are the same either way: "
            "fl_sim/federation/run_schedule.py)",
            kind="int",
        ),
    )
    server_streaming: bool = field(
        default=True,
        metadata=key_metadata(
            "server-streaming",
            "take the clients' replies as they arrive: fold each Δ_t into a running sum "
            "(fedavg, task_arithmetic, fednova) or spill it to results-dir/spill (the other "
            "rules; every rule in round 1), so server memory does not grow with the clients; "
            "false: hold every reply until the round aggregates",
            kind="bool",
        ),
    )

    def __post_init__(self) -> None:
        check_choice("server-device", self.server_device, SERVER_DEVICES)
        check_at_least("min-clients", self.min_clients, 0)
        if not (math.isfinite(self.round_timeout) and self.round_timeout >= 0):
            raise ConfigError(
                f"round-timeout must be a finite number of seconds ≥ 0 (0 = Flower's default), "
                f"got {self.round_timeout}"
            )
        if not (math.isfinite(self.node_wait) and self.node_wait >= 0):
            raise ConfigError(
                f"node-wait must be a finite number of seconds ≥ 0 (0 = no wait), "
                f"got {self.node_wait}"
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
        check_at_least("eval-workers", self.eval_workers, 0)
        check_at_least("concurrent-runs", self.concurrent_runs, 1)

    def client_resources(self) -> dict[str, float]:
        """What Ray reserves per simulated client."""
        return {"num_cpus": self.client_num_cpus, "num_gpus": self.client_num_gpus}


@dataclass(frozen=True)
class OutputSection:
    """What a run writes and measures, and resuming it."""

    results_dir: str = field(
        default="results",
        metadata=key_metadata(
            "results-dir", "folder for results.json, results.csv and the weights", kind="str"
        ),
    )
    eval_split: str = field(
        default="val",
        metadata=key_metadata(
            "eval-split",
            "the headline split of results (mean_accuracy, progress bar); the server evaluates "
            "every round on both val and test and results keep both",
            kind="str",
        ),
    )
    diagnostic_batch: int = field(
        default=256,
        metadata=key_metadata(
            "diagnostic-batch",
            "gradient diversity ζ² at θ₀ and at the final model: the first n training examples "
            "of every task (fixed, no sampling); 0 = skip the diagnostics",
            kind="int",
        ),
    )
    save_clients: bool = field(
        default=True,
        metadata=key_metadata(
            "save-clients",
            "write each client's fine-tuned model θ₀ + Δ_t of round 1 (clients/client_<t>"
            ".safetensors, and hf/client_<t> where the suite writes folders): T model-sized "
            "files, what `fl-sim merge` redoes round 1 from; false for many clients of a big "
            "model (the clients are still evaluated)",
            kind="bool",
        ),
    )
    resume: bool = field(
        default=False,
        metadata=key_metadata(
            "resume",
            "continue from results-dir/checkpoint (written atomically after every round) at "
            "the last finished round; the rest of the config must be the checkpoint's",
            kind="bool",
        ),
    )

    def __post_init__(self) -> None:
        check_choice("eval-split", self.eval_split, EVAL_SPLITS)
        check_at_least("diagnostic-batch", self.diagnostic_batch, 0)
        if not self.results_dir.strip():
            raise ConfigError("results-dir must name a folder, got '' (set results-dir=results)")
