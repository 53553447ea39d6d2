"""Training-heterogeneity knobs: schedules η⁽ᵏ⁾, FedNova's ‖a_t‖₁, per-client knobs and presets.

‖a_t‖₁ is checked against PyTorch's own optimizers: on a loss whose gradient g_k is fixed by
hand, Δ = −Σ_j a_j g_j exactly, and with a constant gradient Δ = −‖a_t‖₁ g.
"""

from __future__ import annotations

import math

import pytest
import torch

from clients.a_norm import A_NORM_KINDS, a_norm, a_norm_of, gradient_coefficients
from clients.knobs import (
    PRESETS,
    TrainingKnobs,
    client_knobs,
    knobs_from_config,
    knobs_to_config,
)
from clients.schedules import SCHEDULES, learning_rates
from fl_sim.errors import ConfigError

# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schedule", "lr", "steps", "warmup", "expected"),
    [
        ("constant", 0.1, 3, 0, [0.1, 0.1, 0.1]),
        ("linear", 1.0, 4, 0, [1.0, 0.75, 0.5, 0.25]),
        ("cosine", 1.0, 4, 0, [1.0, 0.5 + 0.5 / math.sqrt(2), 0.5, 0.5 - 0.5 / math.sqrt(2)]),
        ("warmup-cosine", 1.0, 5, 2, [0.5, 1.0, 1.0, 0.75, 0.25]),
        ("warmup-cosine", 2.0, 2, 2, [1.0, 2.0]),
        ("warmup-cosine", 1.0, 2, 0, [1.0, 0.5]),
    ],
)
def test_schedules_match_hand_values(schedule, lr, steps, warmup, expected):
    assert learning_rates(schedule, lr, steps, warmup) == pytest.approx(expected, abs=1e-15)


def test_every_schedule_has_positive_rates_starting_at_or_below_lr():
    for schedule in SCHEDULES:
        warmup = 3 if schedule == "warmup-cosine" else 0
        etas = learning_rates(schedule, 0.2, 10, warmup)
        assert len(etas) == 10
        assert all(0 < eta <= 0.2 for eta in etas)


# ---------------------------------------------------------------------------------------------
# ‖a_t‖₁ against PyTorch's optimizers
# ---------------------------------------------------------------------------------------------


