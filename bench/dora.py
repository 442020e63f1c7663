"""DoRA and PiSSA costs: deltatune's DoRA vs its LoRA and vs peft's DoRA; PiSSA's init time.

SmolLM2-135M-Instruct, float32, CPU. Three parts (``--part``), each worker in a fresh process,
workers alternating over ``--runs`` rounds; raw lines and a summary in ``bench/results/dora.jsonl``:

* ``train``: wall time of a training step (forward + backward + AdamW step), r=8 alpha=16 on q_proj
  and v_proj, a fixed 4 x 128 token batch; workers ``lora`` and ``dora`` (deltatune, its trainer's
  step) and ``peft_dora`` (peft's DoRA, ``model(..., labels=...)``). Goal: DoRA <= 1.3 x LoRA.
* ``infer``: wall time of an unmerged forward (no grad, eval, 1 x 128 tokens), ``lora`` vs
  ``dora`` (deltatune; DoRA's weight norm cached between calls) and ``peft_dora`` (peft's default,
  no caching). Goal: DoRA <= 1.2 x LoRA.
* ``pissa``: seconds to add an all-linear r=16 adapter with ``init_lora_weights="pissa_niter_4"``
  (randomized SVD of every linear weight), deltatune (``pissa``) and peft (``peft_pissa``). Goal: <= 5 s (wall);
  the process's CPU time of the same call is kept too (``cpu_s``): the work, without the wait for a busy core.

Per worker: the median of its timed repetitions; the summary gives per worker the median over rounds
(min-max) and the ratios of those medians. Prints the summary as one JSON line on stdout.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    LORA_ALPHA,
    LORA_R,
    LORA_TARGETS,
    RunMeter,
    append_result,
    emit,
    init_lora,
    load_model,
    log,
    median,
    peak_rss_mb,
    set_threads,
    timed,
    train_step,
)

import deltatune as dt

PARTS = {
    "train": ("lora", "dora", "peft_dora"),
    "infer": ("lora", "dora", "peft_dora"),
    "pissa": ("pissa", "peft_pissa"),
}
GOALS = {"train": ("dora", "lora", 1.3), "infer": ("dora", "lora", 1.2)}
PISSA_GOAL_S = 5.0


def wrap(model: torch.nn.Module, worker: str, **extra: Any) -> torch.nn.Module:
    dora = worker.endswith("dora")
    if worker.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, use_dora=dora, **extra)
        return get_peft_model(model, config)
    config = dt.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, use_dora=dora, **extra)
    return dt.wrap(model, config)


def run_train(args: argparse.Namespace) -> dict[str, Any]:
    model = wrap(load_model()[0], args.worker)
    init_lora(model, args.seed, b_std=0.02)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    for step in range(args.warmup + args.reps):
        seconds, loss = timed(lambda: train_step(model, optimizer, ids))
        losses.append(round(loss, 6))
        if step >= args.warmup:
            times.append(seconds)
    return {"times_s": [round(t, 4) for t in times], "median_s": round(median(times), 4), "losses": losses}


def run_infer(args: argparse.Namespace) -> dict[str, Any]:
    model = wrap(load_model()[0], args.worker)
    init_lora(model, args.seed, b_std=0.02)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(args.seed))
    times = []
    with torch.no_grad():
        for step in range(args.warmup + args.reps):
            seconds, logits = timed(lambda: model(input_ids=ids, use_cache=False).logits)
            if step >= args.warmup:
                times.append(seconds)
    return {
        "times_s": [round(t, 4) for t in times],
        "median_s": round(median(times), 4),
        "logit_sum": float(logits.sum()),
    }


def run_pissa(args: argparse.Namespace) -> dict[str, Any]:
    model = load_model()[0]
    torch.manual_seed(args.seed)
    extra = {"r": 16, "lora_alpha": 16, "target_modules": "all-linear", "init_lora_weights": "pissa_niter_4"}
    cpu_start = time.process_time()
    if args.worker == "peft_pissa":
        from peft import LoraConfig, get_peft_model

        seconds, _ = timed(lambda: get_peft_model(model, LoraConfig(**extra)))
    else:
        seconds, _ = timed(lambda: dt.wrap(model, dt.LoraConfig(**extra)))
    # CPU time: the work itself; on a shared machine the wall time adds the wait for a core.
    cpu = time.process_time() - cpu_start
    return {"times_s": [round(seconds, 3)], "median_s": round(seconds, 3), "cpu_s": round(cpu, 3)}


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    figures = {"train": run_train, "infer": run_infer, "pissa": run_pissa}[args.part](args)
    return {**figures, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()}


def spawn(worker: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, *forwarded(args)]
    log(f"running {args.part} worker {worker} ...")
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def forwarded(args: argparse.Namespace) -> list[str]:
    return [
        "--part", args.part, "--warmup", str(args.warmup), "--reps", str(args.reps),
        "--seed", str(args.seed), "--threads", str(args.threads),
    ]  # fmt: skip


def summarize(part: str, lines: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    per = {}
    for worker, runs in lines.items():
        medians = [line["figures"]["median_s"] for line in runs]
        per[worker] = {
            "median_s": round(median(medians), 4),
            "min_s": min(medians),
            "max_s": max(medians),
            "run_ids": [line["run_id"] for line in runs],
            "other_procs_cores": [line["run"]["other_procs_cores"] for line in runs],
        }
        cpu = [line["figures"]["cpu_s"] for line in runs if "cpu_s" in line["figures"]]
        if cpu:
            per[worker]["cpu"] = {"median_s": round(median(cpu), 4), "min_s": min(cpu), "max_s": max(cpu)}
    summary: dict[str, Any] = {"part": part, "workers": per}
    if part in GOALS:
        num, den, goal = GOALS[part]
        ratio = round(per[num]["median_s"] / per[den]["median_s"], 3)
        summary |= {f"{num}/{den}": ratio, "goal": f"<= {goal}", "goal_met": ratio <= goal}
        summary["dora/peft_dora"] = round(per["dora"]["median_s"] / per["peft_dora"]["median_s"], 3)
    else:
        summary |= {"goal": f"<= {PISSA_GOAL_S} s", "goal_met": per["pissa"]["median_s"] <= PISSA_GOAL_S}
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--part", choices=sorted(PARTS), required=True)
    parser.add_argument("--worker", help="run one configuration in this process (internal)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per worker run")
    parser.add_argument("--runs", type=int, default=3, help="rounds of fresh worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: tiny LAPACK calls stall on a busy machine with more)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        emit(run_worker(args))
        return
    campaign = f"dora-{args.part}-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    meter, workers = RunMeter(), PARTS[args.part]
    lines: dict[str, list[dict[str, Any]]] = {w: [] for w in workers}
    settings = {k: getattr(args, k) for k in ("part", "warmup", "reps", "runs", "threads")}
    for round_index in range(args.runs):
        for worker in workers:
            run_meter = RunMeter()
            figures = spawn(worker, args)
            lines[worker].append(
                append_result(
                    "dora",
                    figures,
                    run_meter,
                    kind="worker",
                    campaign=campaign,
                    round=round_index + 1,
                    side=worker,
                    settings=settings,
                )
            )
    summary = summarize(args.part, lines)
    append_result("dora", summary, meter, kind="summary", campaign=campaign, settings=settings)
    emit(summary)


if __name__ == "__main__":
    main()
