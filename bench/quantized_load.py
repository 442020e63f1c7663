"""Quantized bases: what loading costs in memory, and how close each format stays to float32.

* ``fidelity``: SmolLM2-135M on 8 ordinary sentences, each quantized base (``--kinds``, products in each of
  ``--matmul-dtypes``) against the float32 model: top-1 agreement of the next-token predictions and the
  relative logits error ||Δ|| / ||float32|| over real (non-pad) positions. Deterministic: one fresh process
  per kind and dtype. Goal (issue 23): int8 top-1 >= 0.95 and relative error <= 0.06; gguf equal to its own
  float32 dequantization to rounding.
* ``load``: the peak resident memory of a fresh process that only loads the base (``load_base``), against
  its baseline (imports done, nothing loaded), with the quantized model's stored bytes and its largest
  tensor (at its own bytes; for int8/nf4 a linear weight's float32 size, which passes before it is quantized);
  ``--runs`` alternating rounds. Models: ``smollm2`` and ``llama1b`` (a ~1.1B Llama-shaped model,
  TinyLlama's shape, random float32 weights written as sharded safetensors under ``--scratch`` and deleted
  after). Goal: peak - baseline <= 1.2 x (stored + largest tensor), ``load_*`` (the whole ``load_base``).
  ``load_base`` reads the tokenizer first: ``tokenizer_peak_mb`` / ``tokenizer_kept_mb`` are the peak and the
  resident memory over the baseline when the model's load begins, and ``model_load_*`` the peak over that
  (the model's own load).

Peaks are read from /proc/self/status (VmHWM): ``ru_maxrss`` survives exec and can be the parent's.
Raw lines go to ``bench/results/quantized.jsonl``; the summary line is printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import append_result, emit, median

BENCH = "quantized"
SENTENCES = [
    "The capital of France is Paris, and the capital of Italy is",
    "Once upon a time, in a small village by the sea, there lived",
    "To make a cup of tea, first boil the water, then",
    "The quick brown fox jumps over the lazy dog because",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Photosynthesis is the process by which green plants",
    "The meeting has been moved to Thursday afternoon, so please",
    "In 1969, the Apollo 11 mission landed the first humans on",
]


def vm_hwm() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) * 1024


def vm_rss() -> int:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) * 1024


def base_name(model: str, scratch: Path) -> str:
    return "smollm2-135m" if model == "smollm2" else str(scratch / "llama1b")


def worker_fidelity(kind: str, matmul_dtype: str = "auto") -> dict[str, Any]:
    import deltatune as dt

    reference, tokenizer = dt.load_base("smollm2-135m")
    model, _ = dt.load_base("smollm2-135m", quantize=kind, matmul_dtype=matmul_dtype)
    inputs = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref, got = reference(**inputs).logits[mask], model(**inputs).logits[mask]
    return {
        "part": "fidelity",
        "kind": kind,
        "base": dt.quantization.base_kind(model),
        "positions": int(mask.sum()),
        "top1_agreement": (ref.argmax(-1) == got.argmax(-1)).float().mean().item(),
        "relative_logits_error": ((got - ref).norm() / ref.norm()).item(),
        "max_abs_logits_diff": (got - ref).abs().max().item(),
    }


def worker_load(model: str, kind: str, scratch: Path) -> dict[str, Any]:
    import deltatune as dt
    from deltatune.loading import base_models
    from deltatune.quantization import QuantizedLinear, base_storage

    at_model: dict[str, int] = {}  # load_base reads the tokenizer first, then the model

    def recording(load: Any) -> Any:
        def load_model(*args: Any, **kwargs: Any) -> Any:
            at_model.update(rss=vm_rss(), hwm=vm_hwm())
            return load(*args, **kwargs)

        return load_model

    base_models._load_float = recording(base_models._load_float)
    base_models._load_quantized = recording(base_models._load_quantized)
    baseline = vm_rss()
    base, _ = dt.load_base(base_name(model, scratch), quantize=None if kind == "f32" else kind)
    peak = vm_hwm()
    stored, _ = base_storage(base)
    largest = max(p.numel() * p.element_size() for p in base.parameters())  # GGUF blocks: their own bytes
    if kind != "gguf":  # int8/nf4: each linear weight passes in float32 before it is quantized
        quantized = [m.in_features * m.out_features * 4 for m in base.modules() if isinstance(m, QuantizedLinear)]
        largest = max([largest, *quantized])
    return {
        "part": "load",
        "model": model,
        "kind": kind,
        "baseline_mb": baseline / 2**20,
        "peak_mb": peak / 2**20,
        "load_mb": (peak - baseline) / 2**20,
        "stored_mb": stored / 2**20,
        "largest_float_tensor_mb": largest / 2**20,
        "load_over_stored_plus_largest": (peak - baseline) / (stored + largest),
        "tokenizer_peak_mb": (at_model["hwm"] - baseline) / 2**20,
        "tokenizer_kept_mb": (at_model["rss"] - baseline) / 2**20,
        # the model's own load: the peak over what the process held when the model began (baseline + tokenizer)
        "model_load_mb": (peak - at_model["rss"]) / 2**20,
        "model_load_over_stored_plus_largest": (peak - at_model["rss"]) / (stored + largest),
    }


def write_llama1b(scratch: Path) -> None:
    """TinyLlama-1.1B's shape with random float32 weights (memory and speed do not depend on their values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltatune.loading.base_models import BUILTIN_MODELS, _dense_smollm2, resolve_model_dir

    target = scratch / "llama1b"
    if (target / "config.json").is_file():
        return
    config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                         num_attention_heads=32, num_key_value_heads=4, tie_word_embeddings=False)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(target, max_shard_size="1GB")
    smol = _dense_smollm2(resolve_model_dir("smollm2-135m")[0], BUILTIN_MODELS["smollm2-135m"])
    for file in smol.glob("*token*"):
        shutil.copy(file, target)


