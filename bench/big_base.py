"""Issue 23's headline: a 7B-shaped Llama trains LoRA on a 24 GB machine with a quantized base.

The model (Llama-2-7B's shape: hidden 4096, 32 layers, MLP 11008, 32 heads, untied head; SmolLM2's
tokenizer and vocabulary; random bf16 weights, about 14 GB) is written once to ``--model-dir``, one
tensor at a time into 2 GB shards, so the writer never holds the model either. Then each side runs in
a fresh process (the library's own load path, as ``deltatune train --quantize`` uses):

* ``int8`` / ``nf4``: ``load_base(dir, quantize=...)``, LoRA q,v r=8, ``--warmup`` + ``--steps``
  AdamW steps on a random batch; figures: load time, seconds per step (wall and CPU), peak RSS of
  the whole process (VmHWM), losses.
* ``f32``: ``load_base(dir)`` in float32 (about 28 GB): expected to stop before loading with the
  memory-estimate error; figures: the error text and the process's peak RSS (no out-of-memory kill).

One raw line per side to bench/results/big_base.jsonl::

    python bench/big_base.py --sides f32 int8 nf4 --model-dir /tmp/deltatune-bench-llama-7b
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
from _common import RunMeter, append_result, emit, init_lora, log, set_threads, timed_cpu, train_step

SHAPE = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
SHARD_BYTES = 2 * 2**30
SIDES = ("f32", "int8", "nf4")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", choices=SIDES, help="run one side in this process (internal)")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/deltatune-bench-llama-7b"))
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    return parser.parse_args(argv)


def tensor_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LlamaForCausalLM with ``config``, by checkpoint name, from a meta-device model."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def make_model(directory: Path, seed: int) -> int:
    """Write the random bf16 model, shard by shard, to ``directory`` (once); returns its parameter count."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from deltatune.loading.base_models import BUILTIN_MODELS, package_dir

    if (directory / "config.json").is_file():
        return sum(torch.Size(s).numel() for s in tensor_shapes(LlamaConfig.from_pretrained(directory)).values())
    spec = BUILTIN_MODELS["smollm2-135m"]
    tokenizer = AutoTokenizer.from_pretrained(package_dir(spec.package, spec.pip_install), gguf_file=spec.gguf_file)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, **SHAPE)  # fmt: skip
    tmp = directory.parent / f".tmp-{directory.name}"
    tmp.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shapes, shard, shard_bytes, weight_map, files = tensor_shapes(config), {}, 0, {}, []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        files.append(name)
        shard.clear()

    for name, shape in shapes.items():
        shard[name] = (
            torch.ones(shape, dtype=torch.bfloat16) if len(shape) == 1
            else (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        )  # fmt: skip
        shard_bytes += shard[name].numel() * 2
        if shard_bytes >= SHARD_BYTES:
            flush()
            shard_bytes = 0
            log(f"[make] {len(files)} shards written")
    if shard:
        flush()
    total = sum(torch.Size(s).numel() for s in shapes.values())
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(directory)
    return total


def vm_hwm_mb() -> float:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: across fork+exec the kernel carries the parent's peak
    into the child's ru_maxrss, and the parent here has written the model."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return round(int(line.split()[1]) / 1024, 1)


def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    from _common import wrap_lora

    import deltatune as dt

    start = time.perf_counter()
    try:
        base, _ = dt.load_base(str(args.model_dir), quantize=None if side == "f32" else side)
    except MemoryError as error:
        return {"loaded": False, "error": str(error), "peak_rss_mb": vm_hwm_mb()}
    load_s = time.perf_counter() - start
    rss_loaded = vm_hwm_mb()
    log(f"[{side}] loaded in {load_s:.0f} s, peak RSS {rss_loaded:.0f} MB")
    model = wrap_lora(base, "deltatune")
    init_lora(model, args.seed)
    model.train()
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq),
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times, cpus, losses = [], [], []
    for step in range(args.warmup + args.steps):
        seconds, cpu, loss = timed_cpu(lambda: train_step(model, optimizer, ids))
        losses.append(round(loss, 5))
        if step >= args.warmup:
            times.append(round(seconds, 2))
            cpus.append(round(cpu, 2))
        log(f"[{side}] step {step + 1}: loss {loss:.4f}, {seconds:.1f} s")
    return {"loaded": True, "load_s": round(load_s, 1), "rss_after_load_mb": rss_loaded, "step_times_s": times,
            "step_cpu_s": cpus, "losses": losses, "peak_rss_mb": vm_hwm_mb(),
            "base": dt.quantization.base_kind(base)}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.worker:
        emit(run_side(args.worker, args))
        return
    params = make_model(args.model_dir, args.seed)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "sides")}
    settings.update(model_dir=str(args.model_dir), params=params, shape=SHAPE, lora="q,v r=8 alpha=16")
    for side in args.sides:
        meter = RunMeter()
        command = [sys.executable, __file__, "--worker", side, *(argv if argv is not None else sys.argv[1:])]
        done = subprocess.run(command, capture_output=True, text=True)
        sys.stderr.write(done.stderr[-4000:])
        if done.returncode != 0:
            figures = {"loaded": False, "returncode": done.returncode, "stderr_tail": done.stderr[-1500:]}
        else:
            figures = json.loads(done.stdout.strip().splitlines()[-1])
        line = append_result("big_base", {"side": side, **figures}, meter, settings={**settings, "side": side})
        print(json.dumps(line["figures"]), flush=True)


if __name__ == "__main__":
    main()
