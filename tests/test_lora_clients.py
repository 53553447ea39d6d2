"""LoRA clients (``adapter = "lora"``): PEFT adapters on the federated part, federated two ways.

Claims, on the text suite with a tiny random BERT saved as ``hf:PATH`` (and tiny GPT-2 / Llama
models for Conv1D and the default targets): (a) a dense client's Δ_t is ΔW = (α/r)·B·A of its
trained PEFT layers, equal to PEFT's own ``merge_and_unload`` difference; (b) one-shot Task
Arithmetic through the real ClientApp and ServerApp is θ₀ + λ Σ_t ΔW_t of the clients'
updates; (c) federating the adapters (FedIT) agrees with the dense merge for T = 1 and for
identical clients, and otherwise differs by exactly −(α/r) Σ_t p_t (B_t − B̄)(A_t − Ā); (d) bad
settings are one-line errors; (e) the update cache keys on the LoRA settings; (f) the
frozen-prefix cache stays exact with adapters; (g) the bytes per round are r·(m+n) against m·n
values per target. The ``simulate`` runs (Ray) are marked slow.
"""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_BERT_WORDS, InProcessGrid, save_tiny_bert
from safetensors.torch import load_file
from torch import nn

from clients.client_app import cached_suite
from clients.knobs import TrainingKnobs
from clients.local_training import fine_tune
from clients.update_cache import key_material, update_key
from fl_sim.config.run_config import RunConfig
from fl_sim.errors import ConfigError
from fl_sim.experiments.adapter_bias import adapters_of, fedit_bias, measure_adapter_bias
from fl_sim.federation.server_app import run_federation
from fl_sim.suites.base import SPLITS, MultiTaskModel, federated_state, load_federated_state
from fl_sim.suites.lora import (
    ADAPTER_NAME,
    LoraSuite,
    LoraTaskModel,
    delta_weight,
    initial_a,
    resolve_targets,
)
from fl_sim.suites.lora_settings import LoraSettings
from fl_sim.suites.registry import build_suite, make_suite
from strategies.fedavg import fedavg
from strategies.rule import client_weights

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")

WORDS = TINY_BERT_WORDS
SMALL = {"tasks": ["arity", "visibility"], "train_per_class": 8, "eval_per_class": 6}
KNOBS = TrainingKnobs(lr=3e-2, local_steps=6, optimizer="adamw", batch_size=8)
RANK, ALPHA = 2, 6.0
SCALING = ALPHA / RANK


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 3-block BERT with a word-level tokenizer, saved as a local model folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def base_suite(tiny_bert):
    """The text suite on the tiny BERT, its top 2 blocks federated, frozen prefix cached."""
    return make_suite("text", model=f"hf:{tiny_bert}", federated_layers=2, **SMALL)


def lora(base, federation: str = "dense", **values) -> LoraSuite:
    return LoraSuite(base, LoraSettings(rank=RANK, alpha=ALPHA, federation=federation, **values))


def trained_adapters(suite: LoraSuite, clients, knobs=KNOBS):
    """Each client's round-1 adapter {target: (A_t, B_t)}, trained by ``fine_tune``."""
    theta0 = suite.initial_state()
    out = []
    for t in clients:
        update = fine_tune(suite, t, theta0, knobs, round_index=1).update
        out.append(adapters_of({name: theta0[name] + update[name] for name in theta0}))
    return out


def effective_weights(suite: LoraSuite, state) -> dict[str, torch.Tensor]:
    """W + (α/r)·B·A of every target of a model holding ``state``, in float64."""
    model = suite.build_model()
    load_federated_state(model, state)
    return {
        name: layer.base_layer.weight.detach().double()
        + SCALING * (layer.lora_B[ADAPTER_NAME].weight @ layer.lora_A[ADAPTER_NAME].weight).double()
        for name, layer in model.layers.items()
    }


# ---------------------------------------------------------------------------------------------
# (a) the dense update is ΔW = (α/r)·B·A, PEFT's own merge
# ---------------------------------------------------------------------------------------------


