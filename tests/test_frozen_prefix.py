"""The frozen-prefix cache: the layers under the federated top k run once per input set.

Claims, on the real all-MiniLM-L6-v2 (text suite) and on a tiny random BERT saved as ``hf:PATH``
(local suite, through ``build_suite`` and the run-config key): from the cached prefix, (a) the
encoder's output equals the full forward pass on every split (and in the chunked no-grad path),
(b) the frozen heads are the same, (c) client training gives the same federated state, (d)
evaluation gives the same loss and accuracy; (e) with ``frozen-prefix-cache = false`` the inputs
are token ids as before; (f) ``federated_layers = "all"`` keeps the full pass; the model's state
(what checkpoints and merges see) holds no cached tensor.

``python tests/test_frozen_prefix.py`` measures the text suite's default (times and bytes).
"""

from __future__ import annotations

import copy
import time
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY_BERT_WORDS, save_tiny_bert

from clients.knobs import TrainingKnobs
from clients.local_training import fine_tune
from fl_sim.config.run_config import RunConfig
from fl_sim.errors import ConfigError
from fl_sim.suites import encoders, pretrained
from fl_sim.suites.base import SPLITS, evaluate, federated_state, load_federated_state
from fl_sim.suites.registry import build_suite, check_suite_config, make_suite

SMALL = {"tasks": ["arity", "visibility"], "train_per_class": 8, "eval_per_class": 6}
SMALL_TOKENS = {**SMALL, "max_tokens": 24}
WORDS = TINY_BERT_WORDS
TOL = {"rtol": 1e-4, "atol": 1e-5}


pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.fixture(scope="module")
def minilm_pair():
    """The same small text suite with the cache (default) and without it."""
    return (
        make_suite("text", **SMALL_TOKENS),
        make_suite("text", frozen_prefix_cache=False, **SMALL_TOKENS),
    )


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 3-block BERT with a word-level tokenizer, saved as a local model folder."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """One CSV text task of 60 rows of 3 to 14 words (two classes)."""
    root = tmp_path_factory.mktemp("tasks")
    generator = torch.Generator().manual_seed(1)
    rows = ["text,label"]
    for i in range(60):
        count = 2 + int(torch.randint(0, 12, (1,), generator=generator))
        words = [WORDS[int(j)] for j in torch.randint(0, len(WORDS), (count,), generator=generator)]
        rows.append(f"{' '.join(words)} {i},{('open', 'close')[i % 2]}")
    (root / "words.csv").write_text("\n".join(rows) + "\n")
    return root / "words.csv"


def local_config(model: str, path: object, **values: object) -> dict[str, object]:
    return {
        "task-suite": "local",
        "num-tasks": 1,
        "suite-seed": 0,
        "model": model,
        "data-paths": str(path),
        **values,
    }


def assert_same_outputs(cached_suite, full_suite) -> None:
    """(a): the two models' encoder features and logits agree on every task and split."""
    cached_model, full_model = cached_suite.build_model(), full_suite.build_model()
    with torch.no_grad():
        for t, (cached, full) in enumerate(zip(cached_suite.tasks, full_suite.tasks, strict=True)):
            for split in SPLITS:
                (xc, yc), (xf, yf) = cached.split(split), full.split(split)
                assert torch.equal(yc, yf)
                torch.testing.assert_close(cached_model.encoder(xc), full_model.encoder(xf), **TOL)
                torch.testing.assert_close(cached_model(xc, t), full_model(xf, t), **TOL)


def assert_same_training(cached_suite, full_suite, knobs: TrainingKnobs, atol: float) -> None:
    """(c) and (d): the same Δ_t from θ₀, and the same loss and accuracy at θ₀ + Δ_t."""
    theta0 = cached_suite.initial_state()
    assert_close_states(theta0, full_suite.initial_state(), 0.0)
    for t in range(cached_suite.num_tasks):
        cached = fine_tune(cached_suite, t, theta0, knobs, round_index=1)
        full = fine_tune(full_suite, t, theta0, knobs, round_index=1)
        assert any(delta.abs().max() > 0 for delta in full.update.values())
        assert_close_states(cached.update, full.update, atol)
        assert cached.loss_before == pytest.approx(full.loss_before, rel=1e-5)
        assert cached.loss_after == pytest.approx(full.loss_after, rel=1e-4)
        moved = {name: theta0[name] + full.update[name] for name in theta0}
        models = [suite.build_model() for suite in (cached_suite, full_suite)]
        for model in models:
            load_federated_state(model, moved)
        for split in SPLITS:
            (loss_c, acc_c), (loss_f, acc_f) = (
                evaluate(model, suite.tasks[t], split)
                for model, suite in zip(models, (cached_suite, full_suite), strict=True)
            )
            assert loss_c == pytest.approx(loss_f, rel=1e-5, abs=1e-6)
            assert acc_c == acc_f


