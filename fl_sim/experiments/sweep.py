"""``fl-sim sweep``: a grid of runs over run-config knobs, resumable, one row per run in sweep.csv.

A sweep is a ``base`` (run-config keys every point shares) and a ``grid`` (run-config key → list
of values). The cartesian product of the grid values gives the points; each point is one
``RunConfig`` (a compare experiment by default, or ``experiment = "single"``) that writes to
``DIR/points/<slug>``, the slug being made of its grid values (``multi-rounds=3__rho=0.5``).
Every point is parsed and validated before anything runs.

Points that share the federation (``suite_config()``: task suite, num-tasks, seed) run in ONE
``simulate`` call, so Ray starts once per group; the update cache (clients/update_cache.py)
makes every client train each (task, knobs, round, weights) once across the whole sweep.

Resuming is by content, not by bookkeeping. A point is finished when its ``experiment.json``
(compare) or ``results.json`` (single, status completed) exists and records the point's config;
finished points are skipped. In an unfinished point, a run whose ``results.json`` is complete
and records the run's config is kept too (a kill loses at most the runs in flight); everything
else under the point's folder is discarded and rerun. Every file is written atomically (temp
file, then ``os.replace``), so a SIGKILL never leaves a file that looks finished.

Written to ``DIR``:

- ``sweep.json``: the manifest: base, grid, and per point its values, config, status (pending,
  running, finished, failed), start and finish times, and how many of its runs were kept;
- ``sweep.csv``: one row per point × rule × mode (one-shot / multi-round): the grid values,
  test accuracy, normalised accuracy, β, χ²(p‖w), ζ² ratios and seconds (each the mean over
  the point's training seeds, ``seeds``), then n_seeds, the means and 95% CI half-widths over
  seeds and the paired difference to task_arithmetic (compare.py ``summary_rows``);
- ``sweep_seeds.csv``: one row per point × rule × mode × seed, with a ``training_seed`` column
  (``seed`` may be a grid key);
- ``plots/normalized_accuracy_vs_<key>.png``: one per grid key (fl_sim/experiments/sweep_plots.py);
- ``points/<slug>/``: each point's experiment (``fl-sim run``'s files).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the backport Flower depends on
    import tomli as tomllib  # type: ignore[no-redef]

from fl_sim.config.run_config import ConfigValue, RunConfig, parse_override
from fl_sim.errors import ConfigError, FlSimError
from fl_sim.outputs import read_json

MANIFEST = "sweep.json"
MANIFEST_FORMAT = "fl-sim-sweep/1"
CSV_NAME = "sweep.csv"
SEEDS_CSV_NAME = "sweep_seeds.csv"
POINTS = "points"
RESERVED_KEYS = ("results-dir",)  # the sweep sets it: DIR/points/<slug>
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_SLUG = 120

SWEEP_DESCRIPTION = """\
Run a grid of federated runs: every combination of the values in the grid is one point, and
every point is a run config (as `fl-sim run` takes) that writes to DIR/points/<slug>. A point
is a compare experiment (every rule, one-shot and multi-round) unless experiment = "single".

The grid comes from --config SWEEP.toml and/or --grid flags; the knobs every point shares from
the TOML's [base] table (or a [tool.flwr.app.config] table, or flat keys) and --set flags:

    [base]                       # run-config keys shared by every point (fl-sim run --help)
    task-suite = "digits"
    rules = "task_arithmetic,fedavg,fednova"

    [grid]                       # run-config key = list of values; points = cartesian product
    preset = ["homogeneous", "lr-hetero", "both"]
    multi-rounds = [1, 3, 5]

--grid KEY=V1,V2 adds a key or replaces the file's values for it (a value that holds commas
itself, like a per-client lr list, needs TOML: --grid 'lr=["0.1,0.05", 0.1]'). results-dir is
set by the sweep. Every point is validated before anything runs.

