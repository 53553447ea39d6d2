"""Gradient diversity ζ² = Σ_t p_t ‖g_t − ḡ‖² (fl_sim/federation/diagnostics.py) against an
independent computation, and in results.json."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from helpers import InProcessGrid, config

from fl_sim.federation.diagnostics import gradient_diversity, measure
from fl_sim.federation.server_app import run_federation
from fl_sim.suites.registry import make_suite

pytestmark = pytest.mark.usefixtures("isolated_cache", "task_identity")
T = 3
BATCH = 64


def independent_gradients(suite, batch_size):
    """g_t as one flat float64 vector, through torch.autograd.functional.jacobian of a loss
    written out by hand over the flattened backbone parameters (Linear-tanh-Linear-tanh)."""
    model = suite.build_model()
    names = [n for n, _ in model.backbone.named_parameters()]
    shapes = [p.shape for _, p in model.backbone.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for p in model.backbone.parameters()]).double()

    def unflatten(flat):
        out, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            n = shape.numel()
            out[name] = flat[start : start + n].reshape(shape)
            start += n
        return out

    gradients = []
    for t, task in enumerate(suite.tasks):
        x, y = task.train_x[:batch_size].double(), task.train_y[:batch_size]
        head = model.heads[t]

        def loss(flat, x=x, y=y, head=head):
            p = unflatten(flat)
            h = torch.tanh(x @ p["0.weight"].T + p["0.bias"])
            h = torch.tanh(h @ p["2.weight"].T + p["2.bias"])
            logits = h @ head.weight.double().T + head.bias.double()
            return F.cross_entropy(logits, y)

        gradients.append(torch.autograd.functional.jacobian(loss, flat0))
    return torch.stack(gradients)


@pytest.mark.parametrize("weights", [[1 / 3] * 3, [0.5, 0.3, 0.2]])
def test_gradient_diversity_matches_an_independent_computation(weights):
    suite = make_suite("toy", num_tasks=T, seed=0)
    g = independent_gradients(suite, BATCH)
    p = torch.tensor(weights, dtype=torch.float64)
    g_bar = p @ g
    zeta_square = float(sum(p[t] * (g[t] - g_bar).square().sum() for t in range(T)))
    mean_square_norm = float(sum(p[t] * g[t].square().sum() for t in range(T)))
    measured = measure(suite, suite.initial_state(), weights, BATCH)
    assert measured["zeta_square"] == pytest.approx(zeta_square, rel=1e-5)
    assert measured["mean_square_norm"] == pytest.approx(mean_square_norm, rel=1e-5)
    assert measured["ratio"] == pytest.approx(zeta_square / mean_square_norm, rel=1e-5)
    assert measured["gradient_norms"] == pytest.approx(g.norm(dim=1).tolist(), rel=1e-5)
    assert 0 < measured["ratio"] < 1
    assert measured["batch_size"] == [BATCH] * T


def test_gradient_diversity_is_zero_when_all_tasks_are_identical():
    suite = make_suite("toy", num_tasks=T, seed=0)
    # the same data under three names, set before the heads are fitted: identical heads too
    suite.tasks = [replace(suite.tasks[0], name=f"same{t}") for t in range(T)]
    measured = measure(suite, suite.initial_state(), [1 / T] * T, BATCH)
    assert measured["mean_square_norm"] > 0
    assert measured["zeta_square"] == pytest.approx(0.0, abs=1e-12 * measured["mean_square_norm"])


def test_gradient_diversity_folds_a_stream_and_equals_the_hand_computed_value():
    """Two tasks, one 2-vector each, given as a generator (one pass, nothing kept):
    g₁ = (1, 0), g₂ = (0, 2), p = (¾, ¼): ḡ = (¾, ½), Σ p‖g‖² = ¾ + 1 = 1.75,
    ‖ḡ‖² = 9/16 + 1/4 = 0.8125, ζ² = 0.9375."""
    stream = ([torch.tensor([x, y])] for x, y in ((1.0, 0.0), (0.0, 2.0)))
    measured = gradient_diversity(stream, [3.0, 1.0])
    assert measured["mean_square_norm"] == pytest.approx(1.75, abs=1e-15)
    assert measured["mean_gradient_square_norm"] == pytest.approx(0.8125, abs=1e-15)
    assert measured["zeta_square"] == pytest.approx(0.9375, abs=1e-15)
    assert measured["gradient_norms"] == pytest.approx([1.0, 2.0])
    assert measured["weights"] == pytest.approx([0.75, 0.25])


@pytest.mark.parametrize("count", [1, 3])
def test_gradient_diversity_needs_one_gradient_per_weight(count):
    stream = ([torch.ones(2)] for _ in range(count))
    with pytest.raises(ValueError, match="weights"):
        gradient_diversity(stream, [0.5, 0.5])


def test_results_hold_diversity_at_theta0_and_at_the_merged_model(tmp_path):
    results = run_federation(
        InProcessGrid(T), config(diagnostic_batch=BATCH, results_dir=str(tmp_path / "a"))
    )
    diagnostics = results["diagnostics"]
    assert diagnostics["batch_size"] == BATCH
    suite = make_suite("toy", num_tasks=T, seed=0)
    expected = measure(suite, suite.initial_state(), [1 / T] * T, BATCH)
    assert diagnostics["round_0"]["zeta_square"] == pytest.approx(expected["zeta_square"])
    assert diagnostics["final"]["zeta_square"] != diagnostics["round_0"]["zeta_square"]
    off = run_federation(
        InProcessGrid(T), config(diagnostic_batch=0, results_dir=str(tmp_path / "b"))
    )
    assert off["diagnostics"] is None


def test_unequal_tasks_keep_every_lane_busy_and_are_folded_in_task_order(monkeypatch):
    """A slow first task does not hold the other lane: it computes the later tasks meanwhile
    (a wave would wait), and the consumer still receives g_0, g_1, ... in order; an error in a
    lane reaches the consumer."""
    import threading
    import time

    from fl_sim.federation import diagnostics

    suite = make_suite("toy", num_tasks=5, seed=1)
    started, real = [], diagnostics.task_gradient
    gate = threading.Event()

    def slow_first(suite, model, t, batch_size):
        started.append(t)
        if t == 0:
            assert gate.wait(10), "the other lane never reached task 3"
        elif t == 3:
            gate.set()  # task 3 started while task 0 still ran: no wave barrier
        return real(suite, model, t, batch_size)

    monkeypatch.setattr(diagnostics, "task_gradient", slow_first)
    state = suite.initial_state()
    gradients = list(diagnostics.task_gradients(suite, state, 64, workers=2))
    monkeypatch.setattr(diagnostics, "task_gradient", real)
    expected = list(diagnostics.task_gradients(suite, state, 64, workers=1))
    assert len(gradients) == 5 and set(started) == set(range(5))
    for got, want in zip(gradients, expected, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))

    def broken(suite, model, t, batch_size):
        if t == 2:
            raise RuntimeError("task 2 failed")
        time.sleep(0.01)
        return real(suite, model, t, batch_size)

    monkeypatch.setattr(diagnostics, "task_gradient", broken)
    with pytest.raises(RuntimeError, match="task 2 failed"):
        list(diagnostics.task_gradients(suite, state, 64, workers=2))


@pytest.mark.parametrize("mixing", [0.0, 0.5])
@pytest.mark.parametrize("workers", [2, 3])
def test_parallel_gradients_give_the_serial_figures_bit_for_bit(workers, mixing):
    """``workers`` threads (one torch thread each) fold the same g_t in the same order."""
    suite = make_suite("toy", num_tasks=5, seed=1, mixing=mixing)
    state = {k: v + 0.05 for k, v in suite.initial_state().items()}
    weights = [0.1, 0.2, 0.3, 0.15, 0.25]
    threads = torch.get_num_threads()
    serial = measure(suite, state, weights, 64)
    parallel = measure(suite, state, weights, 64, workers=workers)
    assert torch.get_num_threads() == threads
    assert parallel == serial
    assert serial["zeta_square"] > 0
