"""``deltatune`` command line: train, eval, generate, merge, inspect. Thin over the library.

Flags of ``train`` come from :class:`~deltatune.training.config.TrainConfig` and from the chosen
method's config class (``--method lora --r 16 --target-modules q_proj v_proj``), so every library
option is a flag without a second list to keep in step.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any

from deltatune.config import ConfigError

_REGEX_CHARS = set("*[]()|\\^$+?")


def _flag_kwargs(hint: Any) -> dict[str, Any]:
    """argparse settings for a dataclass field's type hint."""
    is_union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    args = set(typing.get_args(hint)) - {type(None)} if is_union else {hint}
    if bool in args:
        return {"action": argparse.BooleanOptionalAction}
    if any(typing.get_origin(a) is list for a in args):
        inner = next(typing.get_args(a)[0] for a in args if typing.get_origin(a) is list)
        return {"nargs": "+", "type": inner if inner in (int, float) else str}
    if any(typing.get_origin(a) is dict for a in args):
        return {"type": json.loads, "metavar": "JSON"}
    for simple in (int, float, str):
        if simple in args:
            return {"type": simple}
    return {"type": str}


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type, skip: set[str] = frozenset()) -> set[str]:
    hints = typing.get_type_hints(cls)
    names = set()
    skip = set(skip) | set(getattr(cls, "cli_hidden", ()))
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, default=argparse.SUPPRESS, **_flag_kwargs(hints[f.name])
        )
        names.add(f.name)
    return names


def _normalise_targets(values: dict[str, Any]) -> None:
    """``--target-modules all-linear`` or one regex means the string, not a one-item list."""
    targets = values.get("target_modules")
    single = targets[0] if isinstance(targets, list) and len(targets) == 1 else None
    if single and (single == "all-linear" or _REGEX_CHARS & set(single)):
        values["target_modules"] = targets[0]


# --- train ------------------------------------------------------------------------------------
def cmd_train(argv: list[str]) -> int:
    from deltatune import methods
    from deltatune.training.config import TrainConfig, build_config, read_config_file

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    file_values = read_config_file(known.config) if known.config else {}
    method = known.method or file_values.get("method", "lora")
    config_cls = methods.config_class_for_name(method)

    parser = argparse.ArgumentParser(
        prog="deltatune train",
        description="Fine-tune a base model with a PEFT method. "
        "With no arguments: LoRA on SmolLM2-135M, built-in JSON-extraction task.",
    )
    parser.add_argument("--config", help="YAML or TOML file of options (flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    train_fields = add_dataclass_flags(parser, TrainConfig, skip={"method_options"})
    group = parser.add_argument_group(f"{method} options")
    method_fields = add_dataclass_flags(group, config_cls, skip=train_fields)
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
def _load(base: str, adapter: str | None, task: str | None = None, num_labels: int = 2):
    from deltatune import DeltaModel, load_base

    model, tokenizer = load_base(base, task=task, num_labels=num_labels)
    if adapter:
        model = DeltaModel.from_pretrained(model, adapter)
    return model.eval(), tokenizer


def cmd_eval(argv: list[str]) -> int:
    from deltatune.training import trainer
    from deltatune.training.data import Batcher, read_examples, tokenize_examples
    from deltatune.training.evaluate import evaluate_model

    parser = argparse.ArgumentParser(prog="deltatune eval", description="Evaluate a base model (+ adapter) on data.")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--adapter", help="adapter directory (deltatune or peft)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--task", choices=["causal-lm", "classification"])
    parser.add_argument("--num-labels", type=int)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-examples", type=int, default=200)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--no-generate", action="store_true", help="loss/perplexity only")
    args = parser.parse_args(argv)
    task = args.task or trainer.task_of(args.base)
    examples = read_examples(args.data, task, num_labels=args.num_labels)[: args.max_examples]
    num_labels = args.num_labels or (max(e.label for e in examples) + 1 if task == "classification" else 2)
    model, tokenizer = _load(args.base, args.adapter, task, num_labels)
    features = tokenize_examples(examples, tokenizer, task, args.max_length)
    batcher = Batcher(features, args.batch_size, pad_token_id=tokenizer.pad_token_id, seed=0, shuffle=False)
    metrics, _ = evaluate_model(
        model,
        tokenizer,
        task,
        examples,
        batcher,
        num_labels=num_labels,
        max_new_tokens=None if args.no_generate else args.max_new_tokens,
    )
    print(json.dumps(metrics))
    return 0


