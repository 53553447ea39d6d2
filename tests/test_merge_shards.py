"""Sharded output of `fl-sim merge` (``--max-shard-size``) and sharded inputs.

A folder OUT larger than one shard is ``model-0000i-of-0000n.safetensors`` plus
``model.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``), as
``transformers``' ``save_pretrained`` writes it; smaller, it is one ``model.safetensors``. The
checks: ``from_pretrained`` loads the shards, they hold the unsharded output bit for bit, every
shard keeps to the limit, a failed merge leaves no folder, and sharded inputs (from
``save_pretrained(max_shard_size=...)`` and from fl-sim itself) merge like unsharded ones.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from fl_sim.checkpoints.model_checkpoint import open_checkpoint
from fl_sim.checkpoints.sharding import parse_shard_size, plan_shards
from fl_sim.cli.main import main
from fl_sim.errors import ConfigError

TINY_LLAMA = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}
SHARD = 10_000  # bytes: the tiny Llama (≈ 60 kB of float32) becomes several shards
INDEX = "model.safetensors.index.json"


pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny tensors: one thread


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """θ₀ (tiny Llama) and two seeded fine-tunes, each also saved sharded by transformers."""
    root = tmp_path_factory.mktemp("shards")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))
    model.save_pretrained(root / "base")
    model.save_pretrained(root / "base_sharded", max_shard_size=SHARD)
    theta0 = {n: t.detach().clone() for n, t in model.state_dict().items()}
    for t in (1, 2):
        generator = torch.Generator().manual_seed(t)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(theta0[name] + 0.01 * t * noise)
        model.save_pretrained(root / f"ft{t}")
        model.save_pretrained(root / f"ft{t}_sharded", max_shard_size=SHARD)
    return {name: root / name for name in ("base", "base_sharded", "ft1", "ft2", "ft1_sharded",
                                          "ft2_sharded")}  # fmt: skip


def merge(*argv: object) -> None:
    assert main(["merge", *map(str, argv), "--no-progress"]) == 0


def weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a folder, sharded or not, read with the safetensors library."""
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
    out = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(folder / shard, "pt") as file:
            out.update({name: file.get_tensor(name) for name in file.keys()})  # noqa: SIM118
    assert set(out) == set(weight_map)
    return out


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_parse_shard_size_follows_hugging_face_units() -> None:
    assert parse_shard_size("5GB") == 5 * 10**9
    assert parse_shard_size("500MB") == 500 * 10**6
    assert parse_shard_size("10KB") == 10_000
    assert parse_shard_size("2GiB") == 2 * 2**30
    assert parse_shard_size("1.5mb") == 1_500_000
    assert parse_shard_size("12345") == 12345
    assert parse_shard_size(777) == 777


@pytest.mark.parametrize("value", ["", "abc", "5XB", "0", "0KB", "-1GB", "1.2.3MB", "GB", "5 G B"])
def test_bad_shard_sizes_are_refused_in_one_line(value: str) -> None:
    with pytest.raises(ConfigError, match="--max-shard-size") as err:
        parse_shard_size(value)
    assert "\n" not in str(err.value)


def test_plan_shards_is_greedy_and_gives_a_big_tensor_its_own_shard() -> None:
    f32 = torch.float32
    specs = [("a", f32, (10,)), ("b", f32, (10,)), ("big", f32, (100,)), ("c", f32, (5,))]
    shards = plan_shards(specs, 80)  # 40 + 40 fit; 400 alone; then 20
    assert [[s[0] for s in shard] for shard in shards] == [["a", "b"], ["big"], ["c"]]


