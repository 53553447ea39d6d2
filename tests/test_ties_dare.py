"""TIES-merging (strategies/ties.py) and DARE (strategies/dare.py), two rules added as one module
and one registry line each.

1. TIES by hand on tiny tensors: trim (with a tie at the threshold), elected signs, disjoint mean,
   normalize false, a zero elected sum, a zero divisor, k = 0.
2. TIES against mergekit's computation re-implemented here in NumPy from mergekit's
   generalized_task_arithmetic.py (GTATask.execute, get_mask) and sparsify.py (magnitude).
3. DARE: density 1 is FedAvg exactly; seeded masks; kept fraction ≈ d; E[A] = FedAvg.
4. Both through strategies.streaming.aggregate_model (models and updates).
5. Registry entries and bad knobs.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fl_sim.errors import ConfigError
from strategies import dare as dare_module
from strategies import ties as ties_module
from strategies.dare import DARE, DAREKnobs, dare, dare_mask
from strategies.fedavg import fedavg
from strategies.registry import RULES, RuleConfig, make_rule
from strategies.rule import Chunk, Rule, client_weights
from strategies.streaming import AggregationOptions, TensorPlan, aggregate_model
from strategies.ties import Ties, TiesKnobs, ties, top_magnitude_mask, trim

F64 = torch.float64
ENGINE_WHOLE_TENSORS = hasattr(Rule, "whole_tensors")
needs_whole_tensor_engine = pytest.mark.skipif(
    not ENGINE_WHOLE_TENSORS, reason="strategies/streaming.py has no whole_tensors support yet"
)


def t64(values) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def close(actual: torch.Tensor, expected, atol: float = 1e-12) -> None:
    expected = torch.as_tensor(expected, dtype=actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=atol)


def whole(name: str, deltas: torch.Tensor) -> Chunk:
    return Chunk(name, 0, deltas[0].numel())


# ---------------------------------------------------------------------------------------------
# 1. TIES by hand
# ---------------------------------------------------------------------------------------------

# T = 3 task vectors on a 2×3 tensor; density 0.5 → k = int(0.5 · 6) = 3 kept per client.
TAU = t64(
    [
        [[4.0, -1.0, 0.5], [2.0, -3.0, 0.1]],  # |τ| 4 1 .5 2 3 .1 → keep 4, 3, 2
        [[-2.0, 5.0, 1.0], [-1.0, 0.2, -6.0]],  # |τ| 2 5 1 1 .2 6 → keep 6, 5, 2
        [[1.0, -2.0, -3.0], [1.0, 2.0, 2.0]],  # |τ| 1 2 3 1 2 2 → 3, then two of the three 2s
    ]
)
TRIMMED = t64(
    [
        [[4.0, 0.0, 0.0], [2.0, -3.0, 0.0]],
        [[-2.0, 5.0, 0.0], [0.0, 0.0, -6.0]],
        [[0.0, -2.0, -3.0], [0.0, 2.0, 0.0]],  # the tie at 2 keeps the lowest flat indices 1, 4
    ]
)
# weights (2, 1, 1) → p = (1/2, 1/4, 1/4); p_t τ̂_t:
#   t1: [[2, 0, 0], [1, -1.5, 0]]   t2: [[-.5, 1.25, 0], [0, 0, -1.5]]
#   t3: [[0, -.5, -.75], [0, .5, 0]]
# Σ_t p_t τ̂_t = [[1.5, .75, -.75], [1, -1, -1.5]] → elected γ = [[+, +, −], [+, −, −]]
# agreeing (m_t = 1): (0,0) t1; (0,1) t2; (0,2) t3; (1,0) t1; (1,1) t1; (1,2) t2
# disjoint sum Σ p m τ̂ = [[2, 1.25, -.75], [1, -1.5, -1.5]]
# divisor Σ p m       = [[.5, .25, .25], [.5, .5, .25]]
DISJOINT_SUM = t64([[2.0, 1.25, -0.75], [1.0, -1.5, -1.5]])
DISJOINT_MEAN = t64([[4.0, 5.0, -3.0], [2.0, -3.0, -6.0]])
WEIGHTS = client_weights(3, [2, 1, 1])


def test_ties_trims_each_task_vector_to_its_top_density_magnitudes_by_hand():
    for t in range(3):
        close(trim(TAU[t].flatten(), 0.5), TRIMMED[t].flatten())
    # no trimming at density 1, as mergekit's magnitude()
    close(trim(TAU[0].flatten(), 1.0), TAU[0].flatten())


def test_ties_ties_at_the_threshold_keep_the_lowest_indices_like_a_stable_argsort():
    g = torch.Generator().manual_seed(0)
    for n, k in [(10, 3), (1000, 250), (5000, 1)]:
        delta = torch.randint(-3, 4, (n,), generator=g).to(F64)  # many equal magnitudes
        order = torch.argsort(delta.abs(), descending=True, stable=True)[:k]
        expected = torch.zeros(n, dtype=torch.bool)
        expected[order] = True
        assert torch.equal(top_magnitude_mask(delta, k), expected)
        assert int(top_magnitude_mask(delta, k).sum()) == k


def test_ties_elects_signs_and_takes_the_disjoint_mean_by_hand():
    rule = make_rule(RuleConfig("ties", weights=[2, 1, 1], density=0.5), 3)
    assert isinstance(rule, Ties)
    flat = TAU.reshape(3, -1)
    close(rule.aggregate(whole("w", flat), flat).view(2, 3), DISJOINT_MEAN)
    summary = rule.summary()
    assert summary["kept_fraction"] == pytest.approx(9 / 18)
    # a kept entry opposes γ at (0,0) (t2), (0,1) (t3) and (1,1) (t3)
    assert summary["sign_conflict_fraction"] == pytest.approx(3 / 6)
    assert summary["all_trimmed_fraction"] == 0
    assert summary["density"] == 0.5 and summary["normalize"] is True
    json.dumps(summary)
    close(ties(TAU, WEIGHTS, density=0.5), DISJOINT_MEAN)


def test_ties_without_normalize_is_the_disjoint_sum_by_hand():
    close(ties(TAU, WEIGHTS, density=0.5, normalize=False), DISJOINT_SUM)
    rule = make_rule(RuleConfig("ties", weights=[2, 1, 1], density=0.5, normalize=False), 3)
    flat = TAU.reshape(3, -1)
    close(rule.aggregate(whole("w", flat), flat).view(2, 3), DISJOINT_SUM)


def test_ties_zero_elected_sum_picks_plus_and_zero_divisor_gives_zero():
    # p = (1/2, 1/2), density 1 (no trim):
    # j=0: p τ = (.5, -.5), Σ = 0 → γ = +1 (mergekit: sign_weight >= 0) → only t1: .5/.5 = 1
    # j=1: (-.5, 0), Σ = -.5 → γ = −1 → t1: -.5/.5 = -1 (a zero never agrees)
    # j=2: (0, 0) → no one agrees, divisor 0 → 1 (mergekit), A = 0 / 1 = 0
    # j=3: (1.5, 1.5) → both: 3/1 = 3
    deltas = t64([[1.0, -1.0, 0.0, 3.0], [-1.0, 0.0, 0.0, 3.0]])
    p = client_weights(2)
    close(ties(deltas, p, density=1.0), [1.0, -1.0, 0.0, 3.0])
    close(ties(deltas, p, density=1.0, normalize=False), [0.5, -0.5, 0.0, 3.0])
    rule = Ties(p, density=1.0)
    result = rule.aggregate(whole("v", deltas), deltas)
    assert torch.isfinite(result).all()
    assert rule.summary()["all_trimmed_fraction"] == pytest.approx(1 / 4)
    assert rule.summary()["sign_conflict_fraction"] == pytest.approx(1 / 4)


def test_ties_a_client_of_weight_zero_never_agrees():
    # mergekit elects on p_t τ̂_t: weight 0 makes the entry 0, which matches neither sign
    deltas = t64([[2.0, 2.0], [-8.0, 4.0]])
    p = client_weights(2, [1, 0])
    close(ties(deltas, p, density=1.0), [2.0, 2.0])


def test_ties_at_density_one_with_agreeing_signs_is_fedavg():
    g = torch.Generator().manual_seed(1)
    sign = torch.where(torch.rand(40, generator=g) < 0.5, -1.0, 1.0).to(F64)
    deltas = sign * (torch.rand(4, 40, generator=g, dtype=F64) + 0.1)
    p = client_weights(4, [1, 2, 3, 0.5])
    close(ties(deltas, p, density=1.0), fedavg(deltas, p), atol=1e-14)
    # and in float32, to its rounding (Σ p_t m_t = 1 up to float32)
    d32 = deltas.float()
    torch.testing.assert_close(ties(d32, p, density=1.0), fedavg(d32, p), rtol=1e-6, atol=1e-7)


def test_ties_keeps_nothing_of_a_tensor_where_density_times_numel_is_below_one():
    # k = int(0.5 · 1) = 0: mergekit asserts; here that tensor's A is 0 and the summary says so
    rule = Ties(client_weights(2), density=0.5)
    deltas = t64([[3.0], [5.0]])
    close(rule.aggregate(whole("logit_scale", deltas), deltas), [0.0])
    assert rule.summary()["trimmed_to_zero_tensors"] == ["logit_scale"]


def test_ties_refuses_a_partial_tensor():
    rule = Ties(client_weights(2), density=0.5)
    with pytest.raises(RuntimeError, match="whole tensors"):
        rule.aggregate(Chunk("w", 4, 8), torch.zeros(2, 4, dtype=F64))


# ---------------------------------------------------------------------------------------------
# 2. TIES against mergekit's arithmetic, re-implemented in NumPy
# ---------------------------------------------------------------------------------------------


def mergekit_magnitude(tensor: np.ndarray, density: float) -> np.ndarray:
    """mergekit/sparsify.py magnitude(): keep argsort(|τ|, descending)[:int(density·numel)].

    mergekit's torch.argsort is not stable, so its choice among equal magnitudes at the
    threshold is the sort's; a stable sort (lowest index first) is the one fl-sim fixes."""
    if density >= 1:
        return tensor
    k = int(density * tensor.size)
    assert k > 0, "not gonna zero out the whole tensor buddy"
    mask = np.zeros_like(tensor)
    w = np.abs(tensor).reshape(-1)
    topk = np.argsort(-w, kind="stable")[:k]
    mask.reshape(-1)[topk] = 1
    return tensor * mask


