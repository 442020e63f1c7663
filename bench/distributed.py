"""Multi-process LoRA training on CPU: memory per process and speed of one process, DDP and FSDP.

A ~1B-parameter Llama-shaped model (hidden 2048, 16 blocks, MLP 8192, 32 heads / 8 KV heads, SmolLM2's 49k
vocabulary, tied embeddings; random weights, seed 0, float32) is saved as safetensors once (``--model-dir``),
then ``deltatune train`` (LoRA r=8 alpha=8, deltatune's defaults, on q_proj/v_proj, lr 1e-3 constant, seed 0)
runs ``--steps`` optimizer steps on short synthetic plain-text records (about 12 tokens each; global batch 4,
``--max-length`` tokens; short, so that 9 runs of a 1B model fit in an hour on 2 cores) in three layouts:

* ``single``: one process, batch 4, 2 threads;
* ``ddp``: ``torchrun --nproc-per-node 2``, batch 2 per process, 1 thread each (every process holds the whole base);
* ``fsdp``: the same plus ``--fsdp`` (the base built on the meta device, sharded over the 2 processes, each
  reading only its rows of each checkpoint tensor);
* ``single-1t``: one process, batch 4, 1 thread, in the first round only: the equality reference computed with
  the same kernels as the ranks' (the adapters are deterministic, so one run is enough).

Each run is a fresh worker process (``--worker``) that launches the command and waits for it; its peak RSS per
process is ``getrusage(RUSAGE_CHILDREN).ru_maxrss``: the largest peak of any one process under it (each rank, the
torchrun agent), whole runs including the model load, evaluation and the save. Steps/s is the training loop's
(``metrics.jsonl``: steps / ``elapsed_s``, model load and evaluations excluded). ``--rounds`` rounds rotate the order
of the layouts. Each worker appends a raw line to ``bench/results/distributed.jsonl``; a summary line follows with
medians (min-max), the FSDP / one-process RSS ratio (goal <= 0.6) and the adapter equality after ``--steps``
steps, the largest per-tensor ``||a - b|| / ||b||`` (goal <= 1e-4) of: FSDP (and DDP) against ``single-1t`` (same
kernels: the difference sharding makes), against ``single`` (2 threads), and ``single`` against ``single-1t`` (what
the thread count alone makes: float32 sums in another order, grown by Adam over the steps).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RunMeter, append_result, emit, log, median

BENCH = "distributed"
LAYOUTS = ("single", "ddp", "fsdp")
REFERENCE = "single-1t"  # the equality reference: one process with the ranks' thread count
SHAPE = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def make_model(directory: Path, layers: int) -> int:
    """Save the random ~1B model and SmolLM2's tokenizer to ``directory`` once; returns its parameter count."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from deltatune.loading.base_models import BUILTIN_MODELS, package_dir

    if (directory / "config.json").is_file():
        config = LlamaConfig.from_pretrained(directory)
        with torch.device("meta"):
            return sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    spec = BUILTIN_MODELS["smollm2-135m"]
    tokenizer = AutoTokenizer.from_pretrained(package_dir(spec.package, spec.pip_install), gguf_file=spec.gguf_file)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **{**SHAPE, "num_hidden_layers": layers},
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=directory.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(directory)
    return sum(p.numel() for p in model.parameters())


def make_data(directory: Path) -> tuple[Path, Path]:
    records = [{"text": f"Number {i} comes before number {i + 1}."} for i in range(64)]
    train, evaluation = directory / "train.jsonl", directory / "eval.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in records))
    evaluation.write_text(json.dumps(records[0]))
    return train, evaluation


