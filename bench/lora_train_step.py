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

Goal: deltatune's step time <= 0.8 x peft's and its peak RSS <= 0.9 x peft's, with the same losses.

Prints one JSON line on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    LIBRARIES,
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


def summarize(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    dt_res, peft_res = results["deltatune"], results["peft"]
    return {
        "bench": "lora_train_step",
        "settings": {
            "batch": args.batch,
            "seq": args.seq,
            "warmup": args.warmup,
            "steps": args.steps,
            "lr": args.lr,
            "threads": args.threads,
            "dtype": "float32",
        },
        **results,
        "step_time_ratio": round(dt_res["step_time_s"] / peft_res["step_time_s"], 3),
        "step_time_median_ratio": round(dt_res["step_time_median_s"] / peft_res["step_time_median_s"], 3),
        "step_cpu_time_ratio": round(dt_res["step_cpu_time_s"] / peft_res["step_cpu_time_s"], 3),
        "peak_rss_ratio": round(dt_res["peak_rss_mb"] / peft_res["peak_rss_mb"], 3),
        "max_loss_diff": max(abs(a - b) for a, b in zip(dt_res["losses"], peft_res["losses"], strict=True)),
        "goal": GOAL,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        emit(run_worker(args))
        return
    workers = [w for w in WORKERS if not (args.skip_full and w == "full")]
    emit(summarize({w: spawn(w, args) for w in workers}, args))


if __name__ == "__main__":
    main()
