"""LoRA inference benchmark: generation latency of deltatune's LoRA, unmerged and merged, vs peft's.

Measured, for SmolLM2-135M-Instruct in float32 on CPU (2 threads): batch-1 greedy generation
(do_sample=False) of exactly 32 new tokens (min_new_tokens = max_new_tokens = 32) from a fixed chat
prompt, as ms per generated token (prompt prefill included), the median of ``--repeats`` runs
after ``--warmup`` untimed ones, for each of these configurations (each its own model copy, timed
in interleaved rounds so that a busy spell on a shared machine hits them all alike):

* ``base``: the plain model;
* ``deltatune_unmerged``: deltatune LoRA r=8 alpha=16 on q_proj/v_proj, B filled with seeded
  N(0, ``--b-std``) values so that the adapter changes the output;
* ``deltatune_merged``: the same after ``merge_adapter()`` (wrappers still in place);
* ``deltatune_merged_unloaded``: the plain model returned by ``merge_and_unload()``;
* ``peft_unmerged`` / ``peft_merged``: peft with identical LoRA factors, for the side-by-side.

Checks: merged tokens == unmerged tokens, peft tokens == deltatune tokens, LoRA tokens != base tokens.

Goal: merged LoRA costs nothing over the base model (merged/base ~ 1.0), unmerged LoRA stays close
to it and no slower than peft's, and merging never changes the generated tokens.

Each invocation appends one raw line to ``bench/results/lora_inference.jsonl``. Prints one JSON line on stdout;
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
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
    timed,
    wrap_lora,
)

PROMPT = "Give me three short tips for writing clear and maintainable Python code."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--b-std", type=float, default=0.1, help="std of the random LoRA B values")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="8 new tokens, 1 timed run")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 8, 1
    return args


def prompt_inputs(tokenizer: Any) -> dict[str, torch.Tensor]:
    messages = [{"role": "user", "content": PROMPT}]
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def generate(model: nn.Module, inputs: dict[str, torch.Tensor], new_tokens: int, pad_id: int) -> list[int]:
    """Greedy generation of exactly ``new_tokens`` tokens; returns only the new ones."""
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id
        )
    tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    if len(tokens) != new_tokens:
        raise RuntimeError(f"expected {new_tokens} new tokens, got {len(tokens)}")
    return tokens


def lora_model(library: str, seed: int, b_std: float) -> tuple[nn.Module, float]:
    """A fresh base model with a LoRA adapter whose factors are seeded (same values in both libraries)."""
    model, _ = load_model()
    lora = wrap_lora(model, library)
    return lora, init_lora(lora, seed, b_std)


def build_configs(base: nn.Module, args: argparse.Namespace) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Every configuration as its own model, so that they can be timed in interleaved rounds."""
    configs: dict[str, nn.Module] = {"base": base}
    checksums: dict[str, float] = {}
    for library in ("deltatune", "peft"):
        configs[f"{library}_unmerged"], checksums[library] = lora_model(library, args.seed, args.b_std)
        configs[f"{library}_merged"], _ = lora_model(library, args.seed, args.b_std)
        configs[f"{library}_merged"].merge_adapter()
    configs["deltatune_merged_unloaded"] = lora_model("deltatune", args.seed, args.b_std)[0].merge_and_unload()
    for model in configs.values():
        model.eval()
    return configs, checksums


def measure_all(
    configs: dict[str, nn.Module], inputs: dict[str, torch.Tensor], args: argparse.Namespace, pad_id: int
) -> dict[str, dict[str, Any]]:
    """Time every configuration once per round, rounds interleaved so that a busy spell hits all alike.

    Per configuration: ms/token (median of the timed rounds), the generated tokens, and whether greedy
    generation gave the same tokens every round.
    """
    runs: dict[str, list[tuple[float, list[int]]]] = {label: [] for label in configs}
    for round_index in range(args.warmup + args.repeats):
        for label, model in configs.items():
            runs[label].append(timed(lambda model=model: generate(model, inputs, args.new_tokens, pad_id)))
        log(
            f"round {round_index + 1}: "
            + ", ".join(f"{label} {1000 * r[-1][0] / args.new_tokens:.1f}" for label, r in runs.items())
            + " ms/token"
        )
    out = {}
    for label, label_runs in runs.items():
        ms = [1000 * seconds / args.new_tokens for seconds, _ in label_runs[args.warmup :]]
        out[label] = {
            "ms_per_token": round(median(ms), 3),
            "ms_per_token_runs": [round(v, 3) for v in ms],
            "tokens": label_runs[0][1],
            "repeatable": all(tokens == label_runs[0][1] for _, tokens in label_runs),
        }
    return out


def summarize(
    res: dict[str, dict[str, Any]], checksums: dict[str, float], load_avg: list[float], args: argparse.Namespace
) -> dict[str, Any]:
    def ms(key: str) -> float:
        return res[key]["ms_per_token"]

    def tokens(key: str) -> list[int]:
        return res[key]["tokens"]

    configs = (
        "base",
        "deltatune_unmerged",
        "deltatune_merged",
        "deltatune_merged_unloaded",
        "peft_unmerged",
        "peft_merged",
    )
    return {
        "bench": "lora_inference",
        "settings": {
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "dtype": "float32",
            "b_std": args.b_std,
        },
        "ms_per_token": {key: ms(key) for key in configs},
        "merged_over_base": round(ms("deltatune_merged") / ms("base"), 3),
        "merged_unloaded_over_base": round(ms("deltatune_merged_unloaded") / ms("base"), 3),
        "unmerged_over_base": round(ms("deltatune_unmerged") / ms("base"), 3),
        "unmerged_over_peft_unmerged": round(ms("deltatune_unmerged") / ms("peft_unmerged"), 3),
        "merged_tokens_equal_unmerged": tokens("deltatune_merged") == tokens("deltatune_unmerged"),
        "merged_unloaded_tokens_equal_unmerged": tokens("deltatune_merged_unloaded") == tokens("deltatune_unmerged"),
        "peft_tokens_equal_deltatune": tokens("peft_unmerged") == tokens("deltatune_unmerged"),
        "lora_changes_output": tokens("deltatune_unmerged") != tokens("base"),
        "repeatable": all(r["repeatable"] for r in res.values()),
        "same_lora_factors": checksums["deltatune"] == checksums["peft"],
        "peak_rss_mb": peak_rss_mb(),
        "load_avg_1m": load_avg,
        "goal": {
            "merged_over_base<=": 1.05,
            "unmerged_over_peft_unmerged<=": 1.0,
            "merged_tokens_equal_unmerged": True,
        },
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    meter = RunMeter()
    load_start = load_average()
    base, tokenizer = load_model()
    inputs = prompt_inputs(tokenizer)
    log(f"prompt: {inputs['input_ids'].shape[1]} tokens")
    configs, checksums = build_configs(base, args)
    res = measure_all(configs, inputs, args, tokenizer.pad_token_id)
    summary = summarize(res, checksums, [load_start, load_average()], args)
    # one invocation is one run: the README shows the median over the latest invocations (bench/report.py)
    append_result("lora_inference", summary, meter, kind="summary")
    emit(summary)


if __name__ == "__main__":
    main()
