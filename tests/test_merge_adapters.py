"""`fl-sim merge` with PEFT LoRA adapters as inputs, and `--to-adapter --rank r` as output.

An adapter stands for θ_t = θ₀ + Δ_t with Δ_t[m.weight] = (α_m/r_m)·B_m A_m on each target module
(α/√r with rslora; transposed for fan_in_fan_out and Embedding layers) and Δ_t = 0 elsewhere.
Every check has an independent side: PEFT's own ``merge_and_unload()`` weights, the hand sum
θ₀ + λ Σ_t (α_t/r_t) B_t A_t worked out in float64 from the adapter files, the same rule run on
the dense models PEFT materialises, or ``torch.linalg.svdvals`` for the truncation tail.

Models are tiny LlamaForCausalLM / GPT2LMHeadModel / BertForSequenceClassification built here
with a fixed seed; adapters get seeded non-zero A and B so that ΔW ≠ 0. Nothing downloads.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from fl_sim.checkpoints.model_checkpoint import open_checkpoint
from fl_sim.cli.main import main
from fl_sim.merge.adapters import LoraAdapter
from fl_sim.merge.to_adapter import truncate

F64 = torch.float64
REPO = Path(__file__).resolve().parents[1]
PEFT_PREFIX = "base_model.model."
TINY_LLAMA = {
    "vocab_size": 64,
    "hidden_size": 32,
    "intermediate_size": 48,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32,
}
# (seed, LoraConfig keywords) of the three Llama adapters: ranks 2, 3, 4 (Σ r = 9), other α,
# one with rslora, one with per-module rank_pattern / alpha_pattern
ADAPTERS = (
    (11, {"r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "v_proj"]}),
    (12, {"r": 3, "lora_alpha": 5, "target_modules": ["q_proj", "o_proj"], "use_rslora": True}),
    (
        13,
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["v_proj", "down_proj"],
            "rank_pattern": {"down_proj": 2},
            "alpha_pattern": {"layers.1.self_attn.v_proj": 3},
        },
    ),
)
SUM_OF_RANKS = 9


pytestmark = pytest.mark.usefixtures("module_one_thread")  # tiny tensors: one thread


def randomize_lora(model: torch.nn.Module, seed: int, scale: float = 0.2) -> None:
    """Seeded non-zero A and B (PEFT initialises B = 0, which would make ΔW = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))


def make_adapter(model_class, base: Path, out: Path, seed: int, **lora: object) -> Path:
    """An adapter of the model saved at ``base`` (so base_model_name_or_path = base)."""
    model = model_class.from_pretrained(base)
    peft_model = get_peft_model(model, LoraConfig(**lora))
    randomize_lora(peft_model, seed)
    peft_model.save_pretrained(out)
    return out


def dense_from_adapter(model_class, base: Path, adapter: Path, out: Path) -> Path:
    """The full model PEFT itself makes of the adapter: merge_and_unload(), save_pretrained."""
    model = PeftModel.from_pretrained(model_class.from_pretrained(base), adapter)
    model.merge_and_unload().save_pretrained(out)
    return out


