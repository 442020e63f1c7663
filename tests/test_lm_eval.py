"""Opt-in (lm-evaluation-harness installed): our adapters are peft checkpoints, so ``lm_eval --model hf
--model_args pretrained=DIR,peft=ADAPTER`` evaluates them. A local task made from SST-2 rows (no downloads);
the harness's accuracy equals the one computed here from deltatune's own log-likelihoods."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapters

import deltatune as dt

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness (lm_eval) is not installed")
pytest.importorskip("datasets", reason="datasets (lm_eval's loader) is not installed")

PROMPT = "Review: {sentence}\nSentiment:"
CHOICES = [" negative", " positive"]


def local_task(directory: Path, rows: list[dict]) -> Path:
    """A harness task over a local JSON-lines file: two-choice log-likelihood, like GLUE's SST-2 task."""
    data = directory / "sst2.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "dt_sst2.yaml").write_text(
        "task: dt_sst2\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Review: {{sentence}}\\nSentiment:"\n'
        'doc_to_choice: ["negative", "positive"]\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n"
    )
    return directory


def our_accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Pick the choice with the higher summed log-probability of its tokens after the prompt."""
    correct = 0
    for row in rows:
        context = tokenizer(PROMPT.format(**row))["input_ids"]
        scores = []
        for choice in CHOICES:
            ids = context + tokenizer(choice, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            scores.append(sum(logits[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
        correct += int(scores.index(max(scores)) == row["label"])
    return correct / len(rows)


@pytest.mark.slow
def test_lm_eval_scores_our_adapter(tiny_llama_dir, shared_data, tmp_path):
    from lm_eval.tasks import TaskManager

    lines = (shared_data / "sst2" / "train.tsv").read_text().splitlines()[1:41]
    rows = [{"sentence": s.strip(), "label": int(y)} for s, y in (line.split("\t") for line in lines)]
    base, tokenizer = dt.load_base(str(tiny_llama_dir))
    model = dt.wrap(base, dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"]))
    randomize_adapters(model, std=0.5)
    model.save_pretrained(tmp_path / "adapter")
    with model.disable_adapter():
        plain = our_accuracy(model, tokenizer, rows)
    adapted = our_accuracy(model, tokenizer, rows)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_llama_dir},peft={tmp_path / 'adapter'},dtype=float32",
        tasks=["dt_sst2"],
        task_manager=TaskManager(include_path=str(local_task(tmp_path, rows))),
        batch_size=8,
        device="cpu",
    )
    assert results["results"]["dt_sst2"]["acc,none"] == pytest.approx(adapted)
    assert adapted != plain  # the harness's figure is the adapter's, not the base's
