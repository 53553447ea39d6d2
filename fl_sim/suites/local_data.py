"""A user's own task data from local files: one file or folder per task, text or images.

A task is one of:

- a **file**, ``.csv`` or ``.jsonl`` (one JSON object per line): its rows are deduplicated and
  split 60/20/20 into train/val/test by a permutation from ``seed``;
- a **folder** with ``train.csv|jsonl``, ``test.csv|jsonl`` and optionally ``val.csv|jsonl`` (or
  ``validation``); without a val file, 20% of train (by ``seed``) becomes val. Rows of val or
  test whose input is also in train (and test rows also in val) are dropped, so splits are
  disjoint;
- a folder written by Hugging Face ``datasets``' ``save_to_disk`` (a ``DatasetDict`` with
  train/test and optionally validation splits, or one ``Dataset`` split as a file is). Needs
  ``pip install datasets``.

Columns: ``label_column`` (default ``label``) and either ``text_column`` (default ``text``) or
``image_column`` (default ``image``); the image column wins when both exist. An image is a path
to a ``.npy`` array (or a ``.png``/``.jpg`` file, which needs Pillow), relative to the data file,
or, in JSONL, a nested list of numbers. Arrays are ``(H, W)``, ``(H, W, C)`` or ``(C, H, W)``
with C in 1, 3 (4: alpha dropped); integer pixels are divided by 255, floats are taken as
[0, 1]. The task's classes are its distinct label values, sorted (numerically when all are
integers); a val or test label not seen in train is an error. The task is named after the file
(without extension) or the folder. With ``head_fraction`` > 0, that share of the training rows
becomes a "head" split that only a probe head is fitted on (``fl_sim/suites/pretrained.py``).
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fl_sim.errors import ConfigError
from fl_sim.suites.pretrained import RawTask

FILE_SUFFIXES = (".csv", ".jsonl")
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)
VAL_FROM_TRAIN = 0.2
SPLIT_FILES = {"train": ("train",), "val": ("val", "validation"), "test": ("test",)}


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV (header line) or JSONL file, as dicts."""
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise ConfigError(f"{path}:{number} is not a JSON object (one per line)") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{number} is not a JSON object (one per line)")
            rows.append(row)
    return rows


def load_image(value: object, base: Path) -> np.ndarray:
    """An image cell (path or nested list) as float32 ``(C, H, W)`` in [0, 1]."""
    if isinstance(value, str):
        path = (base / value) if not Path(value).is_absolute() else Path(value)
        if not path.is_file():
            raise ConfigError(
                f"image {value!r}: no file at {path} (paths are relative to the data)"
            )
        if path.suffix == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            try:
                from PIL import Image
            except ImportError:
                raise ConfigError(
                    f"image {path.name}: reading {path.suffix} files needs Pillow (pip install "
                    "pillow), or save the images as .npy"
                ) from None
            with Image.open(path) as image:
                array = np.asarray(
                    image.convert("RGB") if image.mode not in ("L", "RGB") else image
                )
    elif isinstance(value, dict) and ("path" in value or "bytes" in value):
        return _hf_image(value, base)  # a datasets Image cell
    elif hasattr(value, "__array__") or isinstance(value, list):
        array = np.asarray(value)
    else:
        raise ConfigError(f"image cell {value!r:.40} is neither a file path nor a list of pixels")
    scale = 255.0 if np.issubdtype(array.dtype, np.integer) else 1.0
    array = array.astype(np.float32) / scale
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 3 and array.shape[-1] in (1, 3, 4) and array.shape[0] not in (1, 3):
        array = array.transpose(2, 0, 1)
    if array.ndim != 3 or array.shape[0] not in (1, 3, 4):
        raise ConfigError(
            f"image of shape {array.shape}: give (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4"
        )
    return np.ascontiguousarray(array[:3])


def _hf_image(cell: dict, base: Path) -> np.ndarray:
    if cell.get("bytes"):
        import io

        from PIL import Image  # datasets' Image feature depends on Pillow

        with Image.open(io.BytesIO(cell["bytes"])) as image:
            return load_image(np.asarray(image.convert("RGB")), base)
    return load_image(str(cell["path"]), base)


def _input_column(rows: list[dict], where: str, columns: dict[str, str]) -> tuple[str, str]:
    """(modality, column) of the rows' input: image column first, then text column."""
    present = list(rows[0]) if rows else []
    if columns["image"] in present:
        return "image", columns["image"]
    if columns["text"] in present:
        return "text", columns["text"]
    raise ConfigError(
        f"{where}: no text column {columns['text']!r} or image column {columns['image']!r}; "
        f"columns are {', '.join(present) or 'none'} (set text_column= or image_column=)"
    )


def _examples(
    rows: list[dict], where: str, base: Path, modality: str, column: str, label_column: str
) -> list[tuple[object, str, str]]:
    """(input, label, dedupe key) per row, duplicates dropped (first one kept)."""
    if rows and label_column not in rows[0]:
        raise ConfigError(
            f"{where}: no label column {label_column!r}; columns are {', '.join(rows[0])} "
            "(set label_column=)"
        )
    out, seen = [], set()
    for number, row in enumerate(rows, 1):
        if column not in row or label_column not in row or row[label_column] in (None, ""):
            raise ConfigError(f"{where}: row {number} lacks {column!r} or {label_column!r}")
        if modality == "text":
            value = str(row[column])
            key = value
        else:
            value = load_image(row[column], base)
            key = hashlib.sha1(value.tobytes() + str(value.shape).encode()).hexdigest()
        if key not in seen:
            seen.add(key)
            out.append((value, str(row[label_column]), key))
    return out


