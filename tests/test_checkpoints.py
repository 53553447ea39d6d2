"""Checkpoints open lazily in every supported layout; incompatible ones and pickles are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel

from fl_sim.checkpoints.model_checkpoint import (
    Checkpoint,
    atomic_output,
    check_compatible,
    copy_model_files,
    open_checkpoint,
)
from fl_sim.checkpoints.safetensors_io import save_tensors
from fl_sim.errors import CheckpointError, ConfigError


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        vocab_size=100,
        max_position_embeddings=64,
    )
    model = BertModel(config)
    folder = tmp_path_factory.mktemp("bert")
    model.save_pretrained(folder)
    return folder, {name: tensor.clone() for name, tensor in model.state_dict().items()}


def small_state_dict() -> dict[str, torch.Tensor]:
    return {
        "encoder.weight": torch.arange(12.0).reshape(3, 4),
        "encoder.bias": torch.arange(3.0),
        "head.weight": torch.ones(2, 3),
        "head.bias": torch.zeros(2),
    }


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """Two shards and the index that maps every tensor to its shard."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    weight_map = {}
    for shard, shard_names in shards.items():
        save_tensors(folder / shard, {name: tensors[name] for name in shard_names})
        weight_map.update(dict.fromkeys(shard_names, shard))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def assert_matches(checkpoint: Checkpoint, tensors: dict[str, torch.Tensor]) -> None:
    assert sorted(checkpoint.keys()) == sorted(tensors)
    for name, tensor in tensors.items():
        assert checkpoint.shape(name) == tuple(tensor.shape)
        assert checkpoint.dtype(name) == tensor.dtype
        assert torch.equal(checkpoint.get(name), tensor)
    assert checkpoint.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_hugging_face_folder_yields_the_models_state_dict(bert_folder) -> None:
    folder, state_dict = bert_folder
    with open_checkpoint(folder) as checkpoint:
        assert checkpoint.is_folder
        assert checkpoint.path == folder
        assert_matches(checkpoint, state_dict)


def test_single_safetensors_file(bert_folder) -> None:
    folder, state_dict = bert_folder
    with open_checkpoint(folder / "model.safetensors") as checkpoint:
        assert not checkpoint.is_folder
        assert_matches(checkpoint, state_dict)


def test_sharded_folder_and_index_file(tmp_path: Path) -> None:
    tensors = small_state_dict()
    index = write_sharded(tmp_path / "sharded", tensors)
    with open_checkpoint(tmp_path / "sharded") as checkpoint:
        assert checkpoint.is_folder
        assert_matches(checkpoint, tensors)
        assert checkpoint.keys() == list(tensors)  # shard by shard, file order within
    with open_checkpoint(index) as checkpoint:
        assert not checkpoint.is_folder
        assert_matches(checkpoint, tensors)


def test_sharded_folder_with_a_missing_shard_is_refused(tmp_path: Path) -> None:
    write_sharded(tmp_path, small_state_dict())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors.*missing") as err:
        open_checkpoint(tmp_path)
    one_line(err)


def test_index_naming_a_tensor_its_shard_lacks_is_refused(tmp_path: Path) -> None:
    index = write_sharded(tmp_path, small_state_dict())
    content = json.loads(index.read_text())
    content["weight_map"]["ghost.weight"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=r"'ghost\.weight'.*lacks it") as err:
        open_checkpoint(tmp_path)
    one_line(err)


def test_index_pointing_outside_its_folder_is_refused(tmp_path: Path) -> None:
    save_tensors(tmp_path / "outside.safetensors", {"a": torch.zeros(1)})
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "../outside.safetensors"}})
    )
    with pytest.raises(CheckpointError, match="outside its folder"):
        open_checkpoint(tmp_path / "model")


def test_unreadable_index_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="unreadable") as err:
        open_checkpoint(tmp_path)
    one_line(err)


