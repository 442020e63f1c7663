"""``deltatune train`` and ``deltatune sweep``.

Flags of ``train`` come from :class:`~deltatune.training.config.TrainConfig` and from the chosen method's config
class (``--method lora --r 16 --target-modules q_proj v_proj``), so every library option is a flag without a
second list to keep in step.
"""

from __future__ import annotations

import argparse
import json

from deltatune import flags

TRAIN_DESCRIPTION = (
    "Fine-tune a base model with a PEFT method. With no arguments: LoRA on SmolLM2-135M, built-in JSON-extraction "
    "task. Several tasks: --data NAME=PATH ... or --task-column (HyperFormer gets a task id per row; other methods "
    "train one adapter on the union)."
)


def train_parser(method: str, attention: str = "sdpa") -> tuple[argparse.ArgumentParser, set[str], set[str]]:
    """``deltatune train``'s parser for ``method``: TrainConfig's flags in groups, then the method's options
    (and the attention pattern's). Returns the parser and the TrainConfig and method (+ attention) field names."""
    from deltatune import methods
    from deltatune.attention.flags import add_attention_flags

    config_cls = methods.config_class_for_name(method)  # an unknown method: an error listing the known ones
    parser = argparse.ArgumentParser(
        prog="deltatune train",
        description=TRAIN_DESCRIPTION,
        formatter_class=flags.HelpFormatter,
        epilog="Every option can also be given in a --config file (YAML/TOML), with its name as the key.",
    )
    parser.add_argument("--config", help="YAML or TOML file of options (flags override it)")
    parser.add_argument("--print-config", action="store_true", help="print the effective config and exit")
    train_fields = _train_config_flags(parser)
    summary = flags.method_summaries()[method]
    group = parser.add_argument_group(f"{method} options (--method {method})", summary)
    method_fields = flags.add_dataclass_flags(group, config_cls, skip=train_fields)
    parser.set_defaults(attention_fields=add_attention_flags(parser, attention, train_fields | method_fields, False))
    return parser, train_fields, method_fields


def _train_config_flags(parser: argparse.ArgumentParser) -> set[str]:
    """TrainConfig's flags in its FLAG_GROUPS, then the rest; --method and --attention list their choices."""
    from deltatune import methods
    from deltatune.attention.flags import attention_help
    from deltatune.training.config import FLAG_CHOICES, FLAG_GROUPS, TrainConfig

    choices = {**FLAG_CHOICES, "method": tuple(methods.CONFIGS)}
    names: set[str] = set()
    for title, fields in FLAG_GROUPS.items():
        group = parser.add_argument_group(f"{title} options")
        names |= flags.add_dataclass_flags(group, TrainConfig, skip={"method_options"}, only=fields, choices=choices)
    method_action = next(a for a in parser._actions if a.dest == "method")
    method_action.help = flags.escape(f"{flags.method_help()}\n(default: lora)")
    method_action.metavar = "NAME"
    attention_action = next(a for a in parser._actions if a.dest == "attention")
    attention_action.help, attention_action.metavar = flags.escape(f"{attention_help()}\n(default: sdpa)"), "PATTERN"
    rest = parser.add_argument_group("other options")
    return names | flags.add_dataclass_flags(rest, TrainConfig, skip={"method_options"} | names)


def train_config(argv: list[str]) -> tuple[object, bool]:
    """``deltatune train``'s flags (and --config file) as a TrainConfig, and whether --print-config was given."""
    from deltatune.attention.flags import chosen_pattern
    from deltatune.training.config import build_config, read_config_file

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    file_values = read_config_file(known.config) if known.config else {}
    method = known.method or file_values.get("method", "lora")
    attention = chosen_pattern(argv, file_values.get("attention", "sdpa"))
    parser, train_fields, method_fields = train_parser(method, attention)
    args = vars(parser.parse_args(argv))
    attention_fields = args["attention_fields"]
    values = {**file_values, **{k: v for k, v in args.items() if k in train_fields | method_fields | attention_fields}}
    flags.normalise_targets(values)
    return build_config(values, method_fields, attention_fields), bool(args["print_config"])


def cmd_train(argv: list[str]) -> int:
    cfg, print_config = train_config(argv)
    if print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from deltatune.training.trainer import train

    summary = train(cfg)
    return 130 if summary.get("interrupted") else 0


def cmd_sweep(argv: list[str]) -> int:
    from deltatune.analysis.sweep import sweep, sweep_table

    own, train_argv = split_at_dashes(argv)
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


def split_at_dashes(argv: list[str]) -> tuple[list[str], list[str]]:
    """Own flags before ``--``, train flags after it."""
    if "--" not in argv:
        return argv, []
    i = argv.index("--")
    return argv[:i], argv[i + 1 :]
