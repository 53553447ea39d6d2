"""The ``local`` suite: your own tasks (one file or folder each) on your own local model.

    make_suite("local", paths=["reviews.csv", "topics/"], model="hf:/models/my-bert")
    make_suite("local", paths=["cars.jsonl", "pets.jsonl"], model="clip:/models/clip-vit-b32")

Data formats: ``fl_sim/suites/local_data.py`` (CSV/JSONL files or folders with a label column and a
text or image column; ``datasets.save_to_disk`` folders with ``pip install datasets``). Models:
``fl_sim/suites/encoders.py`` (``minilm``, ``hf:PATH``, ``clip:PATH``). Text tasks need a
text model (minilm, hf:PATH); image tasks need ``clip:PATH`` (zero-shot heads from the class
names, which are the label values, so write labels as words: "cat", not 3) or ``hf:PATH`` of a
vision model (ridge-probe heads, fitted on ``head_fraction`` = 30% of each task's training rows,
which are then not trained on; CLIP's zero-shot heads need no data, so its default is 0).
Text models with an integer ``federated_layers`` keep each split as the frozen lower layers'
output, computed once (``frozen_prefix_cache``; fl_sim/suites/pretrained.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fl_sim.errors import ConfigError
from fl_sim.suites.encoders import load_pretrained, parse_model_spec
from fl_sim.suites.local_data import read_local_tasks
from fl_sim.suites.pretrained import PretrainedSuite

HEAD_FRACTION = 0.3  # of each task's training rows: fit the probe head, never trained on


class LocalSuite(PretrainedSuite):
    """Tasks from local files (one per client) on a model from a local folder."""

    name = "local"

    def __init__(
        self,
        num_tasks: int | None = None,
        seed: int = 0,
        *,
        paths: Sequence[str | Path] = (),
        model: str = "minilm",
        text_column: str = "text",
        image_column: str = "image",
        label_column: str = "label",
        max_tokens: int = 128,
        federated_layers: int | str | None = None,
        frozen_prefix_cache: bool = True,
        disk_cache: str | Path | None = None,
        head_fraction: float | None = None,
    ) -> None:
        spec = parse_model_spec(model)
        if head_fraction is None:
            head_fraction = 0.0 if spec.kind == "clip" else HEAD_FRACTION
        raw, modality = read_local_tasks(
            paths,
            seed=int(seed),
            head_fraction=float(head_fraction),
            text_column=text_column,
            image_column=image_column,
            label_column=label_column,
        )
        if num_tasks is not None and int(num_tasks) != len(raw):
            raise ConfigError(
                f"local suite: num_tasks={num_tasks} but {len(raw)} task paths were given "
                "(set num-tasks to the number of paths)"
            )
        pretrained = load_pretrained(spec, max_tokens=max_tokens)
        if pretrained.modality != modality:
            fix = (
                "minilm or hf:PATH of a text model"
                if modality == "text"
                else ("clip:PATH or hf:PATH of a vision model")
            )
            raise ConfigError(
                f"local suite: the tasks are {modality} but model {spec} takes "
                f"{pretrained.modality} (use {fix})"
            )
        super().__init__(
            pretrained,
            raw,
            federated_layers=federated_layers,
            seed=seed,
            frozen_prefix_cache=frozen_prefix_cache,
            disk_cache=disk_cache,
        )