def test_pickled_folder_is_refused_unless_allowed(tmp_path: Path) -> None:
    tensors = small_state_dict()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*--allow-pickle") as err:
        open_checkpoint(tmp_path)
    one_line(err)
    with open_checkpoint(tmp_path, allow_pickle=True) as checkpoint:
        assert checkpoint.is_folder
        assert_matches(checkpoint, tensors)
        assert checkpoint.keys() == list(tensors)


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "pytorch_model.bin"])
def test_pickled_file_is_refused_unless_allowed(tmp_path: Path, name: str) -> None:
    tensors = small_state_dict()
    torch.save(tensors, tmp_path / name)
    with pytest.raises(CheckpointError, match="--allow-pickle") as err:
        open_checkpoint(tmp_path / name)
    one_line(err)
    with open_checkpoint(tmp_path / name, allow_pickle=True) as checkpoint:
        assert not checkpoint.is_folder
        assert_matches(checkpoint, tensors)


def test_sharded_pickle_loads_when_allowed(tmp_path: Path) -> None:
    tensors = small_state_dict()
    names = list(tensors)
    torch.save({name: tensors[name] for name in names[:2]}, tmp_path / "pytorch_model-1.bin")
    torch.save({name: tensors[name] for name in names[2:]}, tmp_path / "pytorch_model-2.bin")
    weight_map = {name: f"pytorch_model-{1 if i < 2 else 2}.bin" for i, name in enumerate(names)}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_checkpoint(tmp_path)
    with open_checkpoint(tmp_path, allow_pickle=True) as checkpoint:
        assert_matches(checkpoint, tensors)


def test_pickle_that_is_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    torch.save({"model": small_state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="'model' is a dict, not a tensor") as err:
        open_checkpoint(tmp_path / "checkpoint.pt", allow_pickle=True)
    one_line(err)


class RunsCode:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_pickle_that_runs_code_is_refused_even_when_allowed(tmp_path: Path) -> None:
    torch.save({"weight": RunsCode()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="weights_only=True") as err:
        open_checkpoint(tmp_path / "model.pt", allow_pickle=True)
    one_line(err)


def test_trainer_state_pickles_are_not_taken_for_weights(tmp_path: Path) -> None:
    torch.save(small_state_dict(), tmp_path / "pytorch_model.bin")
    torch.save({"lr": 1.0}, tmp_path / "optimizer.pt")
    (tmp_path / "training_args.bin").write_bytes(b"not weights")
    with open_checkpoint(tmp_path, allow_pickle=True) as checkpoint:
        assert_matches(checkpoint, small_state_dict())
    (tmp_path / "pytorch_model.bin").rename(tmp_path / "model.bin")
    with open_checkpoint(tmp_path, allow_pickle=True) as checkpoint:
        assert_matches(checkpoint, small_state_dict())


def test_peft_adapter_is_refused(tmp_path: Path) -> None:
    save_tensors(tmp_path / "adapter_model.safetensors", {"lora_A.weight": torch.zeros(2, 2)})
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="PEFT adapter"):
        open_checkpoint(tmp_path)


def test_missing_path_is_named(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=f"{tmp_path / 'nope'} does not exist") as err:
        open_checkpoint(tmp_path / "nope")
    one_line(err)


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="empty folder"):
        open_checkpoint(tmp_path)


def test_folder_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds no model\.safetensors"):
        open_checkpoint(tmp_path)


def test_file_of_an_unknown_kind_is_refused(tmp_path: Path) -> None:
    (tmp_path / "weights.npz").write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        open_checkpoint(tmp_path / "weights.npz")


def save_checkpoint(path: Path, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    save_tensors(path, tensors)
    return open_checkpoint(path)


def test_compatible_checkpoints_give_the_base_order(tmp_path: Path) -> None:
    tensors = small_state_dict()
    base = save_checkpoint(tmp_path / "base.safetensors", tensors)
    fine_tuned = {name: tensor + 1 for name, tensor in reversed(tensors.items())}
    other = save_checkpoint(tmp_path / "ft.safetensors", fine_tuned)
    assert check_compatible(base, [other, other]) == base.keys() == list(tensors)
    assert check_compatible(base, []) == base.keys()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda t: {k: v for k, v in t.items() if k != "head.bias"}, "lacks tensor 'head.bias'"),
        (lambda t: {**t, "extra.weight": torch.zeros(1)}, "has tensor 'extra.weight'"),
        (
            lambda t: {**t, "head.weight": torch.ones(3, 2)},
            r"'head.weight' has shape \[3, 2\] but the base has \[2, 3\]",
        ),
        (
            lambda t: {**t, "head.bias": torch.zeros(2, dtype=torch.bfloat16)},
            "'head.bias' is torch.bfloat16 but the base has torch.float32.*--dtype",
        ),
    ],
    ids=["missing-key", "extra-key", "shape", "dtype"],
)
def test_incompatible_checkpoints_are_refused(tmp_path: Path, change, match: str) -> None:
    tensors = small_state_dict()
    base = save_checkpoint(tmp_path / "base.safetensors", tensors)
    good = save_checkpoint(tmp_path / "good.safetensors", tensors)
    bad = save_checkpoint(tmp_path / "bad.safetensors", change(tensors))
    with pytest.raises(CheckpointError, match=match) as err:
        check_compatible(base, [good, bad])
    assert str(tmp_path / "bad.safetensors") in one_line(err)


