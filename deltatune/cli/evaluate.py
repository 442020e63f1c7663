"""The user's loop after training: ``deltatune eval`` (paper-style scores, files, several models side by side)
and ``deltatune generate`` (one prompt, or a file of them in batches). Every flag and file is checked before a
model loads."""

from __future__ import annotations

import argparse
import json
import sys

from deltatune.cli.common import (
    BASE_HELP,
    QUANTIZE_CHOICES,
    QUANTIZE_HELP,
    attention_flags,
    attention_options,
    decoding_flags,
    parsed_decoding,
)
from deltatune.config import ConfigError


# --- eval ------------------------------------------------------------------------------------------
def eval_parser() -> argparse.ArgumentParser:
    from deltatune.scoring import CLASSIFICATION_METRICS, GENERATION_METRICS

    parser = argparse.ArgumentParser(
        prog="deltatune eval",
        description="Evaluate a base model (+ adapters) on data. Rows sharing an input pool their targets as "
        "that input's references (E2E style); several --adapter values print one side-by-side table.",
    )
    parser.add_argument("--base", default="smollm2-135m", help=BASE_HELP + " (default: %(default)s)")
    parser.add_argument(
        "--adapter",
        action="append",
        help="adapter directory (deltatune or peft); repeat it to compare several, 'base' for the base alone "
        "(default: the base model alone)",
    )
    parser.add_argument("--data", required=True, help="evaluation data file (.jsonl/.json/.csv/.tsv/.txt)")
    parser.add_argument(
        "--task", choices=["causal-lm", "classification"], help="the task (default: the base model's natural task)"
    )
    parser.add_argument("--num-labels", type=int, help="classification: number of classes (default: from the data)")
    parser.add_argument("--max-length", type=int, default=512, help="most tokens per example (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="examples per batch (default: %(default)s)")
    parser.add_argument(
        "--max-examples", type=int, default=200, help="evaluate the first this many rows (default: %(default)s)"
    )
    parser.add_argument(
        "--limit", type=int, help="evaluate the first N distinct inputs with all their rows (overrides --max-examples)"
    )
    parser.add_argument("--group-by", metavar="COLUMN", help="pool references of rows with equal COLUMN values")
    parser.add_argument("--prompt-column", help="the column of the input (default: detected)")
    parser.add_argument("--target-column", help="the column of the reference (default: detected)")
    parser.add_argument(
        "--metrics",
        nargs="+",
        help=f"generation: {', '.join(GENERATION_METRICS)}; classification: {', '.join(CLASSIFICATION_METRICS)} "
        "(default: bleu chrf rougeL exact_match / all three); loss is always reported",
    )
    parser.add_argument("--output-dir", help="write predictions.jsonl and eval.json here")
    parser.add_argument("--no-generate", action="store_true", help="loss/perplexity only: no generations")
    parser.add_argument("--no-loss", action="store_true", help="skip the loss (a forward pass over every row)")
    parser.add_argument(
        "--task-name", help="the task of a multi-task (HyperFormer) adapter that the data is for, e.g. sst2"
    )
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    decoding_flags(parser, 48, sampling=False)
    return parser


def cmd_eval(argv: list[str]) -> int:
    from deltatune.eval_runs import evaluate, side_by_side

    parser = eval_parser()
    attention = attention_flags(parser, argv)
    args = parser.parse_args(argv)
    decoding = None if args.no_generate else parsed_decoding(args)  # bad decoding options before anything loads
    if args.no_generate and args.no_loss:
        raise ConfigError("--no-generate with --no-loss leaves nothing to evaluate")
    results = evaluate(
        args.base,
        args.adapter or [None],
        args.data,
        decoding,
        batch_size=args.batch_size,
        task_name=args.task_name,
        quantize=args.quantize,
        attention=args.attention,
        attention_options=attention_options(args, attention),
        output_dir=args.output_dir,
        progress=True,
        loss=not args.no_loss,
        task=args.task,
        num_labels=args.num_labels,
        max_length=args.max_length,
        max_examples=args.max_examples,
        limit=args.limit,
        group_by=args.group_by,
        prompt_column=args.prompt_column,
        target_column=args.target_column,
        metrics=args.metrics,
    )
    print(json.dumps(results[0].metrics) if len(results) == 1 else side_by_side(results))
    return 0


# --- generate --------------------------------------------------------------------------------------
def cmd_generate(argv: list[str]) -> int:
    from deltatune.evaluation import adapter_task_id, generate_examples
    from deltatune.generation import record_example

    parser = argparse.ArgumentParser(
        prog="deltatune generate",
        description="Complete one prompt (--prompt), or every prompt of a file (--input) in batches. Chat models "
        "get their chat template unless --raw.",
    )
    parser.add_argument("--base", default="smollm2-135m", help=BASE_HELP + " (default: %(default)s)")
    parser.add_argument("--adapter", help="adapter directory (deltatune or peft); none: the base model alone")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text ('-' reads standard input)")
    source.add_argument("--input", help="prompts: .txt (one a line) or .jsonl ('prompt' or 'messages' per line)")
    parser.add_argument("--output", help="with --input: JSON lines, each input record plus its 'completion'")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default: %(default)s)")
    parser.add_argument("--raw", action="store_true", help="feed prompts as they are, without the chat template")
    parser.add_argument("--task-name", help="the task of a multi-task (HyperFormer) adapter to generate for")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, help=QUANTIZE_HELP)
    decoding_flags(parser, 64, sampling=True)
    attention = attention_flags(parser, argv)
    args = parser.parse_args(argv)
    decoding = parsed_decoding(args)
    adapter_task_id(args.adapter, args.task_name)  # a bad adapter or task name before reading standard input
    options = attention_options(args, attention)
    records = _prompt_records(args)

    texts = generate_examples(
        args.base,
        args.adapter,
        [record_example(r) for r in records],
        decoding,
        batch_size=args.batch_size,
        raw=args.raw,
        task_name=args.task_name,
        quantize=args.quantize,
        attention=args.attention,
        attention_options=options,
        progress=args.input is not None,
    )
    if args.prompt is not None:
        print(texts[0])
        return 0
    _write_completions(args.output, records, texts)
    return 0


def _prompt_records(args: argparse.Namespace) -> list[dict]:
    from deltatune.generation import read_prompts

    if args.prompt is not None:
        if args.output:
            raise ConfigError("--output goes with --input (a file of prompts); --prompt prints its completion")
        return [{"prompt": sys.stdin.read() if args.prompt == "-" else args.prompt}]
    records = read_prompts(args.input)
    if args.raw and any("messages" in r for r in records):
        raise ConfigError(f"--raw takes text prompts; {args.input} holds chat 'messages' (drop --raw)")
    return records


def _write_completions(output: str | None, records: list[dict], texts: list[str]) -> None:
    from deltatune.atomic import atomic_write_text

    lines = [json.dumps({**r, "completion": t}, ensure_ascii=False) + "\n" for r, t in zip(records, texts, strict=True)]
    if output is None:
        sys.stdout.write("".join(lines))
    else:
        atomic_write_text(output, "".join(lines))
        print(f"{len(lines)} completions written to {output}", file=sys.stderr)
