"""The ``fl-sim`` command line: ``fl-sim merge`` (and the subcommands registered below)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from fl_sim.errors import FlSimError

MERGE_DESCRIPTION = """\
Merge fine-tuned models with a Federated-Learning aggregation rule, one-shot:

    Δ_t = θ_t − θ₀,    θ = θ₀ + β · A(Δ₁..Δ_T)

Task Arithmetic (θ₀ + λ Σ_t Δ_t) is one-shot FedAvg with p_t = 1/T and β = λT.
Every rule's A is mean-like, so --server-lr (β) means the same for all of them;
--lambda is the paper's λ (β = λT for {sum_rules};
β = λ for {mean_rules}). With neither, β = 1.

BASE and each FT may be a Hugging Face folder (model.safetensors or a sharded
model.safetensors.index.json) or a single .safetensors file; an FT may also be a PEFT
LoRA adapter folder (adapter_config.json + adapter_model.safetensors) trained on BASE,
whose Δ is (α/r)·B·A per target module. Folders in → OUT is a Hugging Face folder
(config and tokenizer copied from BASE; sharded past --max-shard-size); files in → OUT
is a .safetensors file. --to-adapter --rank R writes OUT as a rank-R LoRA adapter
instead (truncated SVD of the merged ΔW per module). merge_report.json (in OUT, or
OUT's sibling <stem>.merge_report.json) holds the weights, effective weights w_t and
χ²(p‖w), task-vector norms and cosines, the rule's own figures, which inputs were
adapters and the time taken."""

MERGE_EPILOG = """\
examples:
  fl-sim merge --method task_arithmetic --lambda 0.3 --base base/ --out merged/ ft1/ ft2/ ft3/
  fl-sim merge --method fednova --train-meta meta.json --base base/ --out m/ ft1/ ft2/
  fl-sim merge --method cclip --tau-c 5 --iters 2 \
      --base base.safetensors --out merged.safetensors ft1.safetensors ft2.safetensors
  fl-sim merge merge.yaml --out merged/   # mergekit-style: merge_method, base_model, models
  fl-sim merge --method ties --base base/ --out merged/ --max-shard-size 2GB lora1/ lora2/ ft3/
  fl-sim merge --method task_arithmetic --base base/ --out lora/ --to-adapter --rank 16 \
      lora1/ lora2/

--train-meta META.json: [{"steps": 500, "lr_sum": 0.5}, ...] (one per FT, in order) or
{"ft1/": {"steps": 500, "lr_sum": 0.5}, ...} keyed by path; a fl_sim_meta.json inside an
FT folder is read too. fednova needs it; every rule reports w_t and χ² from it."""


def add_merge_parser(subparsers: argparse._SubParsersAction) -> None:
    from strategies.fednova import A_NORMS
    from strategies.registry import RULE_NAMES, RULES

    parser = subparsers.add_parser(
        "merge",
        help="merge fine-tuned checkpoints with an FL rule (task_arithmetic, fednova, ...)",
        description=MERGE_DESCRIPTION.format(
            sum_rules=", ".join(n for n, s in RULES.items() if s.paper_scale == "sum"),
            mean_rules=", ".join(n for n, s in RULES.items() if s.paper_scale == "mean"),
        ),
        epilog=MERGE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        metavar="FT",
        help="fine-tuned models (folders or .safetensors), or one mergekit-style CONFIG.yaml",
    )
    parser.add_argument("--method", choices=RULE_NAMES, help="aggregation rule A")
    parser.add_argument("--base", metavar="BASE", help="the pre-trained model θ₀")
    parser.add_argument(
        "--out", metavar="OUT", help="output folder or .safetensors file (must not exist)"
    )
    parser.add_argument(
        "--lambda", dest="lam", type=float, metavar="L", help="the paper's λ (see above)"
    )
    parser.add_argument(
        "--server-lr", type=float, metavar="BETA", help="β, the server step (default 1)"
    )
    parser.add_argument(
        "--weights",
        metavar="W1,W2,...",
        help="client weights p_t, normalised to sum 1 (default uniform)",
    )
    parser.add_argument(
        "--a-norm",
        choices=A_NORMS,
        default=None,
        help="how ‖a_t‖₁ counts local work: lr-sum = Σ_k η_t⁽ᵏ⁾ (default), "
        "steps = K_t (the paper's code)",
    )
    parser.add_argument(
        "--train-meta", metavar="META.json", help="each FT's steps and lr_sum (see below)"
    )
    parser.add_argument(
        "--paper-defaults",
        action="store_true",
        default=None,
        help="the paper's authors' choices where fl-sim's defaults differ, for what is not "
        "given: --a-norm steps, --median-mode lower (YAML: paper_defaults: true)",
    )
    add_knob_flags(parser)
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="where to aggregate (default auto)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="dtype of OUT's float tensors (default: the base's); math runs in float32",
    )
    parser.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        default=None,
        help="largest weights file of a folder OUT: 5GB (default), 500MB, 10KB, 2GiB or bytes; "
        "a larger model is written as model-0000i-of-0000n.safetensors + index",
    )
    parser.add_argument(
        "--to-adapter",
        action="store_true",
        default=None,
        help="write OUT as a PEFT LoRA adapter (every FT must be a LoRA adapter); needs --rank",
    )
    parser.add_argument(
        "--rank",
        type=int,
        metavar="R",
        default=None,
        help="rank of --to-adapter's output per module (exact when R ≥ the sum of the "
        "inputs' ranks, for linear rules); merge_report.json gives the truncation error",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="also read pickled .bin/.pt files, with torch.load(weights_only=True)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace OUT if it exists (only once the new one is complete)",
    )
    parser.add_argument(
        "--no-stats",
        action="store_true",
        help="skip task-vector norms and cosines in the report "
        "(faster: linear rules then skip Δ_t)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_merge_command)


def knob_flags() -> dict[str, str]:
    """YAML name → argparse dest of every rule knob's ``fl-sim merge`` flag (the registry)."""
    from strategies.registry import all_knob_infos

    return {info.yaml: "knob_" + info.yaml for info in all_knob_infos()}


def add_knob_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per rule knob, derived from the registry; rules that share a flag (``--density``
    of ties and dare) share it, with one help line each."""
    from strategies.registry import all_knob_infos

    by_flag: dict[str, list] = {}
    for info in all_knob_infos():
        by_flag.setdefault(info.flag, []).append(info)
    for flag, infos in by_flag.items():
        first = infos[0]
        helps = "; ".join(
            (i.help if i.help.startswith(f"{i.rule}:") else f"{i.rule}: {i.help}")
            + f" (default {i.default})"
            for i in infos
        )
        helps = helps.replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, object] = {"dest": "knob_" + first.yaml, "default": None, "help": helps}
        if first.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = {"float": float, "int": int, "str": str}[first.kind]
            kwargs["metavar"] = first.yaml.upper()
            if first.choices:
                kwargs["choices"] = first.choices
        parser.add_argument(flag, **kwargs)


def run_merge_command(args: argparse.Namespace) -> int:
    from fl_sim.merge.options import build_merge_options, options_from_yaml
    from fl_sim.merge.run import run_merge

    flags = {
        "method": args.method,
        "base": args.base,
        "out": args.out,
        "lam": args.lam,
        "server_lr": args.server_lr,
        "weights": args.weights,
        "a_norm": args.a_norm,
        "train_meta": args.train_meta,
        "paper_defaults": args.paper_defaults,
        **{yaml: getattr(args, dest) for yaml, dest in knob_flags().items()},
        "device": args.device,
        "dtype": args.dtype,
        "max_shard_size": args.max_shard_size,
        "to_adapter": args.to_adapter,
        "rank": args.rank,
    }
    if len(args.inputs) == 1 and args.inputs[0].endswith((".yaml", ".yml")):
        kwargs = options_from_yaml(args.inputs[0], flags)
    else:
        for flag in ("method", "base", "out"):
            if flags[flag] is None:
                raise FlSimError(f"missing --{flag} (see fl-sim merge --help)")
        kwargs = {k: v for k, v in flags.items() if v is not None}
        kwargs["models"] = args.inputs
    options = build_merge_options(
        **kwargs, allow_pickle=args.allow_pickle, force=args.force, statistics=not args.no_stats
    )
    result = run_merge(options, progress=not args.no_progress)
    report = result.report
    print(
        f"merged {len(options.models)} models with {options.method} (β = {options.server_lr:g}) "
        f"→ {options.out}  [{report['seconds']['merge']:.2f} s, "
        f"{report['input_gb_per_s']:.2f} GB/s of input; report: {result.report_path}]"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-sim",
        description="Task Arithmetic is one-shot FedAvg: simulate federations and merge "
        "fine-tuned models with FL aggregation rules.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from fl_sim.cli.run import add_run_parser
    from fl_sim.experiments.demo import add_demo_parser
    from fl_sim.experiments.sweep import add_sweep_parser

    add_run_parser(subparsers)
    add_merge_parser(subparsers)
    add_demo_parser(subparsers)
    add_sweep_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FlSimError as err:
        print(f"fl-sim: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fl-sim: interrupted; nothing half-written was left at the output", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
