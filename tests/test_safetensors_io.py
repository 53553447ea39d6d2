"""The reader refuses every lying header and serves zero-copy views; the writer streams."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fl_sim.checkpoints.safetensors_io as safetensors_io
from fl_sim.checkpoints.safetensors_io import (
    DTYPES,
    SafetensorsFile,
    save_tensors,
    write_safetensors,
)
from fl_sim.errors import CheckpointError


def example_tensor(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.arange(-7, -7 + torch.Size(shape).numel()).reshape(shape)
    if dtype == torch.bool:
        return values % 2 == 0
    if dtype.is_floating_point:
        return (values * 0.37).to(dtype)
    if not dtype.is_signed:
        values = values.abs()
    return values.to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality: works for every dtype, NaN and float8 included."""
    if (a.dtype, a.shape) != (b.dtype, b.shape):
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def raw_file(
    path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None
) -> Path:
    """A safetensors file with exactly this header and data, however wrong they are."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if length is None else length
    path.write_bytes(length.to_bytes(8, "little") + raw + data)
    return path


def assert_one_line_error(path: Path, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as caught:
        SafetensorsFile(path)
    assert "\n" not in str(caught.value)
    assert str(path) in str(caught.value)


SHAPES = [(3, 5), (), (0, 4), (2, 0, 3)]


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_every_dtype_round_trips_and_loads_with_the_reference(tmp_path: Path, dtype) -> None:
    tensors = {f"t{i}": example_tensor(dtype, shape) for i, shape in enumerate(SHAPES)}
    path = tmp_path / "model.safetensors"
    save_tensors(path, tensors, metadata={"format": "pt"})

    with SafetensorsFile(path) as file:
        assert file.metadata == {"format": "pt"}
        assert sorted(file.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert file.dtype(name) == dtype
            assert file.shape(name) == tuple(tensor.shape)
            assert file.nbytes(name) == tensor.numel() * dtype.itemsize
            assert same_bits(file.get(name), tensor)

    reference = safetensors.torch.load_file(path)
    assert reference.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert same_bits(reference[name], tensor)


def test_reads_files_written_by_the_reference(tmp_path: Path) -> None:
    tensors = {
        "embeddings.weight": torch.randn(10, 4, dtype=torch.bfloat16),
        "norm.bias": torch.randn(3, dtype=torch.float16),
        "mask": torch.tensor([True, False, True]),
        "step": torch.tensor(7, dtype=torch.int64),
    }
    path = tmp_path / "reference.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"source": "reference"})
    with SafetensorsFile(path) as file:
        assert file.metadata == {"source": "reference"}
        assert sorted(file) == sorted(tensors)
        for name, tensor in tensors.items():
            assert same_bits(file.get(name), tensor)


def test_writer_lays_out_mixed_dtypes_aligned_so_reads_are_zero_copy(tmp_path: Path) -> None:
    path = tmp_path / "mixed.safetensors"
    # An odd-sized int8 first would misalign everything after it in spec order.
    save_tensors(
        path,
        {
            "a": torch.ones(3, dtype=torch.int8),
            "b": torch.ones(5, dtype=torch.float32),
            "c": torch.ones(1, dtype=torch.bfloat16),
            "d": torch.ones(2, dtype=torch.float64),
        },
    )
    with SafetensorsFile(path) as file:
        assert file.keys() == ["d", "b", "c", "a"]  # descending itemsize, spec order within
        for name in file:
            assert file.get(name).data_ptr() % file.dtype(name).itemsize == 0


def test_get_is_a_zero_copy_view_into_the_mapping(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"a": torch.arange(4.0), "b": torch.arange(6.0).reshape(2, 3)})
    with SafetensorsFile(path) as file:
        a, a_again, b = file.get("a"), file.get("a"), file.get("b")
        assert a.data_ptr() == a_again.data_ptr()  # a copy would live at a fresh address
        assert b.data_ptr() - a.data_ptr() == 4 * 4  # b's data follows a's 16 bytes in the file
        assert torch.equal(b, torch.arange(6.0).reshape(2, 3))


def test_views_stay_valid_after_close(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"a": torch.arange(1000.0)})
    file = SafetensorsFile(path)
    a = file.get("a")
    file.close()
    del file
    gc.collect()
    assert a.sum().item() == sum(range(1000))


def test_get_after_close_raises(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"a": torch.zeros(2)})
    file = SafetensorsFile(path)
    file.close()
    with pytest.raises(ValueError, match="closed"):
        file.get("a")


def test_misaligned_data_is_copied_into_an_aligned_tensor(tmp_path: Path) -> None:
    values = torch.tensor([1.5, -2.25], dtype=torch.float32)
    header = {
        "byte": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "pair": {"dtype": "F32", "shape": [2], "data_offsets": [1, 9]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = raw_file(tmp_path / "misaligned.safetensors", raw, b"\x07" + values.numpy().tobytes())
    with SafetensorsFile(path) as file:
        pair = file.get("pair")
        assert pair.data_ptr() % 4 == 0
        assert torch.equal(pair, values)
        assert file.get("byte").tolist() == [7]


def test_unknown_tensor_name_is_a_key_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"a": torch.zeros(2)})
    with SafetensorsFile(path) as file, pytest.raises(KeyError, match="'missing'"):
        file.get("missing")


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    ("header", "data", "length", "match"),
    [
        (b"{}", b"", 1000, "header lies about its length"),
        ({"a": {**F32_2, "data_offsets": [0, 16]}}, bytes(8), None, "data_offsets"),
        ({"a": {**F32_2, "data_offsets": [-8, 0]}}, bytes(8), None, "data_offsets"),
        ({"a": {**F32_2, "data_offsets": [0]}}, bytes(8), None, "data_offsets"),
        ({"a": {**F32_2, "shape": [3]}}, bytes(12), None, "needs 12"),
        ({"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}, bytes(12), None, "overlaps"),
        (b'{"a": ', b"", None, "not valid JSON"),
        (b"\xff\xfe", b"", None, "not valid JSON"),
        (b"[" * 100_000, b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "JSON list, not an object"),
        (b'{"a": 1, "a": 2}', b"", None, "appears twice"),
        ({"a": {**F32_2, "dtype": "F128"}}, bytes(8), None, "unknown dtype 'F128'"),
        ({"a": {**F32_2, "shape": [-2]}}, bytes(8), None, "non-negative ints"),
        ({"a": {**F32_2, "shape": [True, 2]}}, bytes(8), None, "non-negative ints"),
        ({"a": {**F32_2, "shape": [2.0]}}, bytes(8), None, "non-negative ints"),
        ({"a": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "needs dtype, shape"),
        ({"a": [1, 2]}, bytes(8), None, "needs dtype, shape"),
        ({"__metadata__": {"n": 1}}, b"", None, "__metadata__"),
        (b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 5000 + b"]}}", b"", None, "not valid JSON"),
        ({"a": {**F32_2, "shape": [10**400] * 20}}, bytes(8), None, "needs more than the 8"),
        ({"a": {**F32_2, "shape": [-1] * 10_000}}, bytes(8), None, r"shape \[-1, -1, .* \.\.\.\]"),
    ],
    ids=[
        "length-past-end",
        "offsets-past-end",
        "negative-offset",
        "one-offset",
        "size-not-numel-times-itemsize",
        "overlap",
        "truncated-json",
        "not-utf8",
        "deep-nesting",
        "not-an-object",
        "duplicate-key",
        "unknown-dtype",
        "negative-shape",
        "bool-shape",
        "float-shape",
        "missing-field",
        "entry-not-an-object",
        "metadata-not-str",
        "int-too-long-to-parse",
        "numel-too-long-to-print",
        "shape-too-long-to-print",
    ],
)
def test_lying_header_is_refused_in_one_line(
    tmp_path: Path, header: dict | bytes, data: bytes, length: int | None, match: str
) -> None:
    path = raw_file(tmp_path / "lies.safetensors", header, data, length)
    assert_one_line_error(path, match)


def test_file_shorter_than_the_length_prefix_is_not_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "short.safetensors"
    path.write_bytes(b"\x01\x02")
    assert_one_line_error(path, "is not a safetensors file")


def test_header_over_the_limit_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(safetensors_io, "MAX_HEADER_BYTES", 16)
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"a_long_enough_name": torch.zeros(2)})
    assert_one_line_error(path, "over the 16-byte limit")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    assert_one_line_error(tmp_path / "absent.safetensors", "cannot be opened")


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_corrupted_header_raises_checkpoint_error_or_reads_cleanly(tmp_path: Path, data) -> None:
    path = tmp_path / "fuzz.safetensors"
    save_tensors(path, {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3, dtype=torch.int8)})
    raw = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(raw[:8], "little")
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, header_end - 1))
        raw[position] = data.draw(st.integers(0, 255))
    path.write_bytes(bytes(raw))
    try:
        file = SafetensorsFile(path)
    except CheckpointError as err:
        assert "\n" not in str(err)
        return
    with file:
        for name in file:
            assert file.get(name).shape == file.shape(name)


def test_writer_streams_a_generator_in_spec_order(tmp_path: Path) -> None:
    produced: list[str] = []

    def tensors():
        for name in ["x", "y"]:
            produced.append(name)
            yield name, torch.full((2, 2), float(len(produced)))

    path = tmp_path / "streamed.safetensors"
    specs = [("x", torch.float32, (2, 2)), ("y", torch.float32, (2, 2))]
    write_safetensors(path, tensors(), specs, metadata={"k": "v"})
    loaded = safetensors.torch.load_file(path)
    assert torch.equal(loaded["x"], torch.ones(2, 2))
    assert torch.equal(loaded["y"], torch.full((2, 2), 2.0))
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_length % 8 == 0


def test_writer_writes_non_contiguous_and_grad_tensors(tmp_path: Path) -> None:
    weight = torch.arange(6.0).reshape(2, 3).t()
    bias = torch.ones(3, requires_grad=True)
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"weight": weight, "bias": bias})
    loaded = safetensors.torch.load_file(path)
    assert torch.equal(loaded["weight"], weight)
    assert torch.equal(loaded["bias"], bias.detach())


@pytest.mark.parametrize(
    ("stream", "match"),
    [
        ([("x", torch.zeros(2)), ("y", torch.zeros(3))], "but its spec is 'y'"),
        ([("x", torch.zeros(2)), ("z", torch.zeros(2))], "but its spec is 'y'"),
        ([("x", torch.zeros(2)), ("y", torch.zeros(2, dtype=torch.float64))], "spec"),
        ([("x", torch.zeros(2))], "first missing: 'y'"),
        ([("x", torch.zeros(2)), ("y", torch.zeros(2)), ("w", torch.zeros(2))], "after all 2"),
    ],
    ids=["shape", "name", "dtype", "too-few", "too-many"],
)
def test_writer_leaves_nothing_behind_when_the_stream_breaks_its_specs(
    tmp_path: Path, stream, match: str
) -> None:
    specs = [("x", torch.float32, (2,)), ("y", torch.float32, (2,))]
    with pytest.raises(ValueError, match=match):
        write_safetensors(tmp_path / "out.safetensors", iter(stream), specs)
    assert list(tmp_path.iterdir()) == []


def test_writer_keeps_the_old_file_when_the_producer_fails(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_tensors(path, {"old": torch.zeros(1)})

    def tensors():
        yield "x", torch.zeros(2)
        raise RuntimeError("producer crashed")

    specs = [("x", torch.float32, (2,)), ("y", torch.float32, (2,))]
    with pytest.raises(RuntimeError, match="producer crashed"):
        write_safetensors(path, tensors(), specs)
    assert list(tmp_path.iterdir()) == [path]
    assert list(safetensors.torch.load_file(path)) == ["old"]


def test_writer_rejects_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="appears twice"):
        write_safetensors(tmp_path / "a.safetensors", [], [("x", torch.float32, (1,))] * 2)
    with pytest.raises(ValueError, match="reserved"):
        write_safetensors(tmp_path / "a.safetensors", [], [("__metadata__", torch.float32, (1,))])
    with pytest.raises(ValueError, match="unsupported dtype"):
        write_safetensors(tmp_path / "a.safetensors", [], [("x", torch.complex64, (1,))])
    assert list(tmp_path.iterdir()) == []