def test_copy_model_files_copies_config_and_tokenizer_but_no_weights(tmp_path: Path) -> None:
    base = tmp_path / "base"
    write_sharded(base, small_state_dict())
    for name in [
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
    ]:
        (base / name).write_text(f"{name} content")
    for name in ["model.safetensors", "pytorch_model.bin", "optimizer.pt", "rng_state.pth"]:
        (base / name).write_bytes(b"weights")
    (base / "fl_sim_meta.json").write_text("{}")
    (base / ".cache").mkdir()
    (base / ".cache" / "download.lock").write_text("")
    (base / "tokenizer").mkdir()
    (base / "tokenizer" / "merges.txt").write_text("a b")

    out = tmp_path / "out"
    copied = copy_model_files(base, out)

    expected = {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.txt",
        "special_tokens_map.json",
        "tokenizer/merges.txt",
    }
    assert {str(path) for path in copied} == expected
    on_disk = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert on_disk == expected
    assert (out / "config.json").read_text() == "config.json content"


def test_copy_model_files_needs_a_folder(tmp_path: Path) -> None:
    save_tensors(tmp_path / "model.safetensors", {"a": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not a folder"):
        copy_model_files(tmp_path / "model.safetensors", tmp_path / "out")


def test_atomic_output_leaves_nothing_at_out_when_the_block_fails(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with pytest.raises(RuntimeError, match="merge failed"), atomic_output(out, is_dir=True) as temp:
        assert temp.parent == tmp_path and temp.name.startswith(".merged.tmp-")
        (temp / "config.json").write_text("{}")
        raise RuntimeError("merge failed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_output_moves_a_finished_folder_into_place(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "merged"
    with atomic_output(out, is_dir=True) as temp:
        save_tensors(temp / "model.safetensors", {"a": torch.ones(2)})
        assert not out.exists()
    assert [p.name for p in out.iterdir()] == ["model.safetensors"]
    assert list(out.parent.iterdir()) == [out]


def test_atomic_output_for_a_single_file(tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    with atomic_output(out, is_dir=False) as temp:
        save_tensors(temp, {"a": torch.ones(2)})
    with open_checkpoint(out) as checkpoint:
        assert torch.equal(checkpoint.get("a"), torch.ones(2))
    assert list(tmp_path.iterdir()) == [out]


def test_atomic_output_refuses_an_existing_out_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    ran = False
    with (
        pytest.raises(ConfigError, match=r"already exists.*--force") as err,
        atomic_output(out, is_dir=True),
    ):
        ran = True
    one_line(err)
    assert not ran
    assert (out / "keep.txt").read_text() == "keep"


def test_force_replaces_out_only_once_the_new_one_is_complete(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")

    with pytest.raises(RuntimeError), atomic_output(out, is_dir=True, force=True) as temp:
        (temp / "new.txt").write_text("new")
        raise RuntimeError("merge failed")
    assert [p.name for p in out.iterdir()] == ["old.txt"]

    with atomic_output(out, is_dir=True, force=True) as temp:
        (temp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()
    assert [p.name for p in out.iterdir()] == ["new.txt"]
    assert list(tmp_path.iterdir()) == [out]


def test_force_replaces_an_existing_file(tmp_path: Path) -> None:
    out = tmp_path / "merged.safetensors"
    out.write_bytes(b"old")
    with atomic_output(out, is_dir=False, force=True) as temp:
        save_tensors(temp, {"a": torch.ones(2)})
    with open_checkpoint(out) as checkpoint:
        assert checkpoint.keys() == ["a"]
    assert list(tmp_path.iterdir()) == [out]
