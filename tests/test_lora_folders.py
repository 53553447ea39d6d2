"""LoRA runs on the causal suite write Hugging Face folders, and PEFT adapters `fl-sim merge` takes.

A LoRA state's folder is the whole merged model (dense: W; adapter: W₀ + (α/r)·B·A) and, in
adapter mode, a PEFT folder ``<folder>-adapter`` of (A, B) beside it. Every check is against an
independent computation: the LoRA model's own logits, PEFT's ``merge_and_unload``, or the hand
formula in float64 from the saved A and B. Fast tests pre-train a short llama-tiny / gpt2-tiny
(``QUICK``) into this module's cache; the ``simulate`` run (Ray) is marked slow.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from clients.knobs import TrainingKnobs
from clients.local_training import fine_tune
from fl_sim.errors import CheckpointError, ConfigError
from fl_sim.suites.base import load_federated_state
from fl_sim.suites.causal_lm import SPECS, CausalSuite
from fl_sim.suites.lora import LoraSuite
from fl_sim.suites.lora_settings import LoraSettings

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = {
    family: dataclasses.replace(SPECS[f"{family}-tiny"], pretrain_steps=40)
    for family in ("llama", "gpt2")
}
RANK, ALPHA = 4, 12.0
SCALING = ALPHA / RANK
KNOBS = TrainingKnobs(lr=1e-2, local_steps=4, optimizer="adamw", batch_size=16)
PREFIX = "backbone."


@pytest.fixture(scope="module")
def causal(tmp_path_factory):
    """family → the causal suite on a QUICK decoder (2 tasks, top 2 blocks), built once."""
    cache = tmp_path_factory.mktemp("causal-cache")
    built: dict[str, CausalSuite] = {}

    def get(family: str) -> CausalSuite:
        if family not in built:
            built[family] = CausalSuite(
                num_tasks=2, seed=0, model=f"{family}-tiny", spec=QUICK[family], cache_dir=cache
            )
        return built[family]

    return get


def lora(base: CausalSuite, federation: str) -> LoraSuite:
    return LoraSuite(base, LoraSettings(rank=RANK, alpha=ALPHA, federation=federation))


def client_states(suite: LoraSuite, clients=(0, 1)) -> list[dict[str, torch.Tensor]]:
    """θ_t = θ₀ + Δ_t of round 1, trained by the real client (``fine_tune``)."""
    theta0 = suite.initial_state()
    states = []
    for t in clients:
        knobs = dataclasses.replace(KNOBS, seed=t)
        update = fine_tune(suite, t, theta0, knobs, round_index=1).update
        states.append({name: theta0[name] + update[name] for name in theta0})
    return states


def load_lm(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def lm_logits(lm, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm(input_ids=x[:, 0], attention_mask=(x[:, 1] > 0).long()).logits


def lora_logits(suite: LoraSuite, state, x: torch.Tensor) -> torch.Tensor:
    """The LoraTaskModel's own forward at ``state`` (W x + (α/r)·B A x on every target)."""
    model = suite.build_model()
    load_federated_state(model, state)
    model.eval()
    with torch.no_grad():
        return model(x, 0)


def hand_weight(family: str, w0: torch.Tensor, pairs) -> torch.Tensor:
    """W₀ + Σ (α/r)·B·A in float64 over ``pairs`` of (A, B); GPT-2's Conv1D stores W as n × m."""
    delta = sum(SCALING * (b.double() @ a.double()) for a, b in pairs)
    return w0.double() + (delta.T if family == "gpt2" else delta)


def adapters_of(state, target: str):
    return state[f"{target}.lora_A.weight"], state[f"{target}.lora_B.weight"]


def targets_of(state) -> list[str]:
    return sorted({key.rsplit(".", 2)[0] for key in state if ".lora_" in key})