def test_adapters_start_at_seeded_a0_and_zero_b_so_the_model_is_theta0(base_suite):
    suite = lora(base_suite)
    model, again, plain = suite.build_model(), suite.build_model(), base_suite.build_model()
    assert sorted(model.layers) == [
        f"backbone.encoder.layer.{i}.attention.self.{p}" for i in (1, 2) for p in ("query", "value")
    ]
    for name, layer in model.layers.items():
        a = layer.lora_A[ADAPTER_NAME].weight
        assert torch.equal(a, again.layers[name].lora_A[ADAPTER_NAME].weight)
        assert torch.equal(a, initial_a(tuple(a.shape), base_suite.seed, name))
        assert (
            float(a.detach().abs().max()) <= 1 / a.shape[1] ** 0.5 and float(a.detach().std()) > 0
        )
        assert torch.equal(layer.lora_B[ADAPTER_NAME].weight, torch.zeros(16, RANK))
    assert {id(p) for p in model.trained_parameters()} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    x = base_suite.tasks[0].val_x
    with torch.no_grad():
        torch.testing.assert_close(model(x, 0), plain(x, 0), rtol=0, atol=0)


def test_dense_update_is_scaled_b_times_a_of_the_trained_peft_layers(base_suite):
    """From a LoRA model trained by hand: client_update = (α/r)·B·A = PEFT's get_delta_weight."""
    suite = lora(base_suite)
    model = suite.build_model()
    theta_r = federated_state(model)
    optimizer = torch.optim.AdamW(model.trained_parameters(), lr=0.05)
    task = base_suite.tasks[0]
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(task.train_x, 0), task.train_y).backward()
        optimizer.step()
    update = model.client_update(theta_r)
    assert sorted(update) == sorted(theta_r) == [f"{n}.weight" for n in sorted(model.layers)]
    for name, layer in model.layers.items():
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        assert float(b.abs().max()) > 0
        by_hand = (ALPHA / RANK) * (b.detach() @ a.detach())
        torch.testing.assert_close(update[f"{name}.weight"], by_hand, rtol=0, atol=0)
        torch.testing.assert_close(update[f"{name}.weight"], layer.get_delta_weight(ADAPTER_NAME))


def test_dense_client_update_equals_peft_merge_and_unload_difference(base_suite, tiny_bert):
    """fine_tune's dense Δ_t against PEFT's PeftModel.merge_and_unload on the same adapters."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    dense, adapter = lora(base_suite), lora(base_suite, "adapter")
    theta0 = dense.initial_state()
    update = fine_tune(dense, 0, theta0, KNOBS, round_index=1).update
    (trained,) = trained_adapters(adapter, [0])  # the same training, read as A_t, B_t
    hf_names = [name.removeprefix("backbone.") for name in trained]
    peft_model = get_peft_model(
        AutoModel.from_pretrained(str(tiny_bert), local_files_only=True),
        LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=hf_names),
    )
    with torch.no_grad():
        for name, (a, b) in trained.items():
            layer = peft_model.base_model.model.get_submodule(name.removeprefix("backbone."))
            layer.lora_A[ADAPTER_NAME].weight.copy_(a)
            layer.lora_B[ADAPTER_NAME].weight.copy_(b)
    merged = peft_model.merge_and_unload()
    for name, (a, b) in trained.items():
        key = f"{name}.weight"
        assert float(update[key].abs().max()) > 0
        torch.testing.assert_close(update[key], SCALING * b @ a, rtol=1e-5, atol=1e-7)
        difference = merged.get_submodule(name.removeprefix("backbone.")).weight - theta0[key]
        torch.testing.assert_close(update[key], difference, rtol=1e-4, atol=1e-6)


class _Pooled(nn.Module):
    """A Hugging Face decoder as a backbone: token ids → the mean last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=x).last_hidden_state.mean(dim=1)


def _decoder(kind: str) -> MultiTaskModel:
    from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaModel

    torch.manual_seed(0)
    if kind == "gpt2":
        model = GPT2Model(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    else:
        config = LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
        )
        model = LlamaModel(config)
    return MultiTaskModel(_Pooled(model), [nn.Linear(16, 3)], ["task"])


