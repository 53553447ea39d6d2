"""A text batch's length pieces on several threads (fl_sim/suites/piece_lanes.py).

Claims: (a) a client's fine-tune gives a bit-identical Δ_t and losses whether its steps run as
one autograd graph (as before the lanes) or their pieces on 1, 2 or 3 lanes, on the real
all-MiniLM-L6-v2 from the cached prefix, on a tiny BERT with every layer federated (token ids,
embeddings trained), and with a shared, trained head, its optimizer (AdamW, SGD, SGD with
momentum) split into parts that step side by side; (b) the lanes apply only where the pieces
can run apart; (c) ``CoreMeter`` counts as free what the rest of the machine left idle, so a
client never takes the core another client is using.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import save_tiny_bert

import fl_sim.suites.piece_lanes as piece_lanes
from clients.knobs import TrainingKnobs
from clients.local_training import fine_tune
from fl_sim.suites.lora import LoraSuite
from fl_sim.suites.lora_settings import LoraSettings
from fl_sim.suites.piece_lanes import CoreMeter, PieceLanes, balanced_parts
from fl_sim.suites.registry import make_suite
from fl_sim.suites.shared_head import SharedHeadSuite

SMALL = {"tasks": ["arity", "visibility"], "train_per_class": 12, "eval_per_class": 4}
KNOBS = TrainingKnobs(lr=1e-4, local_steps=5, batch_size=16, optimizer="adamw", seed=3)

pytestmark = pytest.mark.usefixtures("module_one_thread")


@pytest.fixture(scope="module")
def minilm():
    return make_suite("text", **SMALL)


def fine_tunes(suite, monkeypatch, lanes_list=(1, 2, 3), t=1, knobs=KNOBS):
    """The one-graph fine-tune (one optimizer, one thread), then one per number of lanes in
    ``lanes_list`` (the parameters in 3 parts, each with its own optimizer)."""
    applies = PieceLanes.applies
    theta0 = suite.initial_state()
    with monkeypatch.context() as patch:
        patch.setattr(PieceLanes, "applies", staticmethod(lambda model, groups: False))
        results = [fine_tune(suite, t, theta0, knobs, round_index=1)]
    assert applies(suite.build_model(), suite.training_groups(t))
    for lanes in lanes_list:
        with monkeypatch.context() as patch:
            patch.setattr(CoreMeter, "lanes", lambda self, most, n=lanes: min(n, most))
            patch.setattr(piece_lanes, "cores_of_process", lambda: 3)
            results.append(fine_tune(suite, t, theta0, knobs, round_index=1))
    return results


def assert_bit_identical(results) -> None:
    one_graph, *others = results
    assert any(float(d.abs().max()) > 0 for d in one_graph.update.values())
    for other in others:
        assert sorted(other.update) == sorted(one_graph.update)
        for name, delta in one_graph.update.items():
            assert torch.equal(other.update[name], delta), name
        assert other.loss_before == one_graph.loss_before
        assert other.loss_after == one_graph.loss_after


def test_minilm_from_the_cached_prefix_is_bit_identical_on_any_number_of_lanes(minilm, monkeypatch):
    x = minilm.training_groups(1)[0].x[:16]
    assert len(minilm.build_model().encoder.pieces(x)[1]) > 2  # the batches have pieces to share
    assert_bit_identical(fine_tunes(minilm, monkeypatch))


@pytest.mark.parametrize("optimizer", ["sgd", "sgd-momentum"])
def test_the_split_optimizer_steps_sgd_bit_identically_too(minilm, monkeypatch, optimizer):
    """Each part's optimizer moves its parameters as the one optimizer does (weight decay and
    momentum included)."""
    knobs = dataclasses.replace(KNOBS, optimizer=optimizer, lr=0.05, weight_decay=0.01)
    assert_bit_identical(fine_tunes(minilm, monkeypatch, (1, 3), knobs=knobs))


def test_balanced_parts_are_contiguous_non_empty_and_even():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=generator))
        sizes = torch.randint(1, 100, (n,), generator=generator).tolist()
        for count in (1, 2, 3, 5):
            parts = balanced_parts(sizes, count)
            assert [j for part in parts for j in part] == list(range(n))
            assert len(parts) == min(count, n) and all(parts)
            totals = [sum(sizes[j] for j in part) for part in parts]
            assert max(totals) - min(totals) <= 2 * max(sizes)
    assert balanced_parts([5, 5, 5, 5], 2) == [[0, 1], [2, 3]]
    assert balanced_parts([], 2) == [[]]


def test_tiny_bert_with_every_layer_federated_is_bit_identical(tmp_path, monkeypatch):
    folder = save_tiny_bert(tmp_path / "bert")
    suite = make_suite("text", model=f"hf:{folder}", federated_layers="all", **SMALL)
    results = fine_tunes(suite, monkeypatch, (2,))
    assert any(name.endswith("word_embeddings.weight") for name in results[0].update)
    assert_bit_identical(results)


def test_a_shared_trained_head_is_bit_identical(minilm, monkeypatch):
    suite = SharedHeadSuite(minilm, 2)
    results = fine_tunes(suite, monkeypatch, (2,), t=0)
    assert any(name.startswith("heads.0.") for name in results[0].update)
    assert_bit_identical(results)


def test_the_lanes_apply_only_where_the_pieces_run_apart(minilm):
    model = minilm.build_model()
    assert PieceLanes.applies(model, minilm.training_groups(0))
    mixed = make_suite("text", mixing=0.5, **SMALL)
    assert len(mixed.training_groups(0)) == 2
    assert not PieceLanes.applies(mixed.build_model(), mixed.training_groups(0))
    lora = LoraSuite(minilm, LoraSettings(rank=2, alpha=4.0, dropout=0.1, targets=("query",)))
    assert not PieceLanes.applies(lora.build_model(), lora.training_groups(0))
    digits = make_suite("digits", num_tasks=2)
    assert not PieceLanes.applies(digits.build_model(), digits.training_groups(0))


class Machine:
    """A fake clock, machine-busy and own-CPU counters for CoreMeter."""

    def __init__(self) -> None:
        self.wall, self.busy, self.own = 0.0, 0.0, 0.0

    def run(self, seconds: float, others: float, own: float) -> None:
        """``seconds`` of wall time with ``others`` cores busy elsewhere and ``own`` here."""
        self.wall += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own

    def meter(self, cores: int = 2) -> CoreMeter:
        return CoreMeter(
            cores,
            busy_seconds=lambda: self.busy,
            own_seconds=lambda: self.own,
            clock=lambda: self.wall,
        )


def test_core_meter_counts_only_what_the_rest_of_the_machine_leaves_idle():
    machine = Machine()
    meter = machine.meter()
    assert meter.lanes(2) == 1  # nothing measured yet: take nothing
    machine.run(0.6, others=1.0, own=1.0)  # another client trains beside this one
    assert meter.lanes(2) == 1
    machine.run(0.6, others=0.05, own=1.0)  # alone: the other core is idle
    assert meter.free_cores() == pytest.approx(1.95)
    assert meter.lanes(2) == 2
    machine.run(0.6, others=0.05, own=1.9)  # its own second lane does not count against it
    assert meter.lanes(2) == 2 and meter.lanes(1) == 1
    machine.run(0.2, others=1.0, own=1.9)  # within the window: the last figure stands
    assert meter.lanes(2) == 2
    machine.run(0.4, others=1.0, own=1.0)  # another client started again
    assert meter.lanes(2) == 1
    machine.run(0.6, others=2.5, own=1.0)  # overloaded: never below one lane
    assert meter.free_cores() == 0.0 and meter.lanes(4) == 1


def test_core_meter_without_proc_stat_never_takes_a_core():
    machine = Machine()
    meter = CoreMeter(4, busy_seconds=lambda: None, clock=lambda: machine.wall)
    machine.run(1.0, others=0.0, own=1.0)
    assert meter.lanes(4) == 1


def test_machine_busy_seconds_reads_proc_stat(tmp_path, monkeypatch):
    stat = tmp_path / "stat"
    ticks = int(piece_lanes.os.sysconf("SC_CLK_TCK"))
    # user nice system idle iowait irq softirq steal
    stat.write_text(f"cpu  {3 * ticks} 0 {ticks} {50 * ticks} {2 * ticks} 0 0 0 0 0\ncpu0 1\n")
    monkeypatch.setattr(piece_lanes, "PROC_STAT", stat)
    assert piece_lanes.machine_busy_seconds() == pytest.approx(4.0)
    monkeypatch.setattr(piece_lanes, "PROC_STAT", tmp_path / "missing")
    assert piece_lanes.machine_busy_seconds() is None
