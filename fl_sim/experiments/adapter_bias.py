"""The bias of federating LoRA adapters (FedIT) against federating their dense task vectors.

With LoRA clients (fl_sim/suites/lora.py) client t's round-1 adapter (A_t, B_t) gives the task
vector ΔW_t = s·B_t·A_t per target, s = α/r. One-shot FedAvg with weights p_t (β = 1) merges

    dense   (adapter-federation = dense):    W = W₀ + Σ_t p_t s B_t A_t
    adapter (adapter-federation = adapter):  W = W₀ + s (Σ_t p_t B_t)(Σ_t p_t A_t) = W₀ + s B̄ Ā

and the two differ by exactly

    s B̄ Ā − Σ_t p_t s B_t A_t = −s Σ_t p_t (B_t − B̄)(A_t − Ā)

(expand the right side: Σ p_t B_t A_t − B̄Ā − B̄Ā + B̄Ā), which is 0 for T = 1 or when every
client trains the same adapter, and for T = 2, p = (½, ½) is −(s/4)(B₁ − B₂)(A₁ − A₂). In
round 1 both modes train the same adapters from (W₀, A₀, B₀ = 0), so one set of client
trainings gives both merges: ``measure_adapter_bias`` trains every client once and reports,
per target, the relative Frobenius distance ‖s B̄Ā − Σ p_t s B_t A_t‖_F / ‖Σ p_t s B_t A_t‖_F,
and the val and test accuracy of both merged models.

    python -m fl_sim.experiments.adapter_bias --out bias.json \\
        --set task-suite=text --set adapter=lora --set local-steps=40
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import torch

from clients.local_training import fine_tune
from fl_sim.config.run_config import RunConfig
from fl_sim.errors import ConfigError
from fl_sim.outputs import write_json
from fl_sim.suites.base import SPLITS, TaskSuite, evaluate, load_federated_state
from fl_sim.suites.lora import LoraSuite
from fl_sim.suites.lora_settings import LoraSettings
from fl_sim.suites.registry import build_suite
from strategies.rule import client_weights

Adapter = Mapping[str, tuple[torch.Tensor, torch.Tensor]]  # target module → (A_t, B_t)


def adapters_of(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """target → (A, B) from an adapter-mode state (keys ``<target>.lora_A.weight`` / ``_B``)."""
    names = sorted(key[: -len(".lora_A.weight")] for key in state if key.endswith(".lora_A.weight"))
    return {
        name: (state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]) for name in names
    }


def fedit_bias(
    adapters: Sequence[Adapter], weights: Sequence[float], scaling: float
) -> dict[str, dict[str, torch.Tensor | float]]:
    """Per target: the dense merge Σ p_t s B_t A_t, FedIT's s B̄ Ā, and their relative
    Frobenius distance (module docstring); float64 throughout."""
    p = client_weights(len(adapters), list(weights))
    out: dict[str, dict[str, torch.Tensor | float]] = {}
    for name in adapters[0]:
        a = [adapter[name][0].double() for adapter in adapters]
        b = [adapter[name][1].double() for adapter in adapters]
        dense = sum(p[t] * scaling * (b[t] @ a[t]) for t in range(len(adapters)))
        a_mean = sum(p[t] * a[t] for t in range(len(adapters)))
        b_mean = sum(p[t] * b[t] for t in range(len(adapters)))
        fedit = scaling * (b_mean @ a_mean)
        norm = float(torch.linalg.matrix_norm(dense))
        distance = float(torch.linalg.matrix_norm(fedit - dense))
        out[name] = {
            "dense": dense,
            "fedit": fedit,
            "relative_frobenius": distance / norm if norm > 0 else 0.0,
        }
    return out


def _mean_accuracy(suite: TaskSuite, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    model = suite.build_model()
    load_federated_state(model, state)
    return {
        split: sum(evaluate(model, task, split)[1] for task in suite.eval_tasks)
        / len(suite.eval_tasks)
        for split in SPLITS
        if split != "train"
    }


def measure_adapter_bias(config: RunConfig) -> dict[str, object]:
    """Train every client once (round 1, adapter mode), then merge both ways (module doc)."""
    suite_keys = config.suite_config()
    if suite_keys["adapter"] != "lora":
        raise ConfigError("the adapter bias needs adapter=lora (set adapter=lora)")
    adapter_suite = build_suite({**suite_keys, "adapter-federation": "adapter"})
    assert isinstance(adapter_suite, LoraSuite)
    settings: LoraSettings = adapter_suite.settings
    dense_suite = LoraSuite(
        adapter_suite.base_suite,
        LoraSettings(settings.rank, settings.alpha, settings.dropout, settings.targets, "dense"),
    )
    theta0 = adapter_suite.initial_state()
    knobs = config.client_knobs()
    sizes = [adapter_suite.num_examples(t) for t in range(adapter_suite.num_tasks)]
    weights = client_weights(
        len(sizes), sizes if config.rule.weighting == "examples" else None
    ).tolist()
    adapters, losses_before, losses_after = [], [], []
    for t in range(adapter_suite.num_tasks):
        result = fine_tune(
            adapter_suite, t, theta0, knobs[t], full_batch=config.training.full_batch, round_index=1
        )
        update = result.update
        losses_before.append(result.loss_before)
        losses_after.append(result.loss_after)
        adapters.append(adapters_of({name: theta0[name] + update[name] for name in theta0}))
    bias = fedit_bias(adapters, weights, settings.scaling)
    w0 = dense_suite.initial_state()
    dense_state = {
        f"{name}.weight": w0[f"{name}.weight"] + figures["dense"].float()
        for name, figures in bias.items()
    }
    fedit_state = {
        name: sum(weights[t] * state[name] for t, state in enumerate(_states(adapters)))
        for name in theta0
    }
    distances = [float(figures["relative_frobenius"]) for figures in bias.values()]
    return {
        "config": config.to_mapping(),
        "weights": weights,
        "scaling": settings.scaling,
        "relative_frobenius": {name: float(f["relative_frobenius"]) for name, f in bias.items()},
        "relative_frobenius_mean": sum(distances) / len(distances),
        "relative_frobenius_max": max(distances),
        "bytes_per_client_round_by_mode": adapter_suite.adapter_report()[
            "bytes_per_client_round_by_mode"
        ],
        "client_loss": {"before": losses_before, "after": losses_after},
        "accuracy": {
            "theta0": _mean_accuracy(dense_suite, w0),
            "dense": _mean_accuracy(dense_suite, dense_state),
            "adapter": _mean_accuracy(adapter_suite, fedit_state),  # type: ignore[arg-type]
        },
    }


def _states(adapters: Sequence[Adapter]) -> list[dict[str, torch.Tensor]]:
    """Each client's adapter as an adapter-mode state."""
    return [
        {
            key: tensor
            for name, (a, b) in adapter.items()
            for key, tensor in ((f"{name}.lora_A.weight", a), (f"{name}.lora_B.weight", b))
        }
        for adapter in adapters
    ]


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        prog="python -m fl_sim.experiments.adapter_bias", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", help="a run-config TOML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="adapter_bias.json", help="the JSON report")
    args = parser.parse_args(argv)
    config = RunConfig.from_sources(args.config, ["experiment=single", *args.set])
    report = measure_adapter_bias(config)
    write_json(args.out, report)
    accuracy = report["accuracy"]
    print(
        f"relative Frobenius distance FedIT vs dense: mean {report['relative_frobenius_mean']:.4f}"
        f", max {report['relative_frobenius_max']:.4f}; test accuracy θ₀ "
        f"{accuracy['theta0']['test']:.4f}, dense {accuracy['dense']['test']:.4f}, "  # type: ignore[index]
        f"adapter {accuracy['adapter']['test']:.4f}"  # type: ignore[index]
    )
    return report


if __name__ == "__main__":
    main()
