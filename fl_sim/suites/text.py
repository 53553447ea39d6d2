"""The ``text`` suite: five real text-classification tasks from the standard library's own prose.

Data (``fl_sim/suites/stdlib_text.py``): docstrings of a fixed list of standard-library modules and
the paragraphs of ``pydoc_data.topics``, labelled by module family, pydoc topic group, object kind,
visibility and arity; balanced, deduplicated, with fixed train/val/test splits from ``seed`` that
are disjoint across all tasks. Fixed for a Python minor version, recorded in ``metadata()``.

Model: all-MiniLM-L6-v2 by default (``model="minilm"``), or any local text model folder
(``model="hf:PATH"``). Only the top ``federated_layers`` transformer layers are fine-tuned and
merged (default 2 of MiniLM's 6, 3.5M of its 22.7M parameters: one AdamW step on 32 texts of
32 tokens took 0.4 s on one idle thread, against 0.9 s with every layer federated); the heads
are ridge probes on θ₀'s pooled features of a held-out head pool that no client trains on,
frozen. Defaults: 40 training texts per class (about 840 over the five tasks), 20 per class
for val and test; fitting the heads reads the head pool once through MiniLM (15-20 s).
With an integer ``federated_layers`` the frozen lower layers run once per suite: every split
is kept as their output, and training and evaluation run only the top layers on it
(``frozen_prefix_cache``, default on; fl_sim/suites/pretrained.py).

    make_suite("text")                                    # 5 tasks, MiniLM, top 2 layers
    make_suite("text", num_tasks=3, federated_layers="all")
    make_suite("text", model="hf:/models/my-bert", tasks=["arity", "visibility"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fl_sim.errors import ConfigError
from fl_sim.suites.encoders import load_pretrained, parse_model_spec
from fl_sim.suites.pretrained import PretrainedSuite, RawTask
from fl_sim.suites.stdlib_text import MAX_CHARS, TEXT_TASKS, corpus_metadata, text_tasks


class TextSuite(PretrainedSuite):
    """Standard-library text tasks on a pre-trained text encoder (module docstring)."""

    name = "text"

    def __init__(
        self,
        num_tasks: int | None = None,
        seed: int = 0,
        *,
        model: str = "minilm",
        tasks: Sequence[str] | None = None,
        train_per_class: int = 40,
        eval_per_class: int = 20,
        max_chars: int = MAX_CHARS,
        max_tokens: int = 64,
        federated_layers: int | str | None = None,
        frozen_prefix_cache: bool = True,
        disk_cache: str | Path | None = None,
    ) -> None:
        names = list(TEXT_TASKS) if tasks is None else list(tasks)
        if num_tasks is not None:
            if not 1 <= int(num_tasks) <= len(names):
                raise ConfigError(
                    f"text suite has {len(names)} tasks ({', '.join(names)}), got "
                    f"num_tasks={num_tasks} (set num-tasks to 1..{len(names)})"
                )
            names = names[: int(num_tasks)]
        unknown = [name for name in names if name not in TEXT_TASKS]
        if unknown:
            raise ConfigError(
                f"unknown text task {unknown[0]!r}; choose from {', '.join(TEXT_TASKS)}"
            )
        spec = parse_model_spec(model)
        pretrained = load_pretrained(spec, max_tokens=max_tokens)
        if pretrained.modality != "text":
            raise ConfigError(
                f"model {spec} takes images; the text suite needs a text model (minilm or hf:PATH)"
            )
        raw = [
            RawTask(task.name, task.classes, task.texts, task.labels)
            for task in text_tasks(names, int(seed), train_per_class, eval_per_class, max_chars)
        ]
        self.max_chars, self.max_tokens = max_chars, max_tokens
        super().__init__(
            pretrained,
            raw,
            federated_layers=federated_layers,
            seed=seed,
            frozen_prefix_cache=frozen_prefix_cache,
            disk_cache=disk_cache,
        )

    def metadata(self) -> dict[str, object]:
        return {
            **super().metadata(),
            "max-chars": self.max_chars,
            "max-tokens": self.max_tokens,
            "corpus": corpus_metadata(),
        }
