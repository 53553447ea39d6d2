"""Hostile input: random run configs, merge YAML files and train-meta JSON.

Every case ends in a one-line ``FlSimError`` naming the field (the CLI: exit 2, one
``fl-sim: error:`` line, no traceback, nothing at OUT), never another exception type.
A safetensors header that lies about sizes or offsets is covered by tests/test_safetensors_io.py
(``test_header_that_lies_*``-style cases there), so it is not fuzzed again here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sim.checkpoints.safetensors_io import save_tensors
from fl_sim.cli.main import main as cli_main
from fl_sim.config.run_config import RunConfig
from fl_sim.errors import FlSimError
from fl_sim.merge.options import read_train_meta

FUZZ = settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
KEYS = list(RunConfig().to_mapping())
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.integers(min_value=-3, max_value=12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["0:nan", "1:scale:-1e400", "0:1", "inf", "nan", "-1", "1e999", "log:0:1"]),
)
values = st.one_of(
    scalars,
    st.lists(scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), scalars, max_size=2),
)


def one_line_flsim_error(call) -> str:
    try:
        call()
    except FlSimError as error:
        message = str(error)
        assert "\n" not in message, message
        return message
    return ""


@FUZZ
@given(
    st.dictionaries(
        st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS), st.text(max_size=12)),
        values,
        max_size=4,
    )
)
def test_run_config_from_random_mappings_is_valid_or_a_one_line_error(mapping):
    message = one_line_flsim_error(lambda: RunConfig.from_mapping(mapping))
    if message:
        # a bad value names its key; a bad combination names one of the keys involved
        named = [key for key in [*mapping, *KEYS] if isinstance(key, str) and key in message]
        assert named or "run-config key" in message, message


@pytest.mark.parametrize(
    "mapping",
    [
        {"num-rounds": float("inf")},
        {"num-rounds": float("nan")},
        {"server-lr": 10**400},
        {"num-tasks": 10**9},
        {"seed": 10**30},
        {"lr": 10**400},
        {"local-steps": "1e999"},
        {"local-steps": 10**400},
        {"byzantine": "0:scale:1e999"},
        {"crash": "0:1e9"},
        {"slow": "0:nan"},
        {"round-timeout": float("inf")},
    ],
)
def test_run_config_values_found_hostile_are_one_line_errors(mapping):
    message = one_line_flsim_error(lambda: RunConfig.from_mapping(mapping))
    assert message and next(iter(mapping)) in message, message


# ---------------------------------------------------------------------------------------------
# fl-sim merge CONFIG.yaml: malformed values
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> tuple[str, list[str]]:
    root = tmp_path_factory.mktemp("hostile")
    base = {"w": torch.zeros(3), "b": torch.zeros(2)}
    save_tensors(root / "base.safetensors", base)
    models = []
    for t in range(3):
        save_tensors(root / f"ft{t}.safetensors", {n: x + t + 1 for n, x in base.items()})
        models.append(str(root / f"ft{t}.safetensors"))
    return str(root / "base.safetensors"), models


yaml_values = st.one_of(
    scalars,
    st.lists(
        st.one_of(scalars, st.dictionaries(st.sampled_from(["model", "parameters"]), scalars)),
        max_size=3,
    ),
    st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), scalars, max_size=3),
)
YAML_FIELDS = ["merge_method", "base_model", "models", "parameters", "dtype", "out", "train_meta"]
PARAMETERS = ["lambda", "server_lr", "rho", "median_mode", "tau_c", "iters", "a_norm", "weight"]


@FUZZ
@given(
    method=st.one_of(
        st.sampled_from(["task_arithmetic", "fedavg", "fednova", "fedgma", "median", "cclip"]),
        scalars,
    ),
    parameters=st.dictionaries(st.sampled_from(PARAMETERS), scalars, max_size=3),
    weights=st.one_of(st.none(), st.lists(scalars, min_size=3, max_size=3)),
    extra=st.dictionaries(
        st.one_of(st.sampled_from(YAML_FIELDS), st.text(max_size=6), st.integers()),
        yaml_values,
        max_size=2,
    ),
)
def test_merge_yaml_with_malformed_values_is_exit_2_and_one_line(
    checkpoints, tmp_path_factory, capsys, method, parameters, weights, extra
):
    base, models = checkpoints
    folder = tmp_path_factory.mktemp("case")
    entries = [
        {"model": m} if weights is None else {"model": m, "parameters": {"weight": w}}
        for m, w in zip(models, weights or [None] * 3, strict=True)
    ]
    document = {
        "merge_method": method,
        "base_model": base,
        "models": entries,
        "parameters": parameters,
    }
    document.update(extra)
    path = folder / "merge.yaml"
    path.write_text(yaml.safe_dump(document))
    out = folder / "out" / "merged.safetensors"
    code = cli_main(["merge", str(path), "--out", str(out), "--no-progress"])
    captured = capsys.readouterr()
    if code == 0:
        return  # a valid merge: fine
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fl-sim: error: "), captured.err
    assert "Traceback" not in captured.err
    assert not out.exists() and not any(folder.glob("out/*")), list(folder.rglob("*"))


def test_merge_yaml_that_is_not_yaml_or_not_a_mapping(checkpoints, tmp_path, capsys):
    base, models = checkpoints
    for text in (
        "merge_method: [",
        "- 1\n- 2",
        "",
        "\x00\x01",
        "a: !!python/object:os.system x",
        "1: x\nb: y",  # keys of mixed types (was a TypeError)
        f"merge_method: 5\nbase_model: {base}",
        f"merge_method: fedavg\nbase_model: [1, 2]\nmodels: {models}",
    ):
        path = tmp_path / "merge.yaml"
        path.write_text(text)
        assert cli_main(["merge", str(path), "--out", str(tmp_path / "o.safetensors")]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# --train-meta JSON
# ---------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
        st.floats(), st.text(max_size=8),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(["steps", "lr_sum", "lr-sum", "a_norm_exact", "x", "m0", "0"]),
            inner,
            max_size=3,
        ),
    ),
    max_leaves=8,
)  # fmt: skip


@FUZZ
@given(json_values)
def test_train_meta_json_is_valid_or_a_one_line_error_naming_the_field(tmp_path_factory, table):
    folder = tmp_path_factory.mktemp("meta")
    path = folder / "meta.json"
    path.write_text(json.dumps(table))
    models = [Path(folder / "m0"), Path(folder / "m1")]
    message = one_line_flsim_error(lambda: read_train_meta(path, models, ["m0", "m1"]))
    if message:
        assert "--train-meta" in message or str(path) in message, message
