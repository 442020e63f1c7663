"""`deltatune train --fsdp` with 2 gloo processes on a tiny Llama: equal to one process, whole saved
tensors that peft loads, resume across numbers of processes, no hang when a rank is killed. Every run
accumulates 2 micro-batches with gradient checkpointing on."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import deltatune as dt

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alpaca_file(path: Path, count: int = 32) -> Path:
    records = [{"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i} {i} {i}"} for i in range(count)]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def train_args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--base",
        str(base),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--learning-rate",
        "1e-2",
        "--lr-scheduler",
        "constant",  # a run resumed with a larger --max-steps follows the same schedule
        "--no-eval-generate",
        "--threads",
        "1",
        "--eval-fraction",
        "0.25",
        "--max-eval-examples",
        "4",
        "--save-every",
        "2",
        "--grad-accum",  # both compose with sharding: every run here uses them
        "2",
        "--gradient-checkpointing",
        *extra,
    ]


def launch(args: list[str], processes: int, **popen) -> subprocess.Popen:
    """``deltatune`` alone (processes=0) or under torchrun."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 0:
        command = [sys.executable, "-m", "deltatune", *args]
    else:
        torchrun = ["-m", "torch.distributed.run", f"--nproc-per-node={processes}", f"--master-port={free_port()}"]
        command = [sys.executable, *torchrun, "-m", "deltatune", *args]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **popen)


def run(args: list[str], processes: int = 0) -> None:
    proc = launch(args, processes, text=True)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-4000:]


def adapter(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def assert_same_adapter(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same keys, whole shapes, and each tensor within 1e-4 of the reference (norm of difference / norm)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].shape == value.shape, key  # a whole tensor, never one rank's shard
        error = (got[key] - value).norm() / value.norm().clamp_min(1e-12)
        assert error < 1e-4, f"{key}: relative difference {error:.2e}"


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """One process x batch 4 for 4 steps (the reference), 2 FSDP processes x batch 2 for 4 steps, and 2-step
    runs of each that the resume tests continue."""
    root = tmp_path_factory.mktemp("fsdp")
    data = alpaca_file(root / "train.jsonl")
    one = ["--batch-size", "4"]
    two = ["--batch-size", "2", "--fsdp"]
    run(train_args(tiny_llama_dir, data, root / "single", *one, "--max-steps", str(STEPS)))
    run(train_args(tiny_llama_dir, data, root / "fsdp", *two, "--max-steps", str(STEPS)), processes=2)
    return root, data


@pytest.mark.slow
def test_two_sharded_processes_train_the_adapter_of_one(runs):
    root, _ = runs
    expected = adapter(root / "single" / "adapter")
    assert any(v.abs().sum() > 0 for k, v in expected.items() if "lora_B" in k)  # it did train
    assert_same_adapter(adapter(root / "fsdp" / "adapter"), expected)
    # The training checkpoint holds whole tensors too, and its optimizer state has every parameter.
    checkpoint = root / "fsdp" / "checkpoints" / f"step-{STEPS:08d}"
    assert_same_adapter(adapter(checkpoint), adapter(root / "single" / "checkpoints" / f"step-{STEPS:08d}"))
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert len(state["optimizer"]["state"]) == len(expected)
    assert all(
        s["exp_avg"].shape == s["exp_avg_sq"].shape and s["exp_avg"].numel() > 1
        for s in state["optimizer"]["state"].values()
    )


@pytest.mark.slow
def test_accelerate_launch_trains_the_same_sharded_adapter(runs, tiny_llama_dir):
    """``accelerate launch --multi_gpu`` starts its processes with torchrun's launcher and environment, on CPU
    too (gloo), so --fsdp runs as under torchrun. (Without --multi_gpu, accelerate on a machine without a GPU
    runs one process: that would train half the global batch and differ here.)"""
    root, data = runs
    launcher = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    flags = ["--batch-size", "2", "--fsdp", "--max-steps", str(STEPS)]
    args = train_args(tiny_llama_dir, data, root / "accelerate", *flags)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, *launcher, "-m", "deltatune", *args], cwd=ROOT, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert_same_adapter(adapter(root / "accelerate" / "adapter"), adapter(root / "single" / "adapter"))


