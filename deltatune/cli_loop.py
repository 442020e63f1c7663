"""The user's loop after training, on the command line: ``deltatune eval`` (paper-style scores, files, several
models side by side), ``deltatune generate`` (one prompt, or a file of them in batches) and ``deltatune export``
(llama.cpp's GGUF). Every flag and file is checked before a model loads."""

from __future__ import annotations

import argparse
import json
import sys

from deltatune.config import ConfigError


def _helps() -> tuple[str, str]:
    from deltatune.cli import BASE_HELP, QUANTIZE_HELP  # here: deltatune.cli imports this module

    return BASE_HELP, QUANTIZE_HELP


def _decoding_flags(parser: argparse.ArgumentParser, max_new_tokens: int, sampling: bool) -> None:
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


def _decoding(args: argparse.Namespace):
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


def _attention(parser: argparse.ArgumentParser, argv: list[str]):
    from deltatune.cli import _attention_flags

    return _attention_flags(parser, argv)


def _attention_options(args: argparse.Namespace, names):
    from deltatune.cli import _attention_options as options

    return options(args, names)


# --- eval ------------------------------------------------------------------------------------------
def eval_parser() -> argparse.ArgumentParser:
    from deltatune.scoring import CLASSIFICATION_METRICS, GENERATION_METRICS

    BASE_HELP, QUANTIZE_HELP = _helps()

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
    parser.add_argument("--quantize", choices=["int8", "nf4", "gguf"], help=QUANTIZE_HELP)
    _decoding_flags(parser, 48, sampling=False)
    return parser


def cmd_eval(argv: list[str]) -> int:
    from deltatune.eval_runs import evaluate, side_by_side

    parser = eval_parser()
    attention = _attention(parser, argv)
    args = parser.parse_args(argv)
    decoding = None if args.no_generate else _decoding(args)  # bad decoding options before anything loads
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
        attention_options=_attention_options(args, attention),
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

    BASE_HELP, QUANTIZE_HELP = _helps()

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
    parser.add_argument("--quantize", choices=["int8", "nf4", "gguf"], help=QUANTIZE_HELP)
    _decoding_flags(parser, 64, sampling=True)
    attention = _attention(parser, argv)
    args = parser.parse_args(argv)
    decoding = _decoding(args)
    adapter_task_id(args.adapter, args.task_name)  # a bad adapter or task name before reading standard input
    options = _attention_options(args, attention)
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


# --- export ----------------------------------------------------------------------------------------
def cmd_export(argv: list[str]) -> int:
    from deltatune.export import export_lora, export_merged

    base_help, _ = _helps()
    parser = argparse.ArgumentParser(
        prog="deltatune export",
        description="Write llama.cpp's GGUF: a LoRA adapter as an adapter file (llama-cli -m BASE.gguf --lora "
        "OUT.gguf), or with --merged the base with the adapter folded in as one model file.",
    )
    parser.add_argument("--format", choices=["gguf"], default="gguf", help="the file format (default: gguf)")
    parser.add_argument("--base", default="smollm2-135m", help=base_help + " (default: %(default)s)")
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
