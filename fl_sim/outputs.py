"""Every file fl-sim writes: atomically, JSON strictly, CSV one way.

Atomic. ``atomic_path(path)`` yields a temp path next to ``path`` (``.<name>.tmp-<pid>-<hex>``)
and moves it onto ``path`` with ``os.replace`` only when the block succeeds; on any error the
temp file is removed. So a killed process never leaves a half-written results file, report,
manifest, checkpoint or plot that looks finished. ``write_atomically`` (text or bytes),
``write_json`` and ``write_csv`` are built on it, and the streamed writers (the safetensors
writer, matplotlib's ``savefig``) use it directly. Whole folders (``fl-sim merge``'s output
folder) go through fl_sim/checkpoints/model_checkpoint.py's ``atomic_output`` instead.

Strict JSON. Every JSON document fl-sim writes parses with a strict parser: there are no
``NaN``, ``Infinity`` or ``-Infinity`` tokens (``json.dumps(..., allow_nan=False)``). A
non-finite float is written as the string ``"inf"``, ``"-inf"`` or ``"nan"``: the spelling of
Python's ``str(float)`` and TOML, of cclip's ``tau_c`` in a rule summary, and what ``float()``
and RunConfig's float keys read (a config echo with ``"tau-c": "inf"`` parses to the same
RunConfig). null is not used for them, as it would lose which value it was and could not be told
from a figure that is absent. Tensors and numpy values are written as (lists of) numbers, tuples
as lists. Where fl-sim reads its own JSON back (resume from a round checkpoint, the update cache,
``simulate``'s results, a sweep's files) it uses ``read_json`` / ``loads_json``, which turn
exactly these three strings back into floats wherever they stand as a value (not as a key), so
a string that is really "inf" or "nan" reads back as a float; no fl-sim field holds such a
string. Files written before this rule, with ``Infinity`` tokens, still read the same.

CSV. ``write_csv(path, rows)``: a header, then one line per row (``\\n`` line ends); the columns
are the union of the rows' keys in first-seen order unless given (then other keys are left
out). None and a missing key are empty cells; a non-finite float is ``inf``/``-inf``/``nan``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

NON_FINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path next to ``path`` for the block to create; ``os.replace`` it onto
    ``path`` when the block succeeds, remove it when it fails (the folder must exist)."""
    path = Path(path)
    temp = path.parent / f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield temp
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def write_atomically(
    path: str | os.PathLike[str], data: str | bytes, *, fsync: bool = False
) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically, creating its folder;
    ``fsync``: flushed to disk before it is moved into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path) as temp, open(temp, "xb") as file:
        file.write(payload)
        if fsync:
            file.flush()
            os.fsync(file.fileno())


# ---------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------


def _float(value: float) -> float | str:
    if math.isfinite(value):
        return float(value)
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def to_strict_json(value: object, default: Callable[[object], object] | None = None) -> object:
    """``value`` as plain JSON data with every non-finite float as "inf", "-inf" or "nan"
    (module docstring). Tensors and numpy values become (lists of) numbers; any other object
    goes through ``default`` (as ``json.dumps``'s), else raises TypeError."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return _float(value)
    if isinstance(value, Mapping):
        return {
            _float(k) if isinstance(k, float) else k: to_strict_json(v, default)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [to_strict_json(item, default) for item in value]
    tolist = getattr(value, "tolist", None)  # torch.Tensor, numpy arrays and scalars
    if callable(tolist) and type(value).__module__.split(".")[0] in ("torch", "numpy"):
        return to_strict_json(tolist(), default)
    if default is not None:
        return to_strict_json(default(value), default)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def dumps_json(
    value: object,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    default: Callable[[object], object] | None = None,
) -> str:
    """Strict JSON text of ``value`` (``to_strict_json``, then ``allow_nan=False``)."""
    return json.dumps(
        to_strict_json(value, default), indent=indent, sort_keys=sort_keys, allow_nan=False
    )


def write_json(
    path: str | os.PathLike[str],
    value: object,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    default: Callable[[object], object] | None = None,
    fsync: bool = False,
) -> None:
    """``value`` as strict JSON (``dumps_json``) plus a newline, written atomically."""
    text = dumps_json(value, indent=indent, sort_keys=sort_keys, default=default)
    write_atomically(path, text + "\n", fsync=fsync)


def from_strict_json(value: object) -> object:
    """The inverse of ``to_strict_json`` on parsed JSON: "inf", "-inf" and "nan" values (in any
    dict or list) become floats again; keys stay strings."""
    if isinstance(value, str):
        return NON_FINITE.get(value, value)
    if isinstance(value, dict):
        return {k: from_strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_strict_json(item) for item in value]
    return value


def loads_json(text: str | bytes) -> object:
    """``json.loads`` then ``from_strict_json``: how fl-sim reads back what it wrote."""
    return from_strict_json(json.loads(text))


def read_json(path: str | os.PathLike[str]) -> object:
    """``loads_json`` of the UTF-8 file ``path`` (OSError, ValueError as ``json.loads``)."""
    return loads_json(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------


def csv_text(rows: Iterable[Mapping[str, object]], columns: Sequence[str] | None = None) -> str:
    """The CSV text ``write_csv`` writes ('' for no rows and no columns)."""
    rows = list(rows)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not columns:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(
        buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(
    path: str | os.PathLike[str],
    rows: Iterable[Mapping[str, object]],
    columns: Sequence[str] | None = None,
) -> None:
    """``rows`` as CSV, atomically: ``columns`` (default: the union of the rows' keys in
    first-seen order), a header, then one line per row (module docstring)."""
    write_atomically(path, csv_text(rows, columns))


__all__ = [
    "NON_FINITE",
    "atomic_path",
    "csv_text",
    "dumps_json",
    "from_strict_json",
    "loads_json",
    "read_json",
    "to_strict_json",
    "write_atomically",
    "write_csv",
    "write_json",
]
