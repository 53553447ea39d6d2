"""The text suite's data: real English that ships with every Python, labelled five ways.

Two sources, both part of the standard library, so nothing is downloaded:

- **docstrings** of the modules in ``MODULE_FAMILIES`` (a fixed list): every class and routine a
  module defines, and every routine a class defines in its own ``__dict__`` (``obj.__doc__``,
  never inherited). An object counts for a module when its ``__module__`` is that module, one
  of its submodules, or its C accelerator (``_json`` for ``json``, ``posix`` for ``os``).
- **pydoc topics**: ``pydoc_data.topics.topics``, the language reference as ``help()`` shows it,
  cut into prose paragraphs: blocks of ≥ 80 characters, ≥ 85% letters and spaces, with no
  grammar (``::=``) and no ``>>>`` examples.

A text is the source's first ``max_chars`` characters with whitespace collapsed. Identical texts
are one example; a text whose label for a task differs between the objects that carry it is left
out of that task. The tasks, each its own label space:

| task | labels | from |
|---|---|---|
| module-family | files, text, math, net, concurrency, data | the module (``MODULE_FAMILIES``) |
| pydoc-topic | statements, expressions, data-model, builtin-types, execution | ``TOPIC_GROUPS`` |
| object-kind | class, function, method | what carries the docstring |
| visibility | public, private, dunder | its name: ``name``, ``_name``, ``__name__`` |
| arity | 0, 1, 2, 3+ | named parameters of ``inspect.signature`` (no self/cls, \\*args, \\*\\*kw) |

Splits: the distinct docstrings (and, separately, the paragraphs) are permuted by ``seed`` and
cut 30/30/20/20 into head/train/val/test pools, the same pools for every task, so no task's val
or test text is in any task's training split. The head pool fits θ₀'s frozen probe heads and is
never trained on: a probe fitted on the clients' own training texts would already fit them
almost perfectly and leave fine-tuning nothing to learn. Each task then takes up to
``train_per_class`` (head, train) or ``eval_per_class`` (val, test) texts of every class from
each pool (balanced; fewer where a class has fewer), in the seed's order.

The content is fixed for a given Python minor version (and platform, for ``os``):
``corpus_metadata`` records both, with the modules that could not be imported.
"""

from __future__ import annotations

import importlib
import inspect
import platform
import re
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from fl_sim.errors import ConfigError

MAX_CHARS = 256
POOL_FRACTIONS = {"head": 0.3, "train": 0.3, "val": 0.2, "test": 0.2}
PROSE_LETTERS = 0.85  # a paragraph is prose when ≥ 85% of it is letters and spaces

MODULE_FAMILIES: dict[str, tuple[str, ...]] = {
    "files": (
        "os", "posixpath", "shutil", "pathlib", "io", "tempfile", "glob", "fnmatch", "stat",
        "filecmp", "zipfile", "tarfile", "gzip", "bz2", "lzma", "fileinput",
    ),
    "text": (
        "string", "re", "textwrap", "difflib", "unicodedata", "html", "html.parser", "codecs",
        "locale", "gettext", "shlex",
    ),
    "math": (
        "math", "cmath", "decimal", "fractions", "statistics", "random", "numbers", "operator",
    ),
    "net": (
        "socket", "ssl", "http.client", "http.server", "http.cookies", "http.cookiejar",
        "urllib.request", "urllib.parse", "email.message", "email.utils", "smtplib", "ftplib",
        "imaplib", "poplib", "ipaddress", "xmlrpc.client", "socketserver",
        "wsgiref.simple_server",
    ),
    "concurrency": (
        "threading", "multiprocessing", "multiprocessing.pool", "multiprocessing.managers",
        "concurrent.futures", "asyncio", "queue", "subprocess", "sched", "selectors", "signal",
    ),
    "data": (
        "collections", "heapq", "bisect", "array", "enum", "dataclasses", "functools",
        "itertools", "copy", "pickle", "json", "typing", "struct", "weakref", "csv", "sqlite3",
        "datetime", "calendar", "zoneinfo",
    ),
}  # fmt: skip
MODULE_ALIASES = {"os": ("posix", "nt")}  # where os's C functions say they live

