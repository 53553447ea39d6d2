"""Several runs of an experiment at once (fl_sim/federation/run_schedule.py).

Runs that share their clients' round-1 work wait for the first of them (their lead); at most
``concurrent-runs`` run at once; a failure stops new runs and is raised after the runs under way
finish; and a whole compare run concurrently writes the same results as one after the other.
"""

import threading
import time

import pytest
import torch
from helpers import InProcessGrid, config

from fl_sim.errors import ConfigError
from fl_sim.experiments.compare import expand_experiment
from fl_sim.federation.evaluation import clear_cache
from fl_sim.federation.run_schedule import client_work_key, leads, run_all
from fl_sim.federation.server_app import run_federation

pytestmark = pytest.mark.usefixtures("isolated_cache")


def compare_runs(tmp_path, **values):
    return expand_experiment(
        config(
            experiment="compare",
            rules="task_arithmetic,fedavg,fednova",
            compare_beta_grid="0.5,1,2",
            multi_rounds=2,
            results_dir=str(tmp_path),
            **values,
        )
    )


class Recorder:
    """A run_one that sleeps and records when each run started and ended, and how many ran."""

    def __init__(self, configs, fail=None, seconds=0.05):
        self.index = {id(c): i for i, c in enumerate(configs)}
        self.fail, self.seconds = fail, seconds
        self.started, self.ended = {}, {}
        self.running = self.most = 0
        self.lock = threading.Lock()

    def __call__(self, cfg):
        i = self.index[id(cfg)]
        with self.lock:
            self.started[i] = time.monotonic()
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
            self.ended[i] = time.monotonic()
        if i == self.fail:
            raise ConfigError(f"run {i} failed")
        return i, torch.get_num_threads()


def test_one_shot_rules_follow_one_shot_ta_and_multi_round_rules_follow_multi_round_ta(tmp_path):
    runs = compare_runs(tmp_path)
    modes = [("one" if c.rule.num_rounds == 1 else "multi", c.rule.strategy) for c in runs]
    assert modes[0] == ("one", "task_arithmetic") and modes[3] == ("multi", "task_arithmetic")
    assert leads(runs) == [0, 0, 0, 3, 3, 3]
    assert client_work_key(runs[0]) != client_work_key(runs[3])  # 8 vs 4 local steps


@pytest.mark.parametrize("concurrency", [2, 3])
def test_followers_start_after_their_lead_and_at_most_k_run_at_once(tmp_path, concurrency):
    runs = compare_runs(tmp_path)
    record = Recorder(runs)
    results = run_all(record, runs, concurrency)
    assert [i for i, _ in results] == list(range(len(runs)))  # in the configs' order
    assert record.most == concurrency  # the leads ran side by side, then the followers
    for i, lead in enumerate(leads(runs)):
        if lead != i:
            assert record.started[i] >= record.ended[lead]
    # every run computes with the caller's torch thread count
    assert {threads for _, threads in results} == {torch.get_num_threads()}


def test_one_at_a_time_runs_in_order_in_the_callers_thread(tmp_path):
    runs = compare_runs(tmp_path)
    threads = []
    run_all(lambda c: threads.append(threading.get_ident()), runs, 1)
    assert threads == [threading.get_ident()] * len(runs)


def test_a_failure_stops_new_runs_and_raises_after_the_runs_under_way(tmp_path):
    runs = [config(lr=0.01 * (i + 1), results_dir=str(tmp_path / str(i))) for i in range(6)]
    assert leads(runs) == list(range(6))  # different lr: nothing shared, all may overlap
    record = Recorder(runs, fail=1, seconds=0.2)
    with pytest.raises(ConfigError, match="run 1 failed"):
        run_all(record, runs, 2)
    assert set(record.started) == set(record.ended)  # nothing left running
    assert 4 not in record.started and 5 not in record.started


def strip_timings(value):
    """results.json without what depends on the clock or the folders: seconds, timings, paths
    and cache counters (the second side starts from the same caches' misses, see below)."""
    if isinstance(value, dict):
        return {
            k: strip_timings(v)
            for k, v in value.items()
            if "seconds" not in k
            and k
            not in (
                "timings",
                "results-dir",
                "cache-dir",
                "concurrent-runs",
                "dir",
                "evaluation_cache",
            )
            and not k.startswith("client-")
        }
    if isinstance(value, list):
        return [strip_timings(v) for v in value]
    return value


def test_a_compare_run_three_at_a_time_writes_what_one_after_the_other_writes(
    tmp_path, task_identity
):
    """The whole compare (task_arithmetic, fedavg, fednova; one-shot with a β grid and 2-round
    multi-round) through the real ClientApp: the same results.json figures, every float
    equal, at concurrent-runs 1 and 3 (each side from an empty update and evaluation cache)."""
    sides = {}
    for k in (1, 3):
        clear_cache()
        runs = compare_runs(
            tmp_path / f"k{k}", concurrent_runs=k, cache_dir=str(tmp_path / f"cache{k}")
        )
        grid = InProcessGrid(3)
        sides[k] = run_all(lambda c, grid=grid: run_federation(grid, c), runs, k)
    assert len(sides[1]) == 6
    for one, three in zip(sides[1], sides[3], strict=True):
        assert strip_timings(one) == strip_timings(three)
    # the followers were answered from the update cache on both sides (multi-round fedavg and
    # fednova wholly: same schedules everywhere, so FedNova's round 2 is FedAvg's)
    for side in sides.values():
        assert [r["update_cache"]["cached"] for r in side] == [0, 3, 3, 0, 6, 6]


def test_concurrent_runs_below_one_is_a_one_line_error():
    with pytest.raises(ConfigError, match=r"concurrent-runs must be an integer ≥ 1, got 0"):
        config(concurrent_runs=0)


def test_the_time_line_of_overlapping_runs_says_they_overlap_and_gives_the_wall():
    from fl_sim.cli.run import time_line

    part = {"total": 10.0, "client_training": 6.0, "ray_flower": 2.0, "aggregation": 0.5}
    part |= {"evaluation": 1.0, "diagnostics": 0.5, "other": 0.0}
    runs = [{"timings": {"breakdown": part}}] * 3
    assert time_line(runs[:1]).startswith("time 10.0 s: client training 6.0 s")
    assert time_line(runs, 1).endswith("(3 runs)")
    line = time_line(runs, 2, 17.25)
    assert line.startswith("time 30.0 s: client training 18.0 s")
    assert line.endswith("(3 runs summed, up to 2 at once; wall 17.2 s)")
