"""Default learning rates per method and task (docs/defaults.md): the rate a run prints is the rate its optimizer
uses, it follows the measured table, and an explicit --learning-rate wins."""

from __future__ import annotations

import dataclasses

import pytest

from deltatune import methods
from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.training import trainer
from deltatune.training.config import TrainConfig
from deltatune.training.defaults import DEFAULT_LEARNING_RATE, default_learning_rate, format_rate, with_defaults

# The table of docs/defaults.md, chosen from bench/results/defaults.jsonl (typed here on purpose: a record that
# changes without the measurement and the docs changing with it fails this test).
MEASURED = {
    ("lora", "causal-lm"): 2e-4,
    ("lora", "classification"): 1e-3,
    ("bitfit", "classification"): 5e-3,
    ("adapter", "classification"): 2e-4,
    ("prompt_tuning", "classification"): 1e-1,
}
UNMEASURED = [("ia3", "classification"), ("lokr", "causal-lm"), ("bitfit", "causal-lm")]


@pytest.mark.parametrize(("method", "task"), sorted(MEASURED))
def test_measured_defaults_follow_the_table(method, task):
    assert default_learning_rate(method, task) == (MEASURED[method, task], f"default for {method} on {task}")


@pytest.mark.parametrize(("method", "task"), UNMEASURED)
def test_unmeasured_methods_get_the_general_default(method, task):
    rate, why = default_learning_rate(method, task)
    assert rate == DEFAULT_LEARNING_RATE == 2e-4 and "general default" in why


def test_format_rate():
    assert [format_rate(r) for r in (1e-3, 2e-4, 2.5e-4, 0.3, 5e-3)] == ["1e-3", "2e-4", "2.5e-4", "3e-1", "5e-3"]


def test_explicit_rate_and_demo(capsys, tmp_path):
    assert with_defaults(TrainConfig(learning_rate=5e-4), "classification").learning_rate == 5e-4
    assert capsys.readouterr().out == "learning rate 5e-4 (given)\n"
    assert with_defaults(TrainConfig(), "causal-lm").learning_rate == 2e-3  # no --data: the built-in demo
    assert capsys.readouterr().out == "learning rate 2e-3 (default for the built-in demo)\n"


def test_records_refuse_bad_rates():
    lora = methods.method_named("lora")
    for bad in ((("translation", 1e-3),), (("classification", -1.0),)):
        with pytest.raises(ConfigError, match="learning_rates"):
            dataclasses.replace(lora, learning_rates=bad)


def _sst(path):
    rows = [f"{'great fun' if i % 2 else 'dull mess'} number {i}\t{i % 2}" for i in range(24)]
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("explicit", [None, "3e-3"])
def test_the_printed_rate_is_the_rate_used(explicit, tiny_bert_dir, tmp_path, capsys, monkeypatch):
    """One step of `deltatune train` on a classifier: the line it prints and the optimizer's peak rate agree with
    the table (LoRA on classification: 1e-3, not the causal-LM 2e-4), and --learning-rate wins."""
    used = []
    make = trainer._optimizer
    monkeypatch.setattr(trainer, "_optimizer", lambda model, cfg: used.append(make(model, cfg)) or used[-1])
    argv = ["train", "--base", str(tiny_bert_dir), "--data", str(_sst(tmp_path / "sst.tsv")), "--max-steps", "1"]
    argv += ["--output-dir", str(tmp_path / "run"), "--batch-size", "4", "--threads", "1"]
    assert main(argv + (["--learning-rate", explicit] if explicit else [])) == 0
    first = capsys.readouterr().out.splitlines()[0]
    expected = float(explicit) if explicit else MEASURED["lora", "classification"]
    why = "given" if explicit else "default for lora on classification"
    assert first == f"learning rate {format_rate(expected)} ({why})"
    assert [group["initial_lr"] for group in used[0].param_groups] == [expected] * len(used[0].param_groups)