TOPIC_GROUPS: dict[str, tuple[str, ...]] = {
    "statements": (
        "assert", "assignment", "async", "augassign", "break", "class", "compound", "continue",
        "del", "else", "for", "function", "global", "if", "import", "nonlocal", "pass", "raise",
        "return", "try", "while", "with", "yield",
    ),
    "expressions": (
        "atom-identifiers", "atom-literals", "attribute-references", "await", "binary",
        "bitwise", "booleans", "calls", "comparisons", "conversions", "dict", "exprlists",
        "floating", "formatstrings", "id-classes", "identifiers", "imaginary", "in", "integers",
        "lambda", "lists", "numbers", "operator-summary", "power", "shifting", "slicings",
        "strings", "subscriptions", "unary",
    ),
    "data-model": (
        "attribute-access", "callable-types", "context-managers", "customization",
        "numeric-types", "objects", "sequence-types", "specialattrs", "specialnames", "types",
    ),
    "builtin-types": (
        "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
        "string-methods", "truth", "typesfunctions", "typesmapping", "typesmethods",
        "typesmodules", "typesseq", "typesseq-mutable",
    ),
    "execution": ("debugger", "dynamic-features", "exceptions", "execmodel", "naming"),
}  # fmt: skip

# task name → its class names, in label order; the first k are the suite's tasks when T = k
TEXT_TASKS: dict[str, tuple[str, ...]] = {
    "module-family": tuple(MODULE_FAMILIES),
    "pydoc-topic": tuple(TOPIC_GROUPS),
    "object-kind": ("class", "function", "method"),
    "visibility": ("public", "private", "dunder"),
    "arity": ("0", "1", "2", "3+"),
}


@dataclass(frozen=True)
class Docstring:
    """One object's docstring and what it is labelled with (None: no label for that task)."""

    text: str
    family: str
    kind: str
    visibility: str
    arity: str | None


@dataclass
class TextTaskData:
    """One task's texts and integer labels per split (before tokenization), and the head pool's."""

    name: str
    classes: tuple[str, ...]
    texts: dict[str, list[str]]
    labels: dict[str, list[int]]


def clean(text: str, max_chars: int = MAX_CHARS) -> str:
    """Whitespace collapsed to single spaces, then the first ``max_chars`` characters."""
    return " ".join(text.split())[:max_chars]


def _belongs(obj: object, module: str) -> bool:
    owner = getattr(obj, "__module__", None)
    if not isinstance(owner, str):
        return False
    last = module.rsplit(".", 1)[-1]
    return (
        owner == module
        or owner.startswith(module + ".")
        or owner == "_" + last
        or owner in MODULE_ALIASES.get(module, ())
    )


def _visibility(name: str) -> str:
    if name.startswith("__") and name.endswith("__"):
        return "dunder"
    return "private" if name.startswith("_") else "public"