Resumable: a killed sweep, started again with --resume, skips every finished point (its
experiment.json or results.json records the same config) and keeps the finished runs of an
unfinished point; the rest is rerun (clients' updates come back from the update cache).
`fl-sim sweep --out DIR --resume` alone reads the grid and base back from DIR/sweep.json."""

SWEEP_EPILOG = """\
examples:
  fl-sim sweep --grid preset=homogeneous,lr-hetero,both --grid multi-rounds=1,3,5 --out sw/hetero
  fl-sim sweep --config sweep.toml --out sw/rho --dry-run     # list the points, run nothing
  fl-sim sweep --config sweep.toml --out sw/rho
  fl-sim sweep --out sw/rho --resume                          # after a kill: finish the rest
  fl-sim sweep --set experiment=single --set strategy=fedgma --grid rho=0.2,0.5,0.8 --out sw/g

written to DIR (--out):
  sweep.json     manifest: base, grid; per point its values, config, status, times
  sweep.csv      one row per point x rule x mode: the grid values, point, rule, mode, rounds,
                 beta, selected_lambda, test_mean_accuracy, test_mean_normalized_accuracy,
                 chi_square, zeta_square_ratio_theta0, zeta_square_ratio_final,
                 trained_clients, seconds (means over seeds), n_seeds,
                 test_mean_accuracy_mean/_ci95, test_mean_normalized_accuracy_mean/_ci95,
                 delta_vs_task_arithmetic_mean/_ci95
  sweep_seeds.csv one row per point x rule x mode x seed (seeds = n: n training seeds)
  plots/         normalized_accuracy_vs_<key>.png per grid key: one line per rule and mode,
                 averaged over the other grid keys
  points/<slug>/ each point's results (experiment.json/csv and plots, or results.json)"""


# ---------------------------------------------------------------------------------------------
# The sweep: base, grid, points
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepSpec:
    """What a sweep runs: the shared run-config keys and the grid (key → values, in order)."""

    base: dict[str, ConfigValue] = field(default_factory=dict)
    grid: dict[str, list[ConfigValue]] = field(default_factory=dict)


@dataclass(frozen=True)
class SweepPoint:
    """One combination of grid values, its folder name and its validated RunConfig."""

    slug: str
    values: dict[str, ConfigValue]
    config: RunConfig

    @property
    def folder(self) -> Path:
        return Path(self.config.output.results_dir)

    def runs(self) -> list[RunConfig]:
        """The runs of the point (itself for single, the compare runs otherwise)."""
        from fl_sim.experiments.compare import expand_experiment

        return expand_experiment(self.config)


def run_config_keys() -> list[str]:
    return list(RunConfig().to_mapping())


def parse_grid_flag(text: str) -> tuple[str, list[ConfigValue]]:
    """``"rho=0.2,0.5"`` → ("rho", [0.2, 0.5]); ``'lr=["0.1,0.05", 0.1]'`` reads a TOML list."""
    key, sep, raw = text.partition("=")
    key, raw = key.strip(), raw.strip()
    if not sep or not key or not raw:
        raise ConfigError(f"--grid {text!r} is not KEY=V1,V2,... (e.g. --grid rho=0.2,0.5,0.8)")
    if raw.startswith("["):
        try:
            values = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"--grid {key}: {raw!r} is not a TOML list ({error})") from None
        return key, _grid_values(key, values, where="--grid")
    items = [item.strip() for item in raw.split(",")]
    if any(not item for item in items):
        raise ConfigError(f"--grid {key}: empty value in {raw!r} (e.g. --grid {key}=V1,V2)")
    return key, [parse_override(f"{key}={item}")[1] for item in items]


def _grid_values(key: str, values: object, *, where: str) -> list[ConfigValue]:
    if not isinstance(values, list) or not values:
        raise ConfigError(
            f"{where}: grid key {key} needs a non-empty list of values, got {values!r} "
            f"(e.g. {key} = [0.2, 0.5])"
        )
    for value in values:
        if isinstance(value, (list, dict)) or not isinstance(value, (bool, int, float, str)):
            raise ConfigError(
                f"{where}: grid key {key}: every value must be a number, true/false or a string, "
                f"got {value!r}"
            )
    return list(values)