# ---------------------------------------------------------------------------------------------
# (a) the full folder is the LoRA model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("federation", ["dense", "adapter"])
def test_the_full_folder_loads_and_its_logits_are_the_lora_models(
    causal, tmp_path, family, federation
):
    base = causal(family)
    suite = lora(base, federation)
    template = {k: v.clone() for k, v in base.theta0_lm().state_dict().items()}
    theta0 = suite.initial_state()
    (state,) = client_states(suite, clients=(1,))
    hf = tmp_path / "hf"
    suite.save_model_folder(theta0, hf / "base")
    suite.save_model_folder(state, hf / "client_1")
    x = suite.tasks[1].test_x[:12]
    saved = load_lm(hf / "client_1")
    expected = lora_logits(suite, state, x)
    torch.testing.assert_close(lm_logits(saved, x), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(lm_logits(load_lm(hf / "base"), x), expected, atol=1e-4)
    weights, w0 = saved.state_dict(), load_lm(hf / "base").state_dict()
    for name, value in base.theta0_lm().state_dict().items():
        assert torch.equal(w0[name], value), name  # hf/base is θ₀ exactly (B₀ = 0)
    targets = {key.removeprefix(PREFIX).rsplit(".", 1)[0] for key in theta0}
    if federation == "adapter":
        targets = {t.removeprefix(PREFIX) for t in targets_of(theta0)}
    for name, value in w0.items():
        module = name.rsplit(".", 1)[0]
        if module in targets and name.endswith(".weight"):
            assert not torch.equal(weights[name], value), name
        else:
            assert torch.equal(weights[name], value), name  # frozen or untargeted: θ₀
    for name, value in base.theta0_lm().state_dict().items():  # the cached θ₀ is untouched
        assert torch.equal(value, template[name]), name
    assert (hf / "client_1-adapter").is_dir() == (federation == "adapter")
    assert not any(p.name.startswith(".") for p in hf.iterdir())  # no temp folder left


# ---------------------------------------------------------------------------------------------
# (b) the PEFT adapter folder over hf/base is the full folder
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_adapter_folder_merged_by_peft_onto_hf_base_is_the_full_folder(
    causal, tmp_path, family
):
    from peft import PeftModel

    base = causal(family)
    suite = lora(base, "adapter")
    theta0 = suite.initial_state()
    states = client_states(suite)
    # the global model of one FedAvg round: Ā, B̄ averaged apart (FedIT)
    global_state = {k: (states[0][k] + states[1][k]) / 2 for k in theta0}
    hf = tmp_path / "hf"
    for name, state in (("base", theta0), ("client_0", states[0]), ("global", global_state)):
        suite.save_model_folder(state, hf / name)
    x = suite.tasks[0].test_x[:12]
    w0 = load_lm(hf / "base").state_dict()
    for name, state in (("client_0", states[0]), ("global", global_state)):
        folder = hf / f"{name}-adapter"
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == RANK
        assert config["lora_alpha"] == ALPHA and config["bias"] == "none"
        assert config["fan_in_fan_out"] is (family == "gpt2")
        assert config["base_model_name_or_path"] == str((hf / "base").resolve())
        targets = targets_of(state)
        assert sorted(config["target_modules"]) == [t.removeprefix(PREFIX) for t in targets]
        saved = load_file(folder / "adapter_model.safetensors")
        assert sorted(saved) == sorted(
            f"base_model.model.{t.removeprefix(PREFIX)}.{half}.weight"
            for t in targets
            for half in ("lora_A", "lora_B")
        )
        for key, value in state.items():
            assert torch.equal(saved["base_model.model." + key.removeprefix(PREFIX)], value)
        peft_model = PeftModel.from_pretrained(load_lm(hf / "base"), folder).eval()
        torch.testing.assert_close(
            lm_logits(peft_model, x), lora_logits(suite, state, x), rtol=1e-5, atol=1e-5
        )
        merged = peft_model.merge_and_unload().state_dict()
        full = load_lm(hf / name).state_dict()
        assert sorted(merged) == sorted(full)
        for key in full:
            torch.testing.assert_close(merged[key], full[key], rtol=1e-6, atol=1e-7)
        for target in targets:  # and the full folder is W₀ + (α/r)·B·A by hand
            key = target.removeprefix(PREFIX) + ".weight"
            expected = hand_weight(family, w0[key], [adapters_of(state, target)])
            torch.testing.assert_close(full[key].double(), expected, rtol=1e-5, atol=1e-6)


def test_base_model_name_or_path_lets_auto_peft_load_the_adapter_alone(causal, tmp_path):
    from peft import AutoPeftModelForCausalLM

    suite = lora(causal("llama"), "adapter")
    theta0 = suite.initial_state()
    (state,) = client_states(suite, clients=(0,))
    suite.save_model_folder(theta0, tmp_path / "hf" / "base")
    suite.save_model_folder(state, tmp_path / "hf" / "client_0")
    model = AutoPeftModelForCausalLM.from_pretrained(
        tmp_path / "hf" / "client_0-adapter", local_files_only=True
    ).eval()
    x = suite.tasks[0].test_x[:8]
    torch.testing.assert_close(
        lm_logits(model, x), lora_logits(suite, state, x), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# (c) fl-sim merge of the client adapters
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fl_sim_merge_of_the_client_adapters_is_theta0_plus_the_sum_of_their_products(
    causal, tmp_path, family
):
    from fl_sim.cli.main import main

    suite = lora(causal(family), "adapter")
    theta0 = suite.initial_state()
    hf = tmp_path / "hf"
    suite.save_model_folder(theta0, hf / "base")
    for t, state in enumerate(client_states(suite)):
        suite.save_model_folder(state, hf / f"client_{t}")
    code = main(
        ["merge", "--base", str(hf / "base"), "--method", "task_arithmetic", "--lambda", "1",
         "--out", str(tmp_path / "merged"), str(hf / "client_0-adapter"),
         str(hf / "client_1-adapter")]
    )  # fmt: skip
    assert code in (0, None)
    merged = load_lm(tmp_path / "merged").state_dict()
    w0 = load_lm(hf / "base").state_dict()
    adapters = [load_file(hf / f"client_{t}-adapter" / "adapter_model.safetensors") for t in (0, 1)]
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".", 2)[0] for k in adapters[0]})
    assert len(modules) == {"llama": 4, "gpt2": 2}[family]  # (q_proj, v_proj | c_attn) × 2 blocks
    for module in modules:  # θ₀ + Σ_t (α/r)·B_t·A_t, from the adapter files alone
        peft = f"base_model.model.{module}"
        pairs = [(a[f"{peft}.lora_A.weight"], a[f"{peft}.lora_B.weight"]) for a in adapters]
        expected = hand_weight(family, w0[f"{module}.weight"], pairs)
        torch.testing.assert_close(
            merged[f"{module}.weight"].double(), expected, rtol=1e-5, atol=1e-6
        )
    for key, value in w0.items():
        if key.rsplit(".", 1)[0] not in modules or not key.endswith(".weight"):
            assert torch.equal(merged[key], value), key


