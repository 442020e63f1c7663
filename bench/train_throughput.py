"""End-to-end LoRA training throughput on E2E NLG: ``deltatune train`` vs transformers.Trainer + peft.

SmolLM2-135M-Instruct (float32, CPU, 2 threads) with LoRA r=8 alpha=16 on q_proj/v_proj, no dropout, trained for
the same ``--steps`` optimizer steps of ``--batch-size`` examples (lr 1e-3, cosine to 0 without warm-up, gradient
clipping at 1.0, no weight decay) on a fixed seeded subsample of the E2E NLG training set of exactly
``steps x batch-size`` examples, so that each side trains on every example once: the same examples and the same
tokens, in each side's own batch order. Both sides see the same features: deltatune's ``read_examples`` +
``tokenize_examples`` (chat template, loss only on the response + EOS), and both group batches by length.

* deltatune: the real command line, ``python -m deltatune train ...`` in a subprocess. It batches by length and runs
  the output head + cross-entropy fused and only on response positions. Its clock is the training loop's, from
  metrics.jsonl (``elapsed_s``: from just before the first step to the end of the last, not the model load nor the
  evaluations before and after); peak RSS is the subprocess's (``RUSAGE_CHILDREN`` of a worker that starts nothing
  else before it).
* peft: ``peft.get_peft_model`` + ``transformers.Trainer`` with ``train_sampling_strategy="group_by_length"``
  (transformers' own length grouping, ``LengthGroupedSampler``), ``DataCollatorForSeq2Seq`` and the model's own loss
  (head on every position). Its clock is the same training loop's: from ``on_train_begin`` to the last
  ``on_step_end`` (``trainer.train()``'s whole wall time is recorded beside it); peak RSS is its worker process's,
  measured right after training.

Throughput is non-pad tokens (the attention mask's sum, as deltatune counts them) per second of that loop; both
sides train on the same tokens, so the ratio is the inverse ratio of loop times. After training, each adapter is
scored on the E2E devset: the mean response loss on the first ``--bleu-examples`` distinct MRs (first reference
each, same batches on both sides) and, in the first ``--bleu-rounds`` rounds only (training is seeded, so later
rounds give the same adapter), multi-reference corpus BLEU (sacrebleu) of greedy generations (64 new tokens), with
deltatune's ``generate`` so that both sides get the same prompts.

``--runs`` rounds alternate the sides (deltatune, peft, deltatune, peft, ...), each in a fresh process
(``--worker``). Every worker run appends a raw line to ``bench/results/train_throughput.jsonl``, and a summary line
follows: per side the median tokens/s with its min-max, and the ratio of the medians.

``--compile``: both sides torch.compile the model (deltatune ``train --compile``, Trainer ``torch_compile=True``),
inductor. The first steps then include compiling (and, with varying lengths, the first step of another length), so
``tokens_per_s_after_step2`` (steps 3 on) is recorded beside the whole loop's figure, with its ratio.

Goal: deltatune's median tokens/s >= 1.5 x peft's. Prints the summary as one JSON line on stdout; progress goes to
stderr.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    E2E,
    LORA_ALPHA,
    LORA_R,
    LORA_TARGETS,
    MODEL,
    RunMeter,
    append_result,
    contention,
    cpu_counters,
    dev_references,
    emit,
    load_average,
    load_model,
    log,
    median,
    peak_rss_mb,
    set_threads,
    timed,
    timed_cpu,
    wrap_lora,
)

REPO = Path(__file__).resolve().parent.parent
WORKERS = ("deltatune", "peft_trainer")
GOAL = {"tokens_per_s_ratio>=": 1.5}
MAX_LENGTH = 512
MAX_NEW_TOKENS = 64
CLI_EVAL_EXAMPLES = 8  # the CLI's own before/after evaluation (loss only); kept small, it is not timed
LAST_K = 5  # losses averaged over the last LAST_K steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--worker", choices=WORKERS, help="run one side in this process (internal)")
    parser.add_argument("--work-dir", help="folder with the prepared data files (internal)")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps on each side")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--train-examples", type=int, help="size of the seeded training subsample (default: steps x batch size)"
    )
    parser.add_argument("--runs", type=int, default=3, help="alternating rounds (deltatune, peft) in fresh processes")
    parser.add_argument("--bleu-rounds", type=int, default=1, help="rounds that also generate and score BLEU")
    parser.add_argument("--bleu-examples", type=int, default=100, help="distinct devset MRs to score")
    parser.add_argument("--no-bleu", action="store_true", help="skip generation and BLEU (dev loss is still measured)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="6 steps")
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides (inductor)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 6
    if args.train_examples is None:
        args.train_examples = args.steps * args.batch_size
    return args


# --- data ----------------------------------------
def prepare_data(work: Path, n_train: int, seed: int) -> dict[str, Any]:
    """Write the training subsample and the CLI's small eval file as prompt/completion JSON lines."""
    from deltatune.data import read_examples

    examples = read_examples(E2E / "trainset.csv", "causal-lm")
    order = np.random.default_rng(seed).permutation(len(examples))[:n_train]
    chosen = [examples[i] for i in order.tolist()]
    write_jsonl(work / "train.jsonl", [(e.prompt, e.target) for e in chosen])
    dev = dev_references(CLI_EVAL_EXAMPLES)
    write_jsonl(work / "cli_eval.jsonl", [(mr, refs[0]) for mr, refs in dev])
    return {"train_pool": len(examples), "train_examples": len(chosen)}


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for prompt, completion in pairs:
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")


