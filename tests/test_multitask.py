"""Multi-task training from the command line (several data files or a task column), and `train --help`."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest

from deltatune import flags, methods
from deltatune.cli import main, train_parser
from deltatune.config import ConfigError
from deltatune.data import read_examples
from deltatune.model import DeltaModel
from deltatune.training.config import TrainConfig

FAST = ["--learning-rate", "1e-2", "--batch-size", "4", "--log-every", "1", "--threads", "1"]
HYPER = ["--method", "hyperformer", "--bottleneck-size", "4", "--hypernet-hidden", "8"]
HYPER += ["--task-embedding-dim", "4", "--layer-embedding-dim", "4"]


def sst_file(path: Path, count: int = 16) -> Path:
    rows = [f"{'great fun' if i % 2 else 'dull mess'} number {i}\t{i % 2}" for i in range(count)]
    path.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    return path


def rte_file(path: Path, count: int = 16) -> Path:
    labels = ("entailment", "not_entailment")
    rows = [f"a cat sat {i}\t{'a cat' if i % 2 == 0 else 'no dog'} {i}\t{labels[i % 2]}" for i in range(count)]
    path.write_text("sentence1\tsentence2\tlabel\n" + "\n".join(rows) + "\n")
    return path


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture
def spy(monkeypatch) -> list[tuple]:
    """(task_ids, token_type_ids) of every forward that goes through the adapter."""
    seen = []
    original = DeltaModel.prepare_inputs

    def prepare_inputs(self, kwargs, *args, **options):
        if "input_ids" in kwargs:
            seen.append((kwargs.get("task_ids"), kwargs.get("token_type_ids")))
        return original(self, kwargs, *args, **options)

    monkeypatch.setattr(DeltaModel, "prepare_inputs", prepare_inputs)
    return seen


def test_hyperformer_trains_two_data_files_with_a_task_id_per_row(tiny_bert_dir, tmp_path, spy, capsys):
    sst, rte = sst_file(tmp_path / "sst.tsv"), rte_file(tmp_path / "rte.tsv")
    out = tmp_path / "run"
    argv = ["train", "--base", tiny_bert_dir, "--data", f"sst2={sst}", f"rte={rte}", *HYPER, "--max-steps", 4]
    assert run(*argv, "--output-dir", out, "--eval-fraction", "0.25", "--no-group-by-length", *FAST) == 0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["tasks"] == ["sst2", "rte"]  # the data's task names, in order
    # every forward got one task id per row; rte's rows (sentence pairs: token type 1) have id 1, sst2's id 0
    assert spy and all(ids is not None for ids, _ in spy)
    mixed = 0
    for ids, token_types in spy:
        assert ids.shape == (len(token_types),)
        assert ids.tolist() == [int(row.max()) for row in token_types]
        mixed += len(set(ids.tolist())) > 1
    assert mixed > 0  # batches mix tasks
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"sst2", "rte"} and summary["task_ids"] == {"sst2": 0, "rte": 1}
    for name in ("sst2", "rte"):
        assert {"loss", "accuracy", "f1"} <= set(summary["tasks"][name]["after"]) and summary["tasks"][name]["before"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    per_task = [(r["task"], r["eval"]) for r in lines if "task" in r]
    assert sorted(per_task) == sorted([(t, w) for t in ("sst2", "rte") for w in ("before", "after")])
    assert "per task:" in capsys.readouterr().out
    # deltatune eval of one task of the multi-task adapter: every row gets that task's id
    spy.clear()
    assert run("eval", "--base", tiny_bert_dir, "--adapter", out / "adapter", "--data", rte, "--task-name", "rte") == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] >= 0 and {int(i) for ids, _ in spy for i in ids} == {1}
    assert run("eval", "--base", tiny_bert_dir, "--adapter", out / "adapter", "--data", rte, "--task-name", "x") == 2
    assert "the adapter's tasks are ['sst2', 'rte']" in capsys.readouterr().err


def test_a_task_column_and_explicit_tasks(tiny_bert_dir, tmp_path, spy):
    data = tmp_path / "mixed.jsonl"
    records = [{"task": ("a", "b")[i % 2], "text": f"word {i}", "label": i % 2} for i in range(24)]
    data.write_text("\n".join(json.dumps(r) for r in records))
    out = tmp_path / "run"
    argv = ["train", "--base", tiny_bert_dir, "--data", data, "--task-column", "task", *HYPER, "--tasks", "z", "b", "a"]
    assert run(*argv, "--max-steps", 2, "--output-dir", out, *FAST) == 0
    assert {i for ids, _ in spy for i in ids.tolist()} == {1, 2}  # indices into --tasks z b a
    summary = json.loads((out / "summary.json").read_text())
    assert summary["task_ids"] == {"a": 2, "b": 1} and set(summary["tasks"]) == {"a", "b"}


def test_other_methods_train_one_adapter_on_the_union(tiny_bert_dir, tmp_path, spy):
    sst, rte = sst_file(tmp_path / "sst.tsv"), rte_file(tmp_path / "rte.tsv")
    out = tmp_path / "run"
    argv = ["train", "--base", tiny_bert_dir, "--data", f"sst2={sst}", f"rte={rte}", "--max-steps", 2]
    argv += ["--eval-data", f"rte={rte_file(tmp_path / 'rte_dev.tsv', 6)}"]  # sst2's eval is split from its data
    assert run(*argv, "--output-dir", out, "--target-modules", "query", "value", *FAST) == 0
    assert spy and all(ids is None for ids, _ in spy)  # LoRA takes no task ids
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"sst2", "rte"} and summary["task_ids"] is None


def test_multi_task_data_errors(tmp_path):
    sst = sst_file(tmp_path / "sst.tsv")
    with pytest.raises(ConfigError, match="NAME=PATH"):
        TrainConfig(data=[str(sst), str(sst)])
    with pytest.raises(ConfigError, match="no such file"):
        TrainConfig(data=[f"sst2={sst}", "rte=missing.tsv"])
    with pytest.raises(ConfigError, match="NAME=PATH entries too"):
        TrainConfig(data=[f"sst2={sst}", f"rte={sst}"], eval_data=str(sst))
    assert TrainConfig(data=[str(sst)]).data == str(sst)  # one file stays a path
    assert TrainConfig(data=[f"sst2={sst}"]).data == {"sst2": str(sst)}
    with pytest.raises(ConfigError, match="--task-column"):
        read_examples(sst, "classification", task_column="task")


def test_task_column_numbers_string_labels_per_task(tmp_path):
    data = tmp_path / "mixed.csv"
    data.write_text("task,text,label\nrte,x,not_entailment\nsst,y,positive\nrte,z,entailment\nsst,w,negative\n")
    examples = read_examples(data, "classification", task_column="task")
    assert [(e.task, e.text, e.label) for e in examples] == [
        ("rte", "x", 1),
        ("sst", "y", 1),
        ("rte", "z", 0),
        ("sst", "w", 0),
    ]


@pytest.mark.parametrize("method", sorted(methods.CONFIGS))
def test_every_train_flag_has_help_and_method_lists_every_method(method):
    parser, _, method_fields = train_parser(method)
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{action.option_strings} has no help"
    method_help = next(a for a in parser._actions if a.dest == "method").help
    for name in methods.CONFIGS:
        assert f"  {name}: " in method_help
    titles = [g.title for g in parser._action_groups]
    assert {"data options", "training options", "output/run options"} <= set(titles)
    assert any(t.startswith(f"{method} options") for t in titles)
    assert method_fields  # the method's own options are flags


def test_train_help_prints_descriptions_and_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--method", "hyperformer", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "hyperformer options (--method hyperformer)" in text and "(default: 512)" in text
    assert "NAME=PATH" in text and "prefix_tuning: Prefix tuning" in text


def test_causal_lm_tasks_evaluate_generations_per_task_and_generate_takes_a_task(tiny_llama_dir, tmp_path, capsys):
    files = []
    for name, word in (("echo", "again"), ("shout", "LOUD")):
        path = tmp_path / f"{name}.jsonl"
        rows = [{"instruction": f"Say {i}.", "input": "", "output": f"{i} {word}"} for i in range(10)]
        path.write_text("\n".join(json.dumps(r) for r in rows))
        files.append(f"{name}={path}")
    out = tmp_path / "run"
    argv = ["train", "--base", tiny_llama_dir, "--data", *files, *HYPER, "--max-steps", 2, "--max-new-tokens", 3]
    assert run(*argv, "--output-dir", out, *FAST) == 0
    summary = json.loads((out / "summary.json").read_text())
    for name in ("echo", "shout"):
        assert {"loss", "perplexity", "bleu", "rougeL"} <= set(summary["tasks"][name]["after"])
    assert {"loss", "perplexity", "bleu", "rougeL"} <= set(summary["after"])
    capsys.readouterr()
    adapter = out / "adapter"
    assert (
        run("generate", "--base", tiny_llama_dir, "--adapter", adapter, "--prompt", "Say 1.", "--task-name", "shout")
        == 0
    )
    assert (
        run("generate", "--base", tiny_llama_dir, "--adapter", adapter, "--prompt", "Say 1.", "--task-name", "x") == 2
    )


@dataclasses.dataclass
class _Documented:
    """Options:
    listed: from the Options block

    ``mentioned`` is described in a sentence. Another sentence.
    """

    meta: int = dataclasses.field(default=1, metadata={"help": "from metadata"})
    attr: str = "x"
    """from the attribute docstring"""
    commented: float = 0.5  # from the comment
    listed: bool = False
    mentioned: list[str] = dataclasses.field(default_factory=list)
    bare: int | None = None


def test_field_help_conventions():
    """One convention (issue 26): only the attribute docstring is help; metadata, comments and the class
    docstring's Options block or prose are not read, so those fields count as undocumented."""
    assert flags.field_help(_Documented) == {"attr": "from the attribute docstring"}
    assert flags.undocumented_fields(_Documented) == ["meta", "commented", "listed", "mentioned", "bare"]
    parser = argparse.ArgumentParser()
    flags.add_dataclass_flags(parser, _Documented)
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["bare"] == "bare (int) (default: none)" and helps["commented"] == "commented (float) (default: 0.5)"
    assert helps["attr"] == "from the attribute docstring (default: x)"