def read_sweep_toml(path: str | Path) -> SweepSpec:
    """SWEEP.toml: ``[grid]`` plus ``[base]`` / ``[tool.flwr.app.config]`` / flat run keys."""
    path = Path(path)
    try:
        with path.open("rb") as file:
            document = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(
            f"sweep config {path} does not exist (give --config SWEEP.toml)"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"sweep config {path} is not valid TOML: {error}") from None
    base: dict[str, ConfigValue] = {}
    pyproject = document.get("tool", {}).get("flwr", {}).get("app", {}).get("config")
    if pyproject is not None:
        base.update(pyproject)
    for key, value in document.items():
        if key in ("base", "grid", "tool"):
            continue
        if isinstance(value, dict):
            if pyproject is None:  # a pyproject's [project] etc. are fine; a typo is not
                raise ConfigError(
                    f"sweep config {path}: unknown table [{key}]; use [base] and [grid]"
                )
            continue
        base[key] = value
    table = document.get("base", {})
    if not isinstance(table, dict) or any(isinstance(v, (dict, list)) for v in table.values()):
        raise ConfigError(f"sweep config {path}: [base] must hold run-config keys = one value")
    base.update(table)
    grid_table = document.get("grid", {})
    if not isinstance(grid_table, dict):
        raise ConfigError(f"sweep config {path}: grid must be a table, e.g. [grid] rho = [0.2]")
    grid = {
        key: _grid_values(key, values, where=f"sweep config {path}")
        for key, values in grid_table.items()
    }
    return SweepSpec(base=base, grid=grid)


def build_spec(
    config_path: str | Path | None = None,
    grid_flags: Iterable[str] = (),
    overrides: Iterable[str] = (),
) -> SweepSpec:
    """SWEEP.toml, then ``--grid`` (adds or replaces a key), then ``--set`` on the base."""
    spec = read_sweep_toml(config_path) if config_path is not None else SweepSpec()
    base, grid = dict(spec.base), dict(spec.grid)
    for key in RESERVED_KEYS:  # a pyproject table carries results-dir: the sweep sets it
        base.pop(key, None)
    seen: set[str] = set()
    for text in grid_flags:
        key, values = parse_grid_flag(text)
        if key in seen:
            raise ConfigError(f"--grid {key} is given twice; list every value in one flag")
        seen.add(key)
        grid[key] = values
    for text in overrides:
        key, value = parse_override(text)
        if key in grid:
            raise ConfigError(
                f"--set {key} and the grid both set {key}; drop one (the grid gives every point "
                f"its own {key})"
            )
        if key in RESERVED_KEYS:
            raise ConfigError(f"--set {key}: the sweep sets it (DIR/points/<slug>); use --out DIR")
        base[key] = value
    return SweepSpec(base=base, grid=grid)


def point_slug(values: Mapping[str, ConfigValue]) -> str:
    """A stable, filesystem-safe folder name: ``key=value`` joined by ``__``, keys sorted.

    Characters outside [A-Za-z0-9._+-] become '-', and then (or when the name is long) an
    8-hex SHA-256 of the exact values is appended, so two points never share a folder.
    """
    parts, lossy = [], False
    for key in sorted(values):
        text = _value_text(values[key])
        safe = _UNSAFE.sub("-", text)
        lossy = lossy or safe != text
        parts.append(f"{key}={safe}")
    slug = "__".join(parts)
    if lossy or len(slug) > _MAX_SLUG:
        canonical = json.dumps({k: values[k] for k in sorted(values)}, sort_keys=True)
        digest = hashlib.sha256(canonical.encode()).hexdigest()[:8]
        slug = f"{slug[: _MAX_SLUG - 9]}-{digest}"
    return slug


