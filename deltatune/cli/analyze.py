"""``deltatune analyze`` (what adapters learned, the LoRA paper's section 7) and ``deltatune inspect`` (a model's
modules, suggested targets and trainable counts)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deltatune import flags
from deltatune.cli.common import BASE_HELP, HEAD_CHOICES, QUANTIZE_CHOICES, QUANTIZE_HELP


def analyze_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltatune analyze", description="What adapters learned (the LoRA paper, section 7)."
    )
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="{subspace,delta}")
    for p in (_subspace_parser(sub), _delta_parser(sub)):
        p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
        p.add_argument("--output", help="folder for the plots (PNG) and the JSON result; none: no files")
        p.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: %(default)s)")
    return parser


def _subspace_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    sp = sub.add_parser(
        "subspace",
        help="overlap of two LoRA adapters' learned subspaces, φ(A, B, i, j), against random matrices",
        description="Grassmann similarity φ(i, j) = ‖U_A^iᵀ U_B^j‖_F² / min(i, j) of the top right-singular "
        "vectors of the A matrices, for every module both LoRA adapters adapt; needs only the two folders.",
    )
    sp.add_argument("a", metavar="A", help="first LoRA adapter folder (rows i of φ)")
    sp.add_argument("b", metavar="B", help="second LoRA adapter folder (columns j of φ), same base model")
    sp.add_argument(
        "--same-base",
        action="store_true",
        help="the adapters' differently named bases are one model: skip the name check (shapes are still checked)",
    )
    return sp


def _delta_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    dp = sub.add_parser(
        "delta",
        help="per module ‖ΔW‖_F, singular spectrum, effective rank and amplification factor",
        description="The weight delta of a LoRA, BitFit or partial adapter (or of a merged model folder) "
        "against its base model.",
    )
    dp.add_argument("adapter", metavar="ADAPTER", help="adapter folder, or a model folder written by deltatune merge")
    dp.add_argument("--base", help=BASE_HELP + " (default: the base the adapter records, if it is a folder here)")
    dp.add_argument(
        "--rank", type=int, help="top directions the amplification factor uses (default: the LoRA r, else 8)"
    )
    dp.add_argument(
        "--spectrum", type=int, default=64, help="singular values kept per module in --json (default: %(default)s)"
    )
    return dp


def cmd_analyze(argv: list[str]) -> int:
    from deltatune import analysis

    args = analyze_parser().parse_args(argv)
    if args.analysis == "subspace":
        result = analysis.analyze_subspace(args.a, args.b, seed=args.seed, same_base=args.same_base)
        table, plot = analysis.subspace.subspace_table, analysis.subspace.plot_subspace
    else:
        result = analysis.analyze_delta(args.adapter, args.base, args.rank, args.seed, args.spectrum)
        table, plot = analysis.delta.delta_table, analysis.delta.plot_delta
    if args.output:
        from deltatune.atomic import atomic_write_text

        plot(result, args.output)
        atomic_write_text(Path(args.output) / f"{args.analysis}.json", json.dumps(result))
    print(json.dumps(result) if args.json else table(result))
    return 0


def cmd_inspect(argv: list[str]) -> int:
    from deltatune import methods
    from deltatune.inspection import inspect_report
    from deltatune.loading import load_base

    parser = argparse.ArgumentParser(
        prog="deltatune inspect",
        description="Show a model's modules, suggested targets and trainable counts. "
        "The method's options are flags too (deltatune inspect --method NAME --r 8 ...).",
    )
    parser.add_argument("--base", default="smollm2-135m", help=BASE_HELP)
    parser.add_argument("--task", choices=HEAD_CHOICES, help="the model head to load (default: the model's own)")
    parser.add_argument("--method", default="lora", help=f"the PEFT method, one of: {', '.join(methods.CONFIGS)}")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    known, rest = parser.parse_known_args(argv)
    config_cls = methods.config_class_for_name(known.method)
    method_parser = argparse.ArgumentParser(prog=f"deltatune inspect --method {known.method}")
    flags.add_dataclass_flags(method_parser, config_cls)
    options = vars(method_parser.parse_args(rest))
    flags.normalise_targets(options)
    method_config = config_cls(**options)  # bad options fail before the model loads
    model, _ = load_base(known.base, task=known.task, quantize=known.quantize)
    print(inspect_report(model, known.method, method_config, options))
    return 0