def tiny_llama(path: Path, seed: int = 0, **config: object) -> Path:
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **config})).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """θ₀ (tiny Llama), three LoRA adapters of it, their dense models, and a full fine-tune."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama(root / "base")
    adapters = [
        make_adapter(LlamaForCausalLM, base, root / f"lora{t}", seed, **lora)
        for t, (seed, lora) in enumerate(ADAPTERS, start=1)
    ]
    dense = [
        dense_from_adapter(LlamaForCausalLM, base, a, root / f"dense{t}")
        for t, a in enumerate(adapters, start=1)
    ]
    generator = torch.Generator().manual_seed(5)
    theta0 = load_file(base / "model.safetensors")
    full = {n: t + 0.01 * torch.randn(t.shape, generator=generator) for n, t in theta0.items()}
    model = LlamaForCausalLM.from_pretrained(base)
    model.load_state_dict(full, strict=False)
    model.save_pretrained(root / "full")
    return {"root": root, "base": base, "adapters": adapters, "dense": dense, "full": root / "full"}


def merge(*argv: object) -> None:
    assert main(["merge", *map(str, argv), "--no-progress"]) == 0


def report_of(out: Path) -> dict:
    return json.loads((out / "merge_report.json").read_text())


def assert_refused(
    capsys: pytest.CaptureFixture[str], argv: Sequence[object], out: Path, *needles: str
) -> str:
    """Exit 2 with one ``fl-sim: error:`` line that names the problem; nothing at OUT."""
    capsys.readouterr()  # what building the inputs printed
    code = main(["merge", *map(str, argv), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("fl-sim: error:") and "\n" not in err, err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    return err


# --- the independent side ------------------------------------------------------------------


def hand_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """Δ_t per base tensor, float64, from the adapter's files with PEFT's documented formula."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[len(PEFT_PREFIX) : -len(".lora_A.weight")]
        b = tensors[key.replace(".lora_A.", ".lora_B.")]
        r = a.shape[0]
        alpha = config["lora_alpha"]
        for pattern, value in config["alpha_pattern"].items():
            if module == pattern or module.endswith("." + pattern):
                alpha = value
        scale = alpha / math.sqrt(r) if config["use_rslora"] else alpha / r
        delta = scale * (b.to(F64) @ a.to(F64))
        deltas[module + ".weight"] = delta.T if config["fan_in_fan_out"] else delta
    return deltas


def assert_states_close(got: dict, want: dict, *, atol: float = 1e-6) -> None:
    assert set(got) == set(want)
    for name in want:
        assert got[name].shape == want[name].shape, name
        assert torch.allclose(got[name].to(F64), want[name].to(F64), rtol=0, atol=atol), (
            name,
            (got[name].to(F64) - want[name].to(F64)).abs().max(),
        )


# --- adapter → ΔW ----------------------------------------------------------------------------


@pytest.mark.parametrize("index", range(len(ADAPTERS)))
def test_adapter_delta_equals_peft_merge_and_unload(llama, index) -> None:
    """θ₀ + our ΔW is PEFT's merge_and_unload() model, tensor by tensor (rslora, patterns)."""
    base = open_checkpoint(llama["base"])
    adapter = LoraAdapter(llama["adapters"][index], base)
    dense = load_file(llama["dense"][index] / "model.safetensors")
    for name in base:
        delta = adapter.delta(name)
        want = dense[name]
        got = base.get(name) if delta is None else base.get(name) + delta
        assert torch.allclose(got, want, rtol=0, atol=1e-7), name
    assert adapter.modules, "the adapter maps onto some base tensors"
    if index == 2:  # rank_pattern {"down_proj": 2}, alpha_pattern on layer 1's v_proj
        assert {n: m.rank for n, m in adapter.modules.items()} == {
            n: 2 if "down_proj" in n else 4 for n in adapter.modules
        }
        assert {m.alpha for m in adapter.modules.values()} == {3.0, 8.0}


def test_gpt2_fan_in_fan_out_and_embedding_adapter_equals_peft(tmp_path) -> None:
    """Conv1D (fan_in_fan_out: ΔW = (B A)ᵀ) and an Embedding target (lora_embedding_A/B)."""
    torch.manual_seed(1)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "base")
    adapter = make_adapter(
        GPT2LMHeadModel,
        tmp_path / "base",
        tmp_path / "lora",
        seed=3,
        r=3,
        lora_alpha=6,
        target_modules=["c_attn", "c_fc", "wte"],
        fan_in_fan_out=True,
    )
    dense = load_file(
        dense_from_adapter(GPT2LMHeadModel, tmp_path / "base", adapter, tmp_path / "dense")
        / "model.safetensors"
    )
    with open_checkpoint(tmp_path / "base") as base:
        lora = LoraAdapter(adapter, base)
        assert {m.kind for m in lora.modules.values()} == {"linear", "embedding"}
        for name in base:
            delta = lora.delta(name)
            got = base.get(name) if delta is None else base.get(name) + delta
            assert torch.allclose(got, dense[name], rtol=0, atol=1e-7), name
    # merged back into one adapter of rank 3 + 2: PEFT loads the Conv1D and Embedding factors
    other = make_adapter(
        GPT2LMHeadModel, tmp_path / "base", tmp_path / "lora2", seed=4, r=2,
        target_modules=["c_attn", "wte"], fan_in_fan_out=True,
    )  # fmt: skip
    common = ["--method", "fedavg", "--base", tmp_path / "base"]
    merge(*common, "--out", tmp_path / "merged", adapter, other)
    merge(*common, "--out", tmp_path / "merged_lora", "--to-adapter", "--rank", 5, adapter, other)
    config_out = json.loads((tmp_path / "merged_lora" / "adapter_config.json").read_text())
    assert config_out["fan_in_fan_out"] is True
    model = PeftModel.from_pretrained(
        GPT2LMHeadModel.from_pretrained(tmp_path / "base"), tmp_path / "merged_lora"
    )
    got = {n: t.detach() for n, t in model.merge_and_unload().state_dict().items()}
    want = load_file(tmp_path / "merged" / "model.safetensors")
    assert_states_close({n: got[n] for n in want}, want, atol=2e-6)


