"""Every knob of a federated run: flat kebab-case keys in, typed frozen sections out.

A run's knobs come from one flat mapping (``num-rounds = 3``): Flower's ``context.run_config``
under ``flwr run`` (pyproject ``[tool.flwr.app.config]`` plus ``--run-config`` overrides), or,
under ``fl-sim run``, a TOML file plus ``--set key=value`` overrides. ``run_simulation`` hands the
ServerApp an *empty* run config, so the defaults live in the sections, not in pyproject (a test
checks that pyproject's table is ``toml_table()``). ``RunConfig.from_mapping`` parses the keys
into sections, each validated once on construction:

    experiment  ExperimentSection  experiment, rules, compare-beta-grid, multi-rounds, ...
    rule        RuleSection        strategy, num-rounds, server-lr, lambda, weighting, the β/λ
                                   grids, and every registered rule's knobs (strategies/)
    training    TrainingSection    lr, local-steps, schedule, optimizer, ..., a-norm, update cache
    suite       SuiteSection       seed, task-suite, num-tasks, model, data, mixing, shared head
    output      OutputSection      results-dir, eval-split, diagnostic-batch, resume
    engine      EngineSection      min-clients, round-timeout, server-device, client resources,
                                   eval-workers, concurrent-runs
    faults      FaultSection       fail-client/round, byzantine, crash, slow

Unknown keys, wrong types and bad values are a one-line ``ConfigError`` that names the key and
the fix; after parsing the values are trusted. Only the ServerApp (and the CLI) parse a
RunConfig; the Flower strategy gets the rule section, clients get what they need in the
ConfigRecord of every message, so a client behaves the same under ``run_simulation``,
``flwr run`` and the deployment engine.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import Field, dataclass, field, fields
from pathlib import Path

from clients.knobs import TrainingKnobs, client_knobs
from fl_sim.config.keys import (
    ConfigValue,
    coerce,
    parse_override,
    read_toml,
    toml_value,
)
from fl_sim.config.sections import (
    EVAL_SPLITS,
    MAX_SEED,
    NO_PRESET,
    SERVER_DEVICES,
    EngineSection,
    ExperimentSection,
    Faults,
    FaultSection,
    OutputSection,
    SuiteSection,
    TrainingSection,
)
from fl_sim.errors import ConfigError
from strategies.paper_defaults import PAPER_CHOICES, paper_values
from strategies.registry import RULES, all_knob_infos
from strategies.rule_section import WEIGHTINGS, RuleSection
from strategies.rule_spec import KnobInfo
from strategies.server_step import parse_grid

SECTIONS: dict[str, type] = {  # attribute of RunConfig → its section, in key order
    "experiment": ExperimentSection,
    "rule": RuleSection,
    "training": TrainingSection,
    "suite": SuiteSection,
    "output": OutputSection,
    "engine": EngineSection,
    "faults": FaultSection,
}


def _section_fields() -> Iterator[tuple[str, Field]]:
    for section, cls in SECTIONS.items():
        for spec in fields(cls):
            if "key" in spec.metadata:
                yield section, spec


@dataclass(frozen=True)
class RunConfig:
    """The run's knobs by concern; ``to_mapping`` gives the flat keys back."""

    experiment: ExperimentSection = field(default_factory=ExperimentSection)
    rule: RuleSection = field(default_factory=RuleSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    suite: SuiteSection = field(default_factory=SuiteSection)
    output: OutputSection = field(default_factory=OutputSection)
    engine: EngineSection = field(default_factory=EngineSection)
    faults: FaultSection = field(default_factory=FaultSection)

    def __post_init__(self) -> None:
        self._validate()

    # -- parsing -----------------------------------------------------------------------------

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> RunConfig:
        """Parse a flat kebab-case mapping (Flower's run_config); missing keys take defaults.

        With ``paper-defaults = true`` the keys of strategies/paper_defaults.py that are absent
        from the mapping take the paper's authors' values first; a key given explicitly wins."""
        section_keys = {
            spec.metadata["key"]: (section, spec) for section, spec in _section_fields()
        }
        knob_keys = {info.key: info for info in all_knob_infos()}
        if coerce("paper-defaults", "bool", values.get("paper-defaults", False)):
            values = {**paper_values(values), **values}  # only keys absent from the mapping
        kwargs: dict[str, dict[str, object]] = {section: {} for section in SECTIONS}
        knob_values: dict[str, dict[str, object]] = {name: {} for name in RULES}
        for key, value in values.items():
            if key in section_keys:
                section, spec = section_keys[key]
                kwargs[section][spec.name] = coerce(key, spec.metadata["kind"], value)
            elif key in knob_keys:
                info = knob_keys[key]
                knob_values[info.rule][info.field] = value
            else:
                raise ConfigError(f"unknown run-config key {key!r} (see fl-sim run --help)")
        knobs = {name: spec.knobs.from_values(knob_values[name]) for name, spec in RULES.items()}
        kwargs["rule"]["knobs"] = knobs
        sections = {section: SECTIONS[section](**kwargs[section]) for section in SECTIONS}
        return cls(**sections)

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
        values: dict[str, ConfigValue] = {}
        for section, spec in _section_fields():
            values[spec.metadata["key"]] = getattr(getattr(self, section), spec.name)
            if section == "rule" and spec.name == "lambda_grid":  # the rules' knobs follow
                for info in all_knob_infos():
                    values[info.key] = getattr(self.rule.knobs[info.rule], info.field)
        return values

    def paper_defaults(self) -> dict[str, object]:
        """For results.json: whether ``paper-defaults`` is on, the keys that hold the paper's
        value (``set``) and those an explicit key kept at another value (``kept``)."""
        values = self.to_mapping()
        choices = {c.key: c.value for c in PAPER_CHOICES}
        return {
            "enabled": self.rule.paper_defaults,
            "set": {
                k: v for k, v in choices.items() if self.rule.paper_defaults and values[k] == v
            },
            "kept": {
                k: values[k]
                for k, v in choices.items()
                if self.rule.paper_defaults and values[k] != v
            },
        }

    def updated(self, changes: Mapping[str, object]) -> RunConfig:
        """This config with some keys changed (kebab-case), parsed and validated as a whole."""
        return RunConfig.from_mapping({**self.to_mapping(), **changes})

    # -- what the run derives from the knobs ---------------------------------------------------

    def client_knobs(self) -> list[TrainingKnobs]:
        """One TrainingKnobs per task/client t = 0..T−1 (client t's seed is seed + t, or
        training-seed + t when that is set)."""
        t = self.training
        return client_knobs(
            self.suite.num_tasks,
            lr=t.lr,
            local_steps=t.local_steps,
            schedule=t.schedule,
            warmup_steps=t.warmup_steps,
            optimizer=t.optimizer,
            momentum=t.momentum,
            weight_decay=t.weight_decay,
            batch_size=t.batch_size,
            seed=self.training_seed(),
            preset=None if t.preset == NO_PRESET else t.preset,
        )

    def training_seed(self) -> int:
        """The clients' training seed: training-seed, or seed when it is -1 (the default)."""
        return self.suite.seed if self.training.training_seed < 0 else self.training.training_seed

    def seed_list(self) -> list[int]:
        """The training seeds of the experiment's repeats (``seeds``; [seed] by default)."""
        return self.experiment.seed_list(self.suite.seed)

    def declared_faults(self) -> Faults:
        """The declared faults (clients/fault_injection.py) for this run's T."""
        return self.faults.faults(self.suite.num_tasks)

    def suite_config(self) -> dict[str, ConfigValue]:
        """The keys a client needs to build the same task suite as the server."""
        return self.suite.suite_config()

    # -- validation across sections ------------------------------------------------------------

    def _validate(self) -> None:
        rule, experiment = self.rule, self.experiment
        if experiment.kind == "compare" and rule.strategy != "fedavg":
            raise ConfigError(
                f"experiment=compare runs every rule in `rules`; to run strategy={rule.strategy} "
                f"alone set experiment=single (or compare a subset: rules={rule.strategy},...)"
            )
        if experiment.kind == "compare" and (rule.num_rounds != 1 or rule.searches_server_lr):
            raise ConfigError(
                "experiment=compare runs every rule itself (one-shot with compare-beta-grid, "
                "multi-round with multi-rounds); set experiment=single to choose num-rounds or "
                "a grid for one strategy"
            )
        if experiment.kind == "compare":
            for name in experiment.rule_names():
                if name != "cclip":  # compare picks cclip's τ_c itself (tau-c-auto)
                    rule.check_usable(name)
        seeds = self.seed_list()
        if max(seeds) > MAX_SEED:
            raise ConfigError(f"seeds: seed + seeds − 1 must be ≤ {MAX_SEED}, got {max(seeds)}")
        if len(seeds) > 1 and self.training.training_seed >= 0:
            raise ConfigError(
                "seeds gives every repeat its own training-seed; drop training-seed "
                '(or list the training seeds in seeds, e.g. seeds="3,4,5")'
            )
        num_tasks = self.suite.num_tasks
        if self.engine.min_clients > num_tasks:
            raise ConfigError(
                f"min-clients must be ≤ num-tasks = {num_tasks}, got {self.engine.min_clients} "
                "(0 = every client must reply)"
            )
        self.declared_faults()  # byzantine, crash and slow entries are checked here, once
        try:
            self.client_knobs()  # lists, ranges and presets are checked here, once
        except OverflowError:  # e.g. local-steps = 1e999: name the knobs that were set
            given = [
                spec.metadata["key"]
                for spec in fields(TrainingSection)
                if spec.metadata.get("kind") == "knob"
                and getattr(self.training, spec.name) != spec.default
            ]
            raise ConfigError(
                f"{', '.join(given) or 'a training knob'}: a value is out of range "
                "(give finite numbers of a sensible size)"
            ) from None


def key_help() -> list[tuple[str, ConfigValue, str]]:
    """(key, default, help) for every run-config key, in ``to_mapping`` order."""
    helps = {spec.metadata["key"]: spec.metadata["help"] for _, spec in _section_fields()}
    helps.update({info.key: _knob_help(info) for info in all_knob_infos()})
    return [(key, default, helps[key]) for key, default in RunConfig().to_mapping().items()]


def _knob_help(info: KnobInfo) -> str:
    help = info.help if info.help.startswith(f"{info.rule}:") else f"{info.rule}: {info.help}"
    return f"{help} (fl-sim merge: {info.flag}; YAML: {info.yaml})"


def help_text(width: int = 100) -> str:
    """Every key, its default and what it does, for ``fl-sim run --help``."""
    lines = []
    for key, default, help in key_help():
        body = textwrap.fill(help, width=width, initial_indent=" " * 6, subsequent_indent=" " * 6)
        lines.append(f"  {key} = {toml_value(default)}\n{body}")
    return "\n".join(lines)


def toml_table(config: RunConfig | None = None) -> str:
    """``[tool.flwr.app.config]`` with every key (the defaults, or ``config``'s values)."""
    values = (config or RunConfig()).to_mapping()
    body = "\n".join(f"{key} = {toml_value(value)}" for key, value in values.items())
    return f"[tool.flwr.app.config]\n{body}\n"


__all__ = [
    "EVAL_SPLITS",
    "SERVER_DEVICES",
    "WEIGHTINGS",
    "RunConfig",
    "help_text",
    "key_help",
    "parse_grid",
    "parse_override",
    "read_toml",
    "toml_table",
]