def _arity(routine: object, is_method: bool) -> str | None:
    try:
        parameters = list(inspect.signature(routine).parameters.values())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None  # many C routines have no signature
    if is_method and parameters and parameters[0].name in ("self", "cls"):
        parameters = parameters[1:]
    named = [p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return str(len(named)) if len(named) < 3 else "3+"


def _docstrings_of(module_name: str, family: str, max_chars: int) -> Iterator[Docstring]:
    module = importlib.import_module(module_name)
    for name, obj in sorted(vars(module).items()):
        if inspect.ismodule(obj) or not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if not _belongs(obj, module_name):
            continue
        is_class = inspect.isclass(obj)
        doc = obj.__doc__
        if isinstance(doc, str) and doc.strip():
            yield Docstring(
                text=clean(doc, max_chars),
                family=family,
                kind="class" if is_class else "function",
                visibility=_visibility(name),
                arity=None if is_class else _arity(obj, is_method=False),
            )
        if not is_class:
            continue
        for member_name, member in sorted(vars(obj).items()):
            routine = member.__func__ if isinstance(member, (staticmethod, classmethod)) else member
            if not inspect.isroutine(routine):
                continue
            doc = getattr(routine, "__doc__", None)
            if isinstance(doc, str) and doc.strip():
                yield Docstring(
                    text=clean(doc, max_chars),
                    family=family,
                    kind="method",
                    visibility=_visibility(member_name),
                    arity=_arity(routine, is_method=not isinstance(member, staticmethod)),
                )


def collect_docstrings(max_chars: int = MAX_CHARS) -> tuple[list[Docstring], list[str]]:
    """Every docstring of ``MODULE_FAMILIES``, in a fixed order, and the modules not importable."""
    docstrings, missing = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # typing.io and friends warn when touched
        for family, modules in MODULE_FAMILIES.items():
            for module_name in modules:
                try:
                    docstrings.extend(_docstrings_of(module_name, family, max_chars))
                except ImportError:
                    missing.append(module_name)
    return docstrings, missing


def topic_paragraphs(max_chars: int = MAX_CHARS) -> list[tuple[str, str]]:
    """(paragraph, topic group) for the prose of every grouped pydoc topic, in a fixed order."""
    from pydoc_data.topics import topics

    group_of = {topic: group for group, names in TOPIC_GROUPS.items() for topic in names}
    paragraphs = []
    for topic in sorted(topics):
        if topic not in group_of:
            continue  # a topic a later Python added: left out, so the groups stay as documented
        for block in re.split(r"\n\s*\n", topics[topic]):
            text = clean(block, max_chars=len(block))
            if len(text) < 80 or "::=" in text or text.startswith(">>>"):
                continue  # headings, grammar, examples
            if sum(ch.isalpha() or ch.isspace() for ch in text) < PROSE_LETTERS * len(text):
                continue  # code and tables
            paragraphs.append((text[:max_chars], group_of[topic]))
    return paragraphs


def _consistent(pairs: list[tuple[str, str | None]]) -> dict[str, str]:
    """text → label, keeping only texts whose every (non-None) label agrees."""
    labels: dict[str, set[str]] = {}
    for text, label in pairs:
        if label is not None:
            labels.setdefault(text, set()).add(label)
    return {text: next(iter(found)) for text, found in labels.items() if len(found) == 1}


def _pools(texts: list[str], seed: int) -> dict[str, list[str]]:
    """Distinct ``texts`` (sorted, then permuted by ``seed``) cut into head/train/val/test."""
    distinct = sorted(set(texts))
    order = np.random.default_rng(seed).permutation(len(distinct))
    shuffled = [distinct[i] for i in order]
    pools, start = {}, 0
    for split, fraction in POOL_FRACTIONS.items():
        end = len(shuffled) if split == "test" else start + int(fraction * len(shuffled))
        pools[split], start = shuffled[start:end], end
    return pools


def _balanced(
    pool: list[str], label_of: dict[str, str], classes: tuple[str, ...], per_class: int
) -> tuple[list[str], list[int]]:
    """Up to ``per_class`` texts of every class from ``pool``, in pool order, interleaved."""
    by_class: dict[str, list[str]] = {c: [] for c in classes}
    for text in pool:
        label = label_of.get(text)
        if label is not None and len(by_class[label]) < per_class:
            by_class[label].append(text)
    texts, labels = [], []
    for rank in range(per_class):
        for index, c in enumerate(classes):
            if rank < len(by_class[c]):
                texts.append(by_class[c][rank])
                labels.append(index)
    return texts, labels


def text_tasks(
    task_names: tuple[str, ...] | list[str],
    seed: int,
    train_per_class: int,
    eval_per_class: int,
    max_chars: int = MAX_CHARS,
) -> list[TextTaskData]:
    """The named tasks' balanced splits (module docstring)."""
    unknown = [name for name in task_names if name not in TEXT_TASKS]
    if unknown:
        raise ConfigError(f"unknown text task {unknown[0]!r}; choose from {', '.join(TEXT_TASKS)}")
    if train_per_class < 1 or eval_per_class < 1:
        raise ConfigError(
            f"text suite: train-per-class and eval-per-class must be ≥ 1, got "
            f"{train_per_class}, {eval_per_class}"
        )
    docstrings, _ = collect_docstrings(max_chars)
    paragraphs = topic_paragraphs(max_chars)
    doc_pools = _pools([d.text for d in docstrings], seed)
    topic_pools = _pools([text for text, _ in paragraphs], seed)
    field = {"module-family": "family", "object-kind": "kind", "visibility": "visibility"}
    tasks = []
    for name in task_names:
        if name == "pydoc-topic":
            label_of, pools = _consistent(paragraphs), topic_pools
        else:
            attribute = field.get(name, "arity")
            label_of = _consistent([(d.text, getattr(d, attribute)) for d in docstrings])
            pools = doc_pools
        texts, labels = {}, {}
        for split, pool in pools.items():
            per_class = train_per_class if split in ("head", "train") else eval_per_class
            texts[split], labels[split] = _balanced(pool, label_of, TEXT_TASKS[name], per_class)
        tasks.append(TextTaskData(name, TEXT_TASKS[name], texts, labels))
    return tasks


def corpus_metadata() -> dict[str, object]:
    """What fixes the corpus: the Python version and platform, and modules that were missing."""
    _, missing = collect_docstrings()
    return {
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "python-full": platform.python_version(),
        "platform": sys.platform,
        "missing-modules": missing,
    }