# --- rules over adapters -------------------------------------------------------------------


def test_task_arithmetic_of_adapters_equals_hand_sum(llama, tmp_path) -> None:
    """θ = θ₀ + λ Σ_t (α_t/r_t) B_t A_t, with λ = 0.7 (β = λT), untouched tensors = θ₀."""
    lam = 0.7
    merge(
        "--method", "task_arithmetic", "--lambda", lam, "--base", llama["base"],
        "--out", tmp_path / "out", *llama["adapters"],
    )  # fmt: skip
    theta0 = load_file(llama["base"] / "model.safetensors")
    want = {n: t.to(F64) for n, t in theta0.items()}
    for adapter in llama["adapters"]:
        for name, delta in hand_deltas(adapter).items():
            want[name] = want[name] + lam * delta
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert_states_close(got, want)
    untouched = [n for n in theta0 if "layers" not in n or "norm" in n]
    assert untouched and all(torch.equal(got[n], theta0[n]) for n in untouched)
    report = report_of(tmp_path / "out")
    kinds = [entry["kind"] for entry in report["inputs"]]
    assert kinds == ["lora_adapter"] * 3
    assert [entry["rank"] for entry in report["inputs"]] == [2, 3, {"min": 2, "max": 4}]
    assert report["output"]["kind"] == "model"
    # the Hugging Face folder loads
    LlamaForCausalLM.from_pretrained(tmp_path / "out")


def test_fedavg_of_adapters_equals_weighted_hand_sum(llama, tmp_path) -> None:
    """fedavg with p ∝ (1, 2, 5) and β = 2: θ₀ + β Σ_t p_t Δ_t."""
    weights = torch.tensor([1.0, 2.0, 5.0], dtype=F64)
    p = weights / weights.sum()
    merge(
        "--method", "fedavg", "--weights", "1,2,5", "--server-lr", 2, "--base", llama["base"],
        "--out", tmp_path / "out", *llama["adapters"],
    )  # fmt: skip
    want = {n: t.to(F64) for n, t in load_file(llama["base"] / "model.safetensors").items()}
    for p_t, adapter in zip(p.tolist(), llama["adapters"], strict=True):
        for name, delta in hand_deltas(adapter).items():
            want[name] = want[name] + 2.0 * p_t * delta
    assert_states_close(load_file(tmp_path / "out" / "model.safetensors"), want)


@pytest.mark.parametrize("method", ["median", "ties", "cclip"])
def test_rule_over_adapters_equals_rule_over_their_dense_models(llama, tmp_path, method) -> None:
    """A non-linear rule sees the same Δ_t from an adapter as from PEFT's dense model."""
    flags = {"median": [], "ties": ["--density", "0.5"], "cclip": ["--tau-c", "0.05"]}[method]
    common = ["--method", method, *flags, "--base", llama["base"]]
    merge(*common, "--out", tmp_path / "from_adapters", *llama["adapters"])
    merge(*common, "--out", tmp_path / "from_dense", *llama["dense"])
    got = load_file(tmp_path / "from_adapters" / "model.safetensors")
    want = load_file(tmp_path / "from_dense" / "model.safetensors")
    assert_states_close(got, want, atol=1e-6)


