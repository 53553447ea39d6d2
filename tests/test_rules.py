"""The aggregation rules A(Δ₁..Δ_T) of docs/design.md, checked as the paper's claims.

1. Every rule against numbers worked out by hand on tiny tensors (and cclip against an
   independent float64 implementation written here with plain loops).
2. docs/design.md's "Identities that are tests", at rule level.
3. The chunked Rule protocol (strategies/rule.py) equals the whole-tensor function.
4. Properties: invariance to the order of the clients, equivariance to scaling.
5. Bad knobs raise a one-line ConfigError.
6. Rules run on the device their tensors are on.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import cclip
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fl_sim.errors import ConfigError
from strategies.cclip import CClip, auto_tau_c, next_center
from strategies.fedavg import FedAvg, TaskArithmetic, fedavg, task_arithmetic_server_lr
from strategies.fedgma import FedGMA, fedgma
from strategies.fednova import fednova, fednova_coefficients
from strategies.median import Median, median
from strategies.registry import RULE_NAMES, RuleConfig, make_rule
from strategies.rule import Chunk, Rule, client_weights
from strategies.streaming import AggregationOptions, TensorPlan, UpdateStatistics, aggregate_model

F64 = torch.float64
VALUES = st.floats(-100.0, 100.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
PROPERTY = settings(max_examples=50, deadline=None)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-12) -> None:
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=1e-10, atol=atol)


# ---------------------------------------------------------------------------------------------
# Driving the chunked protocol
# ---------------------------------------------------------------------------------------------


def run_protocol(
    rule: Rule, model: dict[str, torch.Tensor], chunks: list[Chunk]
) -> dict[str, torch.Tensor]:
    """Drive num_passes / observe / end_pass / aggregate over ``chunks`` of a [T, ...] model."""
    flat = {name: d.reshape(d.shape[0], -1) for name, d in model.items()}
    for k in range(rule.num_passes - 1):
        for c in chunks:
            rule.observe(k, c, flat[c.name][:, c.start : c.stop])
        rule.end_pass(k)
    out = {name: torch.full_like(f[0], math.nan) for name, f in flat.items()}
    for c in chunks:
        part = rule.aggregate(c, flat[c.name][:, c.start : c.stop])
        assert part.shape == (c.stop - c.start,)
        assert part.device == flat[c.name].device
        assert part.dtype == flat[c.name].dtype
        out[c.name][c.start : c.stop] = part
    return {name: out[name].reshape(model[name].shape[1:]) for name in model}


def two_tensor_model(num_clients: int, seed: int = 0, device: str = "cpu"):
    """A model of two tensors, 'w' [3, 4] and 'b' [5], and uneven chunks covering both."""
    g = torch.Generator().manual_seed(seed)
    model = {
        "w": torch.randn(num_clients, 3, 4, generator=g, dtype=F64).to(device),
        "b": torch.randn(num_clients, 5, generator=g, dtype=F64).to(device),
    }
    chunks = [
        Chunk("w", 0, 5),
        Chunk("b", 0, 1),
        Chunk("w", 5, 7),
        Chunk("w", 7, 12),
        Chunk("b", 1, 5),
    ]
    return model, chunks


# ---------------------------------------------------------------------------------------------
# 1. Hand-computed values
# ---------------------------------------------------------------------------------------------


def test_fedavg_is_the_weighted_mean_of_the_updates_with_normalised_weights():
    # weights (1, 2, 1) normalise to p = (1/4, 1/2, 1/4).
    # coordinate 0: 4/4 + 2/2 + 0/4     = 1 + 1 + 0        = 2
    # coordinate 1: -8/4 + 2/2 + 4/4    = -2 + 1 + 1       = 0
    # coordinate 2: 1/4 + 3/2 - 1/4     = 0.25 + 1.5 - .25 = 1.5
    deltas = t64([[4.0, -8.0, 1.0], [2.0, 2.0, 3.0], [0.0, 4.0, -1.0]])
    p = client_weights(3, [1, 2, 1])
    close(p, t64([0.25, 0.5, 0.25]))
    close(fedavg(deltas, p), t64([2.0, 0.0, 1.5]))
    rule = make_rule(RuleConfig("fedavg", weights=[1, 2, 1]), 3)
    close(rule.aggregate(Chunk("x", 0, 3), deltas), t64([2.0, 0.0, 1.5]))
    close(rule.linear_coefficients(), t64([0.25, 0.5, 0.25]))


def test_fedavg_accepts_a_list_of_client_tensors():
    deltas = [t64([4.0, -8.0]), t64([2.0, 2.0]), t64([0.0, 4.0])]
    close(fedavg(deltas, t64([0.25, 0.5, 0.25])), t64([2.0, 0.0]))


def test_fednova_with_steps_normalises_by_local_step_counts():
    # p = (1/2, 1/4, 1/4), ‖a‖₁ = K = (2, 4, 8)
    # τ_eff = 1/2·2 + 1/4·4 + 1/4·8 = 1 + 1 + 2 = 4
    # c_t = τ_eff p_t / K_t = 4·(1/4, 1/16, 1/32) = (1, 1/4, 1/8)
    # A = 1·(2, 4) + 1/4·(4, -8) + 1/8·(8, 16) = (2+1+1, 4-2+2) = (4, 4)
    deltas = t64([[2.0, 4.0], [4.0, -8.0], [8.0, 16.0]])
    p = t64([0.5, 0.25, 0.25])
    a = t64([2.0, 4.0, 8.0])
    close(fednova_coefficients(p, a), t64([1.0, 0.25, 0.125]))
    close(fednova(deltas, p, a), t64([4.0, 4.0]))
    rule = make_rule(RuleConfig("fednova", weights=[2, 1, 1], a_norm=[2, 4, 8]), 3)
    close(rule.aggregate(Chunk("x", 0, 2), deltas), t64([4.0, 4.0]))
    close(rule.linear_coefficients(), t64([1.0, 0.25, 0.125]))
    summary = rule.summary()
    assert summary["tau_eff"] == pytest.approx(4.0)
    assert summary["coefficients"] == pytest.approx([1.0, 0.25, 0.125])
    assert summary["a_norm"] == pytest.approx([2.0, 4.0, 8.0])


def test_fednova_with_lr_sum_normalises_learning_rate_heterogeneity_too():
    # ‖a_t‖₁ = Σ_k η_t⁽ᵏ⁾: client 1: 5 steps at 0.1 = 0.5; client 2: 10 steps at 0.025 = 0.25;
    # client 3: 10 steps at 0.1 = 1.0.  p = 1/3 each.
    # τ_eff = (0.5 + 0.25 + 1.0)/3 = 1.75/3 = 7/12
    # c_t = (7/12)(1/3)/a_t = (7/36)/a_t = (7/18, 7/9, 7/36)
    # A = 7/18·18 + 7/9·9 + 7/36·36 = 7 + 7 + 7 = 21;  second coordinate: 7/18·(-36) + 0 + 0 = -14
    deltas = t64([[18.0, -36.0], [9.0, 0.0], [36.0, 0.0]])
    a = [5 * 0.1, 10 * 0.025, 10 * 0.1]
    rule = make_rule(RuleConfig("fednova", a_norm=a), 3)
    assert rule.summary()["tau_eff"] == pytest.approx(7 / 12)
    close(rule.linear_coefficients(), t64([7 / 18, 7 / 9, 7 / 36]))
    close(rule.aggregate(Chunk("x", 0, 2), deltas), t64([21.0, -14.0]))
    close(fednova(deltas, client_weights(3), t64(a)), t64([21.0, -14.0]))


# Three clients, p = 1/3, ρ = 0.5. Per coordinate (signs; S = |Σ p_t sign|; M; mean; A = M·mean):
#   0: (+,+,+)  S = 1    M = 1    mean = (1+2+3)/3 = 2     A = 2        all agree
#   1: (+,+,−)  S = 1/3  M = 1/3  mean = (3+3−3)/3 = 1     A = 1/3      2 of 3 agree: damped
#   2: (+,+,0)  S = 2/3  M = 1    mean = (6+3+0)/3 = 3     A = 3        sign(0) = 0
#   3: (+,0,0)  S = 1/3  M = 1/3  mean = 3/3 = 1           A = 1/3      1 of 3 moves
#   4: (+,−,0)  S = 0    M = 0    mean = (3−6)/3 = −1      A = 0        disagreement cancels
#   5: (−,−,−)  S = 1    M = 1    mean = −3                A = −3
#   6: (0,0,0)  S = 0    M = 0    mean = 0                 A = 0
FEDGMA_DELTAS = [
    [1.0, 3.0, 6.0, 3.0, 3.0, -3.0, 0.0],
    [2.0, 3.0, 3.0, 0.0, -6.0, -3.0, 0.0],
    [3.0, -3.0, 0.0, 0.0, 0.0, -3.0, 0.0],
]
FEDGMA_EXPECTED = [2.0, 1 / 3, 3.0, 1 / 3, 0.0, -3.0, 0.0]


def test_fedgma_masks_coordinates_where_fewer_clients_agree_in_sign_than_rho():
    deltas = t64(FEDGMA_DELTAS)
    close(fedgma(deltas, client_weights(3), 0.5), t64(FEDGMA_EXPECTED))
    rule = make_rule(RuleConfig("fedgma", rho=0.5), 3)
    close(rule.aggregate(Chunk("x", 0, 7), deltas), t64(FEDGMA_EXPECTED))
    summary = rule.summary()
    # M < 1 on coordinates 1, 3, 4, 6.
    assert summary["damped_fraction"] == pytest.approx(4 / 7)
    # S = (1, 1/3, 2/3, 1/3, 0, 1, 0) over 10 bins of [0, 1].
    assert summary["sign_agreement_histogram"]["counts"] == [2, 0, 0, 2, 0, 0, 1, 0, 0, 2]


def test_fedgma_keeps_a_coordinate_whose_agreement_equals_rho_exactly():
    # p = (1/2, 1/4, 1/4), coordinate (3, 3, −3): S = |1/2 + 1/4 − 1/4| = 1/2 = ρ → M = 1,
    # A = 3/2 + 3/4 − 3/4 = 1.5.  Coordinate (3, −3, −3): S = |1/2 − 1/2| = 0 → A = 0.
    # Coordinate (0, 4, 4): S = 1/2 → kept, A = 0 + 1 + 1 = 2.
    deltas = t64([[3.0, 3.0, 0.0], [3.0, -3.0, 4.0], [-3.0, -3.0, 4.0]])
    p = t64([0.5, 0.25, 0.25])
    close(fedgma(deltas, p, 0.5), t64([1.5, 0.0, 2.0]))


def test_median_of_an_odd_number_of_clients_is_the_middle_value():
    # column 0: (3, 1, 2) → 2;  column 1: (−1, 5, 0) → 0;  column 2: (7, 7, −7) → 7
    deltas = t64([[3.0, -1.0, 7.0], [1.0, 5.0, 7.0], [2.0, 0.0, -7.0]])
    for mode in ("mean", "lower"):
        close(median(deltas, mode), t64([2.0, 0.0, 7.0]))
        rule = make_rule(RuleConfig("median", median_mode=mode), 3)
        close(rule.aggregate(Chunk("x", 0, 3), deltas), t64([2.0, 0.0, 7.0]))


def test_median_of_an_even_number_of_clients_is_the_mean_or_the_lower_middle_value():
    # column 0 sorted (1, 2, 3, 4): mean mode (2+3)/2 = 2.5, lower mode 2
    # column 1 sorted (−5, 1, 2, 8): mean mode (1+2)/2 = 1.5, lower mode 1
    deltas = t64([[4.0, 1.0], [1.0, 2.0], [3.0, -5.0], [2.0, 8.0]])
    close(median(deltas, "mean"), t64([2.5, 1.5]))
    close(median(deltas), t64([2.5, 1.5]))  # "mean" is the default, as NumPy and Flower
    close(median(deltas, "lower"), t64([2.0, 1.0]))
    rule = make_rule(RuleConfig("median", median_mode="lower"), 4)
    close(rule.aggregate(Chunk("x", 0, 2), deltas), t64([2.0, 1.0]))
    assert rule.summary() == {"median_mode": "lower"}


def test_cclip_one_step_from_zero_clips_only_the_far_client_by_its_whole_model_norm():
    # Two tensors: a (2 values) and b (1 value); p = 1/2; τ_c = 5; v₀ = 0.
    # client 1: (1, 2 | 2)  ‖·‖₂ = √(1+4+4) = 3   ≤ 5 → s₁ = 1
    # client 2: (6, 0 | 8)  ‖·‖₂ = √(36+64) = 10  > 5 → s₂ = 5/10 = 1/2
    # A = 1/2·1·(1, 2 | 2) + 1/2·1/2·(6, 0 | 8) = (0.5 + 1.5, 1 + 0 | 1 + 2) = (2, 1 | 3)
    # (per-tensor norms would give a = (3, 1), b = 3.5: the norm is over the whole model.)
    deltas = {"a": t64([[1.0, 2.0], [6.0, 0.0]]), "b": t64([[2.0], [8.0]])}
    out = cclip(deltas, client_weights(2), tau_c=5.0, iters=1)
    close(out["a"], t64([2.0, 1.0]))
    close(out["b"], t64([3.0]))
    rule = make_rule(RuleConfig("cclip", tau_c=5.0), 2)
    assert rule.num_passes == 2
    got = run_protocol(rule, deltas, [Chunk("a", 0, 2), Chunk("b", 0, 1)])
    close(got["a"], t64([2.0, 1.0]))
    close(got["b"], t64([3.0]))
    assert rule.summary()["clip_scales_per_iteration"] == [[1.0, 0.5]]


def test_cclip_does_not_clip_a_client_exactly_at_the_radius():
    # client 1: (3, 4) ‖·‖ = 5 = τ_c → s = 1;  client 2: (0, 0) → s = 1.  A = (1.5, 2).
    deltas = {"x": t64([[3.0, 4.0], [0.0, 0.0]])}
    close(cclip(deltas, client_weights(2), tau_c=5.0)["x"], t64([1.5, 2.0]))
    rule = CClip(client_weights(2), tau_c=5.0)
    close(run_protocol(rule, deltas, [Chunk("x", 0, 2)])["x"], t64([1.5, 2.0]))
    assert rule.summary()["clip_scales_per_iteration"] == [[1.0, 1.0]]


def cclip_reference(deltas, p, tau_c, iters, center=None):
    """Independent CCLIP in float64 with plain loops over a concatenated parameter vector."""
    names = list(deltas)
    arrays_ = {n: np.asarray(deltas[n], dtype=np.float64) for n in names}
    num_clients = len(p)
    sizes = [arrays_[n][0].size for n in names]
    rows = [
        [float(x) for n in names for x in arrays_[n][t].reshape(-1)] for t in range(num_clients)
    ]
    dim = sum(sizes)
    if center is None:
        v = [0.0] * dim
    else:
        v = [float(x) for n in names for x in np.asarray(center[n], dtype=np.float64).reshape(-1)]
    for _ in range(iters):
        new_v = list(v)
        for t in range(num_clients):
            diff = [rows[t][j] - v[j] for j in range(dim)]
            norm = math.sqrt(sum(d * d for d in diff))
            s = 1.0 if norm <= tau_c else tau_c / norm
            for j in range(dim):
                new_v[j] += float(p[t]) * s * diff[j]
        v = new_v
    out, offset = {}, 0
    for n, size in zip(names, sizes, strict=True):
        out[n] = np.array(v[offset : offset + size]).reshape(arrays_[n].shape[1:])
        offset += size
    return out


def test_cclip_two_iterations_match_an_independent_float64_implementation():
    rng = np.random.default_rng(7)
    deltas = {"w": rng.normal(size=(4, 2, 3)) * 3, "b": rng.normal(size=(4, 2))}
    deltas["w"][3] += 20.0  # one far-away client, so the clipping matters in both steps
    center = {"w": rng.normal(size=(2, 3)), "b": rng.normal(size=(2,))}
    p = np.array([0.1, 0.2, 0.3, 0.4])
    expected = cclip_reference(deltas, p, 2.0, 2, center)
    got = cclip(
        {n: torch.from_numpy(d) for n, d in deltas.items()},
        torch.from_numpy(p),
        tau_c=2.0,
        iters=2,
        center={n: torch.from_numpy(c) for n, c in center.items()},
    )
    for n in deltas:
        np.testing.assert_allclose(got[n].numpy(), expected[n], rtol=1e-12, atol=1e-12)
    # And from v₀ = 0:
    expected0 = cclip_reference(deltas, p, 2.0, 2)
    got0 = cclip({n: torch.from_numpy(d) for n, d in deltas.items()}, torch.from_numpy(p), 2.0, 2)
    for n in deltas:
        np.testing.assert_allclose(got0[n].numpy(), expected0[n], rtol=1e-12, atol=1e-12)
    # The chunked rule too (tests/helpers.py's cclip is the reference the other tests use).
    model = {n: torch.from_numpy(d) for n, d in deltas.items()}
    chunks = [Chunk("w", 0, 4), Chunk("b", 0, 2), Chunk("w", 4, 6)]
    for v0, want in ((center, expected), (None, expected0)):
        v0_t = None if v0 is None else {n: torch.from_numpy(c) for n, c in v0.items()}
        got = run_protocol(CClip(torch.from_numpy(p), 2.0, 2, v0_t), model, chunks)
        for n in deltas:
            np.testing.assert_allclose(got[n].numpy(), want[n], rtol=1e-12, atol=1e-12)


def test_auto_tau_c_is_the_median_distance_mean_of_the_two_middle_for_even_t():
    # tau-c-auto's τ_c = median_t ‖Δ_t − v₀‖₂, statistics.median's: the middle value for odd T,
    # the mean of the two middle values for even T (not the upper or lower one).
    assert auto_tau_c([3.0, 1.0, 2.0]) == 2.0
    assert auto_tau_c([4.0, 1.0, 3.0, 2.0]) == 2.5  # (2 + 3) / 2
    assert auto_tau_c([1.0, 10.0]) == 5.5
    assert auto_tau_c([7.0]) == 7.0
    assert isinstance(auto_tau_c([1, 2]), float)


def test_next_center_is_the_round_update_a_not_beta_a():
    # θʳ = (1, 2), θʳ⁺¹ = (2, 2.5), β = 0.5 → A = (θʳ⁺¹ − θʳ)/β = (2, 1); integer buffers dropped.
    theta = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor([3])}
    merged = {"w": torch.tensor([2.0, 2.5]), "steps": torch.tensor([3])}
    center = next_center(theta, merged, 0.5)
    assert set(center) == {"w"}
    assert center["w"].dtype == torch.float32
    assert torch.equal(center["w"], torch.tensor([2.0, 1.0]))
    # Worked in float64, then θ's dtype: (1 + 2⁻²³ − 1)/3 rounded once from the exact quotient.
    theta = {"w": torch.tensor([1.0])}
    merged = {"w": torch.tensor([1.0 + 2.0**-23])}
    assert next_center(theta, merged, 3.0)["w"].item() == torch.tensor(2.0**-23 / 3).item()


# ---------------------------------------------------------------------------------------------
# 2. docs/design.md identities at rule level
# ---------------------------------------------------------------------------------------------


def random_deltas(num_clients: int, n: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_clients, n, generator=g, dtype=F64)


@pytest.mark.parametrize("a_value", [1.0, 7.0, 0.0625])
def test_fednova_with_identical_schedules_on_every_client_equals_fedavg(a_value):
    deltas = random_deltas(4)
    p = client_weights(4, [1, 2, 3, 4])
    close(fednova(deltas, p, torch.full((4,), a_value, dtype=F64)), fedavg(deltas, p))
    rule = make_rule(RuleConfig("fednova", weights=[1, 2, 3, 4], a_norm=[a_value] * 4), 4)
    close(rule.linear_coefficients(), p)
    assert rule.summary()["tau_eff"] == pytest.approx(a_value)


def test_fedgma_with_rho_zero_equals_fedavg():
    deltas = random_deltas(5)
    deltas[2, :3] = 0.0  # zeros in some coordinates do not matter at ρ = 0
    p = client_weights(5, [5, 1, 1, 2, 3])
    close(fedgma(deltas, p, 0.0), fedavg(deltas, p))
    rule = make_rule(RuleConfig("fedgma", weights=[5, 1, 1, 2, 3], rho=0.0), 5)
    close(rule.aggregate(Chunk("x", 0, 7), deltas), fedavg(deltas, p))
    assert rule.summary()["damped_fraction"] == 0.0


@pytest.mark.parametrize("seed", range(3))
def test_cclip_with_infinite_radius_equals_fedavg_after_one_step_from_any_center(seed):
    g = torch.Generator().manual_seed(100 + seed)
    model = {
        "w": torch.randn(3, 2, 2, generator=g, dtype=F64) * 10,
        "b": torch.randn(3, 3, generator=g, dtype=F64),
    }
    center = {
        "w": torch.randn(2, 2, generator=g, dtype=F64) * 100,
        "b": torch.randn(3, generator=g, dtype=F64) * 100,
    }
    p = client_weights(3, [3, 1, 2])
    out = cclip(model, p, tau_c=math.inf, iters=1, center=center)
    for name, d in model.items():
        close(out[name], fedavg(d, p), atol=1e-10)
    rule = make_rule(RuleConfig("cclip", weights=[3, 1, 2], tau_c=math.inf), 3, center=center)
    got = run_protocol(rule, model, [Chunk("w", 0, 3), Chunk("w", 3, 4), Chunk("b", 0, 3)])
    for name, d in model.items():
        close(got[name], fedavg(d, p), atol=1e-10)
    assert rule.summary()["tau_c"] == "inf"


@pytest.mark.parametrize("num_clients", [1, 3, 5, 7])
def test_median_of_an_odd_number_of_clients_is_the_middle_order_statistic(num_clients):
    deltas = random_deltas(num_clients, n=11, seed=num_clients)
    middle = torch.sort(deltas, dim=0).values[num_clients // 2]
    for mode in ("mean", "lower"):
        close(median(deltas, mode), middle, atol=0)
    np.testing.assert_array_equal(median(deltas).numpy(), np.median(deltas.numpy(), axis=0))


@pytest.mark.parametrize("num_clients", [2, 4, 6])
def test_median_of_an_even_number_of_clients_matches_numpy_and_torch_median(num_clients):
    deltas = random_deltas(num_clients, n=11, seed=num_clients)
    np.testing.assert_allclose(
        median(deltas, "mean").numpy(), np.median(deltas.numpy(), axis=0), rtol=1e-15, atol=0
    )
    close(median(deltas, "lower"), torch.median(deltas, dim=0).values, atol=0)


def numpy_lower_median(x: np.ndarray) -> np.ndarray:
    """The lower middle order statistic, independently: sort each column and index."""
    return np.sort(x, axis=0)[(x.shape[0] - 1) // 2]


@pytest.mark.parametrize("num_clients", range(1, 17))
def test_median_is_exact_on_every_zero_one_input(num_clients):
    # 0-1 principle: a comparator network selects the k-th smallest value of every input iff it
    # does so for every 0/1 input. Column j holds the bits of j, so all 2^T inputs are covered.
    columns = torch.arange(2**num_clients)
    bits = ((columns[None, :] >> torch.arange(num_clients)[:, None]) & 1).to(torch.float32)
    x = bits.numpy()
    np.testing.assert_array_equal(median(bits, "mean").numpy(), np.median(x, axis=0))
    np.testing.assert_array_equal(median(bits, "lower").numpy(), numpy_lower_median(x))


@pytest.mark.parametrize("num_clients", [*range(1, 20), 31, 32, 33, 63, 64, 65, 66, 97])
def test_median_matches_numpy_for_every_client_count_with_ties(num_clients):
    # Both sides of the selection-network size limit (T ≤ 64) and the plain sort above it.
    g = torch.Generator().manual_seed(num_clients)
    distinct = torch.randn(num_clients, 3, 5, generator=g, dtype=F64)
    ties = torch.randint(-2, 3, (num_clients, 40), generator=g).to(F64)
    for deltas in (distinct, ties):
        x = deltas.numpy().copy()
        np.testing.assert_array_equal(median(deltas, "mean").numpy(), np.median(x, axis=0))
        np.testing.assert_array_equal(median(deltas, "lower").numpy(), numpy_lower_median(x))
        np.testing.assert_array_equal(deltas.numpy(), x)  # the updates are left untouched


@pytest.mark.parametrize("num_clients", [1, 3, 4, 65])
def test_median_returns_a_new_tensor_not_a_view_of_an_update(num_clients):
    deltas = random_deltas(num_clients, n=6, seed=9)
    before = deltas.clone()
    for mode in ("mean", "lower"):
        out = median(deltas, mode)
        out.fill_(123.0)
        close(deltas, before, atol=0)
    # A list of client tensors (as_stacked) gives the same result as the stacked tensor.
    close(median(list(deltas.unbind(0)), "lower"), median(deltas, "lower"), atol=0)


@PROPERTY
@given(
    st.integers(1, 70).flatmap(
        lambda t: (
            arrays(np.float64, (t, 3), elements=st.sampled_from([-1.5, 0.0, 2.0, 7.25]))
            | arrays(np.float64, (t, 3), elements=VALUES)
        )
    )
)
def test_median_equals_numpy_median_property(x):
    deltas = torch.from_numpy(x.copy())
    np.testing.assert_array_equal(median(deltas, "mean").numpy(), np.median(x, axis=0))
    np.testing.assert_array_equal(median(deltas, "lower").numpy(), numpy_lower_median(x))


def test_task_arithmetic_rule_is_fedavg_with_uniform_weights_and_beta_lambda_t():
    deltas = random_deltas(4)
    rule = make_rule(RuleConfig("task_arithmetic"), 4)
    assert isinstance(rule, TaskArithmetic)
    uniform = torch.full((4,), 0.25, dtype=F64)
    close(rule.linear_coefficients(), uniform)
    close(rule.aggregate(Chunk("x", 0, 7), deltas), fedavg(deltas, uniform))
    # θ₀ + β·A with β = λT is θ₀ + λ Σ_t τ_t.
    lam = 0.3
    beta = task_arithmetic_server_lr(lam, 4)
    assert beta == pytest.approx(1.2)
    close(beta * rule.aggregate(Chunk("x", 0, 7), deltas), lam * deltas.sum(0))


# ---------------------------------------------------------------------------------------------
# 3. The chunked protocol equals the whole-tensor function
# ---------------------------------------------------------------------------------------------

T_PROTO = 4
P_PROTO = [1.0, 2.0, 3.0, 0.5]
A_PROTO = [10.0, 20.0, 5.0, 12.5]


def whole_model(config: RuleConfig, model, center=None):
    p = client_weights(T_PROTO, config.weights)
    if config.name in ("fedavg", "task_arithmetic"):
        return {n: fedavg(d, p) for n, d in model.items()}
    if config.name == "fednova":
        return {n: fednova(d, p, t64(config.a_norm)) for n, d in model.items()}
    if config.name == "fedgma":
        return {n: fedgma(d, p, config.knobs.rho) for n, d in model.items()}
    if config.name == "median":
        return {n: median(d, config.knobs.median_mode) for n, d in model.items()}
    return cclip(model, p, config.knobs.tau_c, config.knobs.iters, center)


PROTOCOL_CONFIGS = [
    RuleConfig("fedavg", weights=P_PROTO),
    RuleConfig("task_arithmetic"),
    RuleConfig("fednova", weights=P_PROTO, a_norm=A_PROTO),
    RuleConfig("fedgma", weights=P_PROTO, rho=0.5),
    RuleConfig("fedgma", rho=0.8),
    RuleConfig("median", median_mode="mean"),
    RuleConfig("median", median_mode="lower"),
    *[
        RuleConfig("cclip", weights=w, tau_c=tau, iters=L)
        for L in (1, 2, 3)
        for w, tau in ((P_PROTO, 1.5), (None, 0.7))
    ],
]


@pytest.mark.parametrize("config", PROTOCOL_CONFIGS, ids=lambda c: f"{c.name}-{c}")
def test_chunked_rule_protocol_equals_the_whole_tensor_function(config):
    model, chunks = two_tensor_model(T_PROTO, seed=1)
    model["w"][2] *= 5.0  # a far client, so cclip clips
    rule = make_rule(config, T_PROTO)
    got = run_protocol(rule, model, chunks)
    expected = whole_model(config, model)
    for name in model:
        close(got[name], expected[name])


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_chunked_cclip_from_a_given_center_equals_the_whole_model_cclip(iters):
    model, chunks = two_tensor_model(T_PROTO, seed=2)
    g = torch.Generator().manual_seed(3)
    center = {
        "w": torch.randn(3, 4, generator=g, dtype=F64),
        "b": torch.randn(5, generator=g, dtype=F64),
    }
    config = RuleConfig("cclip", weights=P_PROTO, tau_c=1.0, iters=iters)
    rule = make_rule(config, T_PROTO, center=center)
    assert rule.num_passes == iters + 1
    got = run_protocol(rule, model, chunks)
    expected = whole_model(config, model, center)
    for name in model:
        close(got[name], expected[name])
    # And against the independent implementation.
    ref = cclip_reference(
        {n: d.numpy() for n, d in model.items()},
        client_weights(T_PROTO, P_PROTO).numpy(),
        1.0,
        iters,
        {n: c.numpy() for n, c in center.items()},
    )
    for name in model:
        np.testing.assert_allclose(got[name].numpy(), ref[name], rtol=1e-11, atol=1e-12)
    assert len(rule.summary()["clip_scales_per_iteration"]) == iters


def test_make_rule_builds_the_rule_named():
    kinds = {
        "fedavg": FedAvg,
        "task_arithmetic": TaskArithmetic,
        "fedgma": FedGMA,
        "median": Median,
    }
    for name, cls in kinds.items():
        assert type(make_rule(RuleConfig(name), 3)) is cls
    assert isinstance(make_rule(RuleConfig("cclip", tau_c=1.0), 3), CClip)
    assert set(RULE_NAMES) == {
        "task_arithmetic",
        *("fedavg", "fednova", "fedgma", "median", "cclip", "ties", "dare"),
    }


class RecordingRule(Rule):
    """FedAvg that records every chunk it is shown (two passes: observe, then aggregate)."""

    name = "recording"
    num_passes = 2

    def __init__(self, weights: torch.Tensor, whole_tensors: bool) -> None:
        super().__init__(weights)
        self.whole_tensors = whole_tensors
        self.seen: list[tuple[str, Chunk, tuple[int, ...]]] = []

    def observe(self, pass_index: int, chunk: Chunk, deltas: torch.Tensor) -> None:
        self.seen.append(("observe", chunk, tuple(deltas.shape)))

    def aggregate(self, chunk: Chunk, deltas: torch.Tensor) -> torch.Tensor:
        self.seen.append(("aggregate", chunk, tuple(deltas.shape)))
        return fedavg(deltas, self.weights)


def engine_model(num_clients: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    """θ₀ and T models of 'w' [3, 4], 'b' [5] and an integer buffer, and their TensorPlans."""
    g = torch.Generator().manual_seed(seed)
    theta0 = {
        "w": torch.randn(3, 4, generator=g).to(dtype),
        "b": torch.randn(5, generator=g).to(dtype),
        "ids": torch.arange(4),
    }
    models = [
        {n: x + torch.randn(x.shape, generator=g).to(dtype) if x.is_floating_point() else x
         for n, x in theta0.items()}
        for _ in range(num_clients)
    ]  # fmt: skip
    plans = [TensorPlan(n, tuple(x.shape), x.dtype) for n, x in theta0.items()]
    return theta0, models, plans


def merge_with_engine(rule, theta0, clients, plans, statistics=None, **options):
    merged = aggregate_model(
        rule,
        plans,
        theta0.__getitem__,
        [x.__getitem__ for x in clients],
        AggregationOptions(**options),
        statistics=statistics,
    )
    return {name: tensor.clone() for name, tensor in merged}


@pytest.mark.parametrize("whole", [True, False])
def test_a_whole_tensors_rule_sees_each_tensor_as_one_chunk_whatever_the_chunk_size(whole):
    theta0, models, plans = engine_model(3)
    rule = RecordingRule(client_weights(3), whole_tensors=whole)
    got = merge_with_engine(rule, theta0, models, plans, server_lr=0.5, chunk_size=3)
    if whole:  # every pass: one chunk per float tensor, deltas [T, numel]
        pieces = {"w": [(0, 12)], "b": [(0, 5)]}
    else:
        pieces = {"w": [(0, 3), (3, 6), (6, 9), (9, 12)], "b": [(0, 3), (3, 5)]}
    expected = [
        (step, Chunk(name, start, stop), (3, stop - start))
        for step in ("observe", "aggregate")
        for name in ("w", "b")
        for start, stop in pieces[name]
    ]
    assert rule.seen == expected
    for name in ("w", "b"):
        want = theta0[name] + 0.5 * sum(m[name] - theta0[name] for m in models) / 3
        torch.testing.assert_close(got[name], want)
    assert torch.equal(got["ids"], theta0["ids"])


@pytest.mark.parametrize("chunk_size", [4, None])
def test_linear_rules_take_one_path_with_or_without_statistics_bit_for_bit(chunk_size):
    # θ' = θ₀ + Σ_t (β c_t) Δ_t added client by client, Δ_t = fl(θ_t − θ₀); the statistics are a
    # side pass. From the models (fl-sim merge) or from the updates (a Flower round): same bits.
    T = 3
    theta0, models, plans = engine_model(T, seed=1)
    rule = FedAvg(client_weights(T, [1.0, 2.0, 4.0]))
    beta = 0.9
    options = {"server_lr": beta, "chunk_size": chunk_size}
    stats = UpdateStatistics.empty(T)
    with_stats = merge_with_engine(rule, theta0, models, plans, stats, **options)
    plain = merge_with_engine(rule, theta0, models, plans, **options)
    updates = [
        {n: m[n] - theta0[n] if m[n].is_floating_point() else m[n] for n in m} for m in models
    ]
    from_updates = merge_with_engine(rule, theta0, updates, plans, inputs="updates", **options)
    alphas = [beta * c for c in rule.linear_coefficients().tolist()]
    for name in ("w", "b"):
        want = theta0[name].clone()
        for alpha, update in zip(alphas, updates, strict=True):
            want.add_(update[name], alpha=alpha)
        for got in (with_stats, plain, from_updates):
            assert torch.equal(got[name], want), name
    flat = torch.stack([torch.cat([u["w"].flatten(), u["b"]]) for u in updates]).double()
    torch.testing.assert_close(stats.gram, flat @ flat.T, rtol=1e-6, atol=1e-6)
    assert stats.coordinates == 17


def test_bfloat16_models_get_their_deltas_in_float32():
    # torch.sub on two bfloat16 tensors rounds Δ to bfloat16 even into a float32 buffer; the
    # engine widens first, so θ' = bf16(θ₀ + β Σ_t c_t (θ_t − θ₀) in float32), stats or not.
    T = 2
    theta0, models, plans = engine_model(T, seed=2, dtype=torch.bfloat16)
    rule = FedAvg(client_weights(T))
    for stats in (None, UpdateStatistics.empty(T)):
        got = merge_with_engine(rule, theta0, models, plans, stats, server_lr=1.0)
        for name in ("w", "b"):
            want = theta0[name].float()
            for m in models:
                want.add_(m[name].float() - theta0[name].float(), alpha=0.5)
            assert got[name].dtype == torch.bfloat16
            assert torch.equal(got[name], want.to(torch.bfloat16)), name


# ---------------------------------------------------------------------------------------------
# 4. Properties
# ---------------------------------------------------------------------------------------------


@st.composite
def federations(draw, min_clients: int = 1, max_clients: int = 5):
    """(deltas [T, n], weights p, a_norm, a permutation of the clients), all float64."""
    num_clients = draw(st.integers(min_clients, max_clients))
    n = draw(st.integers(1, 6))
    deltas = draw(arrays(np.float64, (num_clients, n), elements=VALUES))
    weights = draw(arrays(np.float64, (num_clients,), elements=st.floats(0.1, 10.0)))
    a_norm = draw(arrays(np.float64, (num_clients,), elements=st.floats(0.01, 100.0)))
    perm = draw(st.permutations(range(num_clients)))
    return (
        torch.from_numpy(deltas),
        client_weights(num_clients, weights),
        torch.from_numpy(a_norm),
        torch.tensor(perm, dtype=torch.long),
    )


def tol(*tensors: torch.Tensor, factor: float = 1.0) -> float:
    scale = max([1.0] + [float(t.abs().max()) for t in tensors if t.numel()])
    return 1e-11 * scale * factor


@PROPERTY
@given(federations(), st.floats(0.0, 1.0), st.floats(0.1, 100.0), st.integers(1, 3))
def test_every_rule_is_invariant_to_the_order_of_the_clients(fed, rho, tau_c, iters):
    d, p, a, perm = fed
    dp, pp, ap = d[perm], p[perm], a[perm]
    atol = tol(d)
    close(fedavg(dp, pp), fedavg(d, p), atol=atol)
    close(fednova(dp, pp, ap), fednova(d, p, a), atol=atol * 1e3)
    close(fedgma(dp, pp, rho), fedgma(d, p, rho), atol=atol)
    for mode in ("mean", "lower"):
        close(median(dp, mode), median(d, mode), atol=0)
    half = d.shape[1] // 2
    model = {"x": d[:, :half], "y": d[:, half:]}
    model_p = {"x": dp[:, :half], "y": dp[:, half:]}
    center = {"x": d[0, :half] * 0.5, "y": d[0, half:] * 0.5}
    got = cclip(model_p, pp, tau_c, iters, center)
    expected = cclip(model, p, tau_c, iters, center)
    for name in model:
        close(got[name], expected[name], atol=atol * 10)


@PROPERTY
@given(federations(), st.floats(0.01, 100.0), st.floats(0.0, 1.0))
def test_rules_are_equivariant_to_positive_scaling_of_the_updates(fed, c, rho):
    d, p, a, _ = fed
    atol = tol(d, factor=c)
    close(fedavg(c * d, p), c * fedavg(d, p), atol=atol)
    close(fednova(c * d, p, a), c * fednova(d, p, a), atol=atol * 1e3)
    close(fedgma(c * d, p, rho), c * fedgma(d, p, rho), atol=atol)
    for mode in ("mean", "lower"):
        close(median(c * d, mode), c * median(d, mode), atol=atol)


@PROPERTY
@given(federations(), st.floats(0.01, 100.0), st.floats(0.1, 100.0), st.integers(1, 3))
def test_cclip_is_equivariant_to_scaling_the_updates_and_the_radius_together(fed, c, tau_c, iters):
    d, p, _, _ = fed
    model = {"x": d}
    center = {"x": d.mean(0) * 0.25}
    got = cclip({"x": c * d}, p, c * tau_c, iters, {"x": c * center["x"]})["x"]
    expected = c * cclip(model, p, tau_c, iters, center)["x"]
    close(got, expected, atol=tol(d, factor=c) * 10)


@PROPERTY
@given(federations(), st.floats(-100.0, -0.01), st.floats(0.0, 1.0))
def test_fedavg_median_and_fedgma_are_odd_functions_of_the_updates(fed, c, rho):
    d, p, _, _ = fed
    atol = tol(d, factor=-c)
    close(fedavg(c * d, p), c * fedavg(d, p), atol=atol)
    close(fedgma(c * d, p, rho), c * fedgma(d, p, rho), atol=atol)
    close(median(c * d, "mean"), c * median(d, "mean"), atol=atol)
    if d.shape[0] % 2 == 1:
        close(median(c * d, "lower"), c * median(d, "lower"), atol=atol)


# ---------------------------------------------------------------------------------------------
# 5. Bad knobs
# ---------------------------------------------------------------------------------------------

BAD_KNOBS = {
    "rho-negative": (lambda: make_rule(RuleConfig("fedgma", rho=-0.1), 3), "rho"),
    "rho-above-one": (lambda: make_rule(RuleConfig("fedgma", rho=1.5), 3), "rho"),
    "rho-nan": (lambda: make_rule(RuleConfig("fedgma", rho=math.nan), 3), "rho"),
    "tau_c-zero": (lambda: make_rule(RuleConfig("cclip", tau_c=0.0), 3), "tau_c"),
    "tau_c-negative": (lambda: make_rule(RuleConfig("cclip", tau_c=-1.0), 3), "tau_c"),
    "tau_c-nan": (lambda: make_rule(RuleConfig("cclip", tau_c=math.nan), 3), "tau_c"),
    "tau_c-missing": (lambda: make_rule(RuleConfig("cclip"), 3), "tau_c"),
    "tau_c-zero-class": (lambda: CClip(client_weights(2), 0.0), "tau_c"),
    "iters-zero": (lambda: make_rule(RuleConfig("cclip", tau_c=1.0, iters=0), 3), "iters"),
    "iters-negative": (lambda: make_rule(RuleConfig("cclip", tau_c=1.0, iters=-2), 3), "iters"),
    "iters-fraction": (
        lambda: make_rule(RuleConfig("cclip", tau_c=1.0, iters=1.5), 3),  # type: ignore[arg-type]
        "iters",
    ),
    "iters-zero-class": (lambda: CClip(client_weights(2), 1.0, iters=0), "iters"),
    "unknown-rule": (lambda: make_rule(RuleConfig("fedprox"), 3), "fedprox"),
    "fednova-no-a_norm": (lambda: make_rule(RuleConfig("fednova"), 3), "fednova"),
    "fednova-too-few-a_norm": (
        lambda: make_rule(RuleConfig("fednova", a_norm=[1.0, 2.0]), 3),
        "a-norm",
    ),
    "fednova-too-many-a_norm": (
        lambda: make_rule(RuleConfig("fednova", a_norm=[1.0, 2.0, 3.0, 4.0]), 3),
        "a-norm",
    ),
    "fednova-zero-a_norm": (
        lambda: make_rule(RuleConfig("fednova", a_norm=[1.0, 0.0, 3.0]), 3),
        "fednova",
    ),
    "fednova-negative-a_norm": (
        lambda: make_rule(RuleConfig("fednova", a_norm=[1.0, -2.0, 3.0]), 3),
        "fednova",
    ),
    "fednova-nan-a_norm": (
        lambda: make_rule(RuleConfig("fednova", a_norm=[1.0, math.nan, 3.0]), 3),
        "fednova",
    ),
    "fednova-inf-a_norm": (
        lambda: make_rule(RuleConfig("fednova", a_norm=[1.0, math.inf, 3.0]), 3),
        "fednova",
    ),
    "task_arithmetic-with-weights": (
        lambda: make_rule(RuleConfig("task_arithmetic", weights=[1, 2, 3]), 3),
        "task_arithmetic",
    ),
    "task_arithmetic-class-with-weights": (
        lambda: TaskArithmetic(t64([0.5, 0.25, 0.25])),
        "task_arithmetic",
    ),
    "median-with-weights": (
        lambda: make_rule(RuleConfig("median", weights=[1, 2, 3]), 3),
        "median",
    ),
    "weights-negative": (lambda: make_rule(RuleConfig("fedavg", weights=[1, -1, 2]), 3), "weights"),
    "weights-all-zero": (lambda: make_rule(RuleConfig("fedavg", weights=[0, 0, 0]), 3), "weights"),
    "weights-nan": (
        lambda: make_rule(RuleConfig("fedavg", weights=[1, math.nan, 1]), 3),
        "weights",
    ),
    "weights-too-few": (lambda: make_rule(RuleConfig("fedavg", weights=[1, 2]), 3), "weights"),
    "weights-too-many": (
        lambda: make_rule(RuleConfig("fedgma", weights=[1, 2, 3, 4]), 3),
        "weights",
    ),
    "no-clients": (lambda: make_rule(RuleConfig("fedavg"), 0), "client"),
    "median-mode-unknown": (
        lambda: make_rule(RuleConfig("median", median_mode="upper"), 3),
        "median-mode",
    ),
    "median-mode-unknown-class": (lambda: Median(client_weights(3), "upper"), "mode"),
    "median-mode-unknown-function": (lambda: median(torch.ones(4, 2), "upper"), "mode"),
}


@pytest.mark.parametrize("case", list(BAD_KNOBS))
def test_bad_knobs_raise_a_one_line_config_error_naming_the_knob(case):
    build, word = BAD_KNOBS[case]
    with pytest.raises(ConfigError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message
    assert word in message
    assert isinstance(info.value, ValueError)


def test_good_edge_knobs_are_accepted():
    make_rule(RuleConfig("fedgma", rho=0.0), 2)
    make_rule(RuleConfig("fedgma", rho=1.0), 2)
    make_rule(RuleConfig("cclip", tau_c=math.inf, iters=3), 2)
    make_rule(RuleConfig("fedavg", weights=[0, 1]), 2)  # a zero weight is allowed, all-zero not


# ---------------------------------------------------------------------------------------------
# 6. Device
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rules_run_on_the_device_of_their_tensors_and_match_the_cpu(dtype):
    model, chunks = two_tensor_model(T_PROTO, seed=4)
    model = {n: d.to(dtype) for n, d in model.items()}
    model_gpu = {n: d.cuda() for n, d in model.items()}
    g = torch.Generator().manual_seed(5)
    center = {n: torch.randn(d.shape[1:], generator=g, dtype=dtype) for n, d in model.items()}
    center_gpu = {n: c.cuda() for n, c in center.items()}
    configs = [
        *PROTOCOL_CONFIGS,
        RuleConfig("cclip", weights=P_PROTO, tau_c=1.0, iters=2),
    ]
    atol = 1e-12 if dtype == torch.float64 else 1e-5
    for config in configs:
        with_center = config.name == "cclip"
        cpu_rule = make_rule(config, T_PROTO, center=center if with_center else None)
        gpu_rule = make_rule(config, T_PROTO, center=center_gpu if with_center else None)
        cpu = run_protocol(cpu_rule, model, chunks)
        gpu = run_protocol(gpu_rule, model_gpu, chunks)
        for name in model:
            assert gpu[name].is_cuda
            torch.testing.assert_close(gpu[name].cpu(), cpu[name], rtol=1e-5, atol=atol)
    # The functions too, with every tensor (weights and center included) on the GPU.
    p = client_weights(T_PROTO, P_PROTO)
    p_gpu = p.cuda()
    for name in model:
        d, dg = model[name], model_gpu[name]
        pairs = [
            (fedavg(dg, p_gpu), fedavg(d, p)),
            (fednova(dg, p_gpu, t64(A_PROTO).cuda()), fednova(d, p, t64(A_PROTO))),
            (fedgma(dg, p_gpu, 0.5), fedgma(d, p, 0.5)),
            (median(dg, "mean"), median(d, "mean")),
            (median(dg, "lower"), median(d, "lower")),
        ]
        for got, expected in pairs:
            assert got.is_cuda
            torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=atol)