def _value_text(value: ConfigValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def expand_sweep(spec: SweepSpec, out: str | Path) -> list[SweepPoint]:
    """Every point of the grid (cartesian product, first grid key slowest), each validated.

    A bad key or value is a one-line ``ConfigError`` naming the point, raised before anything
    runs: ``sweep point rho=1.5: rho must be in [0, 1], got 1.5 (set rho=0.5)``.
    """
    known = set(run_config_keys())
    if not spec.grid:
        raise ConfigError(
            "sweep: the grid is empty; give [grid] in SWEEP.toml or --grid KEY=V1,V2 "
            "(one run: fl-sim run)"
        )
    for where, keys in (("grid", spec.grid), ("base", spec.base)):
        for key in keys:
            if key not in known:
                raise ConfigError(
                    f"sweep {where}: unknown run-config key {key!r} (see fl-sim run --help)"
                )
            if key in RESERVED_KEYS:
                raise ConfigError(f"sweep {where}: {key} is set by the sweep; use --out DIR")
    keys = list(spec.grid)
    points: list[SweepPoint] = []
    by_slug: dict[str, dict[str, ConfigValue]] = {}
    for combination in itertools.product(*(spec.grid[key] for key in keys)):
        values = dict(zip(keys, combination, strict=True))
        label = ",".join(f"{k}={_value_text(v)}" for k, v in values.items())
        slug = point_slug(values)
        if slug in by_slug:
            raise ConfigError(
                f"sweep points {label} and "
                f"{','.join(f'{k}={_value_text(v)}' for k, v in by_slug[slug].items())} "
                "are the same point; list each grid value once"
            )
        by_slug[slug] = values
        mapping = {**spec.base, **values, "results-dir": str(Path(out) / POINTS / slug)}
        try:
            config = RunConfig.from_mapping(mapping)
            point = SweepPoint(slug=slug, values=values, config=config)
            point.runs()  # a compare point's expanded runs are validated too
        except ConfigError as error:
            raise ConfigError(f"sweep point {label}: {error}") from None
        points.append(point)
    return points


# ---------------------------------------------------------------------------------------------
# What is finished (by content: the stored config must be the point's)
# ---------------------------------------------------------------------------------------------


def same_config(stored: object, config: RunConfig) -> bool:
    """True when ``stored`` (a results file's config mapping) parses to ``config``.

    results-dir is left out (the file's location says it), and keys added to RunConfig since
    the file was written take their defaults, so an old result still counts.
    """
    if not isinstance(stored, Mapping):
        return False
    try:
        parsed = RunConfig.from_mapping({**stored, "results-dir": config.output.results_dir})
    except (ConfigError, TypeError):
        return False
    return parsed == config


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        document = read_json(path)  # fl_sim/outputs.py: "inf" strings back to floats
    except (OSError, ValueError):
        return None
    return document if isinstance(document, dict) else None


def run_finished(run: RunConfig) -> bool:
    """A run's results.json says completed, records ``run`` and its results.csv is there."""
    folder = Path(run.output.results_dir)
    results = _read_json(folder / "results.json")
    return (
        results is not None
        and results.get("status") == "completed"
        and same_config(results.get("config"), run)
        and (folder / "results.csv").is_file()
    )


def point_finished(point: SweepPoint) -> bool:
    """compare: experiment.json (and .csv) record the point's config; single: run_finished
    for each of its runs (one per training seed)."""
    if point.config.experiment.kind == "single":  # one run per training seed of `seeds`
        return all(run_finished(run) for run in point.runs())
    summary = _read_json(point.folder / "experiment.json")
    return (
        summary is not None
        and same_config(summary.get("config"), point.config)
        and (point.folder / "experiment.csv").is_file()
    )


def _discard_stale(folder: Path, keep: set[Path]) -> None:
    """Remove everything under ``folder`` but the folders in ``keep`` (rename first: atomic)."""
    if not folder.is_dir():
        return
    for child in sorted(folder.iterdir()):
        if child in keep:
            continue
        if any(child in kept.parents for kept in keep):
            _discard_stale(child, keep)
            continue
        trash = folder / f".discarded-{child.name}-{secrets.token_hex(4)}"
        os.replace(child, trash)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash)
        else:
            trash.unlink()


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def run_group(
    configs: Sequence[RunConfig],
    *,
    ray_address: str | None = None,
    progress: bool = True,
    verbose: bool = False,
) -> None:
    """Run ``configs`` (one federation) on one Ray start; each writes its results-dir."""
    from fl_sim.federation.simulation import simulate

    simulate(configs, ray_address=ray_address, progress=progress, verbose=verbose)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Manifest:
    """``DIR/sweep.json``, rewritten atomically after every change."""

    def __init__(self, out: Path, spec: SweepSpec, points: Sequence[SweepPoint]) -> None:
        self.path = out / MANIFEST
        previous = _read_json(self.path) or {}
        earlier = {p.get("slug"): p for p in previous.get("points") or [] if isinstance(p, dict)}
        self.document: dict[str, object] = {
            "format": MANIFEST_FORMAT,
            "status": "running",
            "started": previous.get("started") or _now(),
            "updated": _now(),
            "base": spec.base,
            "grid": spec.grid,
            "points": [],
            "files": {"csv": CSV_NAME, "plots": []},
        }
        self.entries: dict[str, dict[str, object]] = {}
        for point in points:
            before = earlier.get(point.slug) or {}
            entry = {
                "slug": point.slug,
                "folder": f"{POINTS}/{point.slug}",
                "values": point.values,
                "experiment": point.config.experiment.kind,
                "status": "pending",
                "started": before.get("started"),
                "finished": before.get("finished"),
                "runs": None,
                "kept_runs": None,
                "run_seconds": before.get("run_seconds"),
                "error": None,
                "config": point.config.to_mapping(),
            }
            self.entries[point.slug] = entry
            self.document["points"].append(entry)  # type: ignore[union-attr]
        self.left_out = sorted(slug for slug in earlier if slug not in self.entries)

    def update(self, point: SweepPoint, **values: object) -> None:
        self.entries[point.slug].update(values)

    def save(self, status: str | None = None) -> None:
        from fl_sim.outputs import write_json

        if status is not None:
            self.document["status"] = status
        self.document["updated"] = _now()
        write_json(self.path, self.document, default=str)