def test_mixed_full_and_adapter_inputs(llama, tmp_path) -> None:
    """A full fine-tune next to two adapters: fedavg = θ₀ + β Σ_t p_t Δ_t, each Δ_t its own
    kind; median equals median over the dense equivalents."""
    base = llama["base"]
    inputs = [llama["full"], *llama["adapters"][:2]]
    merge("--method", "fedavg", "--base", base, "--out", tmp_path / "avg", *inputs)
    theta0 = load_file(base / "model.safetensors")
    full = load_file(llama["full"] / "model.safetensors")
    want = {n: t.to(F64) + (full[n].to(F64) - t.to(F64)) / 3 for n, t in theta0.items()}
    for adapter in llama["adapters"][:2]:
        for name, delta in hand_deltas(adapter).items():
            want[name] = want[name] + delta / 3
    assert_states_close(load_file(tmp_path / "avg" / "model.safetensors"), want)
    report = report_of(tmp_path / "avg")
    assert [e["kind"] for e in report["inputs"]] == ["model", "lora_adapter", "lora_adapter"]

    merge("--method", "median", "--base", base, "--out", tmp_path / "med", *inputs)
    dense = [llama["full"], *llama["dense"][:2]]
    merge("--method", "median", "--base", base, "--out", tmp_path / "med_dense", *dense)
    assert_states_close(
        load_file(tmp_path / "med" / "model.safetensors"),
        load_file(tmp_path / "med_dense" / "model.safetensors"),
    )


# --- --to-adapter ----------------------------------------------------------------------------


def test_to_adapter_loads_in_peft_and_equals_the_dense_merge(llama, tmp_path) -> None:
    """r ≥ Σ_t r_t: the written adapter's merge_and_unload() is the dense merge."""
    common = ["--method", "task_arithmetic", "--lambda", 0.5, "--base", llama["base"]]
    merge(*common, "--out", tmp_path / "dense", *llama["adapters"])
    merge(
        *common, "--out", tmp_path / "lora", "--to-adapter", "--rank", SUM_OF_RANKS,
        *llama["adapters"],
    )  # fmt: skip
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == SUM_OF_RANKS and config["lora_alpha"] == SUM_OF_RANKS
    assert config["base_model_name_or_path"] == str(llama["base"])
    model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(llama["base"]), tmp_path / "lora"
    )
    got = {n: t.detach() for n, t in model.merge_and_unload().state_dict().items()}
    want = load_file(tmp_path / "dense" / "model.safetensors")
    assert_states_close({n: got[n] for n in want}, want, atol=2e-6)
    report = report_of(tmp_path / "lora")
    errors = report["output"]["relative_error"]
    assert errors["max"] < 1e-5 and errors["mean"] <= errors["max"]
    assert report["output"]["sum_of_input_ranks"] == SUM_OF_RANKS
    # the adapter also reads back as an input: merging it with itself (mean) is itself
    merge(
        "--method", "fedavg", "--base", llama["base"], "--out", tmp_path / "again",
        tmp_path / "lora", tmp_path / "lora",
    )  # fmt: skip
    assert_states_close(load_file(tmp_path / "again" / "model.safetensors"), want, atol=2e-6)


