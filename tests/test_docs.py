"""The repository carries its own design (docs/design.md) and no reference that a clone lacks.

1. No file of the repository cites the team's working notes, which live outside it (the four
   upper-case ``*.md`` notes named in ``OUTSIDE_NOTES`` and paths into the notes' folder beside
   the checkout): a user who clones the repository never has them. docs/design.md is the design.
2. Every repository path that README.md, docs/design.md and benchmarks/README.md mention
   (``fl_sim/...py``, ``strategies/...py``, ``clients/...py``, ``tests/...py``,
   ``benchmarks/...py``, ``fl_sim/<package>``, ``docs/...``) exists, so a module that moves
   cannot leave a stale reference behind; and every ``tests/<file>.py::<test>`` that
   docs/design.md names is a test defined in that file.

Fast: reads text files only.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
THIS_FILE = "tests/test_docs.py"  # it spells out the patterns it looks for
DOCUMENTS = ("README.md", "docs/design.md", "benchmarks/README.md")
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}

OUTSIDE_NOTES = re.compile(
    r"\b(?:DESIGN|FLOWER|STYLE|DOCKER)\.md\b"  # the team's notes, by name
    r"|\.\./shared\b"  # the folder next to the checkout that holds them
    r"|(?<![\w.-])shared/"  # any path into a `shared` folder (there is none in the repository)
)
# A path ends before a character that cannot continue it; a final "." ends a sentence. A name
# with a placeholder (``strategies/<rule>.py``, ``digits_*.py``) is not a path and never matches.
_END = r"(?![\w/*<{-]|\.[\w/*<{-])"
REPO_PATHS = re.compile(
    r"(?<![\w/.$~-])("
    r"(?:fl_sim|strategies|clients|tests|benchmarks)/[\w/.-]*\.py"  # modules and scripts
    r"|fl_sim/\w+/?"  # the packages of fl_sim
    r"|docs/[\w/.-]*[\w/]"  # documents, plots and their data
    r")" + _END
)
NAMED_TESTS = re.compile(r"(tests/[\w/]+\.py)::(\w+)")


def repository_files() -> list[str]:
    """Tracked files and new ones git does not ignore (all files outside a git checkout)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        names = sorted({name for name in listed.split("\0") if name})
    except (OSError, subprocess.CalledProcessError):
        names = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".egg-info")]
            names += [(Path(folder) / f).relative_to(ROOT).as_posix() for f in files]
    return [name for name in names if (ROOT / name).is_file()]  # not deleted in the work tree


def read_text(name: str) -> str | None:
    """The file as text, or None when it is binary (a plot, a checkpoint)."""
    data = (ROOT / name).read_bytes()
    if b"\0" in data[:8192]:
        return None
    return data.decode("utf-8", errors="replace")


def test_no_file_cites_notes_outside_the_repository():
    found = []
    for name in repository_files():
        text = None if name == THIS_FILE else read_text(name)
        for number, line in enumerate((text or "").splitlines(), 1):
            if match := OUTSIDE_NOTES.search(line):
                found.append(f"{name}:{number}: {match.group(0)!r} in {line.strip()[:120]}")
    assert not found, (
        "these lines cite notes that a clone of the repository does not have; cite "
        "docs/design.md (and a section) instead, or explain in place:\n" + "\n".join(found)
    )


def mentioned_paths(document: str) -> list[tuple[int, str]]:
    text = (ROOT / document).read_text(encoding="utf-8")
    return [
        (number, match.group(1).rstrip("/"))
        for number, line in enumerate(text.splitlines(), 1)
        for match in REPO_PATHS.finditer(line)
    ]


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_path_a_document_mentions_exists(document):
    assert (ROOT / document).is_file(), f"{document} is missing"
    stale = [
        f"{document}:{number}: {path}"
        for number, path in mentioned_paths(document)
        if not (ROOT / path).exists()
    ]
    assert not stale, "these paths do not exist (moved or renamed?):\n" + "\n".join(stale)


def test_the_path_pattern_finds_paths_and_skips_placeholders():
    line = (
        "see fl_sim/merge/run.py, `strategies/ties.py` and docs/scale/. Not strategies/<rule>.py, "
        "fl_sim/suites/digits_*.py, clients/train_meta.json or ta/clients/client_0.py"
    )
    found = [m.group(1) for m in REPO_PATHS.finditer(line)]
    assert found == ["fl_sim/merge/run.py", "strategies/ties.py", "docs/scale/"]
    assert OUTSIDE_NOTES.search("(see " + "DESIGN" + ".md)")
    assert OUTSIDE_NOTES.search("/work/" + "shared/notes")
    assert not OUTSIDE_NOTES.search("shared-head = true; docs/design.md")


def test_every_test_the_design_names_exists():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    named = sorted(set(NAMED_TESTS.findall(text)))
    assert named, "docs/design.md names no tests (its 'Identities that are tests' section)"
    missing = []
    for path, test in named:
        source = ROOT / path
        defined = source.is_file() and re.search(
            rf"^\s*(?:async\s+)?def {test}\(", source.read_text(encoding="utf-8"), re.M
        )
        if not defined:
            missing.append(f"{path}::{test}")
    assert not missing, "docs/design.md names tests that do not exist:\n" + "\n".join(missing)