@pytest.mark.parametrize(
    ("kind", "suffix"), [("gpt2", "attn.c_attn"), ("llama", "self_attn.q_proj")]
)
def test_decoder_default_targets_and_conv1d_delta_is_peft_merge(kind, suffix):
    """GPT-2's Conv1D c_attn (weight n × m: ΔW transposed) and Llama's q_proj, v_proj."""
    inner = _decoder(kind)
    theta0 = federated_state(inner)
    model = LoraTaskModel(inner, LoraSettings(rank=RANK, alpha=ALPHA), seed=0)
    model.eval()  # GPT-2's dropout off
    assert any(name.endswith(suffix) for name in model.layers)
    if kind == "llama":
        assert {n.rsplit(".", 1)[1] for n in model.layers} == {"q_proj", "v_proj"}
    x = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B[ADAPTER_NAME].weight.normal_(generator=torch.Generator().manual_seed(1))
    update = model.client_update(federated_state(model))
    for name, layer in model.layers.items():
        delta = update[f"{name}.weight"]
        assert delta.shape == theta0[f"{name}.weight"].shape
        product = SCALING * layer.lora_B[ADAPTER_NAME].weight @ layer.lora_A[ADAPTER_NAME].weight
        torch.testing.assert_close(delta, product.T if kind == "gpt2" else product)
        weight = layer.base_layer.weight.detach().clone()
        with torch.no_grad():
            before = model(x, 0)
            layer.merge()  # PEFT's merge: W ← W + ΔW, the adapter then bypassed
            torch.testing.assert_close(
                layer.base_layer.weight - weight, delta, rtol=1e-5, atol=1e-7
            )
            torch.testing.assert_close(model(x, 0), before, rtol=1e-4, atol=1e-6)
            layer.unmerge()
    assert delta_weight(next(iter(model.layers.values())), SCALING).dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# (b) one-shot Task Arithmetic with dense LoRA updates through the real apps
# ---------------------------------------------------------------------------------------------


def text_config(tiny_bert, tmp_path, **values) -> RunConfig:
    return RunConfig.from_mapping(
        {
            "experiment": "single",
            "task-suite": "text",
            "model": f"hf:{tiny_bert}",
            "num-tasks": 2,
            "federated-layers": "2",
            "preset": "none",
            "optimizer": "adamw",
            "lr": 3e-2,
            "local-steps": 6,
            "batch-size": 8,
            "adapter": "lora",
            "lora-rank": RANK,
            "lora-alpha": ALPHA,
            "update-cache": False,
            "diagnostic-batch": 16,
            "results-dir": str(tmp_path / "run"),
            **values,
        }
    )


def read_run(folder):
    base = load_file(folder / "base.safetensors")
    clients = [load_file(folder / f"clients/client_{t}.safetensors") for t in range(2)]
    return (
        base,
        [{k: c[k] - base[k] for k in base} for c in clients],
        load_file(folder / "global_model.safetensors"),
    )


def test_one_shot_task_arithmetic_with_dense_lora_is_theta0_plus_lambda_sum(
    tiny_bert, tmp_path, task_identity
):
    lam = 0.7
    cfg = text_config(tiny_bert, tmp_path, strategy="task_arithmetic", **{"lambda": lam})
    results = run_federation(InProcessGrid(2), cfg)
    assert results["status"] == "completed"
    theta0, deltas, merged = read_run(tmp_path / "run")
    suite = cached_suite(tuple(cfg.suite_config().items()))  # the ClientApp's own suite
    assert isinstance(suite, LoraSuite) and suite.settings.federation == "dense"
    assert sorted(theta0) == [f"{n}.weight" for n in suite.build_model().layers]
    adapter = LoraSuite(suite.base_suite, LoraSettings(RANK, ALPHA, federation="adapter"))
    knobs = cfg.client_knobs()
    for t, delta in enumerate(deltas):
        (trained,) = trained_adapters(adapter, [t], knobs[t])
        for name, (a, b) in trained.items():  # each Δ_t is (α/r)·B_t·A_t of its training
            torch.testing.assert_close(
                delta[f"{name}.weight"], SCALING * b @ a, rtol=1e-4, atol=1e-7
            )
    for name in theta0:
        expected = theta0[name] + lam * (deltas[0][name] + deltas[1][name])
        torch.testing.assert_close(merged[name], expected, rtol=1e-6, atol=1e-7)
    report = results["lora"]
    sent = sum(t.numel() * t.element_size() for t in deltas[0].values())
    assert report["bytes_per_client_round"] == sent == 4 * 16 * 16 * 4  # 4 targets of 16 × 16
    assert report["bytes_per_client_round_by_mode"]["adapter"] == 4 * RANK * (16 + 16) * 4
    assert results["diagnostics"]["round_0"]["mean_square_norm"] > 0  # ∇ w.r.t. the adapters


