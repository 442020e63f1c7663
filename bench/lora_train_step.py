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

The ``gemms`` worker times the step's GEMMs alone, at the step's shapes, threads and dtype: every frozen linear's
forward matmul and, where its input needs a gradient, the input-gradient matmul of its backward, and the head's two
(logits, and the hidden states' gradient) on the labelled positions. ``limit_ratio_of_medians`` is deltatune's step
time over that: how far the step is from the machine's limit for its GEMMs.

``--profile N`` runs deltatune's worker once under torch.profiler and prints its top N ops by self CPU time per
step (what the step spends beside its GEMMs); ``--worker W --profile N`` profiles another worker.

``--gradient-checkpointing`` recomputes every decoder block in the backward on both LoRA sides (the gemms worker
stays without it: its limit is the plain step's).

Goal (issue 28): deltatune's step time <= 0.8 x peft's and its peak RSS <= 0.8 x peft's, with the same losses; the
step <= 1.25 x its GEMMs alone.

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
import torch.nn.functional as F
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

WORKERS = (*LIBRARIES, "full", "gemms")
GOAL = {"step_time_ratio<=": 0.8, "peak_rss_ratio<=": 0.8, "limit_ratio<=": 1.25}  # issue 28


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
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile one run: its top N ops")
    parser.add_argument(
        "--compile", action="store_true", help="DeltaModel.compile (inductor) before deltatune's steps (warm-up >= 1)"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="checkpoint every decoder block (non-reentrant, as deltatune train does) on both LoRA sides",
    )
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


def step_gemms(model: nn.Module, ids: torch.Tensor) -> list[tuple[torch.Tensor, int, bool]]:
    """(weight, rows, input needs a gradient) of every frozen linear in deltatune's step, the head last.

    Found by running the step's forward once with a hook on each frozen ``nn.Linear``; the fused head +
    cross-entropy calls no module, so the head is added with the labelled positions as its rows."""
    from deltatune.loss import LossModule

    found: list[tuple[torch.Tensor, int, bool]] = []

    def record(module: nn.Module, inputs: tuple, _output: Any) -> None:
        x = inputs[0]
        found.append((module.weight, x.numel() // x.shape[-1], x.requires_grad))

    frozen = [m for m in model.modules() if isinstance(m, nn.Linear) and not m.weight.requires_grad]
    handles = [m.register_forward_hook(record) for m in frozen]
    try:
        LossModule(model, "causal-lm")({"input_ids": ids, "labels": ids})
    finally:
        for handle in handles:
            handle.remove()
    head = model.base_model.get_output_embeddings().weight
    if all(weight is not head for weight, _, _ in found):
        found.append((head, ids.shape[0] * (ids.shape[1] - 1), True))
    return found


def time_gemms(gemms: list[tuple[torch.Tensor, int, bool]], seed: int) -> Any:
    """A function that runs every GEMM of ``gemms`` once: y = x·Wᵀ, and g·W where the input needs a gradient
    (inputs random, one per shape, the model's own weights)."""
    gen = torch.Generator().manual_seed(seed)
    inputs: dict[tuple[int, int], torch.Tensor] = {}

    def random(rows: int, cols: int) -> torch.Tensor:
        return inputs.setdefault((rows, cols), torch.randn(rows, cols, generator=gen))

    work = [(random(rows, w.shape[1]), w, random(rows, w.shape[0]) if grad else None) for w, rows, grad in gemms]

    def run() -> None:
        with torch.no_grad():
            for x, weight, grad in work:
                F.linear(x, weight)
                if grad is not None:
                    torch.mm(grad, weight)

    return run


def gemm_flops(gemms: list[tuple[torch.Tensor, int, bool]]) -> float:
    return sum(2 * rows * w.numel() * (2 if grad else 1) for w, rows, grad in gemms)


def profile_top(fn: Any, steps: int, top: int) -> dict[str, Any]:
    """The top ``top`` ops of ``steps`` calls of ``fn`` by self CPU time (per step), and the matmuls' share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    matmuls = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return {
        "self_cpu_ms_per_step": round(total / 1000 / steps, 1),
        "matmul_share": round(matmuls / total, 3),
        "top": [
            {
                "op": e.key,
                "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1000 / steps, 2),
                "calls_per_step": round(e.count / steps, 1),
                "share": round(e.self_cpu_time_total / total, 3),
            }
            for e in events[:top]
        ],
    }


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each decoder block in the backward, the same call for both libraries' underlying model."""
    from deltatune import DeltaModel

    base = model.base_model if isinstance(model, DeltaModel) else model.get_base_model()
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    model, info = build("deltatune" if args.worker == "gemms" else args.worker, args.seed)
    if args.gradient_checkpointing and args.worker in LIBRARIES:
        checkpoint_blocks(model)
    if args.compile and args.worker == "deltatune":
        info["compiled"] = model.compile()
    ids = make_batch(model.config.vocab_size, args.batch, args.seq, args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    step_fn = lambda: train_step(model, optimizer, ids)  # noqa: E731
    if args.worker == "gemms":
        gemms = step_gemms(model, ids)
        info.update(gemm_count=sum(1 + grad for _, _, grad in gemms), gemm_gflop=round(gemm_flops(gemms) / 1e9, 2))
        run = time_gemms(gemms, args.seed)
        step_fn = lambda: run() or 0.0  # noqa: E731
    losses, times, cpu_times = [], [], []
    load_before = load_average()
    for step in range(args.warmup + args.steps):
        seconds, cpu, loss = timed_cpu(step_fn)
        losses.append(loss)
        if step >= args.warmup:
            times.append(seconds)
            cpu_times.append(cpu)
        log(f"[{args.worker}] step {step + 1}: loss {loss:.5f}, {seconds:.3f} s wall, {cpu:.3f} s CPU")
    if args.profile:
        info["profile"] = profile_top(step_fn, args.steps, args.profile)
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
        "--profile",
        str(args.profile),
        *(["--compile"] if args.compile else []),
        *(["--gradient-checkpointing"] if args.gradient_checkpointing else []),
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
        "compile": args.compile,
        "gradient_checkpointing": args.gradient_checkpointing,
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
    gemms = per.get("gemms")
    limit = round(ours["step_time_median_s"]["median"] / gemms["step_time_median_s"]["median"], 3) if gemms else None
    cpu_limit = round(ours["step_cpu_time_s"]["median"] / gemms["step_cpu_time_s"]["median"], 3) if gemms else None
    return {
        "bench": "lora_train_step",
        "settings": settings(args),
        "workers": per,
        "step_time_ratio_of_medians": ratio,
        "step_cpu_time_ratio_of_medians": round(
            ours["step_cpu_time_s"]["median"] / theirs["step_cpu_time_s"]["median"], 3
        ),
        "peak_rss_ratio_of_medians": rss_ratio,
        "limit_ratio_of_medians": limit,  # deltatune's step over its GEMMs alone
        "limit_cpu_time_ratio_of_medians": cpu_limit,  # the same in CPU time (steadier on a shared machine)
        "max_loss_diff": max(abs(a - b) for a, b in zip(dt_losses, peft_losses, strict=True)),
        "goal": GOAL,
        "goal_met": {
            "step_time": ratio <= GOAL["step_time_ratio<="],
            "peak_rss": rss_ratio <= GOAL["peak_rss_ratio<="],
            "limit": None if limit is None else limit <= GOAL["limit_ratio<="],
        },
    }


def run_profile(args: argparse.Namespace) -> None:
    """``--profile N``: deltatune's worker once, its top ops by self CPU time on stderr and in a result line."""
    meter = RunMeter()
    figures = spawn("deltatune", args)
    for op in figures["profile"]["top"]:
        log(f"{op['self_cpu_ms_per_step']:10.2f} ms {op['share']:6.1%} {op['calls_per_step']:8.1f}x  {op['op']}")
    line = append_result("lora_train_step", figures, meter, kind="profile", side="deltatune", settings=settings(args))
    emit({"run_id": line["run_id"], "step_time_median_s": figures["step_time_median_s"], **figures["profile"]})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        emit(run_worker(args))
        return
    if args.profile:
        run_profile(args)
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
