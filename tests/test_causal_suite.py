"""The causal-LM suite: generated languages, a character tokenizer, a seeded decoder, θ₀
pre-trained and cached, fine-tuning, Hugging Face folders, `fl-sim merge` and one federation.

Fast tests pre-train a short version of llama-tiny (``QUICK``) into this module's own cache;
the slow one runs the real default through Flower's simulation engine.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import PreTrainedTokenizerFast

from clients.knobs import TrainingKnobs
from clients.local_training import fine_tune
from fl_sim.errors import CheckpointError, ConfigError
from fl_sim.suites import causal_data
from fl_sim.suites.base import evaluate, federated_state, load_federated_state
from fl_sim.suites.causal_lm import (
    ANSWER,
    PAD,
    PROMPT,
    SPECS,
    CausalSuite,
    build_decoder,
    char_tokenizer,
    decode_answer,
    encode_examples,
    pretrained_decoder,
    span_objective,
    token_ids,
)
from fl_sim.suites.registry import build_suite, check_suite_config

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = dataclasses.replace(SPECS["llama-tiny"], pretrain_steps=40)  # seconds, for tests


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("causal-cache")


@pytest.fixture(scope="module")
def suite(cache):
    return CausalSuite(num_tasks=3, seed=0, spec=QUICK, cache_dir=cache)


# -- the languages ---------------------------------------------------------------------------


def expected_answer(name: str, prompt: str) -> str:
    """Each language's rule, written again from its definition (causal_data's docstring)."""
    body = prompt[4:-1]
    if name == "add":
        a, b = body.split("+")
        return str(int(a) + int(b))
    if name == "reverse":
        return body[::-1]
    if name == "sort":
        return "".join(sorted(body))
    if name == "count":
        return str(body.count("b"))
    if name == "shift":
        return "".join(chr(ord(c) + 1) for c in body)
    if name == "plural":
        det, noun, verb, obj_det, obj = body.split()
        noun = "foxes" if noun == "fox" else noun + "s"
        return f"{'some' if det == 'a' else det} {noun} {verb[:-1]} {obj_det} {obj}"
    if name == "max":
        return max(body.split(","))
    if name == "double":
        return "".join(c + c for c in body)
    raise AssertionError(name)


def test_every_language_answers_by_its_rule_and_its_splits_are_disjoint_and_deterministic():
    for name in causal_data.CAUSAL_TASKS:
        splits = causal_data.task_splits(name, 0)
        assert {k: len(v) for k, v in splits.items()} == causal_data.SPLIT_SIZES
        prompts = [prompt for examples in splits.values() for prompt, _ in examples]
        assert len(set(prompts)) == len(prompts), name  # disjoint across every split
        for prompt, answer in splits["train"] + splits["test"]:
            assert prompt.startswith(prompt[:3] + " ") and prompt.endswith("=")
            assert answer == expected_answer(name, prompt), (name, prompt, answer)
        assert causal_data.task_splits(name, 0) == splits  # deterministic
        assert causal_data.task_splits(name, 1)["train"] != splits["train"]  # the seed matters
    tags = {causal_data.task_splits(n, 0)["train"][0][0][:3] for n in causal_data.CAUSAL_TASKS}
    assert len(tags) == causal_data.MAX_TASKS  # every language has its own tag


def test_the_plural_language_uses_its_irregular_noun():
    examples = causal_data.draw_examples("plural", 0, 400)
    assert any(re.search(r"\bfoxes\b", answer) for _, answer in examples)


def test_a_task_count_outside_the_catalogue_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"causal suite has 1\.\.8 tasks.*num-tasks"):
        causal_data.task_names(9)
    with pytest.raises(ConfigError, match="unknown causal task 'poetry'"):
        causal_data.draw_examples("poetry", 0, 3)


# -- the tokenizer ---------------------------------------------------------------------------


def test_the_character_tokenizer_round_trips_every_text_and_marks_the_answer_span():
    tokenizer = char_tokenizer()
    ids = token_ids(tokenizer, "test")
    assert (ids.pad, ids.bos, ids.eos) == (0, 1, 2)
    assert len(tokenizer) == 3 + len(causal_data.alphabet())
    examples = [
        ex for name in causal_data.CAUSAL_TASKS for ex in causal_data.draw_examples(name, 3, 20)
    ]
    for prompt, answer in examples:
        text = prompt + answer
        tokens = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(tokens) == len(text)  # one token per character
        assert tokenizer.decode(tokens) == text
    x = encode_examples(tokenizer, examples, ids)
    for row, (prompt, answer) in zip(x, examples, strict=True):
        roles = row[1]
        n_prompt, n_answer = int((roles == PROMPT).sum()), int((roles == ANSWER).sum())
        assert (n_prompt, n_answer) == (len(prompt) + 1, len(answer) + 1)  # <s>, </s>
        assert row[0, 0] == ids.bos and row[0, n_prompt + n_answer - 1] == ids.eos
        assert bool((row[0][roles == PAD] == ids.pad).all())
        assert decode_answer(tokenizer, row) == answer


def test_a_character_outside_the_alphabet_is_refused_in_one_line():
    tokenizer = char_tokenizer()
    with pytest.raises(ConfigError, match=r"characters \['!', 'A'\] outside the tokenizer"):
        encode_examples(
            tokenizer,
            [("add A!=", "1")],
            token_ids(tokenizer, "t"),
            alphabet=causal_data.alphabet(),
        )


# -- the model and its objective -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_decoder_builds_identically_twice_from_its_seed(name):
    before = torch.random.get_rng_state()
    first, again = build_decoder(SPECS[name], 0), build_decoder(SPECS[name], 0)
    other = build_decoder(SPECS[name], 1)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())
    assert "lm_head.weight" in a  # untied: the head is its own tensor
    assert (
        a["lm_head.weight"].data_ptr()
        != next(iter(first.get_input_embeddings().parameters())).data_ptr()
    )


def test_span_objective_is_the_answer_spans_cross_entropy_and_match():
    tokenizer = char_tokenizer()
    ids = token_ids(tokenizer, "t")
    lm = build_decoder(SPECS["llama-tiny"], 5)
    examples = causal_data.draw_examples("add", 0, 6) + causal_data.draw_examples("plural", 0, 3)
    x = encode_examples(tokenizer, examples, ids)
    loss, token_score = span_objective(lm, x, metric="token")
    _, exact = span_objective(lm, x, metric="exact")
    with torch.no_grad():
        for i in range(len(x)):  # one example at a time, unpadded: a direct computation
            n = int((x[i, 1] > PAD).sum())
            tokens = x[i, 0, :n]
            logits = lm(input_ids=tokens[None]).logits[0]
            positions = [j for j in range(n) if x[i, 1, j] == ANSWER]
            ces = [-F.log_softmax(logits[j - 1], dim=-1)[tokens[j]] for j in positions]
            right = [int(logits[j - 1].argmax()) == int(tokens[j]) for j in positions]
            torch.testing.assert_close(loss[i], torch.stack(ces).mean(), rtol=1e-4, atol=1e-5)
            assert float(token_score[i]) == pytest.approx(sum(right) / len(right))
            assert float(exact[i]) == float(all(right))


def test_a_suite_is_deterministic_and_federates_the_top_blocks_the_norm_and_lm_head(suite, cache):
    assert suite.federated_names == ["model.layers.2", "model.layers.3", "model.norm", "lm_head"]
    model, again = suite.build_model(), CausalSuite(3, 0, spec=QUICK, cache_dir=cache).build_model()
    state, other = federated_state(model), federated_state(again)
    assert list(state) == list(other) and all(torch.equal(state[k], other[k]) for k in state)
    assert "backbone.model.layers.3.self_attn.q_proj.weight" in state
    assert not any(k.startswith("backbone.model.layers.1.") for k in state)
    assert "backbone.model.embed_tokens.weight" not in state
    for t, task in enumerate(suite.tasks):  # every split's x is (n, 2, L), y the answer length
        x, y = task.split("val")
        assert x.shape[1] == 2 and torch.equal(y, (x[:, 1] == ANSWER).sum(dim=1))
        assert task.name == list(causal_data.CAUSAL_TASKS)[t]
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.startswith("backbone.") for n in trained)


def test_theta0_is_pretrained_once_and_then_read_from_the_verified_cache(tmp_path):
    spec = dataclasses.replace(QUICK, pretrain_steps=3)
    first = pretrained_decoder("llama-tiny", 0, tmp_path, spec)
    assert first.source == "pretrained" and first.path.is_file()
    from fl_sim.suites import causal_lm

    causal_lm.forget_memory()
    second = pretrained_decoder("llama-tiny", 0, tmp_path, spec)
    assert second.source == "disk"
    assert all(torch.equal(first.state[k], second.state[k]) for k in first.state)
    first.path.write_bytes(first.path.read_bytes()[:-8] + b"corrupt!")  # fails its SHA-256
    causal_lm.forget_memory()
    third = pretrained_decoder("llama-tiny", 0, tmp_path, spec)
    assert third.source == "pretrained"
    assert all(torch.equal(first.state[k], third.state[k]) for k in first.state)  # deterministic


def test_fine_tuning_reduces_the_task_loss(suite):
    theta0 = suite.initial_state()
    knobs = TrainingKnobs(lr=1e-3, local_steps=30, optimizer="adamw", batch_size=32, seed=0)
    result = fine_tune(suite, 0, theta0, knobs)
    assert result.loss_after < 0.9 * result.loss_before
    model = suite.build_model()
    before = evaluate(model, suite.tasks[0], "val")
    load_federated_state(model, {k: theta0[k] + result.update[k] for k in theta0})
    after = evaluate(model, suite.tasks[0], "val")
    assert after[0] < before[0] and after[1] > before[1]  # val loss down, token accuracy up
    assert set(result.update) == set(theta0)


# -- Hugging Face folders, fl-sim merge, and your own model ---------------------------------


def test_fl_sim_merge_of_two_causal_checkpoints_loads_with_auto_model_for_causal_lm(
    suite, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fl_sim.cli.main import main

    theta0 = suite.initial_state()
    deltas = []
    for t in range(2):
        knobs = TrainingKnobs(lr=1e-3, local_steps=5, optimizer="adamw", batch_size=16, seed=t)
        deltas.append(fine_tune(suite, t, theta0, knobs).update)
        suite.save_model_folder(
            {k: theta0[k] + deltas[t][k] for k in theta0}, tmp_path / f"client_{t}"
        )
    suite.save_model_folder(theta0, tmp_path / "base")
    with pytest.raises(ConfigError, match="already exists"):
        suite.save_model_folder(theta0, tmp_path / "base")
    lam = 0.4
    code = main(
        ["merge", "--method", "task_arithmetic", "--lambda", str(lam), "--base",
         str(tmp_path / "base"), "--out", str(tmp_path / "merged"),
         str(tmp_path / "client_0"), str(tmp_path / "client_1")]
    )  # fmt: skip
    assert code in (0, None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged", local_files_only=True)
    assert tokenizer.decode(tokenizer("add 1+2=")["input_ids"], skip_special_tokens=True) == (
        "add 1+2="
    )
    weights = merged.state_dict()
    base = suite.build_model().lm.state_dict()
    for key, value in theta0.items():  # θ₀ + λ Σ_t Δ_t on the federated part, θ₀ elsewhere
        name = key.removeprefix("backbone.")
        torch.testing.assert_close(weights[name], value + lam * (deltas[0][key] + deltas[1][key]))
    for name, value in base.items():
        if f"backbone.{name}" not in theta0:
            assert torch.equal(weights[name], value), name


def tiny_causal_folder(folder, family: str, tie: bool = False):
    """A causal LM of ``family`` with the suite's tokenizer, saved as your own model would be."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = char_tokenizer()
    common = dict(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        config = LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, **common,
        )  # fmt: skip
    else:
        config = GPT2Config(
            n_embd=32, n_layer=3, n_head=2, n_positions=64, tie_word_embeddings=tie, **common
        )
    torch.manual_seed(3)
    lm = AutoModelForCausalLM.from_config(config)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return lm


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_your_own_causal_lm_loads_from_an_hf_folder(tmp_path, family):
    lm = tiny_causal_folder(tmp_path / "mine", family)
    mine = CausalSuite(num_tasks=2, model=f"hf:{tmp_path / 'mine'}", federated_layers=1)
    top = "model.layers.2" if family == "llama" else "transformer.h.2"
    norm = "model.norm" if family == "llama" else "transformer.ln_f"
    assert mine.federated_names == [top, norm, "lm_head"]
    model = mine.build_model()
    state = federated_state(model)
    for key, value in state.items():  # θ₀ is the folder's weights
        assert torch.equal(value, lm.state_dict()[key.removeprefix("backbone.")]), key
    loss, accuracy = evaluate(model, mine.tasks[0], "val")
    assert loss > 0 and 0 <= accuracy <= 1
    knobs = TrainingKnobs(lr=1e-3, local_steps=3, optimizer="adamw", batch_size=8, seed=0)
    result = fine_tune(mine, 1, state, knobs)
    assert result.loss_after < result.loss_before