def run_torch_optimizer(optimizer: str, etas, gradients, momentum=0.9) -> torch.Tensor:
    """Δ after len(etas) steps of torch.optim with gradient ``gradients[k]`` at step k."""
    theta = torch.nn.Parameter(torch.zeros(gradients.shape[1], dtype=torch.float64))
    opt = torch.optim.SGD(
        [theta], lr=etas[0], momentum=momentum if optimizer == "sgd-momentum" else 0.0
    )
    for eta, g in zip(etas, gradients, strict=True):
        opt.param_groups[0]["lr"] = eta
        theta.grad = g.clone()
        opt.step()
    return theta.detach()


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum"])
@pytest.mark.parametrize("schedule", ["constant", "linear", "warmup-cosine"])
def test_update_is_minus_a_norm_times_a_constant_gradient(optimizer, schedule):
    """L(θ) = g·θ has the constant gradient g, so Δ = −Σ_j a_j g = −‖a_t‖₁ g."""
    etas = learning_rates(schedule, 0.05, 12, 4 if schedule == "warmup-cosine" else 0)
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    delta = run_torch_optimizer(optimizer, etas, g.expand(len(etas), 3), momentum=0.9)
    norm = a_norm("lr-sum", etas, optimizer, 0.9)
    torch.testing.assert_close(delta, -norm * g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum"])
def test_update_is_minus_sum_of_a_j_times_each_gradient(optimizer):
    """With a different gradient g_j every step, Δ = −Σ_j a_j g_j (FedNova's a_t, exactly)."""
    etas = learning_rates("cosine", 0.1, 9)
    gradients = torch.randn(9, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    delta = run_torch_optimizer(optimizer, etas, gradients, momentum=0.7)
    a = torch.tensor(gradient_coefficients(etas, optimizer, 0.7), dtype=torch.float64)
    torch.testing.assert_close(delta, -(a[:, None] * gradients).sum(0), rtol=1e-12, atol=1e-14)
    assert a_norm("lr-sum", etas, optimizer, 0.7) == pytest.approx(float(a.sum()), rel=1e-14)


def test_momentum_a_norm_with_constant_lr_is_designs_closed_form():
    eta, mu, K = 0.01, 0.9, 25
    closed = eta / (1 - mu) * (K - mu * (1 - mu**K) / (1 - mu))
    assert a_norm("lr-sum", [eta] * K, "sgd-momentum", mu) == pytest.approx(closed, rel=1e-13)


def test_a_norm_kinds_and_exactness():
    etas = [0.1, 0.2, 0.3]
    assert A_NORM_KINDS == ("lr-sum", "steps")
    assert a_norm_of("steps", etas, "sgd-momentum", 0.9).value == 3.0
    assert a_norm_of("lr-sum", etas, "sgd", 0.9) == a_norm_of("lr-sum", etas, "sgd", 0.0)
    assert a_norm_of("lr-sum", etas, "sgd", 0.9).value == pytest.approx(0.6)
    adamw = a_norm_of("lr-sum", etas, "adamw", 0.9)
    assert adamw.value == pytest.approx(0.6) and adamw.exact is False
    assert a_norm_of("lr-sum", etas, "sgd-momentum", 0.0).value == pytest.approx(0.6)
    with pytest.raises(ConfigError, match="a-norm"):
        a_norm("steps-ish", etas, "sgd", 0.0)


# ---------------------------------------------------------------------------------------------
# Per-client knobs: scalars, lists, ranges, presets
# ---------------------------------------------------------------------------------------------


def test_scalars_are_shared_and_each_client_gets_seed_plus_t():
    knobs = client_knobs(3, lr=0.1, local_steps=5, seed=7)
    assert [k.lr for k in knobs] == [0.1] * 3
    assert [k.local_steps for k in knobs] == [5] * 3
    assert [k.seed for k in knobs] == [7, 8, 9]


def test_lists_and_comma_strings_give_one_value_per_client():
    knobs = client_knobs(
        3,
        lr="0.1, 0.2,0.3",
        local_steps=[1, 2, 3],
        optimizer="sgd,adamw,sgd-momentum",
        batch_size="8,16,32",
    )
    assert [k.lr for k in knobs] == [0.1, 0.2, 0.3]
    assert [k.local_steps for k in knobs] == [1, 2, 3]
    assert [k.optimizer for k in knobs] == ["sgd", "adamw", "sgd-momentum"]
    assert [k.batch_size for k in knobs] == [8, 16, 32]


def test_ranges_are_log_or_linearly_spaced_and_rounded_for_integers():
    knobs = client_knobs(3, lr="log:1e-4:1e-2", local_steps="lin:10:15")
    assert [k.lr for k in knobs] == pytest.approx([1e-4, 1e-3, 1e-2], rel=1e-12)
    assert [k.local_steps for k in knobs] == [10, 13, 15]  # 12.5 rounds half up
    assert client_knobs(1, lr="log:1e-4:1e-2", local_steps="lin:10:40")[0].local_steps == 10


def test_presets_spread_the_base_values():
    base = {"lr": 0.1, "local_steps": 10}
    homogeneous = client_knobs(4, **base, preset="homogeneous")
    assert {(k.lr, k.local_steps) for k in homogeneous} == {(0.1, 10)}
    lr_hetero = client_knobs(4, **base, preset="lr-hetero")
    factors = [1 / 4, 4 ** (-1 / 3), 4 ** (1 / 3), 4]
    assert [k.lr for k in lr_hetero] == pytest.approx([0.1 * f for f in factors], rel=1e-12)
    assert [k.local_steps for k in lr_hetero] == [10] * 4
    steps_hetero = client_knobs(4, **base, preset="steps-hetero")
    assert [k.local_steps for k in steps_hetero] == [3, 9, 14, 20]  # ⌈10/4⌉ .. 2·10
    assert [k.lr for k in steps_hetero] == [0.1] * 4
    both = client_knobs(4, **base, preset="both")
    assert [(k.lr, k.local_steps) for k in both] == [
        (a.lr, b.local_steps) for a, b in zip(lr_hetero, steps_hetero, strict=True)
    ]
    assert client_knobs(1, **base, preset="both")[0] == TrainingKnobs(lr=0.1, local_steps=10)
    assert PRESETS == ("homogeneous", "lr-hetero", "steps-hetero", "both")


def test_knobs_survive_a_flat_config_round_trip():
    knobs = TrainingKnobs(
        lr=0.02,
        local_steps=7,
        schedule="warmup-cosine",
        warmup_steps=2,
        optimizer="sgd-momentum",
        momentum=0.8,
        weight_decay=1e-4,
        batch_size=16,
        seed=5,
    )
    config = knobs_to_config(knobs)
    assert set(config) == {
        "lr",
        "local-steps",
        "schedule",
        "warmup-steps",
        "optimizer",
        "momentum",
        "weight-decay",
        "batch-size",
        "seed",
    }
    assert all(isinstance(v, (int, float, str)) for v in config.values())
    assert knobs_from_config({**config, "round": 3}) == knobs
    assert knobs_from_config({"lr": 1, "local-steps": 2.0}) == TrainingKnobs(lr=1.0, local_steps=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -0.1}, "lr must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"local_steps": 0}, "local-steps must be"),
        ({"local_steps": 2.5}, "local-steps must be"),
        ({"schedule": "step"}, "unknown schedule 'step'"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
        ({"preset": "wild"}, "unknown preset 'wild'"),
        ({"lr": [0.1, 0.2]}, "lr: got 2 values for 3 clients"),
        ({"local_steps": "1,2,3,4"}, "local-steps: got 4 values for 3 clients"),
        ({"lr": "log:1e-4"}, "malformed range 'log:1e-4'"),
        ({"lr": "log:0:1"}, "log range needs START and STOP > 0"),
        ({"lr": "lin:a:b"}, "cannot read 'a'"),
        ({"lr": "fast"}, "cannot read 'fast'"),
        ({"local_steps": "1.5,2,3"}, "not an integer"),
        ({"momentum": 1.0, "optimizer": "sgd-momentum"}, "momentum must be in"),
        ({"batch_size": 0}, "batch-size must be"),
        ({"weight_decay": -1.0}, "weight-decay must be"),
        ({"warmup_steps": 2}, "only applies to schedule warmup-cosine"),
        ({"warmup_steps": 9, "schedule": "warmup-cosine"}, "exceeds local-steps"),
        ({"seed": -1}, "seed must be"),
        ({"lr": "0.1,0.2,0.3", "preset": "lr-hetero"}, "preset 'lr-hetero' spreads one base lr"),
    ],
)
def test_bad_knobs_raise_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as error:
        client_knobs(3, **{"lr": 0.1, "local_steps": 5, **kwargs})
    assert "\n" not in str(error.value)


def test_knobs_from_config_names_a_missing_key():
    with pytest.raises(ConfigError, match="local-steps"):
        knobs_from_config({"lr": 0.1})
    with pytest.raises(ConfigError, match="lr must be a number"):
        knobs_from_config({"lr": "0.1", "local-steps": 3})
