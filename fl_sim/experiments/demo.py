"""``fl-sim demo``: make real fine-tuned checkpoints, then merge them with every rule.

A small BERT classifier (θ₀, seeded) is fine-tuned on T synthetic token-counting tasks — task t
asks whether a sequence holds more tokens of group A_t than of group B_t — with heterogeneous
learning rates and step counts (training heterogeneity, as in the paper's setting). Each client
is saved as a Hugging Face folder with its ``fl_sim_meta.json`` (K_t and Σ_k η_t⁽ᵏ⁾), then
``fl-sim merge`` runs every rule on them and each merged model is scored on every task. Runs in
well under a minute on a 2-core CPU; everything is made locally, nothing is downloaded.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch

from fl_sim.errors import ConfigError
from fl_sim.outputs import write_csv, write_json

VOCAB, SEQ_LEN, GROUP = 64, 16, 6
FIRST_TOKEN = 4  # ids below are special ([PAD]=0, [CLS]=1, ...)


@dataclass(frozen=True)
class CountingTask:
    """Label 1 when the sequence holds more tokens of ``group_a`` than of ``group_b``."""

    name: str
    group_a: tuple[int, ...]
    group_b: tuple[int, ...]

    def sample(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = torch.randint(FIRST_TOKEN, VOCAB, (n, SEQ_LEN), generator=generator)
        tokens[:, 0] = 1
        count_a = torch.isin(tokens, torch.tensor(self.group_a)).sum(1)
        count_b = torch.isin(tokens, torch.tensor(self.group_b)).sum(1)
        # ties are broken by the sequence's last token so every label is well defined
        label = (count_a > count_b) | ((count_a == count_b) & (tokens[:, -1] % 2 == 0))
        return tokens, label.long()


def make_tasks(num_tasks: int) -> list[CountingTask]:
    tokens = list(range(FIRST_TOKEN, VOCAB))
    if 2 * GROUP * num_tasks > len(tokens):
        raise ConfigError(f"demo: at most {len(tokens) // (2 * GROUP)} tasks, got {num_tasks}")
    return [
        CountingTask(
            f"count-{t}",
            tuple(tokens[2 * GROUP * t : 2 * GROUP * t + GROUP]),
            tuple(tokens[2 * GROUP * t + GROUP : 2 * GROUP * (t + 1)]),
        )
        for t in range(num_tasks)
    ]


def make_base_model(seed: int):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=SEQ_LEN,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def accuracy(model, task: CountingTask, seed: int, n: int = 1024) -> float:
    tokens, labels = task.sample(n, torch.Generator().manual_seed(seed))
    model.eval()
    with torch.no_grad():
        predicted = model(input_ids=tokens).logits.argmax(-1)
    return float((predicted == labels).float().mean())


def fine_tune(model, task: CountingTask, lr: float, steps: int, seed: int) -> dict[str, object]:
    """AdamW at a constant learning rate; returns K_t and Σ_k η_t⁽ᵏ⁾.

    For Adam-type optimizers no exact ‖a_t‖₁ exists: Σ_k η_t⁽ᵏ⁾ is the stand-in
    docs/design.md prescribes, and the metadata says so (``a_norm_exact``).
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        tokens, labels = task.sample(64, generator)
        loss = torch.nn.functional.cross_entropy(model(input_ids=tokens).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {"steps": float(steps), "lr_sum": lr * steps, "a_norm_exact": False}


def make_checkpoints(out: Path, num_tasks: int, seed: int) -> tuple[Path, list[Path]]:
    """θ₀ and T fine-tuned folders, with learning rates and steps spread over the clients."""
    tasks = make_tasks(num_tasks)
    base = make_base_model(seed)
    base.save_pretrained(out / "base")
    clients = []
    for t, task in enumerate(tasks):
        model = make_base_model(seed)
        lr = 1e-3 * 2.0 ** (t - (num_tasks - 1) / 2)  # learning rates ×2 apart
        steps = 60 + 40 * t
        meta = fine_tune(model, task, lr, steps, seed + 1 + t)
        folder = out / f"ft-{task.name}"
        model.save_pretrained(folder)
        write_json(folder / "fl_sim_meta.json", meta)
        clients.append(folder)
    return out / "base", clients


def run_demo(
    out: Path, num_tasks: int, seed: int, progress: bool = True
) -> list[dict[str, object]]:
    from transformers import AutoModelForSequenceClassification

    from fl_sim.merge.options import build_merge_options
    from fl_sim.merge.run import run_merge
    from strategies.cclip import auto_tau_c

    if out.exists():
        raise ConfigError(f"demo: {out} already exists (pass a new --out)")
    tasks = make_tasks(num_tasks)
    base, clients = make_checkpoints(out / "checkpoints", num_tasks, seed)

    def scores(folder: Path) -> list[float]:
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        return [accuracy(model, task, seed + 1000 + i) for i, task in enumerate(tasks)]

    own = [scores(folder)[t] for t, folder in enumerate(clients)]
    setups = {
        "task_arithmetic": {"lam": 0.3},
        "fedavg": {"server_lr": 1.0},
        "fednova": {"server_lr": 1.0},
        "fedgma": {"server_lr": 1.0, "rho": 0.5},
        "median": {"server_lr": 1.0},
        "cclip": {"server_lr": 1.0},  # τ_c: the median task-vector norm, measured below
    }
    rows: list[dict[str, object]] = [
        {"method": "base (θ₀)", "beta": 0.0, **dict(zip(_names(tasks), scores(base), strict=True))}
    ]
    norms: list[float] = []
    for method, knobs in setups.items():
        if method == "cclip":
            knobs = {**knobs, "tau_c": auto_tau_c(norms)}  # as tau-c-auto (v₀ = 0)
        options = build_merge_options(
            method=method,
            base=str(base),
            models=[str(c) for c in clients],
            out=str(out / "merged" / method),
            **knobs,
        )
        result = run_merge(options, progress=progress)
        norms = result.report["task_vectors"]["norms"]
        accuracies = scores(options.out)
        rows.append(
            {
                "method": method,
                "beta": options.server_lr,
                **dict(zip(_names(tasks), accuracies, strict=True)),
                "normalized": sum(a / o for a, o in zip(accuracies, own, strict=True)) / num_tasks,
                "chi_square": result.report["heterogeneity"]["chi_square"],
            }
        )
    rows.append(
        {
            "method": "fine-tuned (own task)",
            "beta": None,
            **dict(zip(_names(tasks), own, strict=True)),
        }
    )
    write_results(out, rows)
    return rows


def _names(tasks: list[CountingTask]) -> list[str]:
    return [task.name for task in tasks]


def write_results(out: Path, rows: list[dict[str, object]]) -> None:
    write_json(out / "demo_results.json", rows)
    write_csv(out / "demo_results.csv", rows)  # columns: every row's keys, first seen first


def print_table(rows: list[dict[str, object]]) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    widths = {f: max(len(f), *(len(_cell(r.get(f))) for r in rows)) for f in fields}
    print("  ".join(f.ljust(widths[f]) for f in fields))
    for row in rows:
        print("  ".join(_cell(row.get(f)).ljust(widths[f]) for f in fields))


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune a small BERT on T tasks, then merge the checkpoints with every rule",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", default="demo-out", help="folder to create (default demo-out)")
    parser.add_argument(
        "--tasks", type=int, default=4, help="number of tasks/clients T (default 4)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for data, θ₀ and training")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=_demo_command)


def _demo_command(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    rows = run_demo(Path(args.out), args.tasks, args.seed, progress=not args.no_progress)
    print_table(rows)
    print(f"\ncheckpoints, merged models and demo_results.json/csv are in {args.out}/")
    return 0
