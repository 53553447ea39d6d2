"""The quadratic suite (fl_sim/suites/quadratic.py): the theory's closed forms, through the real
ClientApp and ServerApp in process (InProcessGrid, no Ray).

L_t(θ) = ½ Σ_j h_t,j (θ_j − c_t,j)²; K_t SGD steps of rate η_t from θ give exactly
Δ_t = m_t ⊙ (c_t − θ), m_t = 1 − (1 − η_t h_t)^{K_t}; multi-round FedAvg's fixed point is
Σ_t p_t m_t c_t / Σ_t p_t m_t (docs/design.md, "A worked example").
"""

from __future__ import annotations

import pytest
import torch
from helpers import InProcessGrid
from safetensors.torch import load_file

from clients.knobs import client_knobs
from clients.local_training import fine_tune
from fl_sim.config.run_config import RunConfig
from fl_sim.errors import ConfigError
from fl_sim.federation.server_app import run_federation
from fl_sim.suites.quadratic import FEDERATED_KEY, QuadraticSuite
from fl_sim.suites.registry import build_suite

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache", "task_identity")

QUAD = {
    "experiment": "single",
    "task-suite": "quadratic",
    "optimizer": "sgd",
    "schedule": "constant",
    "preset": "none",
    "update-cache": False,
    "diagnostic-batch": 0,
}


def quad_config(tmp_path, name: str, **values: object) -> RunConfig:
    values = {k.replace("_", "-"): v for k, v in values.items()}
    return RunConfig.from_mapping({**QUAD, "results-dir": str(tmp_path / name), **values})


def suite_of(cfg: RunConfig) -> QuadraticSuite:
    suite = build_suite(cfg.suite_config())
    assert isinstance(suite, QuadraticSuite)
    return suite


def contraction(h, lrs, steps):
    """m_t = 1 − (1 − η_t h_t)^{K_t}, float64, [T, d]."""
    eta = torch.tensor(lrs, dtype=torch.float64)[:, None]
    k = torch.tensor(steps, dtype=torch.float64)[:, None]
    return 1 - (1 - eta * h) ** k


def closed_form(c, h, theta0, p, lrs, steps, *, rule, rounds, beta=1.0, a_norm="lr-sum"):
    """θ¹..θᴿ of θ ← θ + β·A(Δ), Δ_t = m_t ⊙ (c_t − θ), A of fedavg or fednova, float64."""
    c, h, theta = c.double(), h.double(), theta0.double()
    p = torch.as_tensor(p, dtype=torch.float64)[:, None]
    m = contraction(h, lrs, steps)
    a = torch.tensor(
        [k * eta if a_norm == "lr-sum" else float(k) for eta, k in zip(lrs, steps, strict=True)],
        dtype=torch.float64,
    )[:, None]
    trajectory = []
    for _ in range(rounds):
        delta = m * (c - theta)
        if rule == "fedavg":
            aggregate = (p * delta).sum(0)
        else:  # fednova: τ_eff Σ_t p_t Δ_t / ‖a_t‖₁
            aggregate = (p * a).sum() * (p * delta / a).sum(0)
        theta = theta + beta * aggregate
        trajectory.append(theta)
    return trajectory


def final_theta(tmp_path, name: str) -> torch.Tensor:
    return load_file(tmp_path / name / "global_model.safetensors")[FEDERATED_KEY].double()


def test_local_training_is_exact_gradient_descent_on_l_t():
    """SGD, constant η_t, σ = 0: K_t steps of θ ← θ − η_t h_t ⊙ (θ − c_t), in closed form."""
    suite = QuadraticSuite(num_tasks=3, dim=20, seed=3)
    lrs, steps = [0.05, 0.2, 0.4], [3, 7, 12]
    knobs = client_knobs(3, lr=lrs, local_steps=steps, batch_size=4)
    theta = suite.theta0()
    m = contraction(suite.h.double(), lrs, steps)
    for t in range(3):
        result = fine_tune(suite, t, {FEDERATED_KEY: theta}, knobs[t], round_index=1)
        expected = m[t] * (suite.c[t].double() - theta.double())
        torch.testing.assert_close(
            result.update[FEDERATED_KEY].double(), expected, atol=1e-5, rtol=1e-5
        )
        assert result.loss_before == pytest.approx(float(suite.task_losses(theta)[t]), rel=1e-6)
        assert result.a_norm_lr_sum == pytest.approx(lrs[t] * steps[t])