@dataclass
class SweepOutcome:
    points: list[SweepPoint]
    skipped: list[str]
    finished: list[str]
    failed: dict[str, str]
    rows: list[dict[str, object]]
    plots: list[Path]


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    resume: bool = False,
    ray_address: str | None = None,
    progress: bool = True,
    verbose: bool = False,
    log: Callable[[str], None] = print,
) -> SweepOutcome:
    """Run every unfinished point (module docstring); returns what was skipped, run, failed."""
    out = Path(out)
    if not resume and ((out / MANIFEST).exists() or (out / POINTS).exists()):
        raise ConfigError(
            f"{out} already holds a sweep: add --resume to finish it (finished points are "
            "skipped), or choose another --out"
        )
    points = expand_sweep(spec, out)
    manifest = Manifest(out, spec, points)
    skipped = [p.slug for p in points if point_finished(p)]
    if skipped:
        log(f"skipping {len(skipped)} finished point{'s' if len(skipped) != 1 else ''}")
    if manifest.left_out:
        log(
            f"{len(manifest.left_out)} point(s) of the earlier sweep are not in this grid "
            f"(left in {out / POINTS})"
        )
    for point in points:
        if point.slug in skipped:
            manifest.update(point, status="finished", runs=len(point.runs()))
    manifest.save()

    groups: dict[tuple[tuple[str, object], ...], list[SweepPoint]] = {}
    for point in points:
        if point.slug not in skipped:
            key = tuple(sorted(point.config.suite_config().items()))
            groups.setdefault(key, []).append(point)
    finished, failed = list(skipped), {}
    varying = {k for k, _ in itertools.chain(*groups) if len({dict(g)[k] for g in groups}) > 1}
    for number, (key, group) in enumerate(groups.items(), start=1):
        todo: list[RunConfig] = []
        kept_total = 0
        for point in group:
            runs = point.runs()
            kept = [run for run in runs if run_finished(run)]
            _discard_stale(point.folder, {Path(run.output.results_dir) for run in kept})
            todo += [run for run in runs if run not in kept]
            kept_total += len(kept)
            manifest.update(
                point,
                status="running",
                started=_now(),
                finished=None,
                runs=len(runs),
                kept_runs=len(kept),
                error=None,
            )
        manifest.save()
        shown = ("task-suite", "num-tasks", "suite-seed", *sorted(varying))
        federation = ", ".join(f"{k}={v}" for k, v in key if k in shown)
        log(
            f"group {number}/{len(groups)} ({federation}): {len(group)} point(s), "
            f"{len(todo)} run(s) to run, {kept_total} finished run(s) kept"
        )
        error = None
        if todo:
            try:
                run_group(todo, ray_address=ray_address, progress=progress, verbose=verbose)
            except FlSimError as failure:  # the runs before the failure are written: keep them
                error = str(failure)
        for point in group:
            status, message = _finish_point(point, error)
            manifest.update(point, status=status, error=message)
            if status == "finished":
                manifest.update(point, finished=_now(), run_seconds=_run_seconds(point))
                finished.append(point.slug)
            else:
                failed[point.slug] = message or "unfinished"
            log(f"  {point.slug}: {status}" + (f" ({message})" if message else ""))
        manifest.save()
        write_sweep_csv(out, spec, [p for p in points if p.slug in finished])

    done = [p for p in points if p.slug in finished]
    rows = write_sweep_csv(out, spec, done)
    from fl_sim.experiments.sweep_plots import draw_sweep_plots

    plots = draw_sweep_plots(out / "plots", spec.grid, rows) if rows else []
    manifest.document["files"] = {
        "csv": CSV_NAME,
        "plots": [str(p.relative_to(out)) for p in plots],
    }
    manifest.save("failed" if failed else "finished")
    return SweepOutcome(points, skipped, finished, failed, rows, plots)