def train_features(work: Path, tokenizer: Any) -> list[dict]:
    """The features both sides train on, built exactly as ``deltatune train`` builds them."""
    from deltatune.data import read_examples, tokenize_examples

    return tokenize_examples(read_examples(work / "train.jsonl", "causal-lm"), tokenizer, "causal-lm", MAX_LENGTH)


def batch_stats(batches: list[dict]) -> dict[str, Any]:
    """Token counts of the training batches: non-pad, padded (rows x width), loss targets."""
    nonpad = [int(b["attention_mask"].sum()) for b in batches]
    padded = [int(b["attention_mask"].numel()) for b in batches]
    targets = [int((b["labels"][:, 1:] != -100).sum()) for b in batches]
    return {
        "tokens": sum(nonpad),
        "padded_tokens": sum(padded),
        "pad_fraction": round(1 - sum(nonpad) / sum(padded), 4),
        "response_tokens": sum(targets),
        "response_fraction": round(sum(targets) / sum(nonpad), 4),
        "tokens_per_step": nonpad,
    }


def throughput(tokens: list[int], times: list[float]) -> dict[str, Any]:
    """tokens/s over all steps, over all but the first (warm-up; deltatune's first batch is its longest), and the
    median of the steps' own tokens/s."""
    total = sum(times)
    return {
        "train_seconds": round(total, 3),
        "tokens_per_s": round(sum(tokens) / total, 1),
        "tokens_per_s_after_step1": round(sum(tokens[1:]) / sum(times[1:]), 1) if len(times) > 1 else None,
        # With --compile: the steps after the compiles (the first shape, then the first other length).
        "tokens_per_s_after_step2": round(sum(tokens[2:]) / sum(times[2:]), 1) if len(times) > 2 else None,
        # Robust to other processes taking the cores for part of the run (a 2-thread step then takes many times longer).
        "tokens_per_s_median_step": round(median([n / t for n, t in zip(tokens, times, strict=True)]), 1),
        "step_seconds": [round(t, 3) for t in times],
    }


def loss_summary(losses: list[float]) -> dict[str, Any]:
    last = losses[-LAST_K:]
    return {
        "losses": [round(v, 4) for v in losses],
        "first_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
        f"loss_last{LAST_K}_mean": round(sum(last) / len(last), 4),
    }