# ---------------------------------------------------------------------------------------------
# (c) federating the adapters: agreement for T = 1 and identical clients, the exact bias
# ---------------------------------------------------------------------------------------------


def fedit_state(theta0, adapters, weights):
    """θ₀ + Σ p_t Δ_t of adapter-mode updates, by the FedAvg rule itself (β = 1)."""
    p = client_weights(len(adapters), weights).float()
    states = [
        {f"{n}.lora_{w}.weight": t for n, (a, b) in ad.items() for w, t in (("A", a), ("B", b))}
        for ad in adapters
    ]
    return {
        name: theta0[name] + fedavg([state[name] - theta0[name] for state in states], p)
        for name in theta0
    }


def test_adapter_federation_agrees_with_dense_for_one_client_and_identical_clients(base_suite):
    dense, adapter = lora(base_suite), lora(base_suite, "adapter")
    theta0_dense, theta0_adapter = dense.initial_state(), adapter.initial_state()
    update = fine_tune(dense, 0, theta0_dense, KNOBS, round_index=1).update
    dense_merged = effective_weights(
        dense, {name: theta0_dense[name] + update[name] for name in theta0_dense}
    )
    (trained,) = trained_adapters(adapter, [0])
    for adapters, weights in (([trained], [1.0]), ([trained, trained], [0.3, 0.7])):
        merged = effective_weights(adapter, fedit_state(theta0_adapter, adapters, weights))
        for name in merged:
            torch.testing.assert_close(merged[name], dense_merged[name], rtol=1e-5, atol=1e-6)
        for figures in fedit_bias(adapters, weights, SCALING).values():
            assert figures["relative_frobenius"] < 1e-6