def test_a_tied_lm_head_is_federated_as_the_one_tensor_it_is(tmp_path):
    tiny_causal_folder(tmp_path / "tied", "gpt2", tie=True)
    mine = CausalSuite(num_tasks=1, model=f"hf:{tmp_path / 'tied'}", federated_layers=1)
    model = mine.build_model()
    knobs = TrainingKnobs(lr=1e-2, local_steps=2, optimizer="adamw", batch_size=8, seed=0)
    update = fine_tune(mine, 0, federated_state(model), knobs).update
    assert float(update["backbone.lm_head.weight"].abs().sum()) > 0
    lm = model.lm
    assert lm.lm_head.weight is lm.transformer.wte.weight  # still one tensor


def test_bad_causal_models_and_keys_are_refused_in_one_line(tmp_path):
    with pytest.raises(ConfigError, match="task-suite=causal takes model"):
        CausalSuite(num_tasks=1, model="minilm")
    with pytest.raises(ConfigError, match="no folder at"):
        CausalSuite(num_tasks=1, model=f"hf:{tmp_path / 'missing'}")
    folder = tmp_path / "no-eos"
    tiny_causal_folder(folder, "llama")
    without_eos = PreTrainedTokenizerFast(
        tokenizer_object=char_tokenizer().backend_tokenizer, pad_token="<pad>"
    )
    without_eos.save_pretrained(folder)
    with pytest.raises(CheckpointError, match="no end-of-sequence token"):
        CausalSuite(num_tasks=1, model=f"hf:{folder}")
    keys = {"task-suite": "causal", "num-tasks": 2, "suite-seed": 0}
    with pytest.raises(ConfigError, match="takes model '', 'llama-tiny', 'gpt2-tiny', hf:PATH"):
        check_suite_config({**keys, "model": "vit-digits"})
    with pytest.raises(ConfigError, match="causal-metric must be one of token, exact"):
        check_suite_config({**keys, "causal-metric": "bleu"})
    with pytest.raises(ConfigError, match="causal-metric is for task-suite=causal"):
        check_suite_config(
            {"task-suite": "toy", "num-tasks": 2, "suite-seed": 0, "causal-metric": "exact"}
        )
    with pytest.raises(ConfigError, match="no heads to share"):
        check_suite_config({**keys, "shared-head": True})
    with pytest.raises(ConfigError, match=r"causal suite has 1\.\.8 tasks"):
        build_suite({**keys, "num-tasks": 9})