@pytest.mark.parametrize(
    ("rule", "a_norm"), [("fedavg", "lr-sum"), ("fednova", "lr-sum"), ("fednova", "steps")]
)
def test_one_shot_and_multi_round_runs_equal_the_closed_form(tmp_path, rule, a_norm):
    """Through Flower: θʳ of a one-shot and an R-round run is the closed-form recursion with the
    rule's A, per round (results.json's theory figures) and at the end; quadratic.safetensors
    alone recomputes it."""
    lrs, steps = [0.05, 0.1, 0.3], [4, 9, 6]
    knobs = {"num-tasks": 3, "lr": "0.05,0.1,0.3", "local-steps": "4,9,6", "strategy": rule}
    knobs |= {"a-norm": a_norm, "quadratic-dim": 16, "server-lr": 1.5}
    for rounds in (1, 4):
        cfg = quad_config(tmp_path, f"r{rounds}", num_rounds=rounds, **knobs)
        results = run_federation(InProcessGrid(3), cfg)
        assert results["status"] == "completed" and results["files"]["quadratic"]
        problem = load_file(tmp_path / f"r{rounds}" / "quadratic.safetensors")
        assert {k: tuple(v.shape) for k, v in problem.items()} == {
            "c": (3, 16),
            "h": (3, 16),
            "theta0": (16,),
            "p": (3,),
        }
        suite = suite_of(cfg)
        torch.testing.assert_close(problem["theta0"], suite.theta0())
        trajectory = closed_form(
            problem["c"],
            problem["h"],
            problem["theta0"],
            problem["p"],
            lrs,
            steps,
            rule=rule,
            rounds=rounds,
            beta=1.5,
            a_norm=a_norm,
        )
        torch.testing.assert_close(
            final_theta(tmp_path, f"r{rounds}"), trajectory[-1], atol=1e-5, rtol=1e-5
        )
        p = problem["p"].double()
        opt_p = suite.minimiser(p.tolist())
        for r, theta in enumerate(trajectory, start=1):
            theory = results["rounds"][r]["theory"]
            losses = 0.5 * (problem["h"].double() * (theta - problem["c"].double()) ** 2).sum(1)
            assert theory["task_losses"] == pytest.approx(losses.tolist(), rel=1e-5)
            assert theory["objective"] == pytest.approx(float((p * losses).sum()), rel=1e-5)
            assert theory["distance_to_opt_p"] == pytest.approx(
                float(torch.linalg.vector_norm(theta - opt_p)), rel=1e-5, abs=1e-6
            )
            w = torch.tensor(theory["effective_weights"], dtype=torch.float64)
            a = torch.tensor(
                [e * k if a_norm == "lr-sum" else k for e, k in zip(lrs, steps, strict=True)]
            )
            torch.testing.assert_close(w, (p * a / (p * a).sum()).double())
            assert theory["distance_to_opt_w"] == pytest.approx(
                float(torch.linalg.vector_norm(theta - suite.minimiser(w.tolist()))), rel=1e-5
            )
            # the accuracy stand-in: 1 / (1 + L_t/d), monotone in L_t
            accuracy = [task["accuracy"] for task in results["rounds"][r]["tasks"]]
            assert accuracy == pytest.approx((1 / (1 + losses / 16)).tolist(), rel=1e-5)
        assert results["rounds"][0]["theory"]["distance_to_opt_w"] is None  # no w_t before round 1


