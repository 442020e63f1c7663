"""Every method on SmolLM2-135M: trainable parameters, training step, memory, batch-1 latency.

Training (batch 4 x 128 random tokens, labels = inputs, AdamW, float32, 2 threads): trainable
parameters and %, mean step time after warm-up, peak RSS; peft's figures beside ours where peft
has the method (LoRA, prefix tuning, prompt tuning, P-tuning, adaption prompt = LLaMA-Adapter).
Goal: each deltatune method at <= 0.9x peft's step time and <= peft's memory.

Inference: ms per token of batch-1 greedy generation of 32 tokens for the base model, LoRA
merged and unmerged, Houlsby adapters, prefix and prompt tuning: the seeds' "adapters add
latency at batch size 1" on our own code.

Every configuration runs in a fresh process. One JSON line on stdout; a table on stderr.
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
from _common import emit, load_model, log, median, peak_rss_mb, set_threads, train_step

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


def spawn(kind: str, method: str, library: str, args: argparse.Namespace) -> dict[str, Any]:
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
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        return {"error": f"worker exited with {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "METHOD", "LIBRARY"), help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-latency", action="store_true")
    args = parser.parse_args()
    if args.worker:
        set_threads(args.threads)
        kind, method, library = args.worker
        emit(train_worker(method, library, args) if kind == "train" else latency_worker(method, args))
        return
    training: dict[str, Any] = {}
    for method in args.methods:
        training[method] = {"deltatune": spawn("train", method, "deltatune", args)}
        if peft_config(method) is not None:
            ours, theirs = training[method]["deltatune"], spawn("train", method, "peft", args)
            training[method]["peft"] = theirs
            if "error" not in ours and "error" not in theirs:
                training[method]["step_time_ratio"] = round(
                    ours["step_time_median_s"] / theirs["step_time_median_s"], 3
                )
                training[method]["peak_rss_ratio"] = round(ours["peak_rss_mb"] / theirs["peak_rss_mb"], 3)
    latency = {} if args.no_latency else {m: spawn("latency", m, "deltatune", args) for m in LATENCY}
    for method, row in training.items():
        ours, theirs = row["deltatune"], row.get("peft", {})
        log(
            f"{method:<14} {ours.get('trainable_pct', '-'):>8}% {ours.get('step_time_s', '-'):>7} s "
            f"{ours.get('peak_rss_mb', '-'):>7} MB | peft {theirs.get('step_time_s', '-'):>7} s "
            f"{theirs.get('peak_rss_mb', '-'):>7} MB"
        )
    for method, row in latency.items():
        log(f"latency {method:<14} {row.get('ms_per_token', '-')} ms/token")
    emit(
        {
            "bench": "methods",
            "training": training,
            "latency_batch1": latency,
            "goal": {"step_time_ratio<=": 0.9, "peak_rss_ratio<=": 1.0},
        }
    )


if __name__ == "__main__":
    main()