def mergekit_ties(
    base: np.ndarray,
    models: list[np.ndarray],
    weights: list[float],
    density: float,
    normalize: bool = True,
    lambda_: float = 1.0,
) -> np.ndarray:
    """mergekit GTATask.execute for merge_method: ties (consensus sum, magnitude sparsify)."""
    deltas = np.stack([mergekit_magnitude(m - base, density) for m in models])
    w = np.asarray(weights, dtype=deltas.dtype).reshape(-1, *([1] * base.ndim))
    weighted = deltas * w
    # get_mask(method="sum")
    sign = np.sign(weighted)
    majority = (weighted.sum(axis=0) >= 0).astype(deltas.dtype) * 2 - 1
    mask = sign == majority
    mixed = (weighted * mask).sum(axis=0)
    divisor = (w * mask).sum(axis=0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


@pytest.mark.parametrize("density", [0.1, 0.2, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("discrete", [False, True])
def test_ties_equals_mergekit_on_random_tensors(density, normalize, discrete):
    rng = np.random.default_rng(int(density * 100) + 7 * normalize + 13 * discrete)
    shape = (7, 11)
    base = rng.normal(size=shape)
    if discrete:  # bf16-like: few distinct values, so ties at the threshold
        models = [base + rng.integers(-4, 5, size=shape) / 8 for _ in range(4)]
    else:
        models = [base + rng.normal(size=shape) for _ in range(4)]
    # with discrete Δ, Σ_t w_t τ̂_t is often exactly 0: then the elected sign is the rounding's
    # of Σ_t p_t τ̂_t against Σ_t w_t τ̂_t, unless the weights are equal (fl-sim then sums τ̂_t)
    weights = [1.0, 1.0, 1.0, 1.0] if discrete else [1.0, 0.5, 2.0, 0.25]
    lam = 0.8
    expected = mergekit_ties(base, models, weights, density, normalize, lam)
    p = client_weights(4, weights)
    deltas = torch.from_numpy(np.stack([m - base for m in models]))
    # normalize: a disjoint mean, β = λ; without it mergekit sums w_t, so β = λ Σ_t w_t
    beta = lam if normalize else lam * sum(weights)
    merged = torch.from_numpy(base) + beta * ties(deltas, p, density, normalize)
    close(merged, expected, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# 3. DARE
# ---------------------------------------------------------------------------------------------


def random_deltas(num_clients: int, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(num_clients, n, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_dare_at_density_one_is_fedavg_exactly():
    deltas = random_deltas(3, 50)
    p = client_weights(3, [1, 2, 3])
    for rescale in (True, False):
        rule = make_rule(RuleConfig("dare", weights=[1, 2, 3], density=1.0, rescale=rescale), 3)
        assert torch.equal(rule.aggregate(whole("w", deltas), deltas), fedavg(deltas, p))
        assert rule.summary()["kept_fraction"] == 1.0


def test_dare_is_the_masked_rescaled_weighted_sum():
    deltas = random_deltas(3, 200, seed=1)
    p = client_weights(3, [1, 2, 3])
    masks = [dare_mask(11, "layer.w", t, 200, 0.3) for t in range(3)]
    for rescale, scale in ((True, 1 / 0.3), (False, 1.0)):
        expected = sum(p[t] * scale * deltas[t] * masks[t] for t in range(3))
        rule = DARE(p, density=0.3, rescale=rescale, seed=11)
        close(rule.aggregate(whole("layer.w", deltas), deltas), expected)
        # the mask is drawn over the flattened tensor, whatever its shape
        shaped = dare(deltas.view(3, 10, 20), p, "layer.w", 0.3, rescale, 11)
        assert shaped.shape == (10, 20)
        close(shaped.flatten(), expected)


def test_dare_masks_are_seeded_and_differ_by_seed_tensor_and_client():
    n = 1000
    assert torch.equal(dare_mask(5, "a", 0, n, 0.5), dare_mask(5, "a", 0, n, 0.5))
    assert not torch.equal(dare_mask(5, "a", 0, n, 0.5), dare_mask(6, "a", 0, n, 0.5))
    assert not torch.equal(dare_mask(5, "a", 0, n, 0.5), dare_mask(5, "b", 0, n, 0.5))
    assert not torch.equal(dare_mask(5, "a", 0, n, 0.5), dare_mask(5, "a", 1, n, 0.5))
    assert dare_module.mask_seed(5, "a", 0) == dare_module.mask_seed(5, "a", 0)  # no hash()
    deltas = random_deltas(3, n)

    def run(seed: int) -> torch.Tensor:
        rule = make_rule(RuleConfig("dare", seed=seed, density=0.5), 3)
        assert rule.summary()["seed"] == seed
        return rule.aggregate(whole("a", deltas), deltas)

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_dare_keeps_about_density_of_the_coordinates():
    num_clients, n, d = 3, 20_000, 0.3
    rule = DARE(client_weights(num_clients), density=d, seed=2)
    deltas = random_deltas(num_clients, n)
    rule.aggregate(whole("w", deltas), deltas)
    kept = rule.summary()["kept_fraction"]
    bound = 5 * math.sqrt(d * (1 - d) / (num_clients * n))  # binomial, 5σ
    assert abs(kept - d) < bound
    assert abs(float(dare_mask(0, "x", 0, n, 0.8).double().mean()) - 0.8) < 5 * math.sqrt(
        0.8 * 0.2 / n
    )


def test_dare_is_unbiased_its_mean_over_seeds_is_fedavg():
    num_clients, n, d, seeds = 3, 40, 0.4, 400
    deltas = random_deltas(num_clients, n, seed=3)
    p = client_weights(num_clients, [1, 2, 1])
    runs = torch.stack(
        [DARE(p, density=d, seed=s).aggregate(whole("w", deltas), deltas) for s in range(seeds)]
    )
    # Var[A_j] = (1 − d)/d · Σ_t p_t² Δ_t,j²; the mean of S draws has variance Var/S
    std = torch.sqrt((1 - d) / d * (p.unsqueeze(1) ** 2 * deltas**2).sum(0) / seeds)
    error = (runs.mean(0) - fedavg(deltas, p)).abs()
    assert (error < 5 * std).all()
    # and the spread matches the formula (a loose check of the rescale)
    ratio = runs.var(0) / (std**2 * seeds)
    assert 0.7 < float(ratio.mean()) < 1.3


def test_dare_refuses_a_partial_tensor():
    rule = DARE(client_weights(2), density=0.5)
    with pytest.raises(RuntimeError, match="whole tensor"):
        rule.aggregate(Chunk("w", 4, 8), torch.zeros(2, 4, dtype=F64))


# ---------------------------------------------------------------------------------------------
# 4. Through the streaming engine
# ---------------------------------------------------------------------------------------------


def small_model(num_clients: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {
        "layer.weight": torch.randn(6, 5, generator=g, dtype=F64),
        "layer.bias": torch.randn(7, generator=g, dtype=F64),
        "step": torch.tensor([3, 4]),  # an integer buffer: copied
    }
    deltas = [
        {k: torch.randn(v.shape, generator=g, dtype=F64) for k, v in base.items() if k != "step"}
        for _ in range(num_clients)
    ]
    return base, deltas


def run_engine(rule, base, deltas, inputs, beta, chunk_size=None):
    plans = [TensorPlan(k, tuple(v.shape), v.dtype) for k, v in base.items()]
    if inputs == "models":
        clients = [{k: base[k] + d[k] if k in d else base[k] for k in base} for d in deltas]
    else:
        clients = [{k: d.get(k, base[k]) for k in base} for d in deltas]
    options = AggregationOptions(server_lr=beta, inputs=inputs, chunk_size=chunk_size)
    merged = aggregate_model(
        rule, plans, base.__getitem__, [c.__getitem__ for c in clients], options
    )
    return {name: tensor.clone() for name, tensor in merged}


def direct(rule_name: str, base, deltas, p, beta, **knobs):
    out = {"step": base["step"]}
    for name in ("layer.weight", "layer.bias"):
        stacked = torch.stack([d[name] for d in deltas])
        a = ties(stacked, p, **knobs) if rule_name == "ties" else dare(stacked, p, name, **knobs)
        out[name] = base[name] + beta * a
    return out


CASES = [
    ("ties", {"density": 0.3}, {"density": 0.3}),
    ("ties", {"density": 0.5, "normalize": False}, {"density": 0.5, "normalize": False}),
    ("dare", {"density": 0.4}, {"density": 0.4, "seed": 9}),
    ("dare", {"density": 0.4, "rescale": False}, {"density": 0.4, "rescale": False, "seed": 9}),
]


@pytest.mark.parametrize(("rule_name", "values", "knobs"), CASES)
@pytest.mark.parametrize("inputs", ["models", "updates"])
def test_engine_equals_the_direct_computation(rule_name, values, knobs, inputs):
    base, deltas = small_model()
    weights = [1.0, 3.0, 2.0]
    p = client_weights(3, weights)
    beta = 0.7
    seed = 9 if rule_name == "dare" else 0
    rule = make_rule(RuleConfig(rule_name, weights=weights, seed=seed, **values), 3)
    merged = run_engine(rule, base, deltas, inputs, beta)
    expected = direct(rule_name, base, deltas, p, beta, **knobs)
    assert merged.keys() == expected.keys()
    for name in expected:
        close(merged[name], expected[name])
    json.dumps(rule.summary())


@needs_whole_tensor_engine
@pytest.mark.parametrize(("rule_name", "values", "knobs"), CASES)
def test_engine_passes_whole_tensors_whatever_the_chunk_size(rule_name, values, knobs):
    base, deltas = small_model()
    p = client_weights(3)
    seed = 9 if rule_name == "dare" else 0
    expected = direct(rule_name, base, deltas, p, 1.0, **knobs)
    for chunk_size in (4, 16, None):
        rule = make_rule(RuleConfig(rule_name, seed=seed, **values), 3)
        assert rule.whole_tensors
        merged = run_engine(rule, base, deltas, "updates", 1.0, chunk_size=chunk_size)
        for name in expected:
            close(merged[name], expected[name])


def test_engine_float32_model_matches_the_float64_computation():
    base, deltas = small_model(seed=4)
    base32 = {k: (v.float() if v.is_floating_point() else v) for k, v in base.items()}
    deltas32 = [{k: v.float() for k, v in d.items()} for d in deltas]
    p = client_weights(3)
    for name, knobs in (("ties", {"density": 0.5}), ("dare", {"density": 0.5, "seed": 1})):
        rule = make_rule(RuleConfig(name, seed=knobs.get("seed", 0), density=0.5), 3)
        merged = run_engine(rule, base32, deltas32, "updates", 1.0)
        # the same masks and trims on float32 inputs (widened to float64 for the reference)
        wide = [{k: v.double() for k, v in d.items()} for d in deltas32]
        base_wide = {k: (v.double() if v.is_floating_point() else v) for k, v in base32.items()}
        expected = direct(name, base_wide, wide, p, 1.0, **knobs)
        for key in ("layer.weight", "layer.bias"):
            assert merged[key].dtype == torch.float32
            torch.testing.assert_close(merged[key].double(), expected[key], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# 5. Registry entries and bad knobs
# ---------------------------------------------------------------------------------------------


def test_registry_entries_and_knob_names():
    assert RULES["ties"] is ties_module.SPEC and RULES["dare"] is dare_module.SPEC
    t, d = RULES["ties"], RULES["dare"]
    assert (t.mergekit, t.paper_scale, t.weighting, t.linear) == ("ties", "mean", "weighted", False)
    assert (d.mergekit, d.paper_scale, d.seeded, d.linear) == ("dare_linear", "sum", True, False)
    names = {(i.field, i.key, i.flag, i.yaml, i.default) for i in t.knob_infos()}
    assert names == {
        ("density", "ties-density", "--density", "density", 0.2),
        ("normalize", "ties-normalize", "--normalize", "normalize", True),
    }
    names = {(i.field, i.key, i.flag, i.yaml, i.default) for i in d.knob_infos()}
    assert names == {
        ("density", "dare-density", "--density", "density", 0.5),
        ("rescale", "dare-rescale", "--rescale", "rescale", True),
        ("seed", "dare-seed", "--seed", "seed", 0),
    }
    # built from run-config keys and YAML names as the front ends give them
    assert TiesKnobs.from_values({"ties-density": "0.3", "ties-normalize": "false"}, by="key") == (
        TiesKnobs(density=0.3, normalize=False)
    )
    assert DAREKnobs.from_values({"density": 0.7, "seed": 4.0}, by="yaml") == DAREKnobs(
        density=0.7, seed=4
    )


BAD = [
    ("ties", {"density": 0}, "ties-density"),
    ("ties", {"density": 1.5}, "ties-density"),
    ("ties", {"density": float("nan")}, "ties-density"),
    ("ties", {"density": -0.1}, "ties-density"),
    ("ties", {"normalize": "maybe"}, "ties-normalize"),
    ("dare", {"density": 0}, "dare-density"),
    ("dare", {"density": 1.5}, "dare-density"),
    ("dare", {"density": float("nan")}, "dare-density"),
    ("dare", {"rescale": 2}, "dare-rescale"),
    ("dare", {"seed": -1}, "dare-seed"),
    ("dare", {"seed": 1.5}, "dare-seed"),
]


@pytest.mark.parametrize(("rule_name", "values", "key"), BAD)
def test_bad_knobs_raise_a_one_line_config_error_naming_the_key(rule_name, values, key):
    knobs = RULES[rule_name].knobs
    with pytest.raises(ConfigError) as error:
        knobs(**values)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{rule_name}: {key} ")
    run_config = {knobs.info(field).key: value for field, value in values.items()}
    with pytest.raises(ConfigError, match=key):
        knobs.from_values(run_config, by="key")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_cuda_gives_the_cpu_result():
    deltas = random_deltas(3, 5000, seed=5).float()
    deltas[:, ::7] = deltas[:, 1::7][:, : deltas[:, ::7].shape[1]]  # some ties in |Δ|
    for rule_name, values in (("ties", {"density": 0.2}), ("dare", {"density": 0.3})):
        cpu = make_rule(RuleConfig(rule_name, weights=[1, 2, 3], seed=3, **values), 3)
        gpu = make_rule(RuleConfig(rule_name, weights=[1, 2, 3], seed=3, **values), 3)
        expected = cpu.aggregate(whole("w", deltas), deltas)
        actual = gpu.aggregate(whole("w", deltas), deltas.cuda())
        assert actual.device.type == "cuda"
        torch.testing.assert_close(actual.cpu(), expected, rtol=1e-6, atol=1e-6)
        assert gpu.summary() == cpu.summary()