def assert_close_states(actual, expected, atol: float) -> None:
    assert sorted(actual) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=atol, msg=name)


def test_minilm_cached_prefix_equals_the_full_forward_on_every_split(minilm_pair):
    cached, full = minilm_pair
    assert cached.cached_from == 4 and full.cached_from is None  # top 2 of 6 blocks federated
    for task in cached.tasks:
        for split in SPLITS:
            x, y = task.split(split)
            assert x.dtype == torch.float32 and x.shape[0] == len(y) and x.shape[2] == 384 + 1
    expected = sum(
        4 * task.split(split)[0].shape[0] * task.split(split)[0].shape[1] * 385
        for task in cached.tasks
        for split in SPLITS
    )
    assert cached.prefix_bytes == expected > 0 and full.prefix_bytes == 0
    assert_same_outputs(cached, full)


def test_the_same_suite_again_reuses_the_prefix_computed_once(minilm_pair):
    """A server running several rules builds the suite per rule: the prefix runs once."""
    cached, _ = minilm_pair
    again = make_suite("text", **SMALL_TOKENS)
    for task, other in zip(cached.tasks, again.tasks, strict=True):
        for split in SPLITS:
            assert other.split(split)[0] is task.split(split)[0]
    other_seed = make_suite("text", seed=1, **{**SMALL_TOKENS, "tasks": ["arity"]})
    assert other_seed.cached_from == 4
    assert other_seed.tasks[0].train_x is not cached.tasks[0].train_x


def test_minilm_heads_and_model_state_are_unchanged_by_the_cache(minilm_pair):
    cached, full = minilm_pair
    cached_model, full_model = cached.build_model(), full.build_model()
    for head, other in zip(cached_model.heads, full_model.heads, strict=True):
        torch.testing.assert_close(head.weight, other.weight, rtol=0, atol=0)
        torch.testing.assert_close(head.bias, other.bias, rtol=0, atol=0)
    # what checkpoints and `fl-sim merge` read: the same tensors, no cached features among them
    state, other = cached_model.state_dict(), full_model.state_dict()
    assert sorted(state) == sorted(other)
    for name in state:
        assert torch.equal(state[name], other[name]), name
    assert sorted(federated_state(cached_model)) == sorted(federated_state(full_model))


def test_the_probes_are_fitted_once_per_model_and_head_data(monkeypatch):
    """A server builds the same suite once per rule: the second build fits no probe and gets
    the same heads (copies); other head data (another suite seed) fits its own."""
    fits = []
    fit = pretrained.probe_head
    monkeypatch.setattr(pretrained, "probe_head", lambda *args: fits.append(1) or fit(*args))
    monkeypatch.setattr(pretrained, "_PROBES", OrderedDict())
    first = make_suite("text", **SMALL_TOKENS).build_model()
    assert len(fits) == 2  # one per task
    second = make_suite("text", **SMALL_TOKENS).build_model()
    assert len(fits) == 2
    for head, other in zip(first.heads, second.heads, strict=True):
        assert head is not other
        torch.testing.assert_close(head.weight, other.weight, rtol=0, atol=0)
    reseeded = make_suite("text", seed=1, **SMALL_TOKENS).build_model()
    assert len(fits) == 4
    assert not torch.equal(reseeded.heads[0].weight, first.heads[0].weight)


def fresh_memos(monkeypatch) -> None:
    """A new process's memos: nothing computed in this one is reused."""
    monkeypatch.setattr(pretrained, "_PREFIXES", OrderedDict())
    monkeypatch.setattr(pretrained, "_PROBES", OrderedDict())