def cmd_generate(argv: list[str]) -> int:
    from deltatune.training.data import Example
    from deltatune.training.evaluate import generate

    parser = argparse.ArgumentParser(prog="deltatune generate", description="Complete a prompt, greedy.")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--adapter")
    parser.add_argument("--prompt", required=True, help="the prompt text ('-' reads standard input)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model, tokenizer = _load(args.base, args.adapter, "causal-lm")
    print(generate(model, tokenizer, [Example(prompt=prompt, target=None)], args.max_new_tokens)[0])
    return 0


def cmd_merge(argv: list[str]) -> int:
    import shutil
    import tempfile

    parser = argparse.ArgumentParser(
        prog="deltatune merge", description="Fold an adapter into the base weights; write a plain model."
    )
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--output", required=True, help="new directory for the merged transformers model")
    parser.add_argument("--task", choices=["causal-lm", "classification", "feature-extraction"])
    args = parser.parse_args(argv)
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"--output {output} exists and is not empty; choose a new directory")
    from deltatune import DeltaConfig

    task = args.task or ("classification" if DeltaConfig.load(args.adapter).task_type == "SEQ_CLS" else None)
    model, tokenizer = _load(args.base, args.adapter, task, _num_labels(args.adapter))
    merged = model.merge_and_unload()
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=output.parent))
    try:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged model written to {output} (load it with transformers' from_pretrained)")
    return 0


def _num_labels(adapter: str) -> int:
    """A classification adapter's head size, read from its saved head weights."""
    from deltatune.checkpoint.adapter import load_tensors

    heads = [v for k, v in load_tensors(adapter).items() if k.endswith(("classifier.weight", "score.weight"))]
    return heads[0].shape[0] if heads else 2


def cmd_inspect(argv: list[str]) -> int:
    from deltatune import methods, wrap
    from deltatune.loading import load_base
    from deltatune.targeting import LINEAR_TYPES, find_targets, output_head_names

    parser = argparse.ArgumentParser(
        prog="deltatune inspect", description="Show a model's modules, suggested targets and trainable counts."
    )
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--task", choices=["causal-lm", "classification", "feature-extraction"])
    parser.add_argument("--method", default="lora")
    known, rest = parser.parse_known_args(argv)
    config_cls = methods.config_class_for_name(known.method)
    method_parser = argparse.ArgumentParser(prog=f"deltatune inspect --method {known.method}")
    add_dataclass_flags(method_parser, config_cls)
    options = vars(method_parser.parse_args(rest))
    _normalise_targets(options)
    model, _ = load_base(known.base, task=known.task)
    counts: dict[str, list] = {}
    for name, module in model.named_modules():
        if isinstance(module, LINEAR_TYPES) or type(module).__name__ == "Embedding":
            leaf = name.rsplit(".", 1)[-1]
            counts.setdefault(leaf, [type(module).__name__, 0])[1] += 1
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters")
    print("adaptable modules (leaf name, type, count):")
    for leaf, (kind, count) in counts.items():
        print(f"  {leaf:<24} {kind:<10} x{count}")
    heads = output_head_names(model)
    attention = [leaf for leaf in counts if leaf in {"q_proj", "v_proj", "c_attn", "query", "value"}]
    print("suggested targets:")
    print(f"  lora (attention, as in the LoRA paper): {attention or 'all-linear'}")
    print(f"  lora all-linear: {len(find_targets(model, 'all-linear'))} modules (skips {', '.join(sorted(heads))})")
    delta = wrap(model, config_cls(**options))
    trainable, total = delta.trainable_parameters()
    print(f"{known.method} with {options}:")
    print(f"  trainable {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)")
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
    parser.add_argument("--port", type=int, default=8000)
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