def test_to_adapter_error_is_the_svd_tail(llama, tmp_path) -> None:
    """r = 2 < rank ΔW: per module, the reported error is √(Σ_{i>r} s_i²)/√(Σ s_i²) of the dense
    merged ΔW and the adapter's B A is the best rank-2 approximation."""
    rank = 2
    common = ["--method", "task_arithmetic", "--base", llama["base"]]
    merge(*common, "--out", tmp_path / "dense", *llama["adapters"])
    merge(*common, "--out", tmp_path / "lora", "--to-adapter", "--rank", rank, *llama["adapters"])
    theta0 = load_file(llama["base"] / "model.safetensors")
    dense = load_file(tmp_path / "dense" / "model.safetensors")
    lora = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    errors = report_of(tmp_path / "lora")["output"]["relative_error"]
    assert len(errors["per_module"]) == len(lora) // 2 > 0
    for module, reported in errors["per_module"].items():
        delta_w = dense[module + ".weight"].to(F64) - theta0[module + ".weight"].to(F64)
        s = torch.linalg.svdvals(delta_w)
        tail = (s[rank:].square().sum() / s.square().sum()).sqrt().item()
        assert reported == pytest.approx(tail, rel=1e-3, abs=1e-6), module
        a = lora[f"{PEFT_PREFIX}{module}.lora_A.weight"].to(F64)
        b = lora[f"{PEFT_PREFIX}{module}.lora_B.weight"].to(F64)
        assert a.shape[0] == rank
        cut = torch.linalg.matrix_norm(delta_w - b @ a) / torch.linalg.matrix_norm(delta_w)
        assert cut.item() == pytest.approx(tail, rel=1e-3, abs=1e-6), module
    values = list(errors["per_module"].values())
    assert errors["max"] == max(values) and errors["mean"] == pytest.approx(
        sum(values) / len(values)
    )
    assert errors["max"] > 0.01  # the cut is real: rank ΔW > 2 on some module


def test_truncate_is_exact_at_full_rank_and_pads_narrow_modules() -> None:
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(5, 3, generator=generator, dtype=F64) @ torch.randn(
        3, 7, generator=generator, dtype=F64
    )
    exact = truncate(m, 4)  # rank 3 ≤ 4 ≤ min(5, 7)
    assert torch.allclose(exact.b @ exact.a, m, atol=1e-12) and exact.relative_error < 1e-7
    padded = truncate(m[:2], 6)  # wider than the module: zero-padded factors
    assert padded.b.shape == (2, 6) and padded.a.shape == (6, 7)
    assert torch.allclose(padded.b @ padded.a, m[:2], atol=1e-12)
    assert truncate(torch.zeros(4, 4), 2).relative_error == 0.0


def test_modules_to_save_merge_and_to_adapter(tmp_path) -> None:
    """A sequence classifier (PEFT puts the head in modules_to_save): the head's Δ is the saved
    head minus θ₀'s, and --to-adapter carries the merged head in modules_to_save."""
    torch.manual_seed(2)
    config = BertConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
    )  # fmt: skip
    BertForSequenceClassification(config).save_pretrained(tmp_path / "base")
    adapters = []
    for t in (1, 2):
        model = BertForSequenceClassification.from_pretrained(tmp_path / "base")
        peft_model = get_peft_model(
            model,
            LoraConfig(r=2, lora_alpha=2, target_modules=["query"], task_type="SEQ_CLS"),
        )
        randomize_lora(peft_model, seed=20 + t)
        with torch.no_grad():  # the trained head
            for name, parameter in peft_model.named_parameters():
                if "modules_to_save" in name:
                    parameter.add_(0.1 * t)
        peft_model.save_pretrained(tmp_path / f"lora{t}")
        adapters.append(tmp_path / f"lora{t}")
    dense = [
        dense_from_adapter(BertForSequenceClassification, tmp_path / "base", a, tmp_path / f"d{t}")
        for t, a in enumerate(adapters)
    ]
    common = ["--method", "fedavg", "--base", tmp_path / "base"]
    merge(*common, "--out", tmp_path / "from_adapters", *adapters)
    merge(*common, "--out", tmp_path / "from_dense", *dense)
    want = load_file(tmp_path / "from_dense" / "model.safetensors")
    assert_states_close(load_file(tmp_path / "from_adapters" / "model.safetensors"), want)
    merge(*common, "--out", tmp_path / "lora", "--to-adapter", "--rank", 4, *adapters)
    config_out = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert "classifier" in config_out["modules_to_save"] and config_out["task_type"] == "SEQ_CLS"
    model = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "lora"
    )
    got = {n: t.detach() for n, t in model.merge_and_unload().state_dict().items()}
    assert_states_close({n: got[n] for n in want}, want, atol=2e-6)