def test_a_second_process_reads_the_prefix_and_probes_from_disk_the_very_tensors(
    monkeypatch, tmp_path
):
    """The server stores the prefix and the probes; a client process (fresh memos) reads them:
    no prefix pass, no probe fit, every tensor equal to computing them itself."""
    fresh_memos(monkeypatch)
    computed = make_suite("text", **SMALL_TOKENS)
    computed_heads = computed.build_model().heads
    fresh_memos(monkeypatch)
    first = make_suite("text", disk_cache=tmp_path, **SMALL_TOKENS)
    first_heads = first.build_model().heads
    stored = sorted(path.name.split("-")[0] for path in tmp_path.glob("*.safetensors"))
    assert stored == ["frozen", "probes"]
    fresh_memos(monkeypatch)

    def never(*args, **kwargs):
        raise AssertionError("fitted again although it was on disk")

    passes = []  # the prefix passes' sizes: only check_prefix's few examples run again
    prefix = type(first.pretrained.encoder).prefix

    def counted(encoder, x, first_block):
        passes.append(len(x))
        return prefix(encoder, x, first_block)

    monkeypatch.setattr(pretrained, "probe_head", never)
    monkeypatch.setattr(type(first.pretrained.encoder), "prefix", counted)
    second = make_suite("text", disk_cache=tmp_path, **SMALL_TOKENS)
    second_heads = second.build_model().heads
    assert passes and max(passes) <= encoders.PREFIX_CHECK
    assert second.cached_from == first.cached_from == computed.cached_from == 4
    for suite in (first, second):
        for task, other in zip(suite.tasks, computed.tasks, strict=True):
            for split in SPLITS:
                assert torch.equal(task.split(split)[0], other.split(split)[0])
        assert suite.prefix_bytes == computed.prefix_bytes
    for heads in (first_heads, second_heads):
        for head, other in zip(heads, computed_heads, strict=True):
            assert torch.equal(head.weight, other.weight) and torch.equal(head.bias, other.bias)


def test_a_damaged_or_foreign_stored_prefix_is_never_trusted(monkeypatch, tmp_path, caplog):
    """A stored file that fails its SHA-256 is made again; another θ₀ has another key."""
    fresh_memos(monkeypatch)
    reference = make_suite("text", disk_cache=tmp_path, **SMALL_TOKENS)
    (stored,) = tmp_path.glob("frozen-prefix-*.safetensors")
    payload = bytearray(stored.read_bytes())
    payload[-1] ^= 0xFF
    stored.write_bytes(bytes(payload))
    fresh_memos(monkeypatch)
    with caplog.at_level("WARNING"):
        again = make_suite("text", disk_cache=tmp_path, **SMALL_TOKENS)
    assert "fails its SHA-256" in caplog.text
    for task, other in zip(again.tasks, reference.tasks, strict=True):
        assert torch.equal(task.train_x, other.train_x)
    encoder = reference.pretrained.encoder
    other = copy.deepcopy(encoder)
    with torch.no_grad():
        next(other.parameters()).view(-1)[0] += 1  # another θ₀, the same spec and inputs
    assert pretrained.weights_digest(other) != pretrained.weights_digest(encoder)
    assert pretrained.weights_digest(copy.deepcopy(encoder)) == pretrained.weights_digest(encoder)


def test_minilm_training_and_evaluation_from_the_cache_match_the_full_pass(minilm_pair):
    cached, full = minilm_pair
    knobs = TrainingKnobs(lr=0.05, local_steps=3, optimizer="sgd", batch_size=8)
    assert_same_training(cached, full, knobs, atol=1e-6)


def test_minilm_chunked_no_grad_path_equals_the_full_forward(minilm_pair):
    """More than EVAL_CHUNK examples at once (padded to one length): the chunked path."""
    cached, full = minilm_pair
    xs_cached = [task.split(split)[0] for task in cached.tasks for split in SPLITS]
    xs_full = [task.split(split)[0] for task in full.tasks for split in SPLITS]
    length = max(x.shape[1] for x in xs_cached)
    x_cached = torch.cat([F.pad(x, (0, 0, 0, length - x.shape[1])) for x in xs_cached])
    x_full = torch.cat([F.pad(x, (0, length - x.shape[2])) for x in xs_full])
    assert len(x_full) > 128
    with torch.no_grad():
        torch.testing.assert_close(
            cached.build_model().encoder(x_cached), full.build_model().encoder(x_full), **TOL
        )


def test_key_off_keeps_token_ids_and_the_full_pass(minilm_pair):
    _, full = minilm_pair
    for task in full.tasks:
        for split in SPLITS:
            x, _ = task.split(split)
            assert x.dtype == torch.int64 and x.shape[1] == 2
    assert full.metadata()["frozen-prefix-cached-from"] is None
    model = full.build_model()
    assert model.encoder.cached_from is None
    with pytest.raises(ConfigError, match="takes token ids, not cached prefix features"):
        model(torch.zeros(2, 3, 385), 0)


def test_tiny_bert_through_build_suite_and_the_run_config_key(tiny_bert, local_tasks):
    model = f"hf:{tiny_bert}"
    cached = build_suite(local_config(model, local_tasks, **{"federated-layers": "1"}))
    full = build_suite(
        local_config(model, local_tasks, **{"federated-layers": "1", "frozen-prefix-cache": False})
    )
    assert cached.cached_from == 2 and full.cached_from is None
    assert cached.tasks[0].train_x.shape[2] == 16 + 1
    assert full.tasks[0].train_x.dtype == torch.int64
    assert_same_outputs(cached, full)
    knobs = TrainingKnobs(lr=1e-2, local_steps=4, optimizer="adamw", batch_size=6)
    assert_same_training(cached, full, knobs, atol=1e-5)


