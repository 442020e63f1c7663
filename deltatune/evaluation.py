"""Evaluation: loss and perplexity, accuracy/F1 for classification, BLEU/ROUGE-L (and the demo's
exact match) for greedy generations, as the trainer reports them. ``deltatune eval``'s multi-reference
scores, output files and side-by-side runs live in deltatune.eval_runs and deltatune.scoring."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deltatune.data import Batcher, Example
from deltatune.loss import LossModule, to_model_device


@torch.no_grad()
def evaluate_loss(model: nn.Module, task: str, batcher: Batcher) -> dict[str, float]:
    was_training = model.training
    model.eval()
    loss_module = LossModule(model, task)
    total, count = 0.0, 0
    for indices in batcher.epoch_batches(0):
        loss, n = loss_module(batcher.collate(indices))
        total, count = total + loss.item(), count + int(n)
    model.train(was_training)
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50))} if task == "causal-lm" else {"loss": mean}


@torch.no_grad()
def classification_metrics(model: nn.Module, batcher: Batcher, num_labels: int) -> dict[str, float]:
    model.eval()
    predictions, labels = [], []
    for indices in batcher.epoch_batches(0):
        batch = to_model_device(batcher.collate(indices), model)
        gold = batch.pop("labels")
        predictions += model(**batch).logits.argmax(-1).tolist()
        labels += gold.tolist()
    metrics = {"accuracy": sum(p == g for p, g in zip(predictions, labels, strict=True)) / len(labels)}
    if num_labels == 2:
        metrics["f1"] = binary_f1(predictions, labels)
    return metrics


def binary_f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    tp = sum(p == g == 1 for p, g in zip(predictions, labels, strict=True))
    predicted, actual = sum(p == 1 for p in predictions), sum(g == 1 for g in labels)
    return 2 * tp / (predicted + actual) if predicted + actual else 0.0


def generate(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    max_new_tokens: int,
    batch_size: int = 16,
    task_ids: Sequence[int] | None = None,
) -> list[str]:
    """Greedy completions of each example's prompt (left-padded batches, KV cache); ``task_ids``, one per
    example, go to a method that takes a task per row (HyperFormer). Other decodings: deltatune.generation."""
    from deltatune.generation import Decoding, generate_batches

    decoding = Decoding(max_new_tokens=max_new_tokens)
    return generate_batches(model, tokenizer, examples, decoding, batch_size, task_ids=task_ids).texts


def generation_metrics(
    predictions: Sequence[str], references: Sequence[str], exact_match: Callable[[str, str], bool] | None = None
) -> dict[str, float]:
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    metrics = {
        "bleu": sacrebleu.corpus_bleu(list(predictions), [list(references)]).score,
        "rougeL": 100 * sum(rouge) / len(rouge),
    }
    match = exact_match or (lambda p, r: p.strip() == r.strip())
    metrics["exact_match"] = 100 * sum(map(match, predictions, references)) / len(references)
    return metrics


def evaluate_model(
    model: nn.Module,
    tokenizer: Any,
    task: str,
    examples: Sequence[Example],
    batcher: Batcher,
    *,
    num_labels: int | None = None,
    max_new_tokens: int | None = 48,
    exact_match: Callable[[str, str], bool] | None = None,
    task_ids: Sequence[int] | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Every metric that fits the task, and the greedy generations (empty when none were made).

    ``batcher`` holds the tokenized ``examples``; ``max_new_tokens=None`` skips generation. ``task_ids`` (one
    per example) are the examples' tasks for generation; the batcher's features carry their own.
    """
    metrics = evaluate_loss(model, task, batcher)
    predictions: list[str] = []
    if task == "classification":
        metrics |= classification_metrics(model, batcher, num_labels or 2)
    elif max_new_tokens and all(e.target is not None for e in examples):
        predictions = generate(model, tokenizer, examples, max_new_tokens, task_ids=task_ids)
        metrics |= generation_metrics(predictions, [e.target for e in examples], exact_match)
    return metrics, predictions


def adapter_task_id(adapter: str | None, task_name: str | None) -> int | None:
    """The index of ``task_name`` in a multi-task adapter's ``tasks`` (None without a name); the adapter
    directory is checked first, so a damaged one is a clear error before any model loads."""
    from deltatune import methods
    from deltatune.checkpoint.adapter import check_adapter_dir
    from deltatune.config import ConfigError

    config = check_adapter_dir(adapter) if adapter else None
    if task_name is None:
        return None
    tasks = methods.method_for(config).tasks_of(config) if config is not None else []
    if task_name not in tasks:
        multi = methods.describe([m for m in methods.registered() if m.takes_task_ids])
        raise ConfigError(
            f"--task-name {task_name!r}: the adapter's tasks are {tasks}"
            if tasks
            else f"--task-name needs a multi-task adapter ({multi}, with tasks)"
        )
    return tasks.index(task_name)


def generate_text(
    base: str,
    adapter: str | None,
    prompt: str,
    max_new_tokens: int = 64,
    task_name: str | None = None,
    quantize: str | None = None,
    attention: str = "sdpa",
    attention_options: dict | None = None,
) -> str:
    """The greedy completion of ``prompt`` by ``base`` (+ ``adapter``; ``task_name`` picks a multi-task
    adapter's task)."""
    from deltatune.generation import Decoding

    example = Example(prompt=prompt, target=None)
    options = {"quantize": quantize, "attention": attention, "attention_options": attention_options}
    return generate_examples(base, adapter, [example], Decoding(max_new_tokens), task_name=task_name, **options)[0]


def generate_examples(
    base: str,
    adapter: str | None,
    examples: Sequence[Example],
    decoding: Any,
    *,
    batch_size: int = 16,
    raw: bool = False,
    task_name: str | None = None,
    quantize: str | None = None,
    attention: str = "sdpa",
    attention_options: dict | None = None,
    progress: bool = False,
) -> list[str]:
    """``deltatune generate``: completions of ``examples`` by ``base`` (+ ``adapter``) with ``decoding``
    (a deltatune.generation.Decoding), in batches; ``raw`` skips the chat template."""
    from deltatune.attention import set_attention
    from deltatune.generation import generate_batches
    from deltatune.loading import load_base
    from deltatune.model import DeltaModel

    task_id = adapter_task_id(adapter, task_name)
    model, tokenizer = load_base(base, task="causal-lm", quantize=quantize)
    set_attention(model, attention, **(attention_options or {}))
    if adapter:
        model = DeltaModel.from_pretrained(model, adapter)
    ids = None if task_id is None else [task_id] * len(examples)
    out = generate_batches(model, tokenizer, examples, decoding, batch_size, ids, raw, progress)
    return out.texts