def _finish_point(point: SweepPoint, error: str | None) -> tuple[str, str | None]:
    """('finished', None) once every run completed (compare: experiment.json written)."""
    from fl_sim.experiments.compare import write_experiment

    runs = point.runs()
    if not all(run_finished(run) for run in runs):
        return "failed", error or "a run did not complete"
    if point.config.experiment.kind == "compare":
        results = [_read_json(Path(run.output.results_dir) / "results.json") for run in runs]
        write_experiment(point.config, results)  # type: ignore[arg-type]
    return "finished", None


def _run_seconds(point: SweepPoint) -> float:
    total = 0.0
    for run in point.runs():
        results = _read_json(Path(run.output.results_dir) / "results.json") or {}
        total += float((results.get("timings") or {}).get("total_seconds") or 0.0)
    return total


# ---------------------------------------------------------------------------------------------
# sweep.csv
# ---------------------------------------------------------------------------------------------


def point_rows(point: SweepPoint) -> list[dict[str, object]]:
    """One row per rule × mode × seed of a finished point, its grid values first."""
    from fl_sim.experiments.compare import MULTI_ROUND, ONE_SHOT, summarize

    if point.config.experiment.kind == "compare":
        summary = _read_json(point.folder / "experiment.json") or {}
        rows = list(summary.get("rows") or [])
    else:
        results = [
            _read_json(Path(run.output.results_dir) / "results.json") or {} for run in point.runs()
        ]
        rows = summarize(point.config, results)["rows"]
        for row in rows:
            row["rule"] = point.config.rule.strategy
            row["mode"] = ONE_SHOT if point.config.rule.num_rounds == 1 else MULTI_ROUND
    table = []
    for row in rows:
        scalars = {k: v for k, v in row.items() if not isinstance(v, (list, dict))}
        scalars["selected_lambda"] = scalars.pop("lambda", None)  # `lambda` is also a grid key
        scalars["training_seed"] = scalars.pop("seed", None)  # and so is `seed`
        table.append({**point.values, "point": point.slug, **scalars})
    return table


