"""Server evaluation once per content key and on a thread pool; the run's time breakdown.

fl_sim/federation/evaluation.py and fl_sim/federation/timing.py: a cached or parallel
evaluation returns exactly the floats of a plain serial ``evaluate``; runs of one experiment
share what they evaluate (θ₀, the clients' θ₀ + Δ_t, a shared A's β candidates); the breakdown
adds up to the run's wall time and counts client training as the union of handler intervals.
"""

import pytest
import torch
from helpers import InProcessGrid, config

from fl_sim.federation.evaluation import Evaluator, Job, clear_cache
from fl_sim.federation.server_app import run_federation
from fl_sim.federation.timing import add_breakdowns, format_breakdown, time_breakdown
from fl_sim.suites.base import evaluate, load_federated_state
from fl_sim.suites.registry import build_suite
from strategies.flower_strategy import busy_seconds

pytestmark = pytest.mark.usefixtures("isolated_cache")
EVAL_SPLITS = ("val", "test")


@pytest.fixture(autouse=True)
def fresh_results():
    clear_cache()
    yield
    clear_cache()


def toy_states(suite, n):
    """θ₀ and n − 1 perturbations of it (distinct contents)."""
    theta0 = suite.initial_state()
    generator = torch.Generator().manual_seed(3)
    states = [theta0]
    for _ in range(n - 1):
        states.append(
            {k: v + 0.1 * torch.randn(v.shape, generator=generator) for k, v in theta0.items()}
        )
    return states


def plain(suite, state, task, split):
    model = suite.build_model()
    load_federated_state(model, state)
    return evaluate(model, suite.eval_tasks[task], split)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_evaluator_equals_a_plain_serial_evaluation_bit_for_bit(workers):
    cfg = config()
    suite = build_suite(cfg.suite_config())
    states = toy_states(suite, 3)
    jobs = [Job(i, t, EVAL_SPLITS) for i in range(3) for t in range(suite.num_tasks)]
    evaluator = Evaluator(suite, ("toy", workers), workers)
    threads = torch.get_num_threads()
    answers = evaluator.evaluate(states, jobs)
    assert torch.get_num_threads() == threads  # the pool's one-thread setting is undone
    for job, answer in zip(jobs, answers, strict=True):
        for split in EVAL_SPLITS:
            assert answer[split] == plain(suite, states[job.state], job.task, split)
    assert evaluator.stats == {"evaluated": len(jobs) * 2, "cached": 0}


def test_a_triple_is_evaluated_once_across_evaluators_of_the_same_suite():
    cfg = config()
    suite = build_suite(cfg.suite_config())
    states = toy_states(suite, 2)
    key = tuple(sorted(cfg.suite_config().items()))
    first = Evaluator(suite, key, 2)
    jobs = [Job(0, 0, EVAL_SPLITS), Job(1, 1, ("val",))]
    expected = first.evaluate(states, jobs)
    # another run of the experiment: a fresh copy of the same states, a rebuilt suite
    second = Evaluator(build_suite(cfg.suite_config()), key, 2)
    copies = [{k: v.clone() for k, v in s.items()} for s in states]
    again = second.evaluate(copies, [*jobs, Job(1, 1, ("val", "test"))])
    assert again[:2] == expected
    assert second.stats == {"evaluated": 1, "cached": 4}  # only (θ_1, task 1, test) is new
    # a different state of the same suite, or another suite key, is not answered from the cache
    other = Evaluator(suite, ("another suite",), 1)
    other.evaluate(states, jobs)
    assert other.stats["cached"] == 0


def test_requests_that_repeat_a_job_compute_it_once():
    cfg = config()
    suite = build_suite(cfg.suite_config())
    states = toy_states(suite, 1)
    evaluator = Evaluator(suite, ("toy",), 2)
    answers = evaluator.evaluate(states, [Job(0, 2, ("val",)), Job(0, 2, ("val",))])
    assert answers[0] == answers[1] == {"val": plain(suite, states[0], 2, "val")}
    assert evaluator.stats == {"evaluated": 1, "cached": 1}


def test_busy_seconds_is_the_union_of_intervals_within_the_window():
    assert busy_seconds([(1.0, 3.0), (2.0, 5.0), (7.0, 8.0)], 0.0, 7.5) == 4.5
    assert busy_seconds([(-1.0, 2.0)], 0.0, 10.0) == 2.0  # clipped to the window's start
    assert busy_seconds([(2.0, 3.0), (1.0, 4.0)], 0.0, 10.0) == 3.0  # nested
    assert busy_seconds([], 0.0, 10.0) == 0.0


def test_an_experiment_shares_evaluations_and_its_breakdown_adds_up(tmp_path, task_identity):
    """task_arithmetic then one-shot fedavg at the same grid (β = λT): the same θ₀, the same
    client models and the same candidates, so fedavg evaluates nothing new; eval-workers = 1
    and 2 give the same results.json figures."""
    T = 3
    grid = "0.5,1,2"
    runs = {}
    for workers in (1, 2):
        clear_cache()
        ta = config(
            strategy="task_arithmetic",
            lambda_grid=",".join(str(float(b) / T) for b in grid.split(",")),
            eval_workers=workers,
            results_dir=str(tmp_path / f"ta-{workers}"),
        )
        fedavg = config(
            strategy="fedavg",
            server_lr_grid=grid,
            eval_workers=workers,
            results_dir=str(tmp_path / f"fedavg-{workers}"),
        )
        runs[workers] = [run_federation(InProcessGrid(T), c) for c in (ta, fedavg)]
    for workers, (ta, fedavg) in runs.items():
        assert ta["evaluation_cache"]["evaluated"] > 0
        assert fedavg["evaluation_cache"]["evaluated"] == 0, workers
        assert fedavg["selected_beta"] == pytest.approx(ta["selected_beta"])
        for run in (ta, fedavg):
            parts = run["timings"]["breakdown"]
            assert parts["total"] == pytest.approx(run["timings"]["total_seconds"])
            assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"])
            assert parts["client_training"] >= 0 and parts["ray_flower"] >= 0
            assert format_breakdown(parts).startswith("time ")
    for serial, parallel in zip(runs[1], runs[2], strict=True):
        assert serial["rounds"][-1]["splits"] == parallel["rounds"][-1]["splits"]
        assert serial["beta_search"] == parallel["beta_search"]
        assert serial["finetuned_splits"] == parallel["finetuned_splits"]
    both = add_breakdowns([r["timings"]["breakdown"] for r in runs[2]])
    assert both["total"] == pytest.approx(sum(r["timings"]["total_seconds"] for r in runs[2]))


def test_time_breakdown_splits_the_wait_into_training_and_overhead():
    class Round:
        wait_seconds, busy_seconds, aggregation_seconds = 10.0, 7.0, 0.5

    parts = time_breakdown(20.0, [Round(), Round()], evaluation=3.0, diagnostics=1.0, discovery=2)
    assert parts == {
        "total": 20.0,
        "client_training": 14.0,
        "ray_flower": 8.0,
        "aggregation": 1.0,
        "evaluation": 3.0,
        "diagnostics": 1.0,
        "other": -7.0,  # more than the wall time: said as measured, never clipped
    }