def test_adapter_federation_differs_from_dense_by_exactly_the_covariance_bias(base_suite):
    """T = 2, p = ½: s·B̄Ā − Σ p_t s B_t A_t = −(s/4)(B₁ − B₂)(A₁ − A₂), through the rule."""
    adapter = lora(base_suite, "adapter")
    theta0 = adapter.initial_state()
    adapters = trained_adapters(adapter, [0, 1])
    merged = effective_weights(adapter, fedit_state(theta0, adapters, [1.0, 1.0]))
    w0 = effective_weights(adapter, theta0)
    bias = fedit_bias(adapters, [0.5, 0.5], SCALING)
    for name, ((a1, b1), (a2, b2)) in {n: (adapters[0][n], adapters[1][n]) for n in w0}.items():
        a1, b1, a2, b2 = (t.double() for t in (a1, b1, a2, b2))
        dense = w0[name] + 0.5 * SCALING * (b1 @ a1 + b2 @ a2)
        hand = -(SCALING / 4) * (b1 - b2) @ (a1 - a2)
        assert float(hand.abs().max()) > 1e-6  # the two clients trained different adapters
        torch.testing.assert_close(merged[name] - dense, hand, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(bias[name]["fedit"] - bias[name]["dense"], hand)
        expected = float(hand.norm() / (dense - w0[name]).norm())
        assert bias[name]["relative_frobenius"] == pytest.approx(expected, rel=1e-9)


def test_measure_adapter_bias_reports_both_merges(tiny_bert, tmp_path):
    report = measure_adapter_bias(text_config(tiny_bert, tmp_path))
    assert report["relative_frobenius_max"] >= report["relative_frobenius_mean"] > 0
    assert set(report["accuracy"]) == {"theta0", "dense", "adapter"}
    assert all(0 <= v <= 1 for acc in report["accuracy"].values() for v in acc.values())


# ---------------------------------------------------------------------------------------------
# (d) one-line errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"adapter": "qlora"}, "unknown adapter 'qlora'; choose one of none, lora"),
        ({"adapter": "lora", "lora-rank": 0}, "lora-rank must be an integer ≥ 1"),
        ({"adapter": "lora", "lora-alpha": -1}, "lora-alpha must be a finite number > 0"),
        ({"adapter": "lora", "lora-dropout": 1.0}, "lora-dropout must be a number in [0, 1)"),
        ({"adapter": "lora", "adapter-federation": "both"}, "unknown adapter-federation 'both'"),
        ({"adapter": "lora", "lora-target-modules": "q proj"}, "is not a module-name suffix"),
        ({"adapter": "lora", "task-suite": "toy"}, "task-suite=toy has none"),
        ({"adapter": "lora", "task-suite": "quadratic"}, "task-suite=quadratic has none"),
        ({"adapter": "lora", "shared-head": True}, "drop shared-head or adapter"),
    ],
)
def test_bad_lora_settings_are_one_line_config_errors(values, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_mapping({"experiment": "single", **values})
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_target_that_matches_nothing_names_the_models_linear_modules(base_suite):
    with pytest.raises(ConfigError) as error:
        lora(base_suite, targets=("q_proj",))
    assert str(error.value) == (
        "lora-target-modules: 'q_proj' matches no Linear module of the federated part "
        "(federated-layers); its Linear modules end in: dense, key, query, value"
    )
    with pytest.raises(ConfigError, match=r"'layer\.0\.attention\.self\.query' matches no Linear"):
        lora(base_suite, targets=("layer.0.attention.self.query",))  # block 0 is frozen
    suite = lora(base_suite, targets=("output.dense", "key"))
    assert len(resolve_targets(base_suite.build_model(), suite.settings)) == 6


def test_the_run_config_keys_reach_every_party(tiny_bert):
    keys = {
        "task-suite": "text",
        "num-tasks": 2,
        "suite-seed": 0,
        "model": f"hf:{tiny_bert}",
        "adapter": "lora",
        "lora-rank": 3,
        "lora-alpha": 3.0,
        "lora-target-modules": "value",
        "adapter-federation": "adapter",
    }
    suite = build_suite(keys)
    assert isinstance(suite, LoraSuite)
    assert suite.settings == LoraSettings(3, 3.0, 0.0, ("value",), "adapter")
    assert suite.settings.scaling == 1.0
    assert not isinstance(build_suite({**keys, "adapter": "none"}), LoraSuite)
    cfg = RunConfig.from_mapping(
        {"experiment": "single", **{k: v for k, v in keys.items() if k not in ("suite-seed",)}}
    )
    assert {k: cfg.suite_config()[k] for k in keys if k != "suite-seed"} == {
        k: v for k, v in keys.items() if k != "suite-seed"
    }


# ---------------------------------------------------------------------------------------------
# (e) the update cache, (f) the frozen-prefix cache
# ---------------------------------------------------------------------------------------------


def test_update_cache_keys_differ_for_every_lora_setting_and_keep_full_fine_tuning_keys(
    base_suite,
):
    config = {"task-suite": "text", "num-tasks": 2, "suite-seed": 0, "model": "x"}
    defaults = {
        "adapter": "none",
        "lora-rank": 8,
        "lora-alpha": 16.0,
        "lora-dropout": 0.0,
        "lora-target-modules": "",
        "adapter-federation": "dense",
    }
    variants = [
        ({}, base_suite),
        ({"adapter": "lora"}, lora(base_suite)),
        ({"adapter": "lora", "adapter-federation": "adapter"}, lora(base_suite, "adapter")),
        ({"adapter": "lora", "lora-rank": 4}, lora(base_suite)),
        ({"adapter": "lora", "lora-alpha": 8.0}, lora(base_suite)),
        ({"adapter": "lora", "lora-target-modules": "query"}, lora(base_suite)),
        ({"adapter": "lora", "lora-dropout": 0.1}, lora(base_suite)),
    ]
    keys = []
    for changes, suite in variants:
        state = suite.initial_state()
        material = key_material(suite, {**config, **defaults, **changes}, 0, KNOBS, 1, False, state)
        keys.append(update_key(material))
        if not changes:  # full fine-tuning: the key material of before LoRA existed
            assert not set(defaults) & set(material["suite_config"])
            assert update_key(key_material(suite, config, 0, KNOBS, 1, False, state)) == keys[0]
    assert len(set(keys)) == len(keys)


def test_frozen_prefix_cache_stays_exact_with_adapters_in_the_federated_blocks(tiny_bert):
    cached_base = make_suite("text", model=f"hf:{tiny_bert}", federated_layers=1, **SMALL)
    full_base = make_suite(
        "text", model=f"hf:{tiny_bert}", federated_layers=1, frozen_prefix_cache=False, **SMALL
    )
    assert cached_base.cached_from == 2 and full_base.cached_from is None
    cached, full = lora(cached_base, "adapter"), lora(full_base, "adapter")
    theta0 = cached.initial_state()
    torch.testing.assert_close(theta0, full.initial_state(), rtol=0, atol=0)
    generator = torch.Generator().manual_seed(3)
    moved = {
        name: t + 0.3 * torch.randn(t.shape, generator=generator) for name, t in theta0.items()
    }
    models = [cached.build_model(), full.build_model()]
    for model in models:
        load_federated_state(model, moved)
    with torch.no_grad():
        for t in range(cached.num_tasks):
            for split in SPLITS:
                xc, xf = cached.tasks[t].split(split)[0], full.tasks[t].split(split)[0]
                torch.testing.assert_close(models[0](xc, t), models[1](xf, t), rtol=1e-4, atol=1e-5)
    a = fine_tune(cached, 0, moved, KNOBS, round_index=1).update
    b = fine_tune(full, 0, moved, KNOBS, round_index=1).update
    assert any(float(delta.abs().max()) > 0 for delta in b.values())
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_adapter_mode_multi_round_starts_from_the_global_adapter(base_suite):
    """Round 2 loads θ¹ = (A¹, B¹) into the adapters; its loss before training is θ¹'s."""
    adapter = lora(base_suite, "adapter")
    theta0 = adapter.initial_state()
    first = fine_tune(adapter, 0, theta0, KNOBS, round_index=1)
    theta1 = {name: theta0[name] + first.update[name] for name in theta0}
    second = fine_tune(adapter, 0, theta1, KNOBS, round_index=2)
    assert second.loss_before == pytest.approx(first.loss_after, rel=1e-6)


def test_lora_dropout_is_active_in_training_and_seeded(base_suite):
    """The encoder stays in eval mode, the adapters' dropout does not; Δ_t is reproducible."""
    dropped, plain = lora(base_suite, dropout=0.5), lora(base_suite)
    theta0 = plain.initial_state()
    first, again = (fine_tune(dropped, 0, theta0, KNOBS, round_index=1).update for _ in range(2))
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    without = fine_tune(plain, 0, theta0, KNOBS, round_index=1).update
    assert any(not torch.allclose(first[k], without[k]) for k in theta0)
    model = dropped.build_model().train()
    assert all(layer.lora_dropout[ADAPTER_NAME].training for layer in model.layers.values())
    assert not model.eval().layers[next(iter(model.layers))].lora_dropout[ADAPTER_NAME].training


# ---------------------------------------------------------------------------------------------
# End to end on Flower's simulation engine (Ray)
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("federation", ["dense", "adapter"])
def test_simulate_runs_lora_clients_in_each_mode(tiny_bert, tmp_path, federation):
    from fl_sim.federation.simulation import simulate

    cfg = text_config(
        tiny_bert,
        tmp_path,
        strategy="fedavg",
        **{"num-rounds": 2, "adapter-federation": federation, "diagnostic-batch": 0},
    )
    (results,) = simulate([cfg], progress=False)
    assert results["status"] == "completed" and len(results["rounds"]) == 3  # rounds 0..2
    assert results["lora"]["federation"] == federation
    theta0, deltas, merged = read_run(tmp_path / "run")
    suite = build_suite(cfg.suite_config())
    knobs = cfg.client_knobs()
    for t, delta in enumerate(deltas):  # the Ray clients trained exactly what this process does
        own = fine_tune(suite, t, theta0, knobs[t], round_index=1).update
        torch.testing.assert_close(delta, own, rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(merged[k], theta0[k]) for k in theta0)
    keys = sorted(theta0)
    if federation == "dense":
        assert all(key.endswith(".weight") and "lora" not in key for key in keys)
    else:
        assert {key.rsplit(".", 2)[1] for key in keys} == {"lora_A", "lora_B"}
        assert all(float(d.abs().max()) > 0 for d in deltas[0].values())  # A and B both move
    sent = sum(t.numel() * t.element_size() for t in theta0.values())
    assert results["lora"]["bytes_per_client_round"] == sent