def regime_run(tmp_path, rule: str, lr: float, beta: float) -> tuple[dict, QuadraticSuite]:
    """T = 8, steps-hetero K_t = 2, 4, .., 16 (one η), 25 rounds."""
    cfg = quad_config(
        tmp_path,
        f"{rule}-{lr}",
        num_tasks=8,
        preset="steps-hetero",
        lr=lr,
        local_steps=8,
        strategy=rule,
        num_rounds=25,
        server_lr=beta,
    )
    results = run_federation(InProcessGrid(8), cfg)
    assert results["rounds"][1]["training"]["local_steps"] == [2, 4, 6, 8, 10, 12, 14, 16]
    return results, suite_of(cfg)


def fixed_point(suite: QuadraticSuite, lr: float, weights_over_a: bool) -> torch.Tensor:
    """FedAvg's Σ p m c / Σ p m; FedNova's with p_t m_t / ‖a_t‖₁ (uniform p)."""
    steps = [2, 4, 6, 8, 10, 12, 14, 16]
    m = contraction(suite.h.double(), [lr] * 8, steps)
    q = m / (lr * torch.tensor(steps, dtype=torch.float64)[:, None]) if weights_over_a else m
    return (q * suite.c.double()).sum(0) / q.sum(0)


def test_small_steps_fedavg_finds_the_reweighted_optimum_and_fednova_the_intended_one(tmp_path):
    """η h K ≪ 1 (max 0.16, the worked example's): FedAvg → Σ p m c / Σ p m ≈ θ*_w, far from
    θ*_p; FedNova → θ*_p (both to the closed-form fixed point)."""
    lr = 0.005
    fedavg, suite = regime_run(tmp_path, "fedavg", lr, beta=15.0)
    fednova, _ = regime_run(tmp_path, "fednova", lr, beta=15.0)
    assert float((lr * suite.h * 16).max()) == pytest.approx(0.16, abs=0.01)
    theta_avg, theta_nova = (
        final_theta(tmp_path, f"fedavg-{lr}"),
        final_theta(tmp_path, f"fednova-{lr}"),
    )
    torch.testing.assert_close(theta_avg, fixed_point(suite, lr, False), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(theta_nova, fixed_point(suite, lr, True), atol=1e-4, rtol=1e-4)
    avg, nova = fedavg["rounds"][-1]["theory"], fednova["rounds"][-1]["theory"]
    assert avg["distance_to_opt_w"] < 0.1 < 1.0 < avg["distance_to_opt_p"]
    assert nova["distance_to_opt_p"] < 0.1 < 1.0 < nova["distance_to_opt_w"]
    assert nova["optimality_gap"] < 0.01 < 0.5 < avg["optimality_gap"]


def test_saturated_local_training_makes_fednova_over_correct(tmp_path):
    """η h K ≫ 1 (max 7.8): m_t → 1, FedAvg drifts to Σ p c; FedNova, dividing by a K_t that no
    longer measures progress, lands farther from θ*_p than FedAvg does."""
    lr = 0.245
    fedavg, suite = regime_run(tmp_path, "fedavg", lr, beta=1.0)
    fednova, _ = regime_run(tmp_path, "fednova", lr, beta=1.0)
    assert float((lr * suite.h * 16).max()) > 7
    theta_avg = final_theta(tmp_path, f"fedavg-{lr}")
    torch.testing.assert_close(theta_avg, fixed_point(suite, lr, False), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        final_theta(tmp_path, f"fednova-{lr}"), fixed_point(suite, lr, True), atol=1e-4, rtol=1e-4
    )
    avg, nova = fedavg["rounds"][-1]["theory"], fednova["rounds"][-1]["theory"]
    assert nova["distance_to_opt_p"] > avg["distance_to_opt_p"] + 0.1
    assert nova["optimality_gap"] > avg["optimality_gap"]
    mean_c = suite.c.double().mean(0)
    assert torch.linalg.vector_norm(theta_avg - mean_c) < avg["distance_to_opt_p"]


def test_homogeneous_training_makes_fedavg_and_fednova_coincide(tmp_path):
    common = {"num-tasks": 4, "preset": "homogeneous", "lr": 0.1, "local-steps": 5, "num-rounds": 3}
    for rule in ("fedavg", "fednova"):
        run_federation(InProcessGrid(4), quad_config(tmp_path, rule, strategy=rule, **common))
    torch.testing.assert_close(final_theta(tmp_path, "fedavg"), final_theta(tmp_path, "fednova"))


def test_one_shot_gap_grows_with_the_spread_of_the_c_t_and_shrinks_with_rounds(tmp_path):
    # saturated clients (m_t ≈ 1): θ¹ ≈ Σ p c_t, whose distance to θ*_p is ∝ spread (c̄ cancels)
    gaps = []
    for spread in (0.0, 0.5, 1.0, 2.0):
        cfg = quad_config(
            tmp_path,
            f"s{spread}",
            num_tasks=4,
            lr=0.4,
            local_steps=50,
            num_rounds=1,
            strategy="fedavg",
            quadratic_spread=spread,
        )
        gaps.append(run_federation(InProcessGrid(4), cfg)["rounds"][1]["theory"]["optimality_gap"])
    assert gaps[0] < 1e-6 and gaps == sorted(gaps) and gaps[3] > 10 * gaps[1]
    # more rounds of small local progress close the gap, round after round
    cfg = quad_config(
        tmp_path, "rounds", num_tasks=4, lr=0.05, local_steps=2, num_rounds=6, strategy="fedavg"
    )
    rounds = run_federation(InProcessGrid(4), cfg)["rounds"]
    by_round = [entry["theory"]["optimality_gap"] for entry in rounds]
    assert by_round == sorted(by_round, reverse=True) and by_round[-1] < 0.5 * by_round[1]


def test_gradient_noise_is_seeded_and_the_full_batch_stays_exact():
    suite = QuadraticSuite(num_tasks=2, dim=8, noise=0.5, seed=1)
    exact = QuadraticSuite(num_tasks=2, dim=8, noise=0.0, seed=1)
    torch.testing.assert_close(suite.c, exact.c)  # σ does not change the problem
    torch.testing.assert_close(suite.theta0(), exact.theta0())
    knobs = client_knobs(2, lr=0.1, local_steps=5, batch_size=16)[0]
    state = {FEDERATED_KEY: suite.theta0()}
    full = fine_tune(suite, 0, state, knobs, full_batch=True, round_index=1).update[FEDERATED_KEY]
    clean = fine_tune(exact, 0, state, knobs, round_index=1).update[FEDERATED_KEY]
    torch.testing.assert_close(full, clean, atol=1e-5, rtol=1e-5)
    noisy = [
        fine_tune(suite, 0, state, knobs, round_index=r).update[FEDERATED_KEY] for r in (1, 1, 2)
    ]
    assert torch.equal(noisy[0], noisy[1]) and not torch.equal(noisy[0], noisy[2])
    assert not torch.allclose(noisy[0], clean, atol=1e-3)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"quadratic-dim": 0}, "quadratic-dim"),
        ({"quadratic-spread": -1.0}, "quadratic-spread"),
        ({"quadratic-curvature-spread": 0.5}, "quadratic-curvature-spread"),
        ({"quadratic-noise": -0.1}, "quadratic-noise"),
        ({"quadratic-noise": "inf"}, "quadratic-noise"),
        ({"task-suite": "toy", "quadratic-dim": 8}, "quadratic-dim"),
        ({"shared-head": True}, "shared-head"),
        ({"model": "minilm"}, "model"),
        ({"federated-layers": "2"}, "federated-layers"),
    ],
)
def test_bad_quadratic_knobs_are_one_line_config_errors_naming_the_key(values, key):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_mapping({**QUAD, **values})
    message = str(error.value)
    assert key in message and "\n" not in message
