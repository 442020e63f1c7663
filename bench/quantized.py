"""LoRA on a quantized frozen base: deltatune int8 / NF4 vs peft on float32 and peft on a bitsandbytes base.

SmolLM2-135M-Instruct, LoRA r=8 alpha=16 on q_proj and v_proj, 1 thread by default. Three parts, every side of
each in a fresh process (the script re-invokes itself with ``--worker``), rounds alternating the sides:

* ``step``: one fixed seeded batch of 4 x 128 random tokens, AdamW; per run the median of ``--steps`` timed
  training steps after ``--warmup`` untimed ones, and the process's peak RSS (model load included). Sides:
  deltatune on int8 and on nf4 (its trainer's step, LossModule), peft on float32, peft on a bitsandbytes nf4
  and a bitsandbytes int8 base (transformers' ``BitsAndBytesConfig``; ``model(..., labels=...)``).
  ``--step-sides`` picks some; ``ours_int8_head`` (not in the default set) also quantizes the output head;
  ``peft_bf16`` (not in the default set either) is peft on the base loaded in bfloat16, for context: the peer's
  own way to multiply in bfloat16, at 2 bytes per weight. ``--matmul-dtype``: what our quantized layers'
  products multiply in (``auto``: bfloat16 where the CPU has it in hardware); each line records it.
  ``--model DIR``: the step part on another base (a float32 safetensors directory, e.g. a ~1B Llama).
  Goals (issue 23): int8 <= 0.75x peft float32's step time, nf4 no slower than peft + bitsandbytes nf4; peak RSS
  of the whole run (load + steps) int8 <= 0.45x and nf4 <= 0.3x peft float32's.
* ``decode``: batch-1 greedy decoding of 32 new tokens from a fixed chat prompt, ms per generated token
  (median of 3 after a warm-up), of the base and of a merged LoRA (B ~ N(0, 0.02)); float32 vs int8 vs nf4.
  Goal: int8 <= 0.75x float32's ms/token, base and merged.
* ``quality``: deltatune LoRA trained ``--quality-steps`` steps on E2E (batch 4, max length 128, the same seeded
  subsample and batch order on every side, lr ``--lr``) on a float32, int8 and nf4 base; then the dev loss on
  the first 100 distinct devset MRs (first reference) and BLEU of greedy generations on ``--bleu-examples`` MRs.
  ``int8_loftq`` / ``nf4_loftq``: the same with ``init_lora_weights="loftq"`` (8 / 4 bits, ``--loftq-iter``);
  every side also records the start error of its adapted weights, sum ||W - (Q + s·B·A)|| / sum ||W||.
  Goal: dev loss within 1% of float32's after 200 steps.

Every worker run appends a raw line to ``bench/results/quantized.jsonl``; a summary line ends the campaign and is
printed as one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
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
    E2E,
    MODEL,
    RunMeter,
    append_result,
    dev_references,
    emit,
    init_lora,
    log,
    median,
    peak_rss_mb,
    set_threads,
    timed_cpu,
    train_step,
    wrap_lora,
)

import deltatune as dt

BENCH = "quantized"
STEP_SIDES = ("ours_int8", "ours_nf4", "peft_f32", "peft_bnb_nf4", "peft_bnb_int8", "ours_int8_head", "peft_bf16")
LOAD_OPTIONS: dict[str, str] = {}  # set from --matmul-dtype in main, in the campaign and in each worker
DECODE_SIDES = ("f32", "int8", "nf4", "int8_head")
QUALITY_SIDES = ("f32", "int8", "nf4", "int8_loftq", "nf4_loftq")
PROMPT = [{"role": "user", "content": "Write one sentence about a coffee shop by the river."}]
GOAL = {  # issue 23's goals
    "int8_step_vs_peft_f32<=": 0.75,
    "nf4_step_vs_peft_bnb_nf4<=": 1.0,
    "int8_rss_vs_peft_f32<=": 0.45,
    "nf4_rss_vs_peft_f32<=": 0.3,
    "int8_decode_vs_f32<=": 0.75,
    "dev_loss_within": 0.01,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--worker", help="PART:SIDE, run in this process (internal)")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="which parts to run")
    parser.add_argument("--runs", type=int, default=3, help="rounds of fresh processes for step and decode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per step run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32, help="decode: tokens generated per timing")
    parser.add_argument("--decode-sides", nargs="+", default=list(DECODE_SIDES[:3]), choices=DECODE_SIDES)
    parser.add_argument(
        "--step-sides", nargs="+", default=list(STEP_SIDES[:5]), choices=STEP_SIDES, help="step: sides to time"
    )
    parser.add_argument("--quality-steps", type=int, default=200, help="quality: training steps on E2E")
    parser.add_argument("--bleu-examples", type=int, default=100, help="quality: devset MRs for BLEU (0: none)")
    parser.add_argument("--quality-sides", nargs="+", default=list(QUALITY_SIDES), choices=QUALITY_SIDES)
    parser.add_argument("--loftq-iter", type=int, default=1, help="quality: LoftQ alternations (loftq sides)")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--matmul-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="what our quantized layers' products multiply in (deltatune.quantization.set_matmul_dtype)",
    )
    parser.add_argument(
        "--model", default=MODEL, help="step: the base, a built-in name or a model directory (e.g. a ~1B Llama)"
    )
    return parser.parse_args(argv)


# --- models ------------------------------------------------------------------------------------
def dense_dir() -> Path:
    from deltatune.loading.base_models import BUILTIN_MODELS, _dense_smollm2, resolve_model_dir

    return _dense_smollm2(resolve_model_dir(MODEL)[0], BUILTIN_MODELS[MODEL])


def load(kind: str, model: str = MODEL) -> tuple[nn.Module, Any]:
    """Our base: float32, or quantized by deltatune (``int8``/``nf4``; ``int8_head``: the output head too)."""
    if kind == "int8_head":
        base, tokenizer = dt.load_base(model)
        return dt.quantize_base(base, "int8", quantize_head=True, **LOAD_OPTIONS), tokenizer
    if kind == "f32":
        return dt.load_base(model)
    return dt.load_base(model, quantize=kind, **LOAD_OPTIONS)


def peft_bnb_base(bits: str, model: str = MODEL) -> nn.Module:
    """The peer's base: transformers + bitsandbytes, quantized while loading (float32 compute)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if bits == "nf4"
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    source = dense_dir() if model == MODEL else model
    return AutoModelForCausalLM.from_pretrained(source, quantization_config=config, device_map="cpu")


