"""The suite registry: name → suite, and the suite as run-config keys, which every party needs
to build the identical suite.

``make_suite(name, **kwargs)`` builds a registered suite (toy, digits, text, local, quadratic);
``build_suite(keys)`` builds it from the run-config keys below.

The ServerApp puts ``RunConfig.suite_config()`` (the keys of ``SUITE_DEFAULTS``, kebab-case) into
every message's ConfigRecord; the ServerApp and every client call ``build_suite`` on it, and the
update cache puts it in its key, so all of them train and evaluate the same tasks, data split
and model:

    task-suite        toy | digits | text | local | quadratic | causal
    num-tasks         T, one client per task (shared-head: the number of clients C)
    suite-seed        θ₀ and the data splits
    model             '' = the suite's default; vit-digits (digits); minilm, hf:PATH (text,
                      local); clip:PATH (local images); llama-tiny, gpt2-tiny, hf:PATH (causal)
    data-paths        local only: comma list of files/folders, one task each
    federated-layers  text/local/causal: '' = the suite's default, an integer k (the top k
                      layers) or all
    causal-metric     causal only: exact (the answer matched whole) or token (the share of
                      answer tokens right) (fl_sim/suites/causal_lm.py)
    frozen-prefix-cache
                      text/local: true = compute the frozen layers' output under the federated
                      top k once per suite and train/evaluate from it (fl_sim/suites/pretrained.py)
    mixing            m ∈ [0, 1]: the share of every other task's training data each client also
                      trains on (fl_sim/suites/base.py)
    shared-head       classic single-task FL (fl_sim/suites/shared_head.py)
    dirichlet-task    shared-head: the task that is split over the clients
    dirichlet-alpha   shared-head: α of the Dirichlet label skew; 0 = IID equal split
    quadratic-dim, quadratic-spread, quadratic-curvature-spread, quadratic-noise
                      task-suite=quadratic only: d, the spread of the c_t around their centre,
                      the bound h_max/h_min of the curvatures, the gradient noise σ
                      (fl_sim/suites/quadratic.py)

``check_suite_config`` gives the one-line errors for bad values and combinations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

from fl_sim.errors import ConfigError
from fl_sim.suites.base import TaskSuite
from fl_sim.suites.lora_settings import ADAPTER_DEFAULTS, adapter_enabled
from fl_sim.suites.quadratic import QuadraticSuite, check_quadratic
from fl_sim.suites.toy import ToySuite


def _digits_suite(**kwargs: object) -> TaskSuite:
    # imported on use: transformers is slow to load, and a toy run never needs it
    from fl_sim.suites.digits import DigitsSuite

    return DigitsSuite(**kwargs)


def _text_suite(**kwargs: object) -> TaskSuite:
    # imported on use, as digits
    from fl_sim.suites.text import TextSuite

    return TextSuite(**kwargs)


def _local_suite(**kwargs: object) -> TaskSuite:
    from fl_sim.suites.local import LocalSuite

    return LocalSuite(**kwargs)


def _causal_suite(**kwargs: object) -> TaskSuite:
    from fl_sim.suites.causal_lm import CausalSuite

    return CausalSuite(**kwargs)


SUITES: dict[str, Callable[..., TaskSuite]] = {
    "toy": ToySuite,
    "digits": _digits_suite,
    "text": _text_suite,
    "local": _local_suite,
    "quadratic": QuadraticSuite,
    "causal": _causal_suite,
}


def make_suite(name: str, *, mixing: float = 0.0, **kwargs: object) -> TaskSuite:
    """The suite registered as ``name`` ("toy", "digits", "text", "local", "quadratic",
    "causal"), built with ``kwargs``.

    The text and local suites take ``model=`` "minilm", "hf:PATH" or "clip:PATH" (a local
    folder; see fl_sim/suites/encoders.py); local takes ``paths=[one per task]``.
    ``mixing`` shares that fraction of every task's training data with every client (module
    docstring). From a run config's keys: ``fl_sim.suites.registry.build_suite``.
    """
    if name not in SUITES:
        raise ConfigError(f"unknown task suite {name!r}; choose one of {', '.join(SUITES)}")
    suite = SUITES[name](**kwargs)
    suite.mixing = check_mixing(mixing)
    return suite


def check_mixing(mixing: object) -> float:
    """``mixing`` as a float in [0, 1], or a one-line ConfigError."""
    if isinstance(mixing, bool) or not isinstance(mixing, (int, float)) or not 0 <= mixing <= 1:
        raise ConfigError(f"mixing must be a number in [0, 1], got {mixing!r} (set mixing=0)")
    return float(mixing)


ConfigValue = bool | int | float | str

SUITE_DEFAULTS: dict[str, ConfigValue] = {
    "task-suite": "digits",
    "num-tasks": 8,
    "suite-seed": 0,
    "model": "",
    "data-paths": "",
    "federated-layers": "",
    "frozen-prefix-cache": True,
    "mixing": 0.0,
    "shared-head": False,
    "dirichlet-task": 0,
    "dirichlet-alpha": 0.0,
    "quadratic-dim": 50,
    "quadratic-spread": 1.0,
    "quadratic-curvature-spread": 4.0,
    "quadratic-noise": 0.0,
    "causal-metric": "token",
    **ADAPTER_DEFAULTS,  # adapter, lora-*: LoRA clients (fl_sim/suites/lora_settings.py)
}
QUADRATIC_KEYS = (
    "quadratic-dim",
    "quadratic-spread",
    "quadratic-curvature-spread",
    "quadratic-noise",
)
SUITE_KEYS = tuple(SUITE_DEFAULTS)
REQUIRED_KEYS = ("task-suite", "num-tasks", "suite-seed")
SUITE_MODELS = {  # model specs each suite takes ('' = its default); prefixes end with ':'
    "toy": ("",),
    "digits": ("", "vit-digits"),
    "text": ("", "minilm", "hf:"),
    "local": ("", "minilm", "hf:", "clip:"),
    "quadratic": ("",),
    "causal": ("", "llama-tiny", "gpt2-tiny", "hf:"),
}
CAUSAL_METRICS = ("token", "exact")


def complete(config: Mapping[str, object]) -> dict[str, ConfigValue]:
    """The suite keys of ``config`` with defaults for the optional ones (older servers)."""
    for key in REQUIRED_KEYS:
        if key not in config:
            raise ConfigError(f"client config lacks {key!r} (the server must send it)")
    return {key: config.get(key, default) for key, default in SUITE_DEFAULTS.items()}  # type: ignore[misc]


def data_paths(text: str) -> list[str]:
    """``data-paths`` as a list: comma separated, blanks dropped."""
    return [path.strip() for path in text.split(",") if path.strip()]


def parse_federated_layers(text: str) -> int | str | None:
    """'' → None (the suite's default), 'all' → 'all', '3' → 3; else a one-line ConfigError."""
    text = str(text).strip()
    if text in ("", "all"):
        return text or None
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ConfigError(
        f"federated-layers must be '' (the suite's default), an integer ≥ 1 or all, got {text!r}"
    )


def check_suite_config(config: Mapping[str, object]) -> None:
    """One-line ConfigErrors for bad values and combinations of the suite keys."""
    c = complete(config)
    suite, shared = str(c["task-suite"]), bool(c["shared-head"])
    if suite not in SUITES:
        raise ConfigError(f"unknown task-suite {suite!r}; choose one of {', '.join(SUITES)}")
    model = str(c["model"])
    allowed = SUITE_MODELS[suite]
    if not any(model == a or (a.endswith(":") and model.startswith(a)) for a in allowed):
        choices = ", ".join(repr(a) if not a.endswith(":") else f"{a}PATH" for a in allowed)
        raise ConfigError(f"task-suite={suite} takes model {choices}; got model={model!r}")
    paths = data_paths(str(c["data-paths"]))
    if paths and suite != "local":
        raise ConfigError(
            f"data-paths is for task-suite=local (your own files), not {suite}: "
            "drop data-paths or set task-suite=local"
        )
    if suite == "local" and not paths:
        raise ConfigError('task-suite=local needs data-paths="task0.csv,task1/,..." (one per task)')
    if suite == "local" and not shared and len(paths) != int(c["num-tasks"]):  # type: ignore[call-overload]
        raise ConfigError(
            f"data-paths names {len(paths)} tasks but num-tasks = {c['num-tasks']} "
            "(one path per task/client)"
        )
    layers = parse_federated_layers(str(c["federated-layers"]))
    if layers is not None and suite in ("toy", "digits", "quadratic"):
        raise ConfigError(
            f"federated-layers is for the text and local suites; {suite} federates its whole "
            "backbone (drop federated-layers)"
        )
    if not isinstance(c["frozen-prefix-cache"], bool):
        raise ConfigError(
            f"frozen-prefix-cache must be true or false, got {c['frozen-prefix-cache']!r}"
        )
    check_mixing(c["mixing"])
    _check_quadratic_keys(c, suite, shared)
    _check_causal_keys(c, suite, shared)
    alpha, task = float(c["dirichlet-alpha"]), int(c["dirichlet-task"])  # type: ignore[arg-type]
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ConfigError(
            f"dirichlet-alpha must be a finite number ≥ 0 (0 = IID split), got {alpha}"
        )
    if not shared and (alpha != 0 or task != 0):
        raise ConfigError(
            "dirichlet-alpha / dirichlet-task split one task over the clients: set "
            "shared-head=true (or drop them)"
        )
    if task < 0 or (shared and task >= _num_suite_tasks(suite, paths)):
        raise ConfigError(
            f"dirichlet-task must be a task index < {_num_suite_tasks(suite, paths)} of the "
            f"{suite} suite, got {task}"
        )


def _check_quadratic_keys(c: Mapping[str, object], suite: str, shared: bool) -> None:
    """The quadratic-* keys: only for task-suite=quadratic, which has no shared head."""
    if suite != "quadratic":
        changed = [key for key in QUADRATIC_KEYS if c[key] != SUITE_DEFAULTS[key]]
        if changed:
            raise ConfigError(
                f"{changed[0]} is for task-suite=quadratic, not {suite}: drop it or set "
                "task-suite=quadratic"
            )
        return
    if shared:
        raise ConfigError(
            "task-suite=quadratic has no heads to share: drop shared-head (its tasks are the "
            "quadratics L_t)"
        )
    check_quadratic(*(c[key] for key in QUADRATIC_KEYS))


def _check_causal_keys(c: Mapping[str, object], suite: str, shared: bool) -> None:
    """causal-metric: one of CAUSAL_METRICS, for task-suite=causal, which has no shared head."""
    metric = c["causal-metric"]
    if metric not in CAUSAL_METRICS:
        raise ConfigError(
            f"causal-metric must be one of {', '.join(CAUSAL_METRICS)}, got {metric!r} "
            "(set causal-metric=token)"
        )
    if suite != "causal" and metric != SUITE_DEFAULTS["causal-metric"]:
        raise ConfigError(
            f"causal-metric is for task-suite=causal, not {suite}: drop it or set task-suite=causal"
        )
    if suite == "causal" and shared:
        raise ConfigError(
            "task-suite=causal has no heads to share (the LM writes every answer): drop shared-head"
        )


def _num_suite_tasks(suite: str, paths: list[str]) -> int | float:
    """How many tasks a suite can have (toy: any number)."""
    if suite == "digits":
        from fl_sim.suites.digits_data import MAX_TASKS

        return MAX_TASKS
    if suite == "text":
        from fl_sim.suites.stdlib_text import TEXT_TASKS

        return len(TEXT_TASKS)
    if suite == "local":
        return len(paths)
    if suite == "causal":
        from fl_sim.suites.causal_data import MAX_TASKS as CAUSAL_TASKS

        return CAUSAL_TASKS
    return math.inf


def build_suite(config: Mapping[str, object], disk_cache: str | Path | None = None) -> TaskSuite:
    """The task suite of the suite keys in ``config`` (module docstring); checked first.

    ``disk_cache``: a folder where the text and local suites keep what every process of a run
    would otherwise compute alike (the frozen prefix's outputs, the probes;
    fl_sim/suites/pretrained.py), the same figures either way; other suites ignore it."""
    check_suite_config(config)
    if adapter_enabled(config):  # the base suite with LoRA adapters (fl_sim/suites/lora.py)
        from fl_sim.suites.lora import lora_suite

        return lora_suite(build_suite({**config, "adapter": "none"}, disk_cache), config)
    c = complete(config)
    name, shared = str(c["task-suite"]), bool(c["shared-head"])
    num_tasks, task = int(c["num-tasks"]), int(c["dirichlet-task"])  # type: ignore[call-overload]
    kwargs: dict[str, object] = {"seed": int(c["suite-seed"])}  # type: ignore[call-overload]
    if str(c["model"]):
        kwargs["model"] = str(c["model"])
    layers = parse_federated_layers(str(c["federated-layers"]))
    if layers is not None:
        kwargs["federated_layers"] = layers
    if name in ("text", "local") and not c["frozen-prefix-cache"]:  # on: the suites' default
        kwargs["frozen_prefix_cache"] = False
    if name in ("text", "local") and disk_cache is not None:
        kwargs["disk_cache"] = disk_cache
    if name == "causal":
        kwargs["metric"] = str(c["causal-metric"])
    if name == "quadratic":
        dim, spread, curvature, noise = (c[key] for key in QUADRATIC_KEYS)
        kwargs.update(dim=dim, spread=spread, curvature_spread=curvature, noise=noise)
    if name == "local":
        kwargs["paths"] = data_paths(str(c["data-paths"]))
        kwargs["num_tasks"] = None if shared else num_tasks
    else:  # shared-head: the base suite only needs the tasks up to the one that is split
        kwargs["num_tasks"] = task + 1 if shared else num_tasks
    mixing = float(c["mixing"])  # type: ignore[arg-type]
    if not shared:
        return make_suite(name, mixing=mixing, **kwargs)
    from fl_sim.suites.shared_head import SharedHeadSuite

    suite = SharedHeadSuite(
        make_suite(name, **kwargs),
        num_tasks,
        task_index=task,
        alpha=float(c["dirichlet-alpha"]),  # type: ignore[arg-type]
    )
    suite.mixing = mixing
    return suite


__all__ = [
    "SUITE_DEFAULTS",
    "SUITE_KEYS",
    "build_suite",
    "check_suite_config",
    "complete",
    "data_paths",
    "parse_federated_layers",
]