# --- quality after training ----------------------------------------
def quality(model: Any, loss_model: Any, tokenizer: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Dev response loss (first reference per MR) and multi-reference BLEU of greedy generations."""
    import sacrebleu
    import torch

    from deltatune.data import Batcher, Example, tokenize_examples
    from deltatune.evaluation import evaluate_loss, generate

    dev = dev_references(args.bleu_examples)
    features = tokenize_examples([Example(mr, refs[0]) for mr, refs in dev], tokenizer, "causal-lm", MAX_LENGTH)
    batcher = Batcher(features, 16, pad_token_id=tokenizer.pad_token_id, seed=0, shuffle=False)
    result: dict[str, Any] = {"dev_loss": round(evaluate_loss(loss_model, "causal-lm", batcher)["loss"], 4)}
    if args.no_bleu:
        return result
    torch.manual_seed(args.seed)
    seconds, hyps = timed(lambda: generate(model, tokenizer, [Example(mr, None) for mr, _ in dev], MAX_NEW_TOKENS))
    width = max(len(refs) for _, refs in dev)
    streams = [[refs[k] if k < len(refs) else None for _, refs in dev] for k in range(width)]
    metric = sacrebleu.BLEU()
    bleu = metric.corpus_score(hyps, streams)
    result |= {
        "bleu": round(bleu.score, 2),
        "bleu_signature": str(metric.get_signature()),
        "bleu_mrs": len(dev),
        "bleu_refs": sum(len(refs) for _, refs in dev),
        "generate_seconds": round(seconds, 1),
        "sample": {"mr": dev[0][0], "hypothesis": hyps[0]},
    }
    return result


# --- (a) deltatune, through its command line ----------------------------------------
def run_deltatune(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(args.work_dir)
    out = work / "deltatune_run"
    cmd = [
        sys.executable, "-m", "deltatune", "train",
        "--data", str(work / "train.jsonl"),
        "--eval-data", str(work / "cli_eval.jsonl"),
        "--max-eval-examples", str(CLI_EVAL_EXAMPLES),
        "--max-steps", str(args.steps),
        "--batch-size", str(args.batch_size),
        "--learning-rate", str(args.lr),
        "--r", str(LORA_R), "--lora-alpha", str(LORA_ALPHA), "--lora-dropout", "0.0",
        "--target-modules", *LORA_TARGETS,
        "--no-eval-generate",
        "--threads", str(args.threads),
        "--seed", str(args.seed),
        "--output-dir", str(out),
        "--log-every", "1",
        "--save-every", "100000",
        *(["--compile"] if args.compile else []),
    ]  # fmt: skip
    load_before, counters = load_average(), cpu_counters()
    log("[deltatune]", " ".join(cmd[1:]))
    # The CLI's summary goes to stderr with its progress bar, so stdout carries only this worker's JSON line.
    wall, _ = timed(lambda: subprocess.run(cmd, cwd=REPO, stdout=sys.stderr, check=True))
    child = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = contention(counters, cpu_counters(), child.ru_utime + child.ru_stime, wall)
    rss = round(child.ru_maxrss / 1024, 1)
    load_after = load_average()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    if [r["step"] for r in records] != list(range(1, args.steps + 1)):
        raise RuntimeError(f"metrics.jsonl of {out} does not log every step")
    elapsed = [r["elapsed_s"] for r in records]
    times = [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True)]
    tokens = [
        b - a for a, b in zip([0, *(r["tokens"] for r in records[:-1])], (r["tokens"] for r in records), strict=True)
    ]
    summary = json.loads((out / "summary.json").read_text())

    # Replay the CLI's batch order (a pure function of seed and epoch) for its padding and response-token counts.
    import deltatune as dt
    from deltatune.data import Batcher
    from deltatune.training.trainer import micro_batches

    set_threads(args.threads)
    base, tokenizer = dt.load_base(MODEL)
    batcher = Batcher(
        train_features(work, tokenizer), args.batch_size, pad_token_id=tokenizer.pad_token_id, seed=args.seed
    )
    feed = micro_batches(batcher, 0, 0, 0, 1)
    stats = batch_stats([batcher.collate(next(feed)[2]) for _ in range(args.steps)])
    if stats["tokens_per_step"] != tokens:
        raise RuntimeError("replayed deltatune batches do not match the token counts in its metrics.jsonl")
    model = dt.DeltaModel.from_pretrained(base, out / "adapter")
    return {
        **throughput(tokens, times),
        **stats,
        **loss_summary([r["loss"] for r in records]),
        "peak_rss_mb": rss,
        "cli_wall_seconds": round(wall, 1),
        "cli_eval_loss_before_after": [round(summary["before"]["loss"], 4), round(summary["after"]["loss"], 4)],
        "lr_last": records[-1]["lr"],
        "load_avg_1m": [load_before, load_after],
        "contention_whole_cli": busy,
        **quality(model, model, tokenizer, args),
    }


# --- (b) transformers.Trainer + peft ----------------------------------------
def run_peft_trainer(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    work = Path(args.work_dir)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    base, tokenizer = load_model()
    rss_after_load = peak_rss_mb()
    model = wrap_lora(base, "peft")
    features = train_features(work, tokenizer)
    pad_collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    batches: list[dict] = []

    def collator(rows: list[dict]) -> dict:
        batch = pad_collator(rows)
        batches.append({k: batch[k] for k in ("attention_mask", "labels")})
        return batch

    class StepClock(TrainerCallback):
        """Wall time of each optimizer step, from the loop's start (Trainer set-up excluded)."""

        def __init__(self) -> None:
            self.marks: list[float] = []

        def on_train_begin(self, *_, **__) -> None:
            self.marks = [time.perf_counter()]

        def on_step_end(self, *_, **__) -> None:
            self.marks.append(time.perf_counter())

    clock = StepClock()
    training_args = TrainingArguments(
        output_dir=str(work / "peft_run"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        dataloader_num_workers=0,
        train_sampling_strategy="group_by_length",
        seed=args.seed,
        disable_tqdm=True,
        torch_compile=args.compile,
    )
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=features,
        data_collator=collator,
        callbacks=[clock],
    )  # no processing_class: LengthGroupedSampler then measures each feature's input_ids
    load_before, counters = load_average(), cpu_counters()
    seconds, cpu, _ = timed_cpu(trainer.train)
    busy = contention(counters, cpu_counters(), cpu, seconds)
    rss = peak_rss_mb()
    load_after = load_average()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    if len(batches) < args.steps or len(losses) != args.steps:
        raise RuntimeError(f"expected {args.steps} batches and losses, got {len(batches)} and {len(losses)}")
    stats = batch_stats(batches[: args.steps])
    # Trainer sets config.use_cache = TrainingArguments.use_cache (False): generating without the KV cache would
    # recompute the whole prefix per token. Greedy outputs are the same either way; this only restores the speed.
    model.config.use_cache = True
    step_times = [b - a for a, b in zip(clock.marks[:-1], clock.marks[1:], strict=True)]
    loop = throughput(stats["tokens_per_step"], step_times)
    return {
        **loop,
        "trainer_train_seconds": round(seconds, 3),
        "trainer_train_tokens_per_s": round(stats["tokens"] / seconds, 1),
        "train_sampling_strategy": training_args.train_sampling_strategy,
        "train_cpu_seconds": round(cpu, 1),
        **stats,
        **loss_summary(losses),
        "peak_rss_mb": rss,
        "rss_after_load_mb": rss_after_load,
        "optim": str(training_args.optim.value),
        "lr_last": trainer.lr_scheduler.get_last_lr()[0],
        "load_avg_1m": [load_before, load_after],
        "contention": busy,
        # LossModule needs the transformers model itself (LoRA layers are injected into it in place).
        **quality(model, model.base_model.model, tokenizer, args),
    }


# --- orchestration ----------------------------------------
def spawn(worker: str, args: argparse.Namespace, work: Path, round_index: int, campaign: str) -> dict[str, Any]:
    """Run ``worker`` in a fresh Python process, append its raw line to the results file, return that line."""
    bleu = round_index < args.bleu_rounds and not args.no_bleu
    cmd = [
        sys.executable, str(Path(__file__).resolve()),
        "--worker", worker, "--work-dir", str(work),
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
        "--bleu-examples", str(args.bleu_examples), "--seed", str(args.seed), "--threads", str(args.threads),
        *([] if bleu else ["--no-bleu"]),
        *(["--compile"] if args.compile else []),
    ]  # fmt: skip
    log(f"round {round_index + 1}/{args.runs}: running worker {worker} ...")
    meter = RunMeter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    busy = figures.get("contention") or figures.get("contention_whole_cli")
    log(f"  {worker}: {figures['tokens_per_s']} tokens/s, other processes during training: {busy}")
    return append_result(
        "train_throughput", figures, meter, kind="worker", campaign=campaign, round=round_index + 1, side=worker,
        worker_argv=[Path(c).name if c.endswith(".py") else c for c in cmd[1:] if not c.startswith(str(work))],
        settings=settings(args),
    )  # fmt: skip


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": MODEL,
        "dtype": "float32",
        "lora": {"r": LORA_R, "alpha": LORA_ALPHA, "targets": LORA_TARGETS, "dropout": 0.0},
        "data": "E2E NLG trainset.csv, seeded subsample of steps x batch_size examples (each trained on once)",
        "train_examples": args.train_examples,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "scheduler": "cosine, no warm-up",
        "max_grad_norm": 1.0,
        "seed": args.seed,
        "threads": args.threads,
        "runs": args.runs,
        "bleu_examples": args.bleu_examples,
        "bleu_rounds": 0 if args.no_bleu else min(args.bleu_rounds, args.runs),
        "max_new_tokens": MAX_NEW_TOKENS,
        "peft_sampler": "train_sampling_strategy=group_by_length",
        "compile": args.compile,
    }