def test_the_registry_builds_the_causal_suite_from_run_config_keys(cache, monkeypatch):
    monkeypatch.setenv("FL_SIM_CACHE", str(cache))
    keys = {"task-suite": "causal", "num-tasks": 2, "suite-seed": 0, "model": "gpt2-tiny"}
    monkeypatch.setitem(
        SPECS, "gpt2-tiny", dataclasses.replace(SPECS["gpt2-tiny"], pretrain_steps=5)
    )
    built = build_suite({**keys, "causal-metric": "exact", "federated-layers": "all"})
    assert isinstance(built, CausalSuite) and built.metric == "exact"
    assert built.federated_names == ["transformer", "lm_head"]
    assert [t.name for t in built.tasks] == ["add", "reverse"]


# -- the federation --------------------------------------------------------------------------


@pytest.mark.slow
def test_one_shot_task_arithmetic_on_the_causal_suite_is_theta0_plus_lambda_sum_of_updates(
    tmp_path,
):
    from transformers import AutoModelForCausalLM

    from tests.helpers import simulate_reference

    lam = 0.3
    values = {
        "experiment": "single",
        "task-suite": "causal",
        "num-tasks": 2,
        "strategy": "task_arithmetic",
        "lambda": lam,
        "num-rounds": 1,
        "optimizer": "adamw",
        "lr": 1e-3,
        "local-steps": 10,
        "preset": "none",
        "update-cache": False,
    }
    out = simulate_reference(values, tmp_path / "run", tmp_path / "cache")
    base = load_file(out / "base.safetensors")
    merged = load_file(out / "global_model.safetensors")
    clients = [load_file(out / "clients" / f"client_{t}.safetensors") for t in range(2)]
    assert any(not torch.equal(clients[0][k], base[k]) for k in base)
    for key in base:  # the identity, from the clients' own checkpoints: Δ_t = θ_t − θ₀
        expected = base[key] + lam * sum(client[key] - base[key] for client in clients)
        torch.testing.assert_close(merged[key], expected, rtol=1e-5, atol=1e-6)
    results = json.loads((out / "results.json").read_text())
    assert results["files"]["hf_folders"] == ["hf/base", "hf/client_0", "hf/client_1", "hf/global"]
    for name, state in (("base", base), ("client_1", clients[1]), ("global", merged)):
        lm = AutoModelForCausalLM.from_pretrained(out / "hf" / name, local_files_only=True)
        weights = lm.state_dict()
        for key, value in state.items():
            assert torch.equal(weights[key.removeprefix("backbone.")], value), (name, key)
    rounds = results["rounds"]
    assert rounds[0]["round"] == 0 and rounds[1]["round"] == 1
    assert all(0 <= task["accuracy"] <= 1 for task in rounds[1]["tasks"])


def test_lora_adapters_find_the_llama_attention_projections(cache, monkeypatch):
    monkeypatch.setenv("FL_SIM_CACHE", str(cache))
    monkeypatch.setitem(SPECS, "llama-tiny", QUICK)  # the module's θ₀, cached by `suite`
    keys = {"task-suite": "causal", "num-tasks": 2, "suite-seed": 0, "adapter": "lora"}
    adapted = build_suite(keys)  # default targets for Llama: q_proj, v_proj of the top blocks
    assert sorted(adapted.initial_state()) == [
        f"backbone.model.layers.{i}.self_attn.{p}.weight"
        for i in (2, 3)
        for p in ("q_proj", "v_proj")
    ]
