"""Evaluation: loss and perplexity, accuracy/F1 for classification, BLEU/ROUGE-L (and the demo's
exact match) for greedy generations. BLEU and ROUGE come from sacrebleu and rouge-score."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from deltatune.data import Batcher, Example, prompt_ids
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


@torch.no_grad()
def generate(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    max_new_tokens: int,
    batch_size: int = 16,
    task_ids: Sequence[int] | None = None,
) -> list[str]:
    """Greedy completions of each example's prompt (left-padded batches, KV cache); ``task_ids``, one per
    example, go to a method that takes a task per row (HyperFormer)."""
    model.eval()
    outputs = []
    pad = tokenizer.pad_token_id
    for start in range(0, len(examples), batch_size):
        prompts = [prompt_ids(e, tokenizer) for e in examples[start : start + batch_size]]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        inputs = to_model_device({"input_ids": input_ids, "attention_mask": attention_mask}, model)
        if task_ids is not None:
            inputs["task_ids"] = torch.tensor(list(task_ids[start : start + batch_size]), device=input_ids.device)
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


def evaluate_file(
    base: str,
    adapter: str | None,
    data: str,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    max_length: int = 512,
    batch_size: int = 8,
    max_examples: int = 200,
    max_new_tokens: int | None = 48,
    task_name: str | None = None,
    quantize: str | None = None,
    attention: str = "sdpa",
    attention_options: dict | None = None,
) -> dict[str, float]:
    """``deltatune eval``: metrics of ``base`` (+ ``adapter``) on the first ``max_examples`` of ``data``.

    Data errors (a prompt over ``max_length``, a bad ``task_name``) come before the model weights load.
    ``task_name`` picks the task of a multi-task adapter (HyperFormer's ``tasks``) for every example;
    ``quantize`` (int8/nf4) evaluates on a quantized base; ``attention`` runs it with an attention pattern
    (deltatune.attention; before the adapter loads, so a pattern's saved modules find their place).
    """
    from deltatune.attention import set_attention
    from deltatune.data import read_examples, tag_tasks, tokenize_examples
    from deltatune.loading import load_base
    from deltatune.loading.tasks import load_tokenizer, task_of
    from deltatune.model import DeltaModel

    task_id = adapter_task_id(adapter, task_name)
    task = task or task_of(base)
    examples = read_examples(data, task, num_labels=num_labels)[:max_examples]
    num_labels = num_labels or (max(e.label for e in examples) + 1 if task == "classification" else 2)
    tokenizer = load_tokenizer(base)  # data errors (a prompt over max_length) before the weights load
    features = tokenize_examples(examples, tokenizer, task, max_length)
    if task_id is not None:
        features = tag_tasks(features, task_id)
    model, _ = load_base(base, task=task, num_labels=num_labels, quantize=quantize)
    set_attention(model, attention, **(attention_options or {}))
    if adapter:
        model = DeltaModel.from_pretrained(model, adapter)
    model.eval()
    batcher = Batcher(features, batch_size, pad_token_id=tokenizer.pad_token_id, seed=0, shuffle=False)
    metrics, _ = evaluate_model(
        model,
        tokenizer,
        task,
        examples,
        batcher,
        num_labels=num_labels,
        max_new_tokens=max_new_tokens,
        task_ids=None if task_id is None else [task_id] * len(examples),
    )
    return metrics


def adapter_task_id(adapter: str | None, task_name: str | None) -> int | None:
    """The index of ``task_name`` in a multi-task adapter's ``tasks`` (None without a name); the adapter
    directory is checked first, so a damaged one is a clear error before any model loads."""
    from deltatune.checkpoint.adapter import check_adapter_dir
    from deltatune.config import ConfigError

    config = check_adapter_dir(adapter) if adapter else None
    if task_name is None:
        return None
    tasks = list(getattr(config, "tasks", None) or [])
    if task_name not in tasks:
        raise ConfigError(
            f"--task-name {task_name!r}: the adapter's tasks are {tasks}"
            if tasks
            else "--task-name needs a multi-task adapter (HyperFormer, with tasks)"
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
    """``deltatune generate``: the greedy completion of ``prompt`` by ``base`` (+ ``adapter``; ``task_name``
    picks a multi-task adapter's task)."""
    from deltatune.attention import set_attention
    from deltatune.loading import load_base
    from deltatune.model import DeltaModel

    task_id = adapter_task_id(adapter, task_name)
    model, tokenizer = load_base(base, task="causal-lm", quantize=quantize)
    set_attention(model, attention, **(attention_options or {}))
    if adapter:
        model = DeltaModel.from_pretrained(model, adapter)
    ids = None if task_id is None else [task_id]
    return generate(model.eval(), tokenizer, [Example(prompt=prompt, target=None)], max_new_tokens, task_ids=ids)[0]
