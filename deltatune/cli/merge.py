"""``deltatune merge``: fold an adapter into its base (also onto a quantized base), or combine LoRA adapters."""

from __future__ import annotations

import argparse

from deltatune.cli.common import BASE_HELP, HEAD_CHOICES, QUANTIZE_CHOICES


def merge_parser() -> argparse.ArgumentParser:
    from deltatune.methods.combine import COMBINATIONS

    parser = argparse.ArgumentParser(
        prog="deltatune merge",
        description="Fold an adapter into the base weights; write a plain model. With --combine: combine LoRA "
        "adapters into one new adapter (written to --output).",
    )
    parser.add_argument("--base", default="smollm2-135m", help=BASE_HELP)
    parser.add_argument("--adapter", help="adapter directory (deltatune or peft); required unless --combine")
    parser.add_argument(
        "--combine",
        nargs="+",
        metavar=("TYPE", "ADAPTER"),
        help=f"TYPE ADAPTER ADAPTER...: combine LoRA adapters; TYPE is one of {', '.join(COMBINATIONS)} "
        "(linear and cat: the exact weighted sum of the deltas; svd: its best rank --svd-rank approximation)",
    )
    parser.add_argument("--weights", nargs="+", type=float, help="one weight per combined adapter (default: 1 each)")
    parser.add_argument("--svd-rank", type=int, help="rank of an svd combination (default: the largest input rank)")
    parser.add_argument("--density", type=float, help="share of entries kept by ties/dare/magnitude_prune")
    parser.add_argument("--majority-sign-method", choices=["total", "frequency"], default="total")
    parser.add_argument("--output", required=True, help="new directory for the merged transformers model")
    parser.add_argument("--task", choices=HEAD_CHOICES, help="the model head to load (default: the adapter's task)")
    parser.add_argument(
        "--quantize",
        choices=QUANTIZE_CHOICES,
        help="the adapter was trained on a base quantized this way: merge onto it and report the error merging "
        "introduces (the written model is float: dequantized base + the adapter's delta)",
    )
    return parser


def cmd_merge(argv: list[str]) -> int:
    from deltatune.merging import merge_adapter

    parser = merge_parser()
    args = parser.parse_args(argv)
    if args.combine:
        return _combine(parser, args)
    if not args.adapter:
        parser.error("--adapter is required (or --combine TYPE ADAPTER ...)")
    quantized = args.quantize is not None
    output = _merge_quantized(args) if quantized else merge_adapter(args.base, args.adapter, args.output, args.task)
    print(f"merged model written to {output} (load it with transformers' from_pretrained)")
    return 0


def _combine(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from deltatune.merging import combine_adapters

    if len(args.combine) < 2:
        parser.error("--combine TYPE ADAPTER [ADAPTER ...]: name the combination type and the adapters")
    kind, *adapters = args.combine
    options = {"svd_rank": args.svd_rank, "density": args.density}
    options["majority_sign_method"] = args.majority_sign_method
    weights = args.weights or [1.0] * len(adapters)
    output = combine_adapters(args.base, adapters, weights, kind, args.output, **options)
    print(f"combined adapter ({kind} of {len(adapters)}) written to {output}")
    return 0


def _merge_quantized(args: argparse.Namespace) -> str:
    """Merge onto the quantized base and print the error merging introduces, both ways of writing it."""
    from deltatune.merging import PROBE_TEXTS, merge_quantized

    output, errors = merge_quantized(args.base, args.adapter, args.output, args.quantize, args.task)
    for name, what in (
        ("float", "written model (dequantized base + delta, float32)"),
        ("requantized", f"merged and requantized to {args.quantize} (merge_adapter() in memory)"),
    ):
        e = errors[name]
        print(
            f"{what}: max |Δlogits| {e['max_abs_logits']:.4g}, KL {e['kl']:.3g} nats/token "
            f"vs the {args.quantize} base + unmerged adapter, on a {len(PROBE_TEXTS)}-text probe batch"
        )
    return output
