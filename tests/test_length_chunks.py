"""Length-sorted pieces (fl_sim/suites/length_chunks.py): a text batch runs in pieces of similar
length, each trimmed to its longest text.

Claims: (a) ``length_pieces`` returns the cheapest cut, checked against every cut of small inputs
by brute force, and never a piece over ``max_size``; (b) on the real all-MiniLM-L6-v2 (from the
cached prefix and from token ids) and on a tiny random BERT, the encoder's features and the
gradients of the federated blocks equal one unpadded-per-batch pass to float tolerance; (c) a
client's fine-tune gives the same Δ_t and losses as with one pass per batch.

``python tests/test_length_chunks.py`` measures a training step of the text suite's default
(one thread): one pass per batch against the pieces, and the token positions each runs.
"""

from __future__ import annotations

import copy
import itertools
import random
import time

import pytest
import torch
import torch.nn.functional as F
from helpers import save_tiny_bert

from clients.knobs import TrainingKnobs
from clients.local_training import fine_tune, minibatches
from fl_sim.suites.encoders import EVAL_CHUNK, TextEncoder
from fl_sim.suites.length_chunks import PIECE_COST, cut_cost, length_pieces
from fl_sim.suites.registry import make_suite

SMALL = {"tasks": ["arity", "visibility"], "train_per_class": 8, "eval_per_class": 6}
TOL = {"rtol": 1e-4, "atol": 1e-5}

pytestmark = pytest.mark.usefixtures("module_one_thread")


def spans(ends: list[int]) -> list[tuple[int, int]]:
    """(start, end) of each piece, from the pieces' ends."""
    return list(zip([0, *ends[:-1]], ends, strict=True))


def every_cut(n: int, max_size: int):
    """Every cut of n sorted positions into contiguous pieces of at most ``max_size``."""
    for inner in range(n):
        for cuts in itertools.combinations(range(1, n), inner):
            ends = [*cuts, n]
            if all(b - a <= max_size for a, b in spans(ends)):
                yield ends


def test_length_pieces_is_the_cheapest_cut_by_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        lengths = tuple(sorted(rng.choice([1, 2, 3, 8, 20, 31, 40, 64]) for _ in range(n)))
        max_size, cost = rng.randint(1, 10), rng.choice([0, 5, PIECE_COST, 200])
        ends = length_pieces(lengths, max_size, cost)
        assert ends[-1] == n and ends == sorted(set(ends))
        assert all(b - a <= max_size for a, b in spans(ends))
        cheapest = min(cut_cost(lengths, cut, cost) for cut in every_cut(n, max_size))
        assert cut_cost(lengths, ends, cost) == cheapest


def test_length_pieces_edge_cases_and_bad_input():
    assert length_pieces((), 4) == []
    assert length_pieces((5,) * 10, 4, cost=0) in ([4, 8, 10], [2, 6, 10], [3, 6, 10])
    assert length_pieces((5,) * 10, 100) == [10]  # equal lengths: padding-free in one pass
    assert length_pieces((1, 1, 1, 64), 8, cost=10) == [3, 4]  # 3·1 + 64 + 20 < 4·64 + 10
    with pytest.raises(ValueError, match="sorted ascending"):
        length_pieces((3, 1), 4)
    with pytest.raises(ValueError, match="max_size"):
        length_pieces((1,), 0)


@pytest.fixture(scope="module")
def minilm_suites():
    """The same small text suite from the cached prefix (default) and from token ids."""
    return make_suite("text", **SMALL), make_suite("text", frozen_prefix_cache=False, **SMALL)


def one_pass(encoder: TextEncoder, x: torch.Tensor) -> torch.Tensor:
    """Today's reference: the whole batch in one pass, trimmed to its longest text."""
    return F.normalize(encoder.features(x), dim=-1)


def federated_grads(model, run, x: torch.Tensor, weights: torch.Tensor) -> dict:
    """∂/∂θ of Σᵢ wᵢ·⟨features(xᵢ), 1⟩ for every parameter that gets a gradient, in float64."""
    model.zero_grad(set_to_none=True)
    (run(x) * weights).sum().backward()
    return {n: p.grad.double() for n, p in model.named_parameters() if p.grad is not None}


def assert_pieces_match_one_pass(model, x: torch.Tensor) -> None:
    """(b): features without grad equal; with grad, the pieces' federated gradients are as close
    to a float64 one-pass reference as float32's one pass is (sums over many tokens round)."""
    encoder = model.encoder
    _, ends = encoder.pieces(x)
    assert len(ends) > 1, "the batch should need more than one piece"
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), one_pass(encoder, x), **TOL)
    weights = torch.randn(x.shape[0], 1, generator=torch.Generator().manual_seed(0))
    pieces = federated_grads(model, encoder, x, weights)
    whole = federated_grads(model, lambda batch: one_pass(encoder, batch), x, weights)
    exact_model = copy.deepcopy(model).double()
    exact_x = x.double() if x.is_floating_point() else x
    exact = federated_grads(
        exact_model, lambda b: one_pass(exact_model.encoder, b), exact_x, weights.double()
    )
    assert pieces and sorted(pieces) == sorted(whole) == sorted(exact)
    for name, reference in exact.items():
        error, one_pass_error = (
            float((g - reference).abs().max()) for g in (pieces[name], whole[name])
        )
        floor = 1e-6 * float(reference.abs().max()) + 1e-8
        assert error <= 4 * one_pass_error + floor, (name, error, one_pass_error)


