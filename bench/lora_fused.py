"""Micro-benchmark: deltatune's fused LoRA matmuls against separate ones.

Fused: the A matmuls of targets that read one input run as one (q/k/v, gate/up: deltatune.methods.lora_fused),
and each B matmul adds into the base output inside the GEMM (addmm). Separate: every layer its own A matmul, B
matmul and add (``lora_fused.ungroup`` and the layer template's ``forward_active``).

SmolLM2-135M-shaped decoder layers (hidden 576, MLP 1536, 9 heads, 3 KV heads; random weights, ``--layers`` of
them), float32, ``--threads`` threads (1 by default), a batch of 4 x 128 tokens fed as embeddings: the time of
forward + backward of the decoder layers with LoRA r=8 (B random, so the deltas are not zero) on each target set,
once as deltatune wraps it (fused) and once separate, same weights. Rounds alternate the two; each round's figure
is the median of ``--reps`` steps' CPU time (this process's: steadier than wall time on a shared machine; with one
thread the two agree on a quiet one). A third side, the same layers without LoRA (the input needs a gradient
everywhere, so every side runs the same frozen backward), gives what LoRA adds. The line gives per target set the
median over rounds of each side, LoRA's cost and the saving per decoder layer in ms, and the largest difference of
the fused and separate outputs.

Prints one JSON line on stdout and appends it to ``bench/results/lora_fused.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RunMeter, append_result, emit, log, set_threads

import deltatune as dt
from deltatune.methods import lora_fused
from deltatune.methods.base import DeltaLayer

TARGETS = {
    "q,v": ["q_proj", "v_proj"],
    "q,k,v,gate,up": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"],
    "all-linear": "all-linear",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--reps", type=int, default=10, help="timed steps per round and side")
    return parser.parse_args(argv)


def smollm2_shaped(layers: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=layers,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(config).float()


def sides(layers: int, targets: Any, r: int) -> dict[str, torch.nn.Module]:
    """The decoder stack with shared A matmuls, a copy with them undone (same weights), and the base alone."""
    base = smollm2_shaped(layers).requires_grad_(False).train()
    fused = dt.wrap(smollm2_shaped(layers), dt.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    torch.manual_seed(1)
    for name, p in fused.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.02)
    separate = copy.deepcopy(fused)
    unfuse(separate)
    for model in (fused, separate):
        model.train()
    return {"fused": fused.base_model.model, "separate": separate.base_model.model, "base": base.model}


def unfuse(model: nn.Module) -> None:
    """Every LoRA layer its own A matmul, B matmul and add: no shared input, the template's forward_active."""
    lora_fused.ungroup(model)
    for layer in model.modules():
        if hasattr(layer, "shared_input"):
            layer.forward_active = types.MethodType(DeltaLayer.forward_active, layer)


def step(model: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    out = model(inputs_embeds=x, use_cache=False).last_hidden_state
    out.backward(grad)
    model.zero_grad(set_to_none=True)
    x.grad = None
    return out.detach()


def timed_round(model: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.process_time()
        step(model, x, grad)
        times.append(time.process_time() - start)
    return statistics.median(times)


def compare(args: argparse.Namespace, label: str, targets: Any) -> dict[str, Any]:
    models = sides(args.layers, targets, args.r)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(args.batch, args.seq, 576, generator=gen).requires_grad_(True)
    grad = torch.randn(args.batch, args.seq, 576, generator=gen)
    diff = (step(models["fused"], x, grad) - step(models["separate"], x, grad)).abs().max().item()
    rounds: dict[str, list[float]] = {side: [] for side in models}
    for _ in range(args.rounds):
        for side, model in models.items():
            rounds[side].append(timed_round(model, x, grad, args.reps))
    med = {side: statistics.median(values) for side, values in rounds.items()}
    per_layer = {key: round(value * 1e3 / args.layers, 3) for key, value in med.items()}
    log(f"{label}: per layer, ms CPU: {per_layer}")
    return {
        side: {"cpu_median_ms": round(med[side] * 1e3, 3), "cpu_rounds_ms": [round(v * 1e3, 3) for v in values]}
        for side, values in rounds.items()
    } | {
        "lora_cost_ms_per_layer": round(per_layer["separate"] - per_layer["base"], 3),
        "saving_ms_per_layer": round(per_layer["separate"] - per_layer["fused"], 3),
        "fused_over_separate": round(med["fused"] / med["separate"], 4),
        "max_output_diff": diff,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    meter = RunMeter()
    figures = {label: compare(args, label, targets) for label, targets in TARGETS.items()}
    settings = {k: getattr(args, k) for k in ("layers", "batch", "seq", "r", "threads", "rounds", "reps")}
    append_result("lora_fused", figures, meter, settings={**settings, "dtype": "float32"})
    emit({"settings": settings, **figures})


if __name__ == "__main__":
    main()
