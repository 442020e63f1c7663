"""``deltatune`` command line: train, eval, generate, export, merge, inspect. Thin over the library.

Flags of ``train`` come from :class:`~deltatune.training.config.TrainConfig` and from the chosen
method's config class (``--method lora --r 16 --target-modules q_proj v_proj``), so every library
option is a flag without a second list to keep in step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from deltatune import flags
from deltatune.cli_loop import cmd_eval, cmd_export, cmd_generate
from deltatune.config import ConfigError

# Re-exported: the flag helpers live in the library (deltatune.flags).
add_dataclass_flags = flags.add_dataclass_flags
_flag_kwargs = flags.flag_kwargs
_normalise_targets = flags.normalise_targets
BASE_HELP = "base model: a built-in name (smollm2-135m, ...) or a local transformers model directory"
QUANTIZE_HELP = (
    "store the frozen base quantized: int8 (weight-only), nf4 (4-bit, needs bitsandbytes) or gguf (a GGUF file's "
    "own Q4_0/Q4_1/Q8_0 blocks)"
)


# --- train ------------------------------------------------------------------------------------
def train_parser(method: str, attention: str = "sdpa") -> tuple[argparse.ArgumentParser, set[str], set[str]]:
    """``deltatune train``'s parser for ``method``: TrainConfig's flags in groups, then the method's options
    (and the attention pattern's). Returns the parser and the TrainConfig and method (+ attention) field names."""
    from deltatune import methods
    from deltatune.attention.flags import add_attention_flags, attention_help
    from deltatune.training.config import FLAG_CHOICES, FLAG_GROUPS, TrainConfig

    config_cls = methods.config_class_for_name(method)
    parser = argparse.ArgumentParser(
        prog="deltatune train",
        description="Fine-tune a base model with a PEFT method. "
        "With no arguments: LoRA on SmolLM2-135M, built-in JSON-extraction task. "
        "Several tasks: --data NAME=PATH ... or --task-column (HyperFormer gets a task id per row; "
        "other methods train one adapter on the union).",
        formatter_class=flags.HelpFormatter,
        epilog="Every option can also be given in a --config file (YAML/TOML), with its name as the key.",
    )
    parser.add_argument("--config", help="YAML or TOML file of options (flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    choices = {**FLAG_CHOICES, "method": tuple(methods.CONFIGS)}
    train_fields: set[str] = set()
    for title, names in FLAG_GROUPS.items():
        group = parser.add_argument_group(f"{title} options")
        train_fields |= add_dataclass_flags(group, TrainConfig, skip={"method_options"}, only=names, choices=choices)
    method_action = next(a for a in parser._actions if a.dest == "method")
    method_action.help = flags._escape(f"{flags.method_help()}\n(default: lora)")
    method_action.metavar = "NAME"
    attention_action = next(a for a in parser._actions if a.dest == "attention")
    attention_action.help, attention_action.metavar = flags._escape(f"{attention_help()}\n(default: sdpa)"), "PATTERN"
    rest = parser.add_argument_group("other options")
    train_fields |= add_dataclass_flags(rest, TrainConfig, skip={"method_options"} | train_fields)
    summary = flags.method_summaries()[method]
    group = parser.add_argument_group(f"{method} options (--method {method})", summary)
    method_fields = add_dataclass_flags(group, config_cls, skip=train_fields)
    parser.set_defaults(attention_fields=add_attention_flags(parser, attention, train_fields | method_fields, False))
    return parser, train_fields, method_fields


def cmd_train(argv: list[str]) -> int:
    cfg, print_config = train_config(argv)
    if print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from deltatune.training.trainer import train

    summary = train(cfg)
    return 130 if summary.get("interrupted") else 0


def train_config(argv: list[str]) -> tuple[object, bool]:
    """``deltatune train``'s flags (and --config file) as a TrainConfig, and whether --print-config was given."""
    from deltatune.training.config import build_config, read_config_file

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    file_values = read_config_file(known.config) if known.config else {}
    method = known.method or file_values.get("method", "lora")
    from deltatune.attention.flags import chosen_pattern

    attention = chosen_pattern(argv, file_values.get("attention", "sdpa"))
    parser, train_fields, method_fields = train_parser(method, attention)
    args = vars(parser.parse_args(argv))
    attention_fields = args["attention_fields"]
    values = {**file_values, **{k: v for k, v in args.items() if k in train_fields | method_fields | attention_fields}}
    _normalise_targets(values)
    return build_config(values, method_fields, attention_fields), bool(args["print_config"])


# --- eval / generate / merge / inspect ----------------------------------------------------------
def _attention_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """``--attention PATTERN`` and that pattern's options; returns the option names."""
    from deltatune.attention.flags import add_attention_flags, chosen_pattern

    return add_attention_flags(parser, chosen_pattern(argv))


def _attention_options(args: argparse.Namespace, names: set[str]) -> dict[str, Any]:
    """The pattern's options from the parsed flags, checked before any model loads."""
    from deltatune.attention import DEFAULT, options_for

    options = {k: v for k, v in vars(args).items() if k in names}
    if args.attention and args.attention != DEFAULT:
        options_for(args.attention, **options)
    return options


def cmd_merge(argv: list[str]) -> int:
    from deltatune.merging import PROBE_TEXTS, combine_adapters, merge_adapter, merge_quantized
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
    parser.add_argument(
        "--task",
        choices=["causal-lm", "classification", "feature-extraction"],
        help="the model head to load (default: the adapter's task)",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8", "nf4", "gguf"],
        help="the adapter was trained on a base quantized this way: merge onto it and report the error merging "
        "introduces (the written model is float: dequantized base + the adapter's delta)",
    )
    args = parser.parse_args(argv)
    if args.combine:
        if len(args.combine) < 2:
            parser.error("--combine TYPE ADAPTER [ADAPTER ...]: name the combination type and the adapters")
        kind, *adapters = args.combine
        options = {"svd_rank": args.svd_rank, "density": args.density}
        options["majority_sign_method"] = args.majority_sign_method
        weights = args.weights or [1.0] * len(adapters)
        output = combine_adapters(args.base, adapters, weights, kind, args.output, **options)
        print(f"combined adapter ({kind} of {len(adapters)}) written to {output}")
        return 0
    if not args.adapter:
        parser.error("--adapter is required (or --combine TYPE ADAPTER ...)")
    if args.quantize:
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
    else:
        output = merge_adapter(args.base, args.adapter, args.output, args.task)
    print(f"merged model written to {output} (load it with transformers' from_pretrained)")
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
    parser.add_argument(
        "--task",
        choices=["causal-lm", "classification", "feature-extraction"],
        help="the model head to load (default: the model's own)",
    )
    parser.add_argument("--method", default="lora", help=f"the PEFT method, one of: {', '.join(methods.CONFIGS)}")
    parser.add_argument("--quantize", choices=["int8", "nf4", "gguf"], help=QUANTIZE_HELP)
    known, rest = parser.parse_known_args(argv)
    config_cls = methods.config_class_for_name(known.method)
    method_parser = argparse.ArgumentParser(prog=f"deltatune inspect --method {known.method}")
    add_dataclass_flags(method_parser, config_cls)
    options = vars(method_parser.parse_args(rest))
    _normalise_targets(options)
    method_config = config_cls(**options)  # bad options fail before the model loads
    model, _ = load_base(known.base, task=known.task, quantize=known.quantize)
    print(inspect_report(model, known.method, method_config, options))
    return 0


def cmd_serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatune serve",
        description="An OpenAI-compatible server for one base model and many adapters: requests for any adapters "
        "share one batch, joining and leaving it at every decoding step (continuous batching).",
    )
    parser.add_argument("--base", default="smollm2-135m", help="base model: smollm2-135m or a local model dir")
    parser.add_argument("--quantize", choices=["int8", "nf4", "gguf"], help=QUANTIZE_HELP)
    parser.add_argument("--adapters", help="a directory of adapters (each sub-directory with adapter_config.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("DELTATUNE_API_KEY"),
        help="required as 'Authorization: Bearer KEY' on every request when set (default: $DELTATUNE_API_KEY)",
    )
    parser.add_argument("--max-batch", type=int, default=16, help="most requests generated together")
    parser.add_argument("--max-queue", type=int, default=256, help="most requests held; more get 429")
    parser.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    parser.add_argument(
        "--max-loaded-adapters",
        type=int,
        help="most adapters loaded at once; others load on demand, evicting the least recently used idle one "
        "(default: load every adapter at start)",
    )
    parser.add_argument(
        "--max-lora-rank",
        type=int,
        help="with --max-loaded-adapters: keep LoRA factors in preallocated slots padded to this rank (a step "
        "gathers by slot id); adapters of a higher rank are refused (default: no slots)",
    )
    parser.add_argument(
        "--scheduler",
        choices=["continuous", "dynamic"],
        default="continuous",
        help="continuous: rows join and leave at every step; dynamic: a batch runs until its last row ends",
    )
    parser.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens prefilled per step")
    parser.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for open requests")
    parser.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest request body (default: 1 MiB)")
    parser.add_argument("--max-prompt-tokens", type=int, help="longest prompt in tokens (default: the context)")
    parser.add_argument("--max-streams-per-key", type=int, help="most streams open at once per API key")
    args = parser.parse_args(argv)
    from deltatune.loading import load_base
    from deltatune.serving import Engine, Limits, create_app
    from deltatune.serving.server import serve

    if args.adapters and not Path(args.adapters).is_dir():
        raise ConfigError(f"--adapters {args.adapters} is not a directory")
    for flag in ("max_batch", "max_queue", "max_tokens_limit", "max_loaded_adapters", "max_lora_rank", "prefill_chunk"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_lora_rank is not None and args.max_loaded_adapters is None:
        raise ConfigError("--max-lora-rank sizes the adapter slots: give --max-loaded-adapters (the slots) too")
    model, tokenizer = load_base(args.base, quantize=args.quantize)
    name = Path(args.base).name if Path(args.base).is_dir() else args.base
    engine = Engine(
        model,
        tokenizer,
        name,
        args.adapters,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_loaded=args.max_loaded_adapters,
        max_lora_rank=args.max_lora_rank,
        scheduler=args.scheduler,
        prefill_chunk=args.prefill_chunk,
    )
    limits = Limits(
        max_tokens=args.max_tokens_limit,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_streams_per_key=args.max_streams_per_key,
    )
    print(f"serving {name} with {len(engine.adapters)} adapters ({args.scheduler} batching)", file=sys.stderr)
    serve(engine, create_app(engine, args.api_key, limits=limits), args.host, args.port, args.drain_timeout)
    return 0


# --- analyze / sweep ----------------------------------------------------------------------------
def cmd_analyze(argv: list[str]) -> int:
    from deltatune import analysis

    parser = argparse.ArgumentParser(
        prog="deltatune analyze", description="What adapters learned (the LoRA paper, section 7)."
    )
    sub = parser.add_subparsers(dest="analysis", required=True, metavar="{subspace,delta}")
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
    for p in (sp, dp):
        p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
        p.add_argument("--output", help="folder for the plots (PNG) and the JSON result; none: no files")
        p.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: %(default)s)")
    args = parser.parse_args(argv)
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


def cmd_sweep(argv: list[str]) -> int:
    from deltatune.analysis.sweep import sweep, sweep_table

    own, train_argv = _split_at_dashes(argv)
    parser = argparse.ArgumentParser(
        prog="deltatune sweep",
        description="Train one task at several LoRA ranks and/or seeds; the runs go side by side in --output-dir "
        "(r8-seed0/, r64-seed0/, ...) with sweep.json. Train flags follow '--', as for deltatune train.",
        epilog="example: deltatune sweep --ranks 8 64 --seeds 0 1 --output-dir runs/e2e -- --data train.jsonl "
        "--max-steps 200 --target-modules q_proj v_proj",
    )
    parser.add_argument("--ranks", type=int, nargs="+", help="LoRA ranks r to train (default: the train flags' r)")
    parser.add_argument("--seeds", type=int, nargs="+", help="seeds to train each rank with (default: --seed's)")
    parser.add_argument("--output-dir", required=True, help="folder for the runs and sweep.json")
    parser.add_argument("--json", action="store_true", help="print sweep.json's object instead of the table")
    args = parser.parse_args(own)
    cfg, _ = train_config(train_argv)
    result = sweep(cfg, args.output_dir, args.ranks, args.seeds)
    print(json.dumps(result) if args.json else sweep_table(result))
    return 0


def _split_at_dashes(argv: list[str]) -> tuple[list[str], list[str]]:
    """Own flags before ``--``, train flags after it."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "export": cmd_export,
    "merge": cmd_merge,
    "inspect": cmd_inspect,
    "serve": cmd_serve,
    "analyze": cmd_analyze,
    "sweep": cmd_sweep,
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"deltatune: unknown command {argv[0]!r}", file=sys.stderr)
        print(
            f"usage: deltatune {{{','.join(COMMANDS)}}} [options]   (deltatune COMMAND --help for each)",
            file=sys.stderr,
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (ConfigError, FileNotFoundError, ModuleNotFoundError) as err:
        message = err.args[0] if err.args else str(err)
        print(f"deltatune {argv[0]}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
