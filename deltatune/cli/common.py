"""Pieces several commands share: the --base/--quantize help, attention and decoding flags."""

from __future__ import annotations

import argparse
from typing import Any

BASE_HELP = "base model: a built-in name (smollm2-135m, ...) or a local transformers model directory"
QUANTIZE_HELP = (
    "store the frozen base quantized: int8 (weight-only), nf4 (4-bit, needs bitsandbytes) or gguf (a GGUF file's "
    "own Q4_0/Q4_1/Q8_0 blocks)"
)
QUANTIZE_CHOICES = ["int8", "nf4", "gguf"]
HEAD_CHOICES = ["causal-lm", "classification", "feature-extraction"]


def attention_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """``--attention PATTERN`` and that pattern's options; returns the option names."""
    from deltatune.attention.flags import add_attention_flags, chosen_pattern

    return add_attention_flags(parser, chosen_pattern(argv))


def attention_options(args: argparse.Namespace, names: set[str]) -> dict[str, Any]:
    """The pattern's options from the parsed flags, checked before any model loads."""
    options = {k: v for k, v in vars(args).items() if k in names}
    if args.attention and args.attention != "sdpa":  # sdpa: full attention, nothing to load or check
        from deltatune.attention import options_for

        options_for(args.attention, **options)
    return options


def decoding_flags(parser: argparse.ArgumentParser, max_new_tokens: int, sampling: bool) -> None:
    """The decoding options of eval (greedy/beam) and generate (also sampling)."""
    group = parser.add_argument_group("decoding options")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="most tokens generated per input")
    group.add_argument("--num-beams", type=int, default=1, help="beam search with this many beams (default: greedy)")
    group.add_argument("--length-penalty", type=float, default=1.0, help="beam score / length**this (default: 1)")
    group.add_argument("--no-repeat-ngram-size", type=int, default=0, help="never repeat an n-gram this long")
    if sampling:
        group.add_argument("--temperature", type=float, default=0.0, help="above 0: sample (default: 0, greedy)")
        group.add_argument("--top-p", type=float, default=1.0, help="sample from the top-p probability mass")
        group.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all)")
        group.add_argument("--seed", type=int, help="seed of the sampling, for reproducible outputs")
        group.add_argument("--stop", nargs="+", default=[], help="end a completion at any of these strings")


def parsed_decoding(args: argparse.Namespace):
    """The parsed decoding flags as a :class:`~deltatune.generation.Decoding` (which checks them)."""
    from deltatune.generation import Decoding

    return Decoding(
        max_new_tokens=args.max_new_tokens,
        num_beams=args.num_beams,
        length_penalty=args.length_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram_size,
        temperature=getattr(args, "temperature", 0.0),
        top_p=getattr(args, "top_p", 1.0),
        top_k=getattr(args, "top_k", 0),
        seed=getattr(args, "seed", None),
        stop=tuple(getattr(args, "stop", ())),
    )
