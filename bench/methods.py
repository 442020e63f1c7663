"""Every method on SmolLM2-135M: trainable parameters, training step, memory, batch-1 latency.

Training (batch 4 x 128 random tokens, labels = inputs, AdamW, float32, 2 threads): trainable
parameters and %, median step time after warm-up, peak RSS; peft's figures beside ours where peft
has the method (LoRA, prefix tuning, prompt tuning, P-tuning, adaption prompt = LLaMA-Adapter).
``--rounds`` rounds each run every configuration once (deltatune then peft, method by method), so
a busy spell hits both libraries alike; the summary gives per configuration the median over rounds
of each run's median step time (with min-max) and of its peak RSS, and the ratios of those medians.
Goal: each deltatune method at <= 0.9x peft's step time and <= peft's memory.

Inference: ms per token of batch-1 greedy generation of 32 tokens for the base model, LoRA
merged and unmerged, Houlsby adapters, prefix and prompt tuning: the seeds' "adapters add
latency at batch size 1" on our own code.

Every configuration runs in a fresh process; each run appends a raw line to
``bench/results/methods.jsonl``, followed by a summary line. One JSON line on stdout; a table on stderr.
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
from _common import RunMeter, append_result, emit, load_model, log, median, peak_rss_mb, set_threads, train_step

VIRTUAL_TOKENS = 16


def deltatune_config(method: str):
    import deltatune as dt

    return {
        "lora": lambda: dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        "adapter": lambda: dt.AdapterConfig(bottleneck_size=64),
        "bitfit": lambda: dt.BitFitConfig(add_missing=True),
        "partial": lambda: dt.PartialConfig(train_top_layers=2),
        "prompt_tuning": lambda: dt.PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS),
        "p_tuning": lambda: dt.PTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, encoder_hidden_size=128),
        "prefix_tuning": lambda: dt.PrefixTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, encoder_hidden_size=128),
        "llama_adapter": lambda: dt.LlamaAdapterConfig(adapter_len=10, adapter_layers=8),
    }[method]()


def peft_config(method: str):
    import peft

    common = {"task_type": "CAUSAL_LM"}
    return {
        "lora": lambda: peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], **common),
        "prompt_tuning": lambda: peft.PromptTuningConfig(num_virtual_tokens=VIRTUAL_TOKENS, **common),
        "p_tuning": lambda: peft.PromptEncoderConfig(
            num_virtual_tokens=VIRTUAL_TOKENS, encoder_hidden_size=128, **common
        ),
        "prefix_tuning": lambda: peft.PrefixTuningConfig(
            num_virtual_tokens=VIRTUAL_TOKENS, prefix_projection=True, encoder_hidden_size=128, **common
        ),
        "llama_adapter": lambda: peft.AdaptionPromptConfig(adapter_len=10, adapter_layers=8, **common),
    }.get(method)


METHODS = ("lora", "adapter", "bitfit", "partial", "prompt_tuning", "p_tuning", "prefix_tuning", "llama_adapter")
LATENCY = ("base", "lora_merged", "lora", "adapter", "prefix_tuning", "prompt_tuning")


def build(method: str, library: str):
    import deltatune as dt

    model, tokenizer = load_model()
    if method == "base":
        return model, tokenizer
    if library == "peft":
        import peft

        return peft.get_peft_model(model, peft_config(method)()), tokenizer
    wrapped = dt.wrap(model, deltatune_config(method.removesuffix("_merged")))
    return wrapped, tokenizer


def train_worker(method: str, library: str, args: argparse.Namespace) -> dict[str, Any]:
    model, _ = build(method, library)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    trainable, total = sum(p.numel() for p in params), sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        train_step(model, optimizer, ids)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {
        "trainable_params": trainable,
        "trainable_pct": round(100 * trainable / total, 4),
        "step_time_s": round(sum(times) / len(times), 3),
        "step_time_median_s": round(median(times), 3),
        "peak_rss_mb": peak_rss_mb(),
    }


@torch.no_grad()
def latency_worker(method: str, args: argparse.Namespace) -> dict[str, Any]:
    model, tokenizer = build(method, "deltatune")
    if method != "base":
        for p in model.parameters():  # a non-trivial adapter, so that unmerged work is real work
            if p.requires_grad:
                p.normal_(0, 0.02)
    if method == "lora_merged":
        model.merge_adapter()
    model.eval()
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Name three colours."}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    runs = []
    for i in range(args.repeats + 1):
        start = time.perf_counter()
        model.generate(**inputs, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        if i:
            runs.append((time.perf_counter() - start) / 32 * 1000)
    return {"ms_per_token": round(median(runs), 2)}


def spawn(kind: str, method: str, library: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        method,
        library,
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    log(f"{kind}: {method} ({library}) ...")
    meter = RunMeter()
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        figures = {"error": f"worker exited with {done.returncode}"}
    else:
        figures = json.loads(done.stdout.strip().splitlines()[-1])
    line = append_result(
        "methods", figures, meter, kind=kind, method=method, library=library, settings=settings(args), **extra
    )
    return {**figures, "run_id": line["run_id"], "other_procs_cores": line["run"]["other_procs_cores"]}


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": "smollm2-135m",
        "batch": [4, 128],
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "threads": args.threads,
        "rounds": args.rounds,
    }


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": round(median(values), 3), "min": min(values), "max": max(values), "runs": values}


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One configuration over the rounds: medians (min-max) of the runs' median step time and peak RSS."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"] if runs else "no runs"}
    return {
        "trainable_params": ok[0]["trainable_params"],
        "trainable_pct": ok[0]["trainable_pct"],
        "step_time_median_s": spread([r["step_time_median_s"] for r in ok]),
        "peak_rss_mb": spread([r["peak_rss_mb"] for r in ok]),
        "run_ids": [r["run_id"] for r in ok],
        "other_procs_cores": [r["other_procs_cores"] for r in ok],
        "failed_runs": len(runs) - len(ok),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "METHOD", "LIBRARY"), help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every configuration, for medians")
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args()
    if args.worker:
        set_threads(args.threads)
        kind, method, library = args.worker
        emit(train_worker(method, library, args) if kind == "train" else latency_worker(method, args))
        return
    set_threads(args.threads)
    campaign = "methods-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    meter = RunMeter()
    raw: dict[str, dict[str, list[dict[str, Any]]]] = {m: {} for m in args.methods}
    for round_index in range(args.rounds):
        for method in args.methods:
            libraries = ["deltatune"] + (["peft"] if peft_config(method) is not None else [])
            for library in libraries:
                run = spawn("train", method, library, args, campaign=campaign, round=round_index + 1)
                raw[method].setdefault(library, []).append(run)
    training: dict[str, Any] = {}
    for method, by_library in raw.items():
        row = training[method] = {library: combine(runs) for library, runs in by_library.items()}
        ours, theirs = row["deltatune"], row.get("peft")
        if theirs is not None and "error" not in ours and "error" not in theirs:
            # ratios of the same statistic the table shows: the medians over rounds
            row["step_time_ratio"] = round(
                ours["step_time_median_s"]["median"] / theirs["step_time_median_s"]["median"], 3
            )
            row["peak_rss_ratio"] = round(ours["peak_rss_mb"]["median"] / theirs["peak_rss_mb"]["median"], 3)
    latency = (
        {}
        if args.no_latency
        else {m: spawn("latency", m, "deltatune", args, campaign=campaign, round=1) for m in LATENCY}
    )
    for method, row in training.items():
        ours, theirs = row["deltatune"], row.get("peft", {})
        if "error" in ours:
            log(f"{method:<14} {ours['error']}")
            continue
        peft_part = (
            f"peft {theirs['step_time_median_s']['median']:>7} s {theirs['peak_rss_mb']['median']:>7} MB"
            if theirs and "error" not in theirs
            else ""
        )
        log(
            f"{method:<14} {ours['trainable_pct']:>8}% {ours['step_time_median_s']['median']:>7} s "
            f"{ours['peak_rss_mb']['median']:>7} MB | {peft_part}"
        )
    for method, row in latency.items():
        log(f"latency {method:<14} {row.get('ms_per_token', '-')} ms/token")
    summary = {
        "bench": "methods",
        "campaign": campaign,
        "training": training,
        "latency_batch1": latency,
        "goal": {"step_time_ratio<=": 0.9, "peak_rss_ratio<=": 1.0},
    }
    append_result("methods", summary, meter, kind="summary", campaign=campaign, settings=settings(args))
    emit(summary)


if __name__ == "__main__":
    main()