def test_tiny_bert_every_split_point_and_all_layers(tiny_bert):
    model = f"hf:{tiny_bert}"
    full = make_suite("text", model=model, frozen_prefix_cache=False, federated_layers=3, **SMALL)
    for k in (1, 3):  # k = 3 of 3: only the embeddings are frozen, and cached
        cached = make_suite("text", model=model, federated_layers=k, **SMALL)
        assert cached.cached_from == 3 - k
        reference = (
            full
            if k == 3
            else make_suite(
                "text", model=model, frozen_prefix_cache=False, federated_layers=k, **SMALL
            )
        )
        assert_same_outputs(cached, reference)
    whole = make_suite("text", model=model, federated_layers="all", **SMALL)  # (f)
    assert whole.cached_from is None and whole.prefix_bytes == 0
    assert whole.tasks[0].train_x.dtype == torch.int64
    assert whole.metadata()["frozen-prefix-cached-from"] is None


def test_the_run_config_key_defaults_on_and_is_checked():
    base = {"experiment": "single", "task-suite": "toy", "num-tasks": 3}
    assert RunConfig.from_mapping(base).suite_config()["frozen-prefix-cache"] is True
    off = RunConfig.from_mapping({**base, "frozen-prefix-cache": False})
    assert off.suite_config()["frozen-prefix-cache"] is False
    with pytest.raises(ConfigError, match="frozen-prefix-cache must be true or false"):
        RunConfig.from_mapping({**base, "frozen-prefix-cache": "sometimes"})
    with pytest.raises(ConfigError, match="frozen-prefix-cache must be true or false"):
        check_suite_config({"task-suite": "text", "num-tasks": 2, "suite-seed": 0,
                            "frozen-prefix-cache": "yes"})  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Measurement (not a test): python tests/test_frozen_prefix.py
# ---------------------------------------------------------------------------------------------


def train_steps(suite, steps: int) -> None:
    """``steps`` AdamW steps (batch 32) of client 0 from θ₀, as ``fine_tune``'s loop runs them."""
    from clients.local_training import minibatches
    from fl_sim.suites.base import batch_loss, federated_parameters

    model = suite.build_model()
    model.train()
    groups = suite.training_groups(0)
    optimizer = torch.optim.AdamW(federated_parameters(model), lr=1e-4)
    batches = minibatches(groups[0].size, 32, torch.Generator().manual_seed(0))
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        batch_loss(model, groups, [0], next(batches)).backward()
        optimizer.step()


def timed(work, *args: object) -> tuple[float, float]:
    """(wall, CPU) seconds of ``work(*args)``; CPU time is what a shared machine distorts least."""
    wall, cpu = time.perf_counter(), time.process_time()
    work(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def evaluate_all(model, suite) -> None:
    """One evaluation pass: every task's val and test split."""
    for task in suite.tasks:
        for split in ("val", "test"):
            evaluate(model, task, split)


def measure(steps: int = 20, repeats: int = 2) -> None:
    """The text suite's default (5 tasks, MiniLM, top 2 of 6 blocks), cached vs full, 1 torch
    thread: the suite's construction, one evaluation pass (every task's val and test split) and
    ``steps`` training steps, alternated ``repeats`` times, and the cached tensors' bytes."""
    torch.set_num_threads(1)
    suites, models = {}, {}
    for cache in (True, False):
        wall, cpu = time.perf_counter(), time.process_time()
        suites[cache] = make_suite("text", frozen_prefix_cache=cache)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        models[cache] = suites[cache].build_model()  # fits the heads (not timed)
        print(f"cache={cache}: construction {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)
    texts = sum(len(task.val_y) + len(task.test_y) for task in suites[True].tasks)
    for _ in range(repeats):
        for cache in (True, False):
            evaluation = timed(evaluate_all, models[cache], suites[cache])
            training = timed(train_steps, suites[cache], steps)
            print(
                f"cache={cache}: evaluation of {texts} texts {evaluation[0]:.2f} s wall "
                f"{evaluation[1]:.2f} s CPU; {steps} training steps (batch 32) {training[0]:.2f} "
                f"s wall {training[1]:.2f} s CPU",
                flush=True,
            )
    suite = suites[True]
    examples = sum(len(task.split(split)[1]) for task in suite.tasks for split in SPLITS)
    print(f"cached tensors: {suite.prefix_bytes} bytes over {examples} examples")


if __name__ == "__main__":
    measure()
