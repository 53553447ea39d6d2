"""Declared faults (clients/fault_injection.py): Byzantine updates, crashes and slow
clients.

In-process (``InProcessGrid``: the real ClientApp and ServerApp, no Ray). The claims:
a non-finite update never reaches the global model; crashed and timed-out clients are recorded
and the round goes on with ≥ min-clients; a scaled attacker drags FedAvg far from the honest
aggregate while median and centred clipping stay close.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable

import pytest
import torch
from flwr.app import Message
from helpers import InProcessGrid, config
from safetensors.torch import load_file

from clients.fault_injection import (
    attack_update,
    parse_byzantine,
    parse_crash,
    parse_slow,
)
from fl_sim.errors import ConfigError
from fl_sim.federation.server_app import run_federation

pytestmark = pytest.mark.usefixtures("one_thread", "isolated_cache")


def global_model(results_dir) -> dict[str, torch.Tensor]:
    return load_file(results_dir / "global_model.safetensors")


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(
        sum(
            float((a[n].double() - b[n].double()).pow(2).sum())
            for n in a
            if a[n].is_floating_point()
        )
    )


class TimeoutGrid(InProcessGrid):
    """As Flower's engines: a reply that takes longer than ``timeout`` never arrives."""

    def send_and_receive(self, messages: Iterable[Message], *, timeout=None) -> list[Message]:
        replies = []
        for msg in messages:
            start = time.monotonic()
            [reply] = super().send_and_receive([msg], timeout=timeout)
            if timeout is None or time.monotonic() - start <= timeout:
                replies.append(reply)
        return replies


# ---------------------------------------------------------------------------------------------
# Parsing: declared in config, one-line errors
# ---------------------------------------------------------------------------------------------


def test_fault_keys_parse_into_per_client_faults():
    cfg = config(
        byzantine="0:scale:-10, 2:gaussian:0.5",
        crash="1:2,1:3",
        slow="2:1.5",
        fail_client=0,
        fail_round=4,
        min_clients=1,
    )
    faults = cfg.declared_faults()
    assert faults.byzantine == {0: "scale:-10", 2: "gaussian:0.5"}
    assert faults.crash == {(1, 2), (1, 3), (0, 4)}  # fail-client / fail-round kept working
    assert faults.slow == {2: 1.5}
    assert parse_byzantine("", 3) == {} and parse_crash(" ", 3) == set() and parse_slow("", 3) == {}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"byzantine": "1:explode"}, "byzantine: unknown attack 'explode'"),
        ({"byzantine": "5:nan"}, "byzantine: cannot read '5:nan'"),
        ({"byzantine": "1:scale:x"}, "byzantine: cannot read 'x'"),
        ({"byzantine": "1:gaussian:-1"}, "gaussian σ must be ≥ 0"),
        ({"byzantine": "1:nan,1:sign-flip"}, "names a client twice"),
        ({"byzantine": "nan"}, "byzantine: cannot read 'nan'"),
        ({"crash": "1:0"}, "crash: round must be an integer ≥ 1"),
        ({"slow": "0:-1"}, "slow: seconds must be ≥ 0"),
        ({"slow": "0:inf"}, "needs a finite number"),
        ({"round-timeout": -1.0}, "round-timeout must be a finite number"),
        ({"node-wait": -1.0}, "node-wait must be a finite number"),
        ({"node-wait": float("nan")}, "node-wait must be a finite number"),
    ],
)
def test_bad_fault_keys_are_one_line_config_errors(values, message):
    with pytest.raises(ConfigError) as error:
        config(**{k.replace("-", "_"): v for k, v in values.items()})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_attacks_change_only_floating_point_tensors_and_are_seeded():
    update = {"w": torch.tensor([1.0, -2.0]), "ids": torch.arange(3)}
    assert torch.equal(attack_update(update, "scale:-10", seed=0)["w"], torch.tensor([-10.0, 20.0]))
    assert torch.equal(attack_update(update, "sign-flip", seed=0)["w"], torch.tensor([-1.0, 2.0]))
    assert torch.isnan(attack_update(update, "nan", seed=0)["w"]).all()
    noisy = attack_update(update, "gaussian:0.5", seed=3)["w"]
    assert torch.equal(noisy, attack_update(update, "gaussian:0.5", seed=3)["w"])
    assert not torch.equal(noisy, attack_update(update, "gaussian:0.5", seed=4)["w"])
    for attack in ("scale:2", "sign-flip", "gaussian:1", "nan"):
        assert torch.equal(attack_update(update, attack, seed=0)["ids"], update["ids"])
    assert torch.equal(update["w"], torch.tensor([1.0, -2.0]))  # the honest update is kept