def spawn(argv: list[str]) -> dict[str, Any]:
    run = subprocess.run([sys.executable, __file__, *argv], capture_output=True, text=True)
    if run.returncode != 0:
        return {"error": run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"exit {run.returncode}"}
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs="+", help="internal: fidelity KIND MATMUL_DTYPE | load MODEL KIND")
    parser.add_argument("--parts", nargs="+", default=["fidelity", "load"], choices=["fidelity", "load"])
    parser.add_argument("--kinds", nargs="+", default=["int8", "nf4", "gguf"])
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama1b"], choices=["smollm2", "llama1b"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--matmul-dtypes",
        nargs="+",
        default=["auto"],
        choices=["auto", "float32", "bfloat16"],
        help="fidelity: what the quantized products multiply in (one run per kind and dtype)",
    )
    parser.add_argument("--scratch", type=Path, default=Path("/work/bench-scratch"))
    args = parser.parse_args(argv)
    if args.worker:
        part, *rest = args.worker
        torch.set_num_threads(1)
        emit(worker_fidelity(*rest) if part == "fidelity" else worker_load(rest[0], rest[1], args.scratch))
        return
    summary: dict[str, Any] = {"bench": BENCH, "part": "fidelity+load summary"}
    if "fidelity" in args.parts:
        for kind in args.kinds:
            for matmul_dtype in args.matmul_dtypes:
                line = spawn(["--worker", "fidelity", kind, matmul_dtype])
                append_result(BENCH, line)
                summary[f"fidelity_{kind}_{matmul_dtype}"] = line
    if "load" in args.parts:
        summary.update(run_loads(args))
    append_result(BENCH, summary)
    emit(summary)


def run_loads(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in args.models:
        if model == "llama1b":
            args.scratch.mkdir(parents=True, exist_ok=True)
            write_llama1b(args.scratch)
        kinds = [k for k in ["f32", *args.kinds] if not (k == "gguf" and model != "smollm2")]
        lines: dict[str, list[dict]] = {k: [] for k in kinds}
        for _ in range(args.runs):
            for kind in kinds:
                line = spawn(["--worker", "load", model, kind, "--scratch", str(args.scratch)])
                append_result(BENCH, line)
                lines[kind].append(line)
        for kind, runs in lines.items():
            ok = [r for r in runs if "error" not in r]
            out[f"load_{model}_{kind}"] = {
                key: [median([r[key] for r in ok]), min(r[key] for r in ok), max(r[key] for r in ok)]
                for key in ("peak_mb", "baseline_mb", "load_mb", "stored_mb", "load_over_stored_plus_largest",
                            "model_load_mb", "model_load_over_stored_plus_largest")
            } if ok else {"error": runs[0].get("error")}  # fmt: skip
        if model == "llama1b":
            shutil.rmtree(args.scratch / "llama1b", ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