def point_summary_rows(point: SweepPoint) -> list[dict[str, object]]:
    """One row per rule × mode of a finished point: its grid values, each per-run column as
    the mean over the seeds (the value itself when the seeds agree, as with one seed; a flag:
    any), then the summary columns (n_seeds, mean and ci95 over seeds, the paired Δ)."""
    from fl_sim.experiments.compare import summary_rows

    rows = point_rows(point)
    groups: dict[tuple[str, str], list[dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((str(row["rule"]), str(row["mode"])), []).append(row)
    paired = [{**r, "seed": r["training_seed"]} for r in rows]  # pair the Δ by training seed
    summaries = {(r["rule"], r["mode"]): r for r in summary_rows(paired)}
    table = []
    for key, members in groups.items():
        merged = {
            column: _mean_over_seeds([m.get(column) for m in members])
            for column in members[0]
            if column != "training_seed"
        }
        table.append({**merged, **summaries[key]})
    return table


def _mean_over_seeds(values: list[object]) -> object:
    if all(v == values[0] for v in values):
        return values[0]
    if all(isinstance(v, bool) or v is None for v in values):
        return any(values)
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numbers and all(v is None or v in numbers for v in values):
        return sum(numbers) / len(numbers)
    return None


def write_sweep_csv(
    out: Path, spec: SweepSpec, points: Sequence[SweepPoint]
) -> list[dict[str, object]]:
    """``DIR/sweep.csv`` (atomically) with a row per point × rule × mode (means over seeds and
    the ci95 columns) and ``DIR/sweep_seeds.csv`` with a row per point × rule × mode × seed;
    returns sweep.csv's rows."""
    from fl_sim.outputs import write_csv

    for name, rows_of in ((SEEDS_CSV_NAME, point_rows), (CSV_NAME, point_summary_rows)):
        rows = [row for point in points for row in rows_of(point)]
        columns: list[str] = [*spec.grid, "point"]
        for row in rows:
            columns += [key for key in row if key not in columns]
        write_csv(out / name, rows, columns)
    return rows


# ---------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep",
        help="run a grid of federations (knob × rule), resumable; sweep.csv and plots",
        description=SWEEP_DESCRIPTION,
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config", metavar="SWEEP.toml", help="[base] run-config keys and a [grid] table"
    )
    parser.add_argument(
        "--grid",
        dest="grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2,...",
        help="a grid key and its values (repeatable), e.g. --grid rho=0.2,0.5,0.8",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a run-config key every point shares (repeatable), e.g. --set task-suite=toy",
    )
    parser.add_argument(
        "--out", default="sweep", metavar="DIR", help="the sweep's folder (default: sweep)"
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue the sweep in DIR: skip finished points, rerun the rest",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and list the points; run nothing"
    )
    parser.add_argument(
        "--ray-address",
        nargs="?",
        const="auto",
        metavar="ADDR",
        help="run on an existing Ray cluster (`ray start --head`); without ADDR: auto",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.set_defaults(func=sweep_command)


def sweep_command(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if args.resume and not (args.config or args.grid or args.overrides):
        spec = _spec_from_manifest(out)
    else:
        spec = build_spec(args.config, args.grid, args.overrides)
    if args.dry_run:
        points = expand_sweep(spec, out)
        for point in points:
            state = "finished" if point_finished(point) else "to run"
            print(
                f"{point.slug}  ({point.config.experiment.kind}, {len(point.runs())} runs, {state})"
            )
        print(f"{len(points)} points; grid: {', '.join(spec.grid)}")
        return 0
    outcome = run_sweep(
        spec,
        out,
        resume=args.resume,
        ray_address=args.ray_address,
        progress=not args.no_progress,
        verbose=args.verbose,
    )
    print(f"sweep: {len(outcome.finished)} of {len(outcome.points)} points finished")
    print(f"results: {out / CSV_NAME}, {out / MANIFEST}; plots: {out / 'plots'}/")
    if outcome.failed:
        slug, message = next(iter(outcome.failed.items()))
        raise FlSimError(
            f"{len(outcome.failed)} point(s) failed, first {slug}: {message} "
            f"(fl-sim sweep --out {out} --resume retries them)"
        )
    return 0


def _spec_from_manifest(out: Path) -> SweepSpec:
    document = _read_json(out / MANIFEST)
    if document is None or not isinstance(document.get("grid"), dict):
        raise ConfigError(
            f"--resume without --config/--grid reads {out / MANIFEST}, which is missing or "
            "unreadable; give the sweep's --config/--grid/--set again"
        )
    return SweepSpec(base=dict(document.get("base") or {}), grid=dict(document["grid"]))


__all__ = [
    "SweepOutcome",
    "SweepPoint",
    "SweepSpec",
    "add_sweep_parser",
    "build_spec",
    "expand_sweep",
    "parse_grid_flag",
    "point_finished",
    "point_slug",
    "read_sweep_toml",
    "run_finished",
    "run_group",
    "run_sweep",
    "same_config",
    "write_sweep_csv",
]