@pytest.mark.slow
def test_lora_on_the_tied_head_trains_as_in_one_process(runs, tiny_llama_dir):
    """LoRA on lm_head: the head is no plain table, so neither it nor its tied embedding is split by rows
    (splitting the embedding alone once left the head's base weight unloaded)."""
    root, data = runs
    flags = ["--target-modules", "q_proj", "v_proj", "lm_head", "--max-steps", "2"]
    run(train_args(tiny_llama_dir, data, root / "head-single", "--batch-size", "4", *flags))
    run(train_args(tiny_llama_dir, data, root / "head-fsdp", "--batch-size", "2", "--fsdp", *flags), processes=2)
    expected = adapter(root / "head-single" / "adapter")
    assert any("lm_head" in k for k in expected)
    assert_same_adapter(adapter(root / "head-fsdp" / "adapter"), expected)


@pytest.mark.slow
def test_sharded_adapter_loads_in_peft_and_in_one_process(runs, tiny_llama_dir):
    from peft import PeftModel

    root, _ = runs
    inputs = {"input_ids": torch.tensor([[5, 17, 99, 3, 42, 8]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    with torch.no_grad():
        before = base(**inputs).logits
        ours = dt.DeltaModel.from_pretrained(base, root / "fsdp" / "adapter").eval()(**inputs).logits
        theirs = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval(), root / "fsdp" / "adapter"
        )(**inputs).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert (ours - before).abs().max() > 1e-4  # the trained adapter changes the output


@pytest.mark.slow
@pytest.mark.parametrize("first, then", [("fsdp", "single"), ("single", "fsdp")])
def test_resume_with_another_number_of_processes(runs, tiny_llama_dir, first, then):
    """A run stopped at step 2 continues to step 4 with the other layout and matches the uninterrupted run;
    the global batch (2 x 2 == 1 x 4) is what must match."""
    root, data = runs
    layouts = {"single": (["--batch-size", "4"], 0), "fsdp": (["--batch-size", "2", "--fsdp"], 2)}
    out = root / f"resume-{first}-{then}"
    flags, processes = layouts[first]
    run(train_args(tiny_llama_dir, data, out, *flags, "--max-steps", "2"), processes)
    flags, processes = layouts[then]
    run(train_args(tiny_llama_dir, data, out, *flags, "--max-steps", str(STEPS), "--resume"), processes)
    assert json.loads((out / "summary.json").read_text())["steps"] == STEPS
    assert_same_adapter(adapter(out / "adapter"), adapter(root / "single" / "adapter"))


@pytest.mark.slow
def test_resume_refuses_another_global_batch(runs, tiny_llama_dir):
    root, data = runs
    proc = launch(train_args(tiny_llama_dir, data, root / "fsdp", "--batch-size", "4", "--fsdp", "--resume"), 2)
    output = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode != 0
    assert "global batch (--batch-size x processes: 2 x 2 then, 4 x 2 now)" in output


@pytest.mark.slow
def test_killed_rank_stops_the_others_and_the_run_resumes(tiny_llama_dir, tmp_path):
    psutil = pytest.importorskip("psutil")
    data = alpaca_file(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    args = train_args(tiny_llama_dir, data, out, "--batch-size", "2", "--fsdp")
    proc = launch([*args, "--max-steps", "100000", "--save-every", "1"], 2)
    try:
        deadline = time.monotonic() + 120
        while not list((out / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list((out / "checkpoints").glob("step-*")), "no checkpoint within 120 s"
        ranks = psutil.Process(proc.pid).children()
        assert len(ranks) == 2
        os.kill(ranks[-1].pid, signal.SIGKILL)
        proc.wait(timeout=60)  # the other rank and torchrun stop instead of waiting forever
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    assert proc.returncode != 0
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    saved = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    run([*args, "--max-steps", str(saved + 2), "--resume"], processes=2)
    assert json.loads((out / "summary.json").read_text())["steps"] == saved + 2


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--quantize", "int8"], "--fsdp cannot shard a --quantize int8 base"),
        (["--use-dora"], "LoraConfig's initialisation reads the base weights"),
    ],
)
def test_what_cannot_be_sharded_is_a_clear_error(tiny_llama_dir, tmp_path, flags, message):
    """One process under --fsdp (a group of one); the error names what to use instead."""
    data = alpaca_file(tmp_path / "train.jsonl")
    proc = launch(train_args(tiny_llama_dir, data, tmp_path / "run", "--fsdp", *flags), 0, text=True)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, output[-3000:]
    assert message in output and "without --fsdp" in output