def test_minilm_pieces_equal_one_pass_from_the_prefix_and_from_token_ids(minilm_suites):
    for suite in minilm_suites:
        model = suite.build_model()
        model.train()
        x = torch.cat([task.train_x for task in suite.tasks])
        assert_pieces_match_one_pass(model, x[:32])
        assert_pieces_match_one_pass(model, x)


def test_tiny_bert_pieces_equal_one_pass_with_every_layer_federated(tmp_path):
    folder = save_tiny_bert(tmp_path / "bert")
    suite = make_suite("text", model=f"hf:{folder}", federated_layers="all", **SMALL)
    model = suite.build_model()
    model.train()
    x = torch.cat([task.train_x for task in suite.tasks])
    assert not x.is_floating_point()  # token ids: the whole encoder runs per piece
    assert_pieces_match_one_pass(model, x)


@pytest.mark.parametrize(
    ("optimizer", "lr", "atol"),
    [("sgd", 0.05, 1e-6), ("adamw", 1e-4, 1e-5)],
)
def test_a_client_fine_tune_is_unchanged_by_the_pieces(
    minilm_suites, monkeypatch, optimizer, lr, atol
):
    suite = minilm_suites[0]
    knobs = TrainingKnobs(lr=lr, local_steps=6, batch_size=8, optimizer=optimizer, seed=3)
    theta0 = suite.initial_state()
    pieces = fine_tune(suite, 1, theta0, knobs, round_index=1)
    monkeypatch.setattr(TextEncoder, "pieces", lambda self, x: None)
    whole = fine_tune(suite, 1, theta0, knobs, round_index=1)
    assert any(delta.abs().max() > 0 for delta in whole.update.values())
    for name in whole.update:
        if optimizer == "adamw" and name.endswith("attention.self.key.bias"):
            # ∂L/∂b_key = 0 exactly (softmax ignores a shift common to a query's scores), so its
            # float gradient is rounding noise, which AdamW's m/√v turns into steps of up to η
            assert (
                float((pieces.update[name] - whole.update[name]).abs().max())
                <= knobs.lr * knobs.local_steps
            )
            continue
        torch.testing.assert_close(pieces.update[name], whole.update[name], rtol=0, atol=atol)
    assert pieces.loss_before == pytest.approx(whole.loss_before, rel=1e-5)
    assert pieces.loss_after == pytest.approx(whole.loss_after, rel=1e-4)


def test_no_piece_holds_more_than_eval_chunk_texts(minilm_suites):
    encoder = minilm_suites[0].build_model().encoder
    x = torch.cat([task.train_x for task in minilm_suites[0].tasks] * 6)
    assert len(x) > 2 * EVAL_CHUNK
    order, ends = encoder.pieces(x)
    assert sorted(order.tolist()) == list(range(len(x)))
    assert max(b - a for a, b in spans(ends)) <= EVAL_CHUNK


# ---------------------------------------------------------------------------------------------
# Measurement (not a test): python tests/test_length_chunks.py
# ---------------------------------------------------------------------------------------------


def measure(steps: int = 30) -> None:
    """Seconds per training step (forward and backward, batch 32, task 0) of the text suite's
    default on one thread, one pass per batch against the pieces, alternated, and the token
    positions each runs per step."""
    torch.set_num_threads(1)
    suite = make_suite("text")
    model = suite.build_model()
    model.train()
    x = suite.training_groups(0)[0].x
    batches = minibatches(len(x), 32, torch.Generator().manual_seed(0))
    index = [next(batches) for _ in range(steps)]
    lengths = [x[i][..., -1].sum(dim=1) for i in index]
    padded = sum(32 * int(n.max()) for n in lengths) / steps
    real = sum(int(n.sum()) for n in lengths) / steps
    cut = [length_pieces(tuple(sorted(n.tolist())), EVAL_CHUNK) for n in lengths]
    runs = sum(cut_cost(tuple(sorted(n.tolist())), e, 0) for n, e in zip(lengths, cut, strict=True))
    pieces = sum(len(e) for e in cut) / steps
    print(
        f"token positions per step: {padded:.0f} one pass, {runs / steps:.0f} in pieces "
        f"({pieces:.1f} pieces), {real:.0f} real"
    )
    for _ in range(2):
        for name, run in (("one pass", lambda b: one_pass(model.encoder, b)), ("pieces", None)):
            start = time.perf_counter()
            for i in index:
                features = model.encoder(x[i]) if run is None else run(x[i])
                features.sum().backward()
            print(f"{name}: {(time.perf_counter() - start) / steps:.3f} s per step", flush=True)


if __name__ == "__main__":
    measure()