def step_model(side: str, name: str) -> tuple[nn.Module, int]:
    """The side's LoRA model on base ``name``, and the base's vocabulary size (for the random batch)."""
    if side.startswith("ours_"):
        base, library = load(side.removeprefix("ours_"), name)[0], "deltatune"
    elif side == "peft_f32":
        base, library = load("f32", name)[0], "peft"
    elif side == "peft_bf16":
        from transformers import AutoModelForCausalLM

        source = dense_dir() if name == MODEL else name
        base, library = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16), "peft"
    else:
        base, library = peft_bnb_base(side.removeprefix("peft_bnb_"), name), "peft"
    return wrap_lora(base, library), base.config.vocab_size


# --- parts --------------------------------------------------------------------------------------
def run_step(side: str, args: argparse.Namespace) -> dict[str, Any]:
    model, vocab = step_model(side, args.model)
    info = {"rss_after_load_mb": peak_rss_mb(), "lora_checksum": init_lora(model, args.seed)}
    info["base"] = dt.quantization.base_kind(model)
    model.train()
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(args.seed))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, cpus, losses = [], [], []
    reset_peak()
    for step in range(args.warmup + args.steps):
        seconds, cpu, loss = timed_cpu(lambda: train_step(model, optimizer, ids))
        losses.append(round(loss, 5))
        if step >= args.warmup:
            times.append(seconds)
            cpus.append(cpu)
        log(f"[step {side}] {step + 1}: loss {loss:.4f}, {seconds:.2f} s")
    return {
        **info,
        "step_time_median_s": round(median(times), 4),
        "step_times_s": [round(t, 4) for t in times],
        "step_cpu_median_s": round(median(cpus), 4),
        "losses": losses,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_training_mb": training_peak_mb(),
    }


