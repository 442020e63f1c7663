"""``deltatune`` command line: train, eval, generate, merge, inspect. Thin over the library.

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

from deltatune import flags
from deltatune.config import ConfigError

# Re-exported: the flag helpers live in the library (deltatune.flags).
add_dataclass_flags = flags.add_dataclass_flags
_flag_kwargs = flags.flag_kwargs
_normalise_targets = flags.normalise_targets
BASE_HELP = "base model: a built-in name (smollm2-135m, ...) or a local transformers model directory"


# --- train ------------------------------------------------------------------------------------
def train_parser(method: str) -> tuple[argparse.ArgumentParser, set[str], set[str]]:
    """``deltatune train``'s parser for ``method``: TrainConfig's flags in groups, then the method's options.
    Returns the parser and the TrainConfig and method field names it parses."""
    from deltatune import methods
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
    rest = parser.add_argument_group("other options")
    train_fields |= add_dataclass_flags(rest, TrainConfig, skip={"method_options"} | train_fields)
    summary = flags.method_summaries()[method]
    group = parser.add_argument_group(f"{method} options (--method {method})", summary)
    method_fields = add_dataclass_flags(group, config_cls, skip=train_fields)
    return parser, train_fields, method_fields


def cmd_train(argv: list[str]) -> int:
    from deltatune.training.config import build_config, read_config_file

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    file_values = read_config_file(known.config) if known.config else {}
    method = known.method or file_values.get("method", "lora")
    parser, train_fields, method_fields = train_parser(method)
    args = vars(parser.parse_args(argv))
    values = {**file_values, **{k: v for k, v in args.items() if k in train_fields | method_fields}}
    _normalise_targets(values)
    cfg = build_config(values, method_fields)
    if args["print_config"]:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from deltatune.training.trainer import train

    summary = train(cfg)
    return 130 if summary.get("interrupted") else 0


# --- eval / generate / merge / inspect ----------------------------------------------------------
def cmd_eval(argv: list[str]) -> int:
    from deltatune.evaluation import evaluate_file

    parser = argparse.ArgumentParser(prog="deltatune eval", description="Evaluate a base model (+ adapter) on data.")
    parser.add_argument("--base", default="smollm2-135m", help=BASE_HELP + " (default: %(default)s)")
    parser.add_argument("--adapter", help="adapter directory (deltatune or peft); none: the base model alone")
    parser.add_argument("--data", required=True, help="evaluation data file (.jsonl/.json/.csv/.tsv/.txt)")
    parser.add_argument(
        "--task", choices=["causal-lm", "classification"], help="the task (default: the base model's natural task)"
    )
    parser.add_argument("--num-labels", type=int, help="classification: number of classes (default: from the data)")
    parser.add_argument("--max-length", type=int, default=512, help="most tokens per example (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per batch (default: %(default)s)")
    parser.add_argument(
        "--max-examples", type=int, default=200, help="evaluate the first this many examples (default: %(default)s)"
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=48, help="most tokens generated per example (default: %(default)s)"
    )
    parser.add_argument("--no-generate", action="store_true", help="loss/perplexity only: no generations")
    parser.add_argument(
        "--task-name", help="the task of a multi-task (HyperFormer) adapter that the data is for, e.g. sst2"
    )
    args = parser.parse_args(argv)
    metrics = evaluate_file(
        args.base,
        args.adapter,
        args.data,
        task=args.task,
        num_labels=args.num_labels,
        max_length=args.max_length,
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        max_new_tokens=None if args.no_generate else args.max_new_tokens,
        task_name=args.task_name,
    )
    print(json.dumps(metrics))
    return 0


def cmd_generate(argv: list[str]) -> int:
    from deltatune.evaluation import adapter_task_id, generate_text

    parser = argparse.ArgumentParser(prog="deltatune generate", description="Complete a prompt, greedy.")
    parser.add_argument("--base", default="smollm2-135m", help=BASE_HELP + " (default: %(default)s)")
    parser.add_argument("--adapter", help="adapter directory (deltatune or peft); none: the base model alone")
    parser.add_argument("--prompt", required=True, help="the prompt text ('-' reads standard input)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default: %(default)s)")
    parser.add_argument("--task-name", help="the task of a multi-task (HyperFormer) adapter to generate for")
    args = parser.parse_args(argv)
    adapter_task_id(args.adapter, args.task_name)  # a bad adapter or task name before reading standard input
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    print(generate_text(args.base, args.adapter, prompt, args.max_new_tokens, args.task_name))
    return 0


def cmd_merge(argv: list[str]) -> int:
    from deltatune.merging import merge_adapter

    parser = argparse.ArgumentParser(
        prog="deltatune merge", description="Fold an adapter into the base weights; write a plain model."
    )
    parser.add_argument("--base", default="smollm2-135m", help=BASE_HELP)
    parser.add_argument("--adapter", required=True, help="adapter directory (deltatune or peft)")
    parser.add_argument("--output", required=True, help="new directory for the merged transformers model")
    parser.add_argument(
        "--task",
        choices=["causal-lm", "classification", "feature-extraction"],
        help="the model head to load (default: the adapter's task)",
    )
    args = parser.parse_args(argv)
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
    known, rest = parser.parse_known_args(argv)
    config_cls = methods.config_class_for_name(known.method)
    method_parser = argparse.ArgumentParser(prog=f"deltatune inspect --method {known.method}")
    add_dataclass_flags(method_parser, config_cls)
    options = vars(method_parser.parse_args(rest))
    _normalise_targets(options)
    method_config = config_cls(**options)  # bad options fail before the model loads
    model, _ = load_base(known.base, task=known.task)
    print(inspect_report(model, known.method, method_config, options))
    return 0


def cmd_serve(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="deltatune serve",
        description="An OpenAI-compatible server for one base model and many adapters: requests for different "
        "adapters that arrive together are generated together in one batch.",
    )
    parser.add_argument("--base", default="smollm2-135m", help="base model: smollm2-135m or a local model dir")
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
    args = parser.parse_args(argv)
    import uvicorn

    from deltatune.loading import load_base
    from deltatune.serving import Engine, create_app

    if args.adapters and not Path(args.adapters).is_dir():
        raise ConfigError(f"--adapters {args.adapters} is not a directory")
    model, tokenizer = load_base(args.base)
    name = Path(args.base).name if Path(args.base).is_dir() else args.base
    engine = Engine(model, tokenizer, name, args.adapters, max_batch=args.max_batch, max_queue=args.max_queue)
    print(f"serving {name} with adapters: {', '.join(engine.adapters) or 'none'}", file=sys.stderr)
    uvicorn.run(create_app(engine, args.api_key, args.max_tokens_limit), host=args.host, port=args.port)
    return 0


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "merge": cmd_merge,
    "inspect": cmd_inspect,
    "serve": cmd_serve,
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
