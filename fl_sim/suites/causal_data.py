"""The ``causal`` suite's data: eight small deterministic languages, a prompt and its answer.

Each task is a language of its own, told apart by a three-letter tag that opens every prompt
(as an instruction would), with its own alphabet and its own rule from prompt to answer:

    add      "add 23+41="     → "64"            two numbers in 0..49, their sum
    reverse  "rev kfdh="      → "hdfk"          3–5 letters of a..l, reversed
    sort     "srt 4193="      → "1349"          3–5 digits, sorted
    count    "cnt abbab="     → "3"             4–9 letters of {a, b}, the number of b's
    shift    "rot mnpq="      → "noqr"          3–5 letters of m..y, each shifted by one
    plural   "plu a fox sees the hen="  → "some foxes see the hen"
                                                a sentence made plural in its subject and verb
    max      "max 3,8,2="     → "8"             3–5 digits, the largest
    double   "dbl xzw="       → "xxzzww"        2–4 letters of t..z, each written twice

An example is ``(prompt, answer)``; a model reads ``prompt`` and must write ``answer`` (then its
end-of-sequence token). ``draw_examples(task, seed, n)`` gives n distinct examples, deterministic
in (task, seed) (Python's ``random.Random`` seeded with a string, stable across runs and
platforms); ``task_splits`` cuts them into the pre-training pool, train, val and test splits,
disjoint by prompt. The pre-training pool of every task is what θ₀ is pre-trained on
(fl_sim/suites/causal_lm.py): the same languages, other sentences.

``alphabet()`` is every character of the generated text, sorted: the character vocabulary of the
suite's own tokenizer (fl_sim/suites/causal_lm.py), the same whatever the suite's seed.
"""

from __future__ import annotations

import functools
import random
import string
from collections.abc import Callable
from dataclasses import dataclass

from fl_sim.errors import ConfigError

Example = tuple[str, str]  # (prompt, answer)
SPLIT_SIZES = {"pretrain": 512, "train": 256, "val": 64, "test": 128}  # per task
MAX_DRAWS = 200  # draws per wanted example before a language is declared too small

_SUBJECTS = ("cat", "dog", "fox", "pig", "bee", "rat", "hen", "yak")
_PLURALS = {"fox": "foxes"}  # the rest take "s"
_VERBS = (("sees", "see"), ("eats", "eat"), ("likes", "like"), ("hears", "hear"))
_VERBS += (("finds", "find"), ("chases", "chase"))
_OBJECTS = _SUBJECTS


def _letters(rng: random.Random, pool: str, low: int, high: int) -> str:
    return "".join(rng.choice(pool) for _ in range(rng.randint(low, high)))


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return f"add {a}+{b}=", str(a + b)


def _reverse(rng: random.Random) -> Example:
    word = _letters(rng, "abcdefghijkl", 3, 5)
    return f"rev {word}=", word[::-1]


def _sort(rng: random.Random) -> Example:
    digits = _letters(rng, string.digits, 3, 5)
    return f"srt {digits}=", "".join(sorted(digits))


def _count(rng: random.Random) -> Example:
    word = _letters(rng, "ab", 4, 9)
    return f"cnt {word}=", str(word.count("b"))


def _shift(rng: random.Random) -> Example:
    word = _letters(rng, "mnopqrstuvwxy", 3, 5)
    return f"rot {word}=", "".join(chr(ord(c) + 1) for c in word)


def _plural(rng: random.Random) -> Example:
    det, noun = rng.choice(("a", "the")), rng.choice(_SUBJECTS)
    verb = rng.choice(_VERBS)
    obj = f"{rng.choice(('a', 'the'))} {rng.choice(_OBJECTS)}"
    plural = f"{'some' if det == 'a' else det} {_PLURALS.get(noun, noun + 's')}"
    return f"plu {det} {noun} {verb[0]} {obj}=", f"{plural} {verb[1]} {obj}"


def _max(rng: random.Random) -> Example:
    digits = [rng.choice(string.digits) for _ in range(rng.randint(3, 5))]
    return f"max {','.join(digits)}=", max(digits)


def _double(rng: random.Random) -> Example:
    word = _letters(rng, "tuvwxyz", 2, 4)
    return f"dbl {word}=", "".join(c + c for c in word)


@dataclass(frozen=True)
class CausalTask:
    """One language: its name and the rule that draws a (prompt, answer) from a Random."""

    name: str
    draw: Callable[[random.Random], Example]


CAUSAL_TASKS: dict[str, CausalTask] = {
    task.name: task
    for task in (
        CausalTask("add", _add),
        CausalTask("reverse", _reverse),
        CausalTask("sort", _sort),
        CausalTask("count", _count),
        CausalTask("shift", _shift),
        CausalTask("plural", _plural),
        CausalTask("max", _max),
        CausalTask("double", _double),
    )
}
MAX_TASKS = len(CAUSAL_TASKS)


def task_names(num_tasks: int | None) -> list[str]:
    """The first ``num_tasks`` task names in catalogue order (None: all of them)."""
    names = list(CAUSAL_TASKS)
    if num_tasks is None:
        return names
    if isinstance(num_tasks, bool) or not 1 <= int(num_tasks) <= len(names):
        raise ConfigError(
            f"causal suite has 1..{len(names)} tasks ({', '.join(names)}), got "
            f"num_tasks={num_tasks} (set num-tasks to 1..{len(names)})"
        )
    return names[: int(num_tasks)]


def draw_examples(name: str, seed: int, count: int) -> list[Example]:
    """``count`` examples of task ``name`` with distinct prompts, deterministic in (name, seed)."""
    if name not in CAUSAL_TASKS:
        raise ConfigError(f"unknown causal task {name!r}; choose from {', '.join(CAUSAL_TASKS)}")
    rng = random.Random(f"fl-sim-causal/{name}/{int(seed)}")
    draw = CAUSAL_TASKS[name].draw
    seen: dict[str, str] = {}
    for _ in range(MAX_DRAWS * count):
        if len(seen) == count:
            break
        prompt, answer = draw(rng)
        seen.setdefault(prompt, answer)
    if len(seen) < count:
        raise ConfigError(
            f"causal task {name!r} has fewer than {count} distinct examples (ask for fewer)"
        )
    return list(seen.items())


def task_splits(name: str, seed: int) -> dict[str, list[Example]]:
    """Task ``name``'s disjoint splits of ``SPLIT_SIZES`` examples: pretrain, train, val, test."""
    examples = draw_examples(name, seed, sum(SPLIT_SIZES.values()))
    splits, start = {}, 0
    for split, size in SPLIT_SIZES.items():
        splits[split] = examples[start : start + size]
        start += size
    return splits


@functools.cache
def alphabet() -> str:
    """Every character in the generated text of every task (all splits, seed 0), sorted: the
    tokenizer's vocabulary (module docstring). The languages write no other character, so a
    text of another seed never falls outside it (checked by the tokenizer, which has no
    unknown token)."""
    chars: set[str] = set()
    for name in CAUSAL_TASKS:
        for examples in task_splits(name, 0).values():
            for prompt, answer in examples:
                chars.update(prompt + answer)
    return "".join(sorted(chars))


__all__ = ["CAUSAL_TASKS", "MAX_TASKS", "alphabet", "draw_examples", "task_names", "task_splits"]