def spread(values: list[float]) -> dict[str, Any]:
    """Median, min and max of one figure over the rounds, and the values themselves in round order."""
    return {"median": round(median(values), 4), "min": min(values), "max": max(values), "runs": values}


def summarize(lines: dict[str, list[dict]], data: dict[str, Any], campaign: str) -> dict[str, Any]:
    """The summary line: per side the median (min-max) of each figure over rounds; ratios of the medians."""
    sides: dict[str, Any] = {}
    for side, runs in lines.items():
        figs = [line["figures"] for line in runs]
        other = [f.get("contention") or f.get("contention_whole_cli") for f in figs]
        sides[side] = {
            "run_ids": [line["run_id"] for line in runs],
            "tokens_per_s": spread([f["tokens_per_s"] for f in figs]),
            "tokens_per_s_after_step2": spread([f["tokens_per_s_after_step2"] for f in figs]),
            "train_seconds": spread([f["train_seconds"] for f in figs]),
            "tokens": sorted({f["tokens"] for f in figs}),
            "peak_rss_mb": spread([f["peak_rss_mb"] for f in figs]),
            "pad_fraction": spread([f["pad_fraction"] for f in figs]),
            "dev_loss": spread([f["dev_loss"] for f in figs]),
            "final_loss": spread([f["final_loss"] for f in figs]),
            "bleu": [f["bleu"] for f in figs if "bleu" in f],
            "other_procs_cores_during_training": [c["other_procs_cores"] for c in other],
        }
    dt_s, hf_s = sides["deltatune"], sides["peft_trainer"]
    ratio = round(dt_s["tokens_per_s"]["median"] / hf_s["tokens_per_s"]["median"], 3)
    return {
        **data,
        "campaign": campaign,
        "sides": sides,
        "same_tokens": dt_s["tokens"] == hf_s["tokens"],
        "tokens_per_s_ratio_of_medians": ratio,
        "tokens_per_s_after_step2_ratio_of_medians": round(
            dt_s["tokens_per_s_after_step2"]["median"] / hf_s["tokens_per_s_after_step2"]["median"], 3
        ),
        # the extremes: deltatune's slowest run over peft's fastest, and the other way round
        "tokens_per_s_ratio_range": [
            round(dt_s["tokens_per_s"]["min"] / hf_s["tokens_per_s"]["max"], 3),
            round(dt_s["tokens_per_s"]["max"] / hf_s["tokens_per_s"]["min"], 3),
        ],
        "peak_rss_ratio_of_medians": round(dt_s["peak_rss_mb"]["median"] / hf_s["peak_rss_mb"]["median"], 3),
        "goal": GOAL,
        "goal_met": ratio >= GOAL["tokens_per_s_ratio>="],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        emit(run_deltatune(args) if args.worker == "deltatune" else run_peft_trainer(args))
        return
    set_threads(args.threads)
    campaign = "train_throughput-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    meter = RunMeter()
    work = Path(tempfile.mkdtemp(prefix="deltatune-train-throughput-"))
    lines: dict[str, list[dict]] = {w: [] for w in WORKERS}
    try:
        data = prepare_data(work, args.train_examples, args.seed)
        for round_index in range(args.runs):  # alternate the sides, so a busy spell hits both alike
            for worker in WORKERS:
                lines[worker].append(spawn(worker, args, work, round_index, campaign))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = summarize(lines, data, campaign)
    append_result("train_throughput", summary, meter, kind="summary", campaign=campaign, settings=settings(args))
    emit(summary)


if __name__ == "__main__":
    main()