def test_sharded_output_loads_and_equals_the_unsharded_output(llama, tmp_path) -> None:
    common = ["--method", "task_arithmetic", "--lambda", 0.4, "--base", llama["base"]]
    merge(*common, "--out", tmp_path / "one", llama["ft1"], llama["ft2"])
    merge(*common, "--out", tmp_path / "many", "--max-shard-size", "10KB", llama["ft1"],
          llama["ft2"])  # fmt: skip
    one, many = tmp_path / "one", tmp_path / "many"
    assert (one / "model.safetensors").is_file() and not (one / INDEX).exists()
    assert not (many / "model.safetensors").exists()
    index = json.loads((many / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    count = len(shards)
    assert count >= 4
    assert shards == [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
    assert sorted(p.name for p in many.glob("*.safetensors")) == shards
    unsharded = weights(one)
    assert_bit_equal(weights(many), unsharded)
    total = sum(t.numel() * t.element_size() for t in unsharded.values())
    assert index["metadata"]["total_size"] == total
    for shard in shards:  # within the limit, unless one tensor alone is larger
        with safe_open(many / shard, "pt") as file:
            sizes = [file.get_slice(n).get_shape() for n in file.keys()]  # noqa: SIM118
        size = sum(4 * torch.Size(s).numel() for s in sizes)
        assert size <= SHARD or len(sizes) == 1, (shard, size)
    report = json.loads((many / "merge_report.json").read_text())
    assert report["output"]["shards"] == count and report["output"]["max_shard_size"] == SHARD
    # transformers loads both, to the same parameters
    loaded_one = LlamaForCausalLM.from_pretrained(one).state_dict()
    loaded_many = LlamaForCausalLM.from_pretrained(many).state_dict()
    assert_bit_equal(loaded_one, loaded_many)
    assert (many / "config.json").is_file()


def test_default_keeps_a_small_model_in_one_file(llama, tmp_path) -> None:
    merge("--method", "fedavg", "--base", llama["base"], "--out", tmp_path / "out", llama["ft1"],
          llama["ft2"])  # fmt: skip
    assert [p.name for p in (tmp_path / "out").glob("model*")] == ["model.safetensors"]
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert report["output"]["max_shard_size"] == 5 * 10**9


def test_sharded_inputs_merge_like_unsharded_ones(llama, tmp_path) -> None:
    """transformers' sharded save_pretrained as base and models, and fl-sim's own shards as
    input to the next merge."""
    common = ["--method", "median"]
    merge(*common, "--base", llama["base"], "--out", tmp_path / "plain", llama["ft1"], llama["ft2"])
    merge(*common, "--base", llama["base_sharded"], "--out", tmp_path / "sharded",
          llama["ft1_sharded"], llama["ft2_sharded"])  # fmt: skip
    assert (llama["base_sharded"] / INDEX).is_file()
    assert_bit_equal(weights(tmp_path / "sharded"), weights(tmp_path / "plain"))
    merge("--method", "fedavg", "--base", llama["base"], "--out", tmp_path / "ours",
          "--max-shard-size", SHARD, llama["ft1"], llama["ft2"])  # fmt: skip
    merge("--method", "fedavg", "--base", llama["base"], "--out", tmp_path / "ref",
          llama["ft1"], llama["ft2"])  # fmt: skip
    for name in ("ours", "ref"):  # the same merge from fl-sim's shards and from one file
        merge("--method", "fedavg", "--base", llama["base"], "--out", tmp_path / f"next_{name}",
              tmp_path / name, llama["ft2"])  # fmt: skip
    assert (tmp_path / "ours" / INDEX).is_file()
    assert_bit_equal(weights(tmp_path / "next_ours"), weights(tmp_path / "next_ref"))


def refused(capsys, argv: Sequence[object], out: Path, needle: str) -> None:
    capsys.readouterr()
    code = main(["merge", *map(str, argv), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fl-sim: error:") and "\n" not in err, err
    assert needle in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("value", ["ten", "0", "5TBB", "-3"])
def test_cli_refuses_a_bad_max_shard_size(llama, tmp_path, capsys, value) -> None:
    argv = ["--method", "fedavg", "--base", llama["base"], "--out", tmp_path / "out",
            f"--max-shard-size={value}", llama["ft1"], llama["ft2"]]  # fmt: skip
    refused(capsys, argv, tmp_path / "out", "--max-shard-size")


def test_a_file_output_cannot_be_sharded(llama, tmp_path, capsys) -> None:
    files = []
    for name in ("base", "ft1", "ft2"):
        save_file(load_file(llama[name] / "model.safetensors"), tmp_path / f"{name}.safetensors")
        files.append(tmp_path / f"{name}.safetensors")
    out = tmp_path / "out.safetensors"
    argv = ["--method", "fedavg", "--base", files[0], "--out", out, "--max-shard-size", "10KB",
            *files[1:]]  # fmt: skip
    refused(capsys, argv, out, "folder")
    merge("--method", "fedavg", "--base", files[0], "--out", out, *files[1:])  # no flag: one file
    assert out.is_file()


def test_a_failed_sharded_merge_leaves_no_folder(llama, tmp_path, capsys) -> None:
    """A NaN in the last tensor fails the merge after earlier shards were written: OUT never
    appears, and no temp folder is left behind."""
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = load_file(llama["ft2"] / "model.safetensors")
    with open_checkpoint(llama["base"]) as base:
        last = base.keys()[-1]  # the merge's (the file's) order
    tensors[last] = tensors[last].clone()
    tensors[last].view(-1)[0] = float("nan")
    save_file(tensors, broken / "model.safetensors")
    (broken / "config.json").write_text((llama["ft2"] / "config.json").read_text())
    argv = ["--method", "fedavg", "--base", llama["base"], "--out", tmp_path / "out",
            "--max-shard-size", "10KB", llama["ft1"], broken]  # fmt: skip
    refused(capsys, argv, tmp_path / "out", "NaN")