def reset_peak() -> None:
    """Start the kernel's peak-RSS counter (VmHWM) afresh, so the training steps' own peak can be read apart
    from the model load's (Linux: clear_refs 5)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def training_peak_mb() -> float | None:
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None
    return round(int(line.split()[1]) / 1024, 1)


def ms_per_token(model: nn.Module, inputs: dict, new_tokens: int) -> tuple[float, list[int]]:
    def once() -> torch.Tensor:
        with torch.no_grad():
            return model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    out = once()
    times = [timed_cpu(once)[0] for _ in range(3)]
    return round(1000 * median(times) / new_tokens, 2), out[0, inputs["input_ids"].shape[1] :].tolist()


def run_decode(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    base, tokenizer = load(kind)
    base.eval()
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inputs = {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}
    base_ms, base_tokens = ms_per_token(base, inputs, args.new_tokens)
    model = wrap_lora(base, "deltatune")
    init_lora(model, args.seed, b_std=0.02)
    with torch.no_grad():
        unmerged = model(**inputs).logits[0, -1]
    merged = model.merge_and_unload().eval()  # on a quantized base: dequantize, add ΔW, requantize
    with torch.no_grad():
        merge_error = (merged(**inputs).logits[0, -1] - unmerged).abs().max().item()
    merged_ms, merged_tokens = ms_per_token(merged, inputs, args.new_tokens)
    return {
        "base_ms_per_token": base_ms,
        "merged_ms_per_token": merged_ms,
        "merge_max_abs_logits_last_position": round(merge_error, 5),
        "base_tokens": base_tokens,
        "merged_tokens": merged_tokens,
        "peak_rss_mb": peak_rss_mb(),
    }


def e2e_batches(tokenizer: Any, args: argparse.Namespace) -> list[dict]:
    """The same seeded subsample and batch order for every side."""
    import numpy as np

    from deltatune.data import Batcher, read_examples, tokenize_examples
    from deltatune.training.trainer import micro_batches

    examples = read_examples(E2E / "trainset.csv", "causal-lm")
    order = np.random.default_rng(args.seed).permutation(len(examples))[: args.quality_steps * args.batch]
    features = tokenize_examples([examples[i] for i in order.tolist()], tokenizer, "causal-lm", args.seq)
    batcher = Batcher(features, args.batch, pad_token_id=tokenizer.pad_token_id, seed=args.seed)
    feed = micro_batches(batcher, 0, 0, 0, 1)
    return [batcher.collate(next(feed)[2]) for _ in range(args.quality_steps)]


def run_quality(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    import sacrebleu

    from deltatune.data import Batcher, Example, tokenize_examples
    from deltatune.evaluation import evaluate_loss, generate
    from deltatune.loss import LossModule

    model, tokenizer = quality_model(kind, args)
    start_error = weight_error(model)
    torch.manual_seed(args.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    loss_module = LossModule(model, "causal-lm")
    model.train()
    losses, start = [], time.perf_counter()
    for i, batch in enumerate(e2e_batches(tokenizer, args)):
        total, count = loss_module(batch)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round((total / count).item(), 4))
        if (i + 1) % 10 == 0:
            log(f"[quality {kind}] step {i + 1}: loss {losses[-1]}")
    train_s = time.perf_counter() - start
    model.eval()
    dev = dev_references(100)
    features = tokenize_examples([Example(mr, refs[0]) for mr, refs in dev], tokenizer, "causal-lm", args.seq)
    batcher = Batcher(features, 16, pad_token_id=tokenizer.pad_token_id, seed=0, shuffle=False)
    result = {
        "steps": args.quality_steps,
        "start_weight_error": start_error,
        "train_s": round(train_s, 1),
        "losses": losses,
        "dev_loss": round(evaluate_loss(model, "causal-lm", batcher)["loss"], 5),
        "dev_mrs": len(dev),
    }
    if args.bleu_examples:
        bleu_dev = dev[: args.bleu_examples]
        hyps = generate(model, tokenizer, [Example(mr, None) for mr, _ in bleu_dev], 64)
        width = max(len(refs) for _, refs in bleu_dev)
        streams = [[refs[k] if k < len(refs) else None for _, refs in bleu_dev] for k in range(width)]
        result |= {"bleu": round(sacrebleu.BLEU().corpus_score(hyps, streams).score, 2), "bleu_mrs": len(bleu_dev)}
    return result | {"peak_rss_mb": peak_rss_mb()}


def quality_model(kind: str, args: argparse.Namespace) -> tuple[nn.Module, Any]:
    """A LoRA on ``kind``'s base: the bench's seeded init, or LoftQ's (``*_loftq``)."""
    from _common import LORA_ALPHA, LORA_R, LORA_TARGETS

    base_kind = kind.removesuffix("_loftq")
    base, tokenizer = load(base_kind)
    if base_kind == kind:
        model = wrap_lora(base, "deltatune")
        init_lora(model, args.seed)
        return model, tokenizer
    loftq = {"loftq_bits": 4 if base_kind == "nf4" else 8, "loftq_iter": args.loftq_iter}
    config = dt.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, init_lora_weights="loftq")
    config.loftq_config = loftq  # set after construction: also runs where LoraConfig lacks the field
    return dt.wrap(base, config), tokenizer


