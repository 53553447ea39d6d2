"""The house rules of the code base, checked: no import cycle between modules or packages, the
rule layer never reads the run config, and everything a front end shows about the rules is
derived from the registry (pyproject's run-config table, the README's rule table, --help)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fl_sim.config.run_config import RunConfig, help_text, toml_table
from strategies.flower_strategy import STRATEGIES
from strategies.registry import RULES, all_knob_infos, rule_table

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fl_sim", "strategies", "clients")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imported_modules(path: Path) -> set[str]:
    """Project modules ``path`` imports, at any depth (function-level imports count too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    found = set()
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name:
            found.add(name)
    return found


GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def package_of(module: str) -> str:
    """``fl_sim.<package>`` for modules of fl_sim's subpackages, else the top-level package
    (``strategies``, ``clients``); fl_sim's own leaf modules (errors, outputs) stand alone."""
    parts = module.split(".")
    if parts[0] == "fl_sim" and len(parts) >= 2:
        return ".".join(parts[:2])
    return parts[0]


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one node (the cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_through_a_cycle():
    assert strongly_connected(GRAPH) == []


def test_no_package_cycle():
    packages: dict[str, set[str]] = {}
    for module, deps in GRAPH.items():
        for dep in deps:
            if package_of(dep) != package_of(module) and package_of(dep) != "fl_sim":
                packages.setdefault(package_of(module), set()).add(package_of(dep))
    assert strongly_connected(packages) == []
    assert "fl_sim.config" not in packages.get("strategies", set())


def test_the_rules_never_read_the_run_config():
    for module, deps in GRAPH.items():
        if module.startswith("strategies"):
            assert not any(d.startswith("fl_sim.config") for d in deps), (module, deps)


def test_every_rule_is_a_strategy_a_merge_method_and_run_config_keys():
    assert set(STRATEGIES) == set(RULES)
    for name, cls in STRATEGIES.items():
        assert cls.rule_name == name and cls.__name__.endswith("Strategy")
    keys = RunConfig().to_mapping()
    infos = all_knob_infos()
    assert len({info.key for info in infos}) == len(infos), "a run-config key names two knobs"
    for info in infos:
        assert info.key in keys and f"  {info.key} = " in help_text()
        assert RunConfig.from_mapping({info.key: info.default}).to_mapping()[info.key] == (
            info.default
        )
    by_flag: dict[str, set[str]] = {}
    for info in infos:
        by_flag.setdefault(info.flag, set()).add(info.kind)
    assert all(len(kinds) == 1 for kinds in by_flag.values()), by_flag  # a shared flag: one type


def test_pyproject_run_config_table_is_generated_from_the_sections_and_registry():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    table = re.search(r"\[tool\.flwr\.app\.config\]\n(?:.+\n)+", pyproject)
    assert table is not None
    assert table.group(0) == toml_table(), (
        "pyproject's [tool.flwr.app.config] is out of date: paste "
        "`python -c 'from fl_sim.config.run_config import toml_table; print(toml_table())'`"
    )


def test_readme_rule_table_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    begin, end = "<!-- rule-table: begin -->\n", "<!-- rule-table: end -->"
    assert begin in readme and end in readme
    table = readme.split(begin, 1)[1].split(end, 1)[0]
    assert table == rule_table(), (
        "README's rule table is out of date: paste "
        "`python -c 'from strategies.registry import rule_table; print(rule_table())'`"
    )


@pytest.mark.parametrize("command", ["run", "merge"])
def test_help_lists_every_rule_and_its_knobs(command):
    done = subprocess.run(
        [sys.executable, "-m", "fl_sim.cli.main", command, "--help"],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    for name in RULES:
        assert name in done.stdout
    for info in all_knob_infos():
        assert (info.key if command == "run" else info.flag) in done.stdout
