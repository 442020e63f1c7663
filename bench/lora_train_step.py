"""LoRA training-step benchmark: deltatune vs Hugging Face peft (and full fine-tuning for reference).

Measured, for SmolLM2-135M-Instruct in float32 on CPU (2 threads), LoRA r=8 alpha=16 on q_proj and
v_proj, one fixed seeded batch of 4 x 128 random tokens (labels = input_ids), AdamW lr 1e-4:

* mean (and median) wall time of a training step: forward + backward + optimizer step + zero_grad,
  over ``--steps`` timed steps after ``--warmup`` untimed ones. deltatune's step is the one its
  trainer runs (``LossModule``: fused head + cross-entropy); peft's is ``model(..., labels=...)``;
* the loss of every step, to compare the two libraries' training curves;
* peak RSS of the process (ru_maxrss), the model load included (identical for every worker).

Every configuration runs in a fresh process (the script re-invokes itself with ``--worker``) so
that memory peaks and allocator state do not leak from one to the next. The LoRA factors are
filled identically in both libraries (seeded, library-neutral order).

``--runs`` rounds run the workers in turn (deltatune, peft, full, deltatune, ...); each worker run appends a raw line
to ``bench/results/lora_train_step.jsonl``, then a summary line gives per worker the median over rounds of each run's
median step time (min-max) and peak RSS, and the ratios of those medians.

Goal: deltatune's step time <= 0.8 x peft's and its peak RSS <= 0.9 x peft's, with the same losses.

Prints the summary as one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    LIBRARIES,
    RunMeter,
    append_result,
    emit,
    init_lora,
    load_average,
    load_model,
    log,
    median,
    peak_rss_mb,
    set_threads,
    timed_cpu,
    train_step,
    wrap_lora,
)

WORKERS = (*LIBRARIES, "full")
GOAL = {"step_time_ratio<=": 0.8, "peak_rss_ratio<=": 0.9}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--worker", choices=WORKERS, help="run one configuration in this process (internal)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=5, help="timed steps")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-full", action="store_true", help="do not run the full fine-tuning reference")
    parser.add_argument("--runs", type=int, default=3, help="rounds of fresh worker processes, for medians")
    parser.add_argument("--quick", action="store_true", help="1 warm-up and 2 timed steps")
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.steps = 1, 2
    return args


def make_batch(vocab_size: int, batch: int, seq: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)


def build(worker: str, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The model to train and facts about it (trainable parameter count, LoRA checksum)."""
    model, _ = load_model()
    info: dict[str, Any] = {"rss_after_load_mb": peak_rss_mb()}
    if worker == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = wrap_lora(model, worker)
        info["lora_checksum"] = init_lora(model, seed)
    info["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model.train()
    return model, info


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    model, info = build(args.worker, args.seed)
    ids = make_batch(model.config.vocab_size, args.batch, args.seq, args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses, times, cpu_times = [], [], []
    load_before = load_average()
    for step in range(args.warmup + args.steps):
        seconds, cpu, loss = timed_cpu(lambda: train_step(model, optimizer, ids))
        losses.append(loss)
        if step >= args.warmup:
            times.append(seconds)
            cpu_times.append(cpu)
        log(f"[{args.worker}] step {step + 1}: loss {loss:.5f}, {seconds:.3f} s wall, {cpu:.3f} s CPU")
    return {
        **info,
        "step_time_s": round(sum(times) / len(times), 4),
        "step_time_median_s": round(median(times), 4),
        "step_times_s": [round(t, 4) for t in times],
        "step_cpu_time_s": round(sum(cpu_times) / len(cpu_times), 4),
        "load_avg_1m": [load_before, load_average()],
        "losses": [round(v, 6) for v in losses],
        "peak_rss_mb": peak_rss_mb(),
        "threads": torch.get_num_threads(),
    }


def spawn(worker: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``worker`` in a fresh Python process; its stdout's last line is its JSON result."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        worker,
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--threads",
        str(args.threads),
    ]
    log(f"running worker {worker} ...")
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "batch": args.batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "steps": args.steps,
        "lr": args.lr,
        "threads": args.threads,
        "dtype": "float32",
        "runs": args.runs,
    }


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": round(median(values), 4), "min": min(values), "max": max(values), "runs": values}


def summarize(lines: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    per: dict[str, Any] = {}
    for worker, runs in lines.items():
        figs = [line["figures"] for line in runs]
        per[worker] = {
            "run_ids": [line["run_id"] for line in runs],
            "step_time_median_s": spread([f["step_time_median_s"] for f in figs]),
            "step_cpu_time_s": spread([f["step_cpu_time_s"] for f in figs]),
            "peak_rss_mb": spread([f["peak_rss_mb"] for f in figs]),
            "other_procs_cores": [line["run"]["other_procs_cores"] for line in runs],
            "trainable_params": figs[0]["trainable_params"],
        }
    ours, theirs = per["deltatune"], per["peft"]
    dt_losses, peft_losses = lines["deltatune"][0]["figures"]["losses"], lines["peft"][0]["figures"]["losses"]
    ratio = round(ours["step_time_median_s"]["median"] / theirs["step_time_median_s"]["median"], 3)
    rss_ratio = round(ours["peak_rss_mb"]["median"] / theirs["peak_rss_mb"]["median"], 3)
    return {
        "bench": "lora_train_step",
        "settings": settings(args),
        "workers": per,
        "step_time_ratio_of_medians": ratio,
        "step_cpu_time_ratio_of_medians": round(
            ours["step_cpu_time_s"]["median"] / theirs["step_cpu_time_s"]["median"], 3
        ),
        "peak_rss_ratio_of_medians": rss_ratio,
        "max_loss_diff": max(abs(a - b) for a, b in zip(dt_losses, peft_losses, strict=True)),
        "goal": GOAL,
        "goal_met": {
            "step_time": ratio <= GOAL["step_time_ratio<="],
            "peak_rss": rss_ratio <= GOAL["peak_rss_ratio<="],
        },
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        emit(run_worker(args))
        return
    set_threads(args.threads)
    campaign = "lora_train_step-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    meter = RunMeter()
    workers = [w for w in WORKERS if not (args.skip_full and w == "full")]
    lines: dict[str, list[dict[str, Any]]] = {w: [] for w in workers}
    for round_index in range(args.runs):
        for worker in workers:
            run_meter = RunMeter()
            figures = spawn(worker, args)
            lines[worker].append(
                append_result(
                    "lora_train_step",
                    figures,
                    run_meter,
                    kind="worker",
                    campaign=campaign,
                    round=round_index + 1,
                    side=worker,
                    settings=settings(args),
                )
            )
    summary = summarize(lines, args)
    append_result("lora_train_step", summary, meter, kind="summary", campaign=campaign, settings=settings(args))
    emit(summary)


if __name__ == "__main__":
    main()
