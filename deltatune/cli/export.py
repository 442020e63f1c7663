"""``deltatune export``: llama.cpp's GGUF, of an adapter or of a merged model."""

from __future__ import annotations

import argparse
import sys

from deltatune.cli.common import BASE_HELP
from deltatune.config import ConfigError


def cmd_export(argv: list[str]) -> int:
    from deltatune.export import export_lora, export_merged

    parser = argparse.ArgumentParser(
        prog="deltatune export",
        description="Write llama.cpp's GGUF: a LoRA adapter as an adapter file (llama-cli -m BASE.gguf --lora "
        "OUT.gguf), or with --merged the base with the adapter folded in as one model file.",
    )
    parser.add_argument("--format", choices=["gguf"], default="gguf", help="the file format (default: gguf)")
    parser.add_argument("--base", default="smollm2-135m", help=BASE_HELP + " (default: %(default)s)")
    parser.add_argument("--adapter", help="adapter directory (deltatune or peft); --merged without it: the base")
    parser.add_argument("--output", required=True, help="the .gguf file to write")
    parser.add_argument("--merged", action="store_true", help="a whole model with the adapter merged in")
    parser.add_argument(
        "--outtype",
        choices=["f32", "f16", "q8_0"],
        help="tensor type: adapters f32 (default) or f16; merged models f32, f16 (default) or q8_0",
    )
    parser.add_argument(
        "--base-gguf",
        help="--merged: a GGUF of the base to take the tokenizer and hyper-parameters from "
        "(default: a built-in base's own file)",
    )
    args = parser.parse_args(argv)
    if args.merged:
        written = export_merged(args.base, args.adapter, args.output, args.outtype or "f16", args.base_gguf)
    else:
        if not args.adapter:
            raise ConfigError("--adapter is needed to export an adapter (or give --merged for a whole model)")
        written = export_lora(args.base, args.adapter, args.output, args.outtype or "f32")
    print(f"wrote {written}", file=sys.stderr)
    return 0
