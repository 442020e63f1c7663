"""Evaluation: loss and perplexity, accuracy/F1 for classification, BLEU/ROUGE-L (and the demo's
exact match) for greedy generations. BLEU and ROUGE come from sacrebleu and rouge-score."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deltatune.training.data import Batcher, Example, prompt_ids
from deltatune.training.loss import LossModule, to_model_device


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


@torch.no_grad()
def generate(
    model: nn.Module, tokenizer: Any, examples: Sequence[Example], max_new_tokens: int, batch_size: int = 16
) -> list[str]:
    """Greedy completions of each example's prompt (left-padded batches, KV cache)."""
    model.eval()
    outputs = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(examples), batch_size):
        prompts = [prompt_ids(e, tokenizer) for e in examples[start : start + batch_size]]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        inputs = to_model_device({"input_ids": input_ids, "attention_mask": attention_mask}, model)
        generated = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        outputs += tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
    return [o.strip() for o in outputs]


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
) -> tuple[dict[str, float], list[str]]:
    """Every metric that fits the task, and the greedy generations (empty when none were made).

    ``batcher`` holds the tokenized ``examples``; ``max_new_tokens=None`` skips generation.
    """
    metrics = evaluate_loss(model, task, batcher)
    predictions: list[str] = []
    if task == "classification":
        metrics |= classification_metrics(model, batcher, num_labels or 2)
    elif max_new_tokens and all(e.target is not None for e in examples):
        predictions = generate(model, tokenizer, examples, max_new_tokens)
        metrics |= generation_metrics(predictions, [e.target for e in examples], exact_match)
    return metrics, predictions
