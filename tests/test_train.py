"""`deltatune train` and friends on tiny models: outputs, resume after SIGKILL, DDP, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.cli import main
from deltatune.data import Batcher, Example, read_examples, split_train_eval, tokenize_examples
from deltatune.evaluation import evaluate_model, generate
from deltatune.training.checkpoints import verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--learning-rate", "1e-2", "--batch-size", "4", "--log-every", "1", "--max-new-tokens", "8", "--threads", "1"]


def alpaca_file(path: Path, count: int = 24) -> Path:
    records = [{"instruction": f"Repeat the number {i}.", "input": "", "output": f"{i} {i} {i}"} for i in range(count)]
    path.write_text("\n".join(json.dumps(r) for r in records))
    return path


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def adapter_tensors(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "adapter_model.safetensors")


def test_train_writes_adapter_metrics_plot_and_summary(tiny_llama_dir, tmp_path, capsys):
    data = alpaca_file(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    assert (
        run_cli(
            "train",
            "--base",
            tiny_llama_dir,
            "--data",
            data,
            "--max-steps",
            30,
            "--output-dir",
            out,
            "--r",
            4,
            "--target-modules",
            "q_proj",
            "v_proj",
            *FAST,
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 30 and summary["after"]["loss"] < summary["before"]["loss"]
    assert {"bleu", "rougeL", "exact_match", "perplexity"} <= set(summary["after"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 31))
    assert records[-1]["loss"] < records[0]["loss"]
    assert (out / "loss.png").stat().st_size > 1000
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_modules"] == ["q_proj", "v_proj"]
    printed = capsys.readouterr().out
    assert "before" in printed and "adapter saved to" in printed
    # the saved adapter reproduces the trained model's evaluation loss: same eval split, fresh base
    base, tokenizer = dt.load_base(str(tiny_llama_dir))
    model = dt.DeltaModel.from_pretrained(base, out / "adapter")
    assert model.trainable_parameters()[0] == 0
    _, evaluation = split_train_eval(read_examples(data, "causal-lm"), eval_fraction=0.1, seed=0)
    features = tokenize_examples(evaluation, tokenizer, "causal-lm", max_length=512)
    batcher = Batcher(features, 4, pad_token_id=tokenizer.pad_token_id, seed=0, shuffle=False)
    metrics, _ = evaluate_model(model, tokenizer, "causal-lm", evaluation, batcher, max_new_tokens=None)
    assert metrics["loss"] == pytest.approx(summary["after"]["loss"], rel=1e-6, abs=0)


def test_existing_run_needs_resume(tiny_llama_dir, tmp_path, capsys):
    data = alpaca_file(tmp_path / "train.jsonl")
    args = [
        "train",
        "--base",
        tiny_llama_dir,
        "--data",
        data,
        "--max-steps",
        2,
        "--save-every",
        1,
        "--output-dir",
        tmp_path / "run",
        "--no-eval-generate",
        *FAST,
    ]
    (tmp_path / "run" / "checkpoints" / ".tmp-killed-save").mkdir(parents=True)  # a save cut short by a kill
    assert run_cli(*args) == 0
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))  # the next save removed it
    assert run_cli(*args) == 2
    assert "--resume" in capsys.readouterr().err


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, resumes_from",
    [
        ({6: ("adapter_model.safetensors", _truncate)}, 4),
        ({6: ("trainer_state.pt", _flip_a_byte), 4: ("manifest.json", Path.unlink)}, 2),
        ({2: ("trainer_state.pt", _truncate), 4: ("trainer_state.pt", _truncate), 6: ("manifest.json", _truncate)}, 0),
    ],
    ids=["latest-truncated", "two-damaged", "all-damaged"],
)
def test_resume_skips_damaged_checkpoints(damage, resumes_from, tiny_llama_dir, tmp_path, capsys):
    """A damaged checkpoint is skipped with a warning; the previous intact one (or step 0) gives the same adapter."""
    data = alpaca_file(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    args = ["train", "--base", tiny_llama_dir, "--data", data, "--max-steps", 6, "--save-every", 2]
    args += ["--keep-checkpoints", 3, "--output-dir", out, "--lora-dropout", "0.1", "--no-eval-generate", *FAST]
    assert run_cli(*args) == 0
    expected = adapter_tensors(out / "adapter")
    checkpoints = out / "checkpoints"
    assert [verify_checkpoint(checkpoints / f"step-{s:08d}") for s in (2, 4, 6)] == [None] * 3
    for step, (name, spoil) in damage.items():
        spoil(checkpoints / f"step-{step:08d}" / name)
    (checkpoints / ".tmp-killed-save").mkdir()
    (checkpoints / ".tmp-killed-save" / "trainer_state.pt").write_bytes(b"half a file")
    capsys.readouterr()
    assert run_cli(*args, "--resume") == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "skipping damaged checkpoint" in line]
    assert len(warnings) == len(damage)
    for step, (name, _) in damage.items():
        assert any(str(checkpoints / f"step-{step:08d}") in w and name in w for w in warnings), err
    if resumes_from:
        assert f"resuming from {checkpoints / f'step-{resumes_from:08d}'}" in err
    else:
        assert "no intact checkpoint" in err and "starting at step 0" in err
    got = adapter_tensors(out / "adapter")
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)
    assert not list(checkpoints.glob(".tmp-*"))
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step-{s:08d}" for s in (2, 4, 6)]
    assert all(verify_checkpoint(p) is None for p in checkpoints.iterdir())  # damaged ones were written anew
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))


def _train_subprocess(tiny_llama_dir: Path, data: Path, out: Path, *extra: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "deltatune",
        "train",
        "--base",
        str(tiny_llama_dir),
        "--data",
        str(data),
        "--max-steps",
        "40",
        "--save-every",
        "4",
        "--output-dir",
        str(out),
        "--lora-dropout",
        "0.1",
        "--no-eval-generate",
        *FAST,
        *extra,
    ]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_resume_after_sigkill_equals_uninterrupted_run(tiny_llama_dir, tmp_path):
    data = alpaca_file(tmp_path / "train.jsonl", count=40)
    reference = _train_subprocess(tiny_llama_dir, data, tmp_path / "whole")
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    killed = _train_subprocess(tiny_llama_dir, data, tmp_path / "killed")
    deadline = time.time() + 120
    while not list((tmp_path / "killed" / "checkpoints").glob("step-*/trainer_state.pt")):
        assert killed.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it was killed"

    resumed = _train_subprocess(tiny_llama_dir, data, tmp_path / "killed", "--resume")
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    expected, got = adapter_tensors(tmp_path / "whole" / "adapter"), adapter_tensors(tmp_path / "killed" / "adapter")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))  # no step logged twice, none missing


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_resumes(tiny_llama_dir, tmp_path):
    data = alpaca_file(tmp_path / "train.jsonl", count=40)
    run = _train_subprocess(tiny_llama_dir, data, tmp_path / "run", "--save-every", "1000")
    deadline = time.time() + 120
    while not (tmp_path / "run" / "metrics.jsonl").is_file():
        assert run.poll() is None and time.time() < deadline
        time.sleep(0.02)
    run.send_signal(signal.SIGINT)
    output, _ = run.communicate(timeout=120)
    assert run.returncode == 130, output
    assert "--resume" in output
    assert list((tmp_path / "run" / "checkpoints").glob("step-*/adapter_model.safetensors"))
    resumed = _train_subprocess(tiny_llama_dir, data, tmp_path / "run", "--save-every", "1000", "--resume")
    assert resumed.wait(timeout=300) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 40


@pytest.mark.slow
def test_two_process_ddp_equals_single_process(tiny_llama_dir, tmp_path):
    data = alpaca_file(tmp_path / "train.jsonl", count=32)
    common = [
        "train",
        "--base",
        str(tiny_llama_dir),
        "--data",
        str(data),
        "--max-steps",
        "6",
        "--learning-rate",
        "1e-2",
        "--no-eval-generate",
        "--threads",
        "1",
        "--eval-fraction",
        "0.25",
    ]
    single = subprocess.run(
        [sys.executable, "-m", "deltatune", *common, "--batch-size", "4", "--output-dir", str(tmp_path / "single")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert single.returncode == 0, single.stderr
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            "-m",
            "deltatune",
            *common,
            "--batch-size",
            "2",
            "--output-dir",
            str(tmp_path / "ddp"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    expected, got = adapter_tensors(tmp_path / "single" / "adapter"), adapter_tensors(tmp_path / "ddp" / "adapter")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4)
    assert any(v.abs().sum() > 0 for k, v in expected.items() if "lora_B" in k)  # it did train


def test_delta_model_trains_under_transformers_trainer(tiny_llama_dir, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = dt.wrap(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), dt.LoraConfig(target_modules=["q_proj"]))
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rows = [{"input_ids": list(range(5 + i, 21 + i)), "labels": list(range(5 + i, 21 + i))} for i in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        remove_unused_columns=False,
        save_strategy="no",
    )
    Trainer(model=model, args=args, train_dataset=rows).train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, frozen_before[n])}
    assert changed and changed == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in changed)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "missing.jsonl"], "no such file"),
        (["--method", "dora"], "unknown method 'dora'"),
        (["--max-steps", "0"], "max_steps must be positive"),
        (["--target-modules", "nope"], "'nope' matches no"),
    ],
)
def test_bad_train_input_is_a_clear_error_before_training(tiny_llama_dir, tmp_path, capsys, args, message):
    data = alpaca_file(tmp_path / "train.jsonl")
    full = ["train", "--base", tiny_llama_dir, "--data", data, "--output-dir", tmp_path / "run", *args]
    assert run_cli(*full) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_bad_data_errors(tiny_llama_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    long_prompt = tmp_path / "long.jsonl"
    long_prompt.write_text(
        json.dumps({"prompt": "word " * 400, "completion": "x"}) + "\n" + json.dumps({"prompt": "a", "completion": "b"})
    )
    labels = tmp_path / "labels.csv"
    labels.write_text("sentence,label\ngood,0\nbad,1\nugly,2\nfine,0\n")
    cases = [
        (["--data", empty], "no examples"),
        (["--data", long_prompt, "--max-length", "64"], "--max-length"),
        (["--data", labels, "--task", "classification", "--num-labels", "2"], "num_labels"),
    ]
    for args, message in cases:
        assert run_cli("train", "--base", tiny_llama_dir, "--output-dir", tmp_path / "run", *args) == 2
        assert message in capsys.readouterr().err


def test_config_file_and_flags(tmp_path, capsys):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("learning_rate: 0.001\nr: 16\ntarget_modules: [q_proj, k_proj]\nmax_steps: 7\n")
    toml_file = tmp_path / "run.toml"
    toml_file.write_text("learning_rate = 0.001\nlora_alpha = 32\n")
    assert run_cli("train", "--config", yaml_file, "--max-steps", "9", "--print-config") == 0
    printed = capsys.readouterr().out
    assert "learning_rate: 0.001" in printed and "max_steps: 9" in printed and "r: 16" in printed
    assert "- k_proj" in printed
    assert run_cli("train", "--config", toml_file, "--target-modules", "all-linear", "--print-config") == 0
    printed = capsys.readouterr().out
    assert "lora_alpha: 32" in printed and "target_modules: all-linear" in printed
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    assert run_cli("train", "--config", bad) == 2
    assert "Did you mean 'learning_rate'" in capsys.readouterr().err


def test_classification_training_and_eval(tiny_bert_dir, tmp_path, capsys):
    data = tmp_path / "sst.tsv"
    rows = [f"{'great fun' if i % 2 else 'dull mess'} number {i}\t{i % 2}" for i in range(40)]
    data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert (
        run_cli(
            "train",
            "--base",
            tiny_bert_dir,
            "--data",
            data,
            "--max-steps",
            40,
            "--output-dir",
            out,
            "--eval-fraction",
            "0.25",
            "--target-modules",
            "all-linear",
            *FAST,
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task"] == "classification" and summary["after"]["accuracy"] == 1.0
    capsys.readouterr()
    assert run_cli("eval", "--base", tiny_bert_dir, "--adapter", out / "adapter", "--data", data) == 0
    reported = json.loads(capsys.readouterr().out)["accuracy"]
    # the same accuracy computed directly, one example at a time
    base, tokenizer = dt.load_base(str(tiny_bert_dir), task="classification")
    model = dt.DeltaModel.from_pretrained(base, out / "adapter").eval()
    correct = 0
    for line in rows:
        text, label = line.split("\t")
        with torch.no_grad():
            correct += int(model(**tokenizer(text, return_tensors="pt")).logits.argmax()) == int(label)
    assert reported == correct / len(rows) > 0.9


def test_generate_merge_and_inspect(tiny_llama_dir, tmp_path, capsys):
    data = alpaca_file(tmp_path / "train.jsonl")
    out = tmp_path / "run"
    assert (
        run_cli(
            "train",
            "--base",
            tiny_llama_dir,
            "--data",
            data,
            "--max-steps",
            10,
            "--output-dir",
            out,
            "--no-eval-generate",
            *FAST,
        )
        == 0
    )
    capsys.readouterr()
    assert (
        run_cli(
            "generate",
            "--base",
            tiny_llama_dir,
            "--adapter",
            out / "adapter",
            "--prompt",
            "Repeat 3.",
            "--max-new-tokens",
            5,
        )
        == 0
    )
    # exactly the library's greedy completion with the same adapter and prompt
    base, tokenizer = dt.load_base(str(tiny_llama_dir))
    adapted = dt.DeltaModel.from_pretrained(base, out / "adapter")
    expected = generate(adapted, tokenizer, [Example(prompt="Repeat 3.", target=None)], max_new_tokens=5)[0]
    assert expected and capsys.readouterr().out == expected + "\n"
    merged_dir = tmp_path / "merged"
    assert run_cli("merge", "--base", tiny_llama_dir, "--adapter", out / "adapter", "--output", merged_dir) == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    unmerged = dt.DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), out / "adapter")
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, unmerged(ids).logits, atol=1e-5, rtol=0)
    assert run_cli("merge", "--base", tiny_llama_dir, "--adapter", out / "adapter", "--output", merged_dir) == 2
    capsys.readouterr()
    assert run_cli("inspect", "--base", tiny_llama_dir, "--r", "2") == 0
    printed = capsys.readouterr().out
    assert "q_proj" in printed and "Linear" in printed and "x2" in printed
    assert f"trainable {2 * (2 * 32 + 2 * 32 + 2 * 32 + 2 * 16):,}" in printed


def test_gradient_checkpointing_gives_the_same_adapter(tiny_llama_dir, tmp_path):
    data = alpaca_file(tmp_path / "train.jsonl")
    common = ["train", "--base", tiny_llama_dir, "--data", data, "--max-steps", 3, "--no-eval-generate", *FAST]
    assert run_cli(*common, "--output-dir", tmp_path / "plain") == 0
    assert run_cli(*common, "--output-dir", tmp_path / "ckpt", "--gradient-checkpointing") == 0
    expected, got = adapter_tensors(tmp_path / "plain" / "adapter"), adapter_tensors(tmp_path / "ckpt" / "adapter")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)


def test_packing_trains_on_fewer_rows_with_the_same_tokens(tiny_llama_dir, tmp_path):
    data = alpaca_file(tmp_path / "train.jsonl", count=40)
    common = ["train", "--base", tiny_llama_dir, "--data", data, "--epochs", 1, "--no-eval-generate", *FAST]
    assert run_cli(*common, "--output-dir", tmp_path / "rows") == 0
    assert run_cli(*common, "--output-dir", tmp_path / "packed", "--packing", "--max-length", 256) == 0
    rows, packed = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("rows", "packed"))
    assert packed["steps"] < rows["steps"]  # several examples share a row
    assert packed["tokens"] == rows["tokens"]  # no token lost or padded in
    assert packed["after"]["loss"] < packed["before"]["loss"]