@torch.no_grad()
def weight_error(model: nn.Module) -> float:
    """sum ||W - (Q + s·B·A)|| / sum ||W|| over the adapted layers, W read from the float checkpoint."""
    from deltatune.loading.streaming import read_checkpoint_tensor

    error = norm = 0.0
    for name, layer in model.named_modules():
        if not hasattr(layer, "lora_A"):
            continue
        weight = read_checkpoint_tensor(dense_dir(), name.removeprefix("base_model.") + ".weight").float()
        base = layer.base_layer.weight
        start = base.dequantize() if hasattr(base, "dequantize") else base.detach().float()
        start = start + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        error, norm = error + float((weight - start).norm()), norm + float(weight.norm())
    return round(error / norm, 6)


PARTS = {"step": (STEP_SIDES, run_step), "decode": (DECODE_SIDES, run_decode), "quality": (QUALITY_SIDES, run_quality)}


# --- campaign -----------------------------------------------------------------------------------
def spawn(worker: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", worker, *argv]
    log(f"running {worker} ...")
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict[str, Any]:
    return {"median": round(median(values), 4), "min": min(values), "max": max(values)}


def ratio(a: dict, b: dict) -> float:
    return round(a["median"] / b["median"], 3)


def summarize(lines: dict[str, list[dict]]) -> dict[str, Any]:
    figs = {w: [line["figures"] for line in runs] for w, runs in lines.items()}
    out: dict[str, Any] = {"sides": {}}
    for worker, values in figs.items():
        keys = [k for k in ("step_time_median_s", "peak_rss_mb", "peak_rss_training_mb", "base_ms_per_token",
                            "merged_ms_per_token")
                if k in values[0]]  # fmt: skip
        out["sides"][worker] = {k: spread([v[k] for v in values]) for k in keys} | {
            "other_procs_cores": [line["run"]["other_procs_cores"] for line in lines[worker]]
        }
        if worker.startswith("quality:"):
            keys = ("steps", "dev_loss", "bleu", "train_s", "start_weight_error")
            out["sides"][worker] |= {k: values[0].get(k) for k in keys}
    s, met = out["sides"], {}
    if "step:peft_f32" in s:
        f32 = s["step:peft_f32"]
        for ours, kind in (("ours_int8", "int8"), ("ours_int8_head", "int8_head"), ("ours_nf4", "nf4")):
            if f"step:{ours}" not in s:
                continue
            side = s[f"step:{ours}"]
            out[f"{kind}_step_vs_peft_f32"] = ratio(side["step_time_median_s"], f32["step_time_median_s"])
            out[f"{kind}_rss_vs_peft_f32"] = ratio(side["peak_rss_mb"], f32["peak_rss_mb"])
            # the training steps' own peak, model load excluded (not the goal's figure)
            out[f"{kind}_training_rss_vs_peft_f32"] = ratio(side["peak_rss_training_mb"], f32["peak_rss_training_mb"])
    if "step:ours_nf4" in s and "step:peft_bnb_nf4" in s:
        out["nf4_step_vs_peft_bnb_nf4"] = ratio(
            s["step:ours_nf4"]["step_time_median_s"], s["step:peft_bnb_nf4"]["step_time_median_s"]
        )
    for key in ("int8_step_vs_peft_f32", "nf4_step_vs_peft_bnb_nf4", "int8_rss_vs_peft_f32", "nf4_rss_vs_peft_f32"):
        if key in out:
            met[key] = out[key] <= GOAL[key + "<="]
    for key in ("int8_head_step_vs_peft_f32", "int8_head_rss_vs_peft_f32"):
        if key in out:
            met[key] = out[key] <= GOAL[key.replace("_head", "") + "<="]
    for kind in ("int8", "int8_head"):
        if f"decode:{kind}" not in s or "decode:f32" not in s:
            continue
        for what in ("base", "merged"):
            key = f"{kind}_decode_{what}_vs_f32"
            out[key] = ratio(s[f"decode:{kind}"][f"{what}_ms_per_token"], s["decode:f32"][f"{what}_ms_per_token"])
            met[key] = out[key] <= GOAL["int8_decode_vs_f32<="]
    if "quality:f32" in s:
        for kind in [k.removeprefix("quality:") for k in s if k.startswith("quality:") and k != "quality:f32"]:
            key = f"{kind}_dev_loss_vs_f32"
            out[key] = round(s[f"quality:{kind}"]["dev_loss"] / s["quality:f32"]["dev_loss"] - 1, 4)
            met[key] = abs(out[key]) <= GOAL["dev_loss_within"]
    return out | {"goal": GOAL, "goal_met": met}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    LOAD_OPTIONS["matmul_dtype"] = args.matmul_dtype
    if args.worker:
        part, side = args.worker.split(":")
        torch.manual_seed(args.seed)
        emit(PARTS[part][1](side, args))
        return
    passed = [a for a in (argv if argv is not None else sys.argv[1:])]
    if "--parts" in passed:  # the workers get every option but --parts
        i = passed.index("--parts")
        j = i + 1
        while j < len(passed) and not passed[j].startswith("--"):
            j += 1
        passed = passed[:i] + passed[j:]
    campaign = f"{BENCH}-" + time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    meter, lines = RunMeter(), {}
    settings = vars(args) | {"worker": None}
    for part in args.parts:
        sides = {"decode": args.decode_sides, "step": args.step_sides, "quality": args.quality_sides}[part]
        for round_index in range(1 if part == "quality" else args.runs):
            for side in sides:
                worker, run_meter = f"{part}:{side}", RunMeter()
                figures = spawn(worker, passed)
                extra = {"kind": "worker", "campaign": campaign, "round": round_index + 1, "side": worker}
                lines.setdefault(worker, []).append(
                    append_result(BENCH, figures, run_meter, settings=settings, **extra)
                )
    summary = summarize(lines)
    append_result(BENCH, summary, meter, kind="summary", campaign=campaign, settings=settings)
    emit(summary)


if __name__ == "__main__":
    main()