# ---------------------------------------------------------------------------------------------
# What is written where, and bad input
# ---------------------------------------------------------------------------------------------


def test_only_a_base_suite_with_folders_gives_a_lora_suite_save_model_folder(causal, tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    from fl_sim.suites.registry import make_suite

    assert callable(getattr(lora(causal("llama"), "dense"), "save_model_folder", None))
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "return", "the", "list", "a", "if"]
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2,
    )  # fmt: skip
    BertModel(config).save_pretrained(tmp_path / "bert")
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(tmp_path / "bert")
    text = make_suite(
        "text", model=f"hf:{tmp_path / 'bert'}", federated_layers=1,
        tasks=["arity", "visibility"], train_per_class=4, eval_per_class=2,
    )  # fmt: skip
    suite = lora(text, "adapter")
    assert getattr(suite, "save_model_folder", None) is None  # the recorder writes nothing
    assert not hasattr(suite, "save_model_folder")


def test_bad_states_and_existing_folders_are_refused_in_one_line(causal, tmp_path):
    dense, adapter = lora(causal("llama"), "dense"), lora(causal("llama"), "adapter")
    with pytest.raises(CheckpointError, match="does not fit adapter-federation=adapter"):
        adapter.save_model_folder(dense.initial_state(), tmp_path / "x")
    with pytest.raises(CheckpointError, match="does not fit adapter-federation=dense"):
        dense.save_model_folder(adapter.initial_state(), tmp_path / "x")
    with pytest.raises(ConfigError, match="needs adapter-federation=adapter"):
        dense.write_adapter_folder(dense.initial_state(), tmp_path / "y", base_folder=tmp_path)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
    theta0 = adapter.initial_state()
    (tmp_path / "hf" / "global-adapter").mkdir(parents=True)
    with pytest.raises(ConfigError, match="global-adapter already exists"):
        adapter.save_model_folder(theta0, tmp_path / "hf" / "global")
    assert not (tmp_path / "hf" / "global").exists()  # refused before anything was written
    adapter.save_model_folder(theta0, tmp_path / "hf" / "global", force=True)
    assert (tmp_path / "hf" / "global-adapter" / "adapter_model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------
# (d) end to end: fl-sim run with LoRA clients, then fl-sim merge of its adapters
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_lora_run_writes_adapters_that_fl_sim_merge_takes(tmp_path):
    from peft import PeftModel

    from fl_sim.cli.main import main
    from tests.helpers import simulate_reference

    lam = 0.7
    values = {
        "experiment": "single", "task-suite": "causal", "num-tasks": 2,
        "strategy": "task_arithmetic", "lambda": lam, "num-rounds": 1, "optimizer": "adamw",
        "lr": 1e-2, "local-steps": 5, "preset": "none", "update-cache": False,
        "diagnostic-batch": 0, "adapter": "lora", "adapter-federation": "adapter",
        "lora-rank": RANK, "lora-alpha": ALPHA,
    }  # fmt: skip
    out = simulate_reference(values, tmp_path / "run", tmp_path / "cache")
    hf = out / "hf"
    results = json.loads((out / "results.json").read_text())
    names = ["base", "client_0", "client_1", "global"]
    assert results["files"]["hf_folders"] == sorted(
        f"hf/{n}{suffix}" for n in names for suffix in ("", "-adapter")
    )
    theta0 = load_file(out / "base.safetensors")  # (A₀, B₀ = 0)
    clients = [load_file(out / "clients" / f"client_{t}.safetensors") for t in (0, 1)]
    global_state = load_file(out / "global_model.safetensors")  # (Ā, B̄)
    targets = targets_of(theta0)
    assert targets and all(float(theta0[f"{t}.lora_B.weight"].abs().max()) == 0 for t in targets)
    w0 = load_lm(hf / "base").state_dict()
    full_global = load_lm(hf / "global").state_dict()
    for target in targets:  # hf/global = W₀ + (α/r)·B̄·Ā of the run's own global adapter
        key = target.removeprefix(PREFIX) + ".weight"
        expected = hand_weight("llama", w0[key], [adapters_of(global_state, target)])
        torch.testing.assert_close(full_global[key].double(), expected, rtol=1e-5, atol=1e-6)
    peft_global = PeftModel.from_pretrained(load_lm(hf / "base"), hf / "global-adapter")
    merged_global = peft_global.merge_and_unload().state_dict()
    for key in full_global:
        torch.testing.assert_close(merged_global[key], full_global[key], rtol=1e-6, atol=1e-7)
    for t, state in enumerate(clients):  # the client adapters are the run's θ_t = (A_t, B_t)
        saved = load_file(hf / f"client_{t}-adapter" / "adapter_model.safetensors")
        for key, value in state.items():
            assert torch.equal(saved["base_model.model." + key.removeprefix(PREFIX)], value)
    code = main(
        ["merge", "--base", str(hf / "base"), "--method", "task_arithmetic", "--lambda",
         str(lam), "--out", str(tmp_path / "merged"), str(hf / "client_0-adapter"),
         str(hf / "client_1-adapter")]
    )  # fmt: skip
    assert code in (0, None)
    merged = load_lm(tmp_path / "merged").state_dict()
    gap = 0.0
    for target in targets:  # fl-sim merge: θ₀ + λ Σ_t (α/r)·B_t·A_t, ΔW-linear
        key = target.removeprefix(PREFIX) + ".weight"
        pairs = [adapters_of(client, target) for client in clients]
        delta = sum(SCALING * (b.double() @ a.double()) for a, b in pairs)
        expected = w0[key].double() + lam * delta
        torch.testing.assert_close(merged[key].double(), expected, rtol=1e-5, atol=1e-6)
        gap = max(gap, float((merged[key] - full_global[key]).abs().max()))
    assert gap > 1e-6  # one-shot FedIT's (λΣB_t)(A₀ + λΣΔA_t) is not λ Σ B_t A_t