def _class_order(labels: set[str]) -> tuple[str, ...]:
    try:
        return tuple(sorted(labels, key=lambda label: int(label)))
    except ValueError:
        return tuple(sorted(labels))


def _split_files(path: Path) -> dict[str, Path]:
    found = {}
    for split, stems in SPLIT_FILES.items():
        for stem in stems:
            for suffix in FILE_SUFFIXES:
                if (path / f"{stem}{suffix}").is_file():
                    found.setdefault(split, path / f"{stem}{suffix}")
    return found


def _read_hf_dataset(path: Path) -> dict[str, list[dict]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"{path} was saved by Hugging Face datasets; reading it needs pip install datasets"
        ) from None
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        return {name: split.to_list() for name, split in loaded.items()}
    return {"all": loaded.to_list()}


def _permutation(n: int, seed: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(seed).permutation(n)]


def read_local_task(
    path: str | Path,
    *,
    seed: int = 0,
    head_fraction: float = 0.0,
    text_column: str = "text",
    image_column: str = "image",
    label_column: str = "label",
) -> tuple[RawTask, str]:
    """One task from ``path`` (module docstring) and its modality, "text" or "image".

    ``head_fraction`` of the training rows (by ``seed``) become the "head" split: examples only
    a probe head is fitted on, which no client trains on.
    """
    if not 0 <= head_fraction < 1:
        raise ConfigError(f"head_fraction must be in [0, 1), got {head_fraction!r}")
    path = Path(path).expanduser()
    columns = {"text": text_column, "image": image_column}
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise ConfigError(f"{path}: unsupported file type {path.suffix!r}; give .csv or .jsonl")
        splits_rows, base, name = {"all": read_rows(path)}, path.parent, path.stem
    elif path.is_dir():
        base, name = path, path.name
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            splits_rows = _read_hf_dataset(path)
            if "validation" in splits_rows:
                splits_rows["val"] = splits_rows.pop("validation")
        else:
            files = _split_files(path)
            if "train" not in files or "test" not in files:
                raise ConfigError(
                    f"{path}: a task folder needs train.csv|jsonl and test.csv|jsonl "
                    "(val optional), or give one data file"
                )
            splits_rows = {split: read_rows(file) for split, file in files.items()}
    else:
        raise ConfigError(
            f"task data {str(path)!r} does not exist (give a .csv/.jsonl or a folder)"
        )

    first = next((rows for rows in splits_rows.values() if rows), None)
    if first is None:
        raise ConfigError(f"{path}: no rows")
    modality, column = _input_column(first, str(path), columns)
    examples = {
        split: _examples(rows, str(path), base, modality, column, label_column)
        for split, rows in splits_rows.items()
    }
    if "all" in examples:  # one file: split it
        every = examples.pop("all")
        order = _permutation(len(every), seed)
        n_train = int(SPLIT_FRACTIONS[0] * len(every))
        n_val = int(SPLIT_FRACTIONS[1] * len(every))
        examples = {
            "train": [every[i] for i in order[:n_train]],
            "val": [every[i] for i in order[n_train : n_train + n_val]],
            "test": [every[i] for i in order[n_train + n_val :]],
        }
    elif "val" not in examples:
        train = examples["train"]
        order = _permutation(len(train), seed)
        n_val = int(VAL_FROM_TRAIN * len(train))
        examples["val"] = [train[i] for i in order[:n_val]]
        examples["train"] = [train[i] for i in sorted(order[n_val:])]
    missing = [split for split in ("train", "val", "test") if split not in examples]
    if missing:
        raise ConfigError(f"{path}: no {missing[0]} split (save train and test splits)")
    seen = {key for _, _, key in examples["train"]}
    for split in ("val", "test"):  # disjoint splits
        examples[split] = [e for e in examples[split] if e[2] not in seen]
        seen |= {key for _, _, key in examples[split]}
    if head_fraction > 0:
        train = examples["train"]
        order = _permutation(len(train), seed + 1)
        n_head = int(head_fraction * len(train))
        examples["head"] = [train[i] for i in sorted(order[:n_head])]
        examples["train"] = [train[i] for i in sorted(order[n_head:])]
    classes = _class_order(
        {label for split in ("head", "train") for _, label, _ in examples.get(split, [])}
    )
    unseen = {label for split in ("val", "test") for _, label, _ in examples[split]} - set(classes)
    if unseen:
        raise ConfigError(
            f"{path}: label {sorted(unseen)[0]!r} is in val/test but not in train (add it to train)"
        )
    index = {label: i for i, label in enumerate(classes)}
    task = RawTask(
        name=name,
        classes=classes,
        inputs={split: [value for value, _, _ in rows] for split, rows in examples.items()},
        labels={split: [index[label] for _, label, _ in rows] for split, rows in examples.items()},
    )
    return task, modality


def read_local_tasks(paths: Sequence[str | Path], **kwargs: object) -> tuple[list[RawTask], str]:
    """Every task of ``paths`` and their common modality; task names made unique."""
    if isinstance(paths, (str, Path)) or not paths:
        raise ConfigError("local suite: give paths=[one file or folder per task]")
    tasks, modalities = [], set()
    for path in paths:
        task, modality = read_local_task(path, **kwargs)  # type: ignore[arg-type]
        names = {t.name for t in tasks}
        if task.name in names:
            task.name = next(
                f"{task.name}-{k}"
                for k in range(2, len(tasks) + 3)
                if f"{task.name}-{k}" not in names
            )
        tasks.append(task)
        modalities.add(modality)
    if len(modalities) > 1:
        raise ConfigError("local suite: mix of text and image tasks; give tasks of one kind")
    return tasks, modalities.pop()