# --- refusals --------------------------------------------------------------------------------


def test_adapter_of_another_base_is_refused(llama, tmp_path, capsys) -> None:
    """Missing target module, shape mismatch, and base_model_name_or_path naming another model:
    each one line naming the mismatch."""
    root = llama["root"]
    deeper = tiny_llama(tmp_path / "deeper", num_hidden_layers=3)
    lora_deeper = make_adapter(
        LlamaForCausalLM, deeper, tmp_path / "lora_deeper", 1, r=2, target_modules=["q_proj"]
    )
    wider = tiny_llama(tmp_path / "wider", intermediate_size=40)
    lora_wider = make_adapter(
        LlamaForCausalLM, wider, tmp_path / "lora_wider", 1, r=2, target_modules=["down_proj"]
    )
    for adapter in (lora_deeper, lora_wider):  # trained elsewhere: the name is not checkable
        config_path = adapter / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config_path.write_text(json.dumps({**config, "base_model_name_or_path": "org/model"}))
    other = tiny_llama(tmp_path / "other", seed=7)  # the same architecture, other weights
    lora_other = make_adapter(
        LlamaForCausalLM, other, tmp_path / "lora_other", 1, r=2, target_modules=["q_proj"]
    )
    good = llama["adapters"][0]
    argv = ["--method", "fedavg", "--base", llama["base"], "--out", tmp_path / "out"]
    assert_refused(capsys, [*argv, good, lora_deeper], tmp_path / "out", "lora_deeper",
                   "model.layers.2.self_attn.q_proj", "not in the base")  # fmt: skip
    assert_refused(capsys, [*argv, good, lora_wider], tmp_path / "out", "lora_wider",
                   "down_proj", "shape")  # fmt: skip
    assert_refused(capsys, [*argv, good, lora_other], tmp_path / "out", "lora_other",
                   str(other), "differs")  # fmt: skip
    assert root.exists()


def test_unsupported_adapters_and_flags_are_refused(llama, tmp_path, capsys) -> None:
    dora = make_adapter(
        LlamaForCausalLM, llama["base"], tmp_path / "dora", 1, r=2, target_modules=["q_proj"],
        use_dora=True,
    )  # fmt: skip
    base, good = llama["base"], llama["adapters"][0]
    out = tmp_path / "out"
    argv = ["--method", "fedavg", "--base", base, "--out", out]
    assert_refused(capsys, [*argv, good, dora], out, "DoRA")
    for name, change, needle in (
        ("bad_regex", {"rank_pattern": {"(": 2}}, "regular expression"),
        ("bad_rank", {"r": 5}, "r = 5"),
        ("bad_alpha", {"lora_alpha": "x"}, "lora_alpha"),
        ("not_lora", {"peft_type": "IA3"}, "LoRA adapters only"),
    ):
        broken = tmp_path / name
        shutil.copytree(good, broken)
        config = json.loads((broken / "adapter_config.json").read_text())
        (broken / "adapter_config.json").write_text(json.dumps({**config, **change}))
        assert_refused(capsys, [*argv, good, broken], out, name, needle)
    assert_refused(capsys, [*argv, "--to-adapter", good, llama["adapters"][1]], out, "--rank")
    assert_refused(capsys, [*argv, "--rank", 4, good, llama["adapters"][1]], out, "--to-adapter")
    assert_refused(
        capsys, [*argv, "--to-adapter", "--rank", 4, good, llama["full"]], out, "full model"
    )
    assert_refused(capsys, [*argv, "--to-adapter", "--rank", 0, good, good], out, "--rank")
    assert_refused(
        capsys, ["--method", "fedavg", "--base", good, "--out", out, llama["full"], good],
        out, "PEFT adapter", "--base",
    )  # fmt: skip


def test_help_shows_the_adapter_and_shard_flags() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "fl_sim.cli.main", "merge", "--help"],
        capture_output=True, text=True, check=True, cwd=REPO,
    )  # fmt: skip
    for flag in ("--to-adapter", "--rank", "--max-shard-size", "LoRA adapter"):
        assert flag in done.stdout, flag