# ---------------------------------------------------------------------------------------------
# Behaviour, end to end in-process
# ---------------------------------------------------------------------------------------------


def test_nan_update_is_rejected_and_the_global_model_is_fedavg_of_the_honest_ones(
    tmp_path, task_identity
):
    attacked = run_federation(
        InProcessGrid(3),
        config(byzantine="1:nan", min_clients=2, results_dir=str(tmp_path / "nan")),
    )
    [failure] = attacked["failures"]
    assert (failure["round"], failure["task"], failure["phase"]) == (1, 1, "train")
    assert failure["reason"].startswith("non-finite update")
    assert attacked["rounds"][1]["training"]["clients"] == [0, 2]
    honest = run_federation(  # the attacker simply absent
        InProcessGrid(3), config(crash="1:1", min_clients=2, results_dir=str(tmp_path / "crash"))
    )
    [crash] = honest["failures"]
    assert crash["task"] == 1 and "fault injection: client 1 fails in round 1" in crash["reason"]
    merged = global_model(tmp_path / "nan")
    assert all(torch.isfinite(x).all() for x in merged.values())
    expected = global_model(tmp_path / "crash")
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0)


def test_crashes_in_several_rounds_are_recorded_and_the_run_goes_on(tmp_path, task_identity):
    results = run_federation(
        InProcessGrid(3),
        config(num_rounds=3, crash="1:2,2:3,1:3", min_clients=1, results_dir=str(tmp_path)),
    )
    assert results["status"] == "completed"
    assert sorted((f["round"], f["task"]) for f in results["failures"]) == [(2, 1), (3, 1), (3, 2)]
    assert [r["training"]["clients"] for r in results["rounds"][1:]] == [[0, 1, 2], [0, 2], [0]]


def test_a_slow_client_past_the_round_timeout_is_recorded_as_failed(tmp_path, task_identity):
    results = run_federation(
        TimeoutGrid(3),
        # margins for a loaded 2-core CI machine: a toy client trains in ≪ 1 s, client 2 sleeps 2 s
        config(slow="2:2", round_timeout=1.0, min_clients=2, results_dir=str(tmp_path)),
    )
    [failure] = results["failures"]
    assert (failure["task"], failure["reason"]) == (2, "no reply before the round's timeout")
    assert results["rounds"][1]["training"]["clients"] == [0, 1]


def test_scaled_attacker_degrades_fedavg_while_median_and_cclip_stay_close(tmp_path, task_identity):
    """5 clients, client 1 sends −10·Δ_1: distance of each rule's model to the honest FedAvg."""
    base = {"num_tasks": 5, "min_clients": 4}
    run_federation(InProcessGrid(5), config(**base, crash="1:1", results_dir=str(tmp_path / "h")))
    honest = global_model(tmp_path / "h")
    rules = {
        "fedavg": {},
        "median": {"strategy": "median"},
        "cclip": {"strategy": "cclip", "tau_c_auto": True},
    }
    distances = {}
    for attack in ("scale:-10", "scale:10"):
        for rule, knobs in rules.items():
            folder = tmp_path / f"{rule}{attack}"
            run_federation(
                InProcessGrid(5),
                config(**base, **knobs, byzantine=f"1:{attack}", results_dir=str(folder)),
            )
            distances[rule, attack] = distance(global_model(folder), honest)
    print(distances)
    for attack in ("scale:-10", "scale:10"):
        fedavg = distances["fedavg", attack]
        assert fedavg > 3 * distances["median", attack]
        assert fedavg > 3 * distances["cclip", attack]