def command(layout: str, args: argparse.Namespace, out: Path) -> list[str]:
    train = [
        "-m",
        "deltatune",
        "train",
        "--base",
        str(args.model_dir),
        "--data",
        str(args.data),
        "--eval-data",
        str(args.eval_data),
        "--output-dir",
        str(out),
        "--max-steps",
        str(args.steps),
        "--max-length",
        str(args.max_length),
        "--learning-rate",
        "1e-3",
        "--lr-scheduler",
        "constant",
        "--no-eval-generate",
        "--log-every",
        "1",
        "--target-modules",
        "q_proj",
        "v_proj",
    ]
    if layout in ("single", REFERENCE):
        return [sys.executable, *train, "--batch-size", "4", "--threads", "1" if layout == REFERENCE else "2"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = ["-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={port}"]
    extra = ["--fsdp"] if layout == "fsdp" else []
    return [sys.executable, *torchrun, *train, "--batch-size", "2", "--threads", "1", *extra]


def worker(args: argparse.Namespace) -> None:
    """One run of one layout in this fresh process; prints its figures as one JSON line."""
    out = Path(args.out)
    env = {**os.environ, "OMP_NUM_THREADS": "2" if args.worker == "single" else "1"}
    proc = subprocess.run(command(args.worker, args, out), env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{args.worker} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    emit(
        {
            "layout": args.worker,
            "peak_rss_mb_per_process": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
            "steps_per_s": round(last["step"] / last["elapsed_s"], 5),
            "train_loop_s": round(last["elapsed_s"], 1),
            "steps": last["step"],
            "final_loss": last["loss"],
        }
    )


def largest_difference(got: Path, expected: Path) -> float:
    """The largest per-tensor relative difference between two saved adapters (whole tensors required)."""
    from safetensors.torch import load_file

    a, b = load_file(got / "adapter_model.safetensors"), load_file(expected / "adapter_model.safetensors")
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        return float("inf")
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "deltatune-bench-llama-1b")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--max-length", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=16, help="decoder blocks of a new model (16: ~1B parameters)")
    parser.add_argument("--lock", type=Path, help="run each layout under `flock LOCK` (a machine shared by big jobs)")
    parser.add_argument("--worker", choices=(*LAYOUTS, REFERENCE), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--eval-data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    log(f"model: {args.model_dir}")
    params = make_model(args.model_dir, args.layers)
    work = Path(tempfile.mkdtemp(prefix="deltatune-bench-distributed-"))
    data, eval_data = make_data(work)
    results: dict[str, list[dict]] = {layout: [] for layout in (*LAYOUTS, REFERENCE)}
    for round_ in range(args.rounds):
        order = LAYOUTS[round_ % 3 :] + LAYOUTS[: round_ % 3] + ((REFERENCE,) if round_ == 0 else ())
        for layout in order:
            log(f"round {round_ + 1}/{args.rounds}: {layout}")
            figures = run_layout(layout, work / f"{layout}-{round_}", data, eval_data, args.lock)
            results[layout].append(figures)
            append_result(BENCH, figures, figures.pop("meter"), params=params, round=round_, steps=args.steps)
    pairs = {"fsdp_vs_single_1t": ("fsdp", REFERENCE), "ddp_vs_single_1t": ("ddp", REFERENCE)}
    pairs |= {"fsdp_vs_single": ("fsdp", "single"), "ddp_vs_single": ("ddp", "single")}
    pairs |= {"single_vs_single_1t": ("single", REFERENCE), "fsdp_vs_ddp": ("fsdp", "ddp")}
    differences = {
        name: largest_difference(work / f"{got}-0" / "adapter", work / f"{expected}-0" / "adapter")
        for name, (got, expected) in pairs.items()
    }
    summary = summarize(results, differences, params, args)
    append_result(BENCH, summary, None, summary=True)
    emit(summary)


def run_layout(layout: str, out: Path, data: Path, eval_data: Path, lock: Path | None) -> dict:
    """One run in a fresh worker process (holding ``lock`` with flock, if given): its figures, and its RunMeter
    under "meter"."""
    meter = RunMeter()
    worker_argv = [*sys.argv[1:], "--worker", layout, "--out", str(out), "--data", str(data)]
    command = [sys.executable, __file__, *worker_argv, "--eval-data", str(eval_data)]
    proc = subprocess.run([*(["flock", str(lock)] if lock else []), *command], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-4000:])
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "meter": meter}


def summarize(results, differences, params: int, args: argparse.Namespace) -> dict:
    def spread(layout: str, key: str) -> dict:
        values = [r[key] for r in results[layout]]
        return {"median": median(values), "min": min(values), "max": max(values)}

    rss = {layout: spread(layout, "peak_rss_mb_per_process") for layout in LAYOUTS}
    speed = {layout: spread(layout, "steps_per_s") for layout in LAYOUTS}
    ratio = rss["fsdp"]["median"] / rss["single"]["median"]
    return {
        "params": params,
        "steps": args.steps,
        "max_length": args.max_length,
        "rounds": args.rounds,
        "peak_rss_mb_per_process": rss,
        "steps_per_s": speed,
        "fsdp_over_single_rss": round(ratio, 3),
        "ddp_over_single_rss": round(rss["ddp"]["median"] / rss["single"]["median"], 3),
        "rss_goal_met": ratio <= 0.6,
        "fsdp_over_ddp_steps_per_s": round(speed["fsdp"]["median"] / speed["ddp"]["median"], 3),
        "adapter_rel_diff": differences,  # after the first round's runs (deterministic: the same every round)
        "equality_goal_met": differences["fsdp_vs_single_1t"] <= 1e-4,  # against the same kernels
        "equality_goal_met_vs_2_thread_single": differences["fsdp_vs_single"] <= 1e-4,
    }


if __name__ == "__main__":
    main()
