"""Evaluation inside ``deltatune train``: before the first step and after the last, on the whole eval
split and, in multi-task training, on each task's part."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltatune.evaluation import evaluate_loss, evaluate_model
from deltatune.training import demo, fsdp
from deltatune.training.config import TrainConfig


def evaluate_everywhere(prepared: Any, cfg: TrainConfig) -> tuple:
    """:func:`evaluate_all`; a sharded model needs every rank running it (with the root gathered)."""
    if prepared.root is None:
        return evaluate_all(prepared, cfg)
    with fsdp.unsharded(prepared.root):
        return evaluate_all(prepared, cfg)


def evaluate_all(prepared: Any, cfg: TrainConfig) -> tuple[dict[str, float], str, dict[str, dict[str, float]]]:
    """Metrics on the eval split, the model's answer to the first eval example (or ""), and each task's metrics
    in multi-task training. There the overall loss (and perplexity) is over every eval example, the other
    metrics are the mean of the tasks' (as GLUE's average score)."""
    generate_tokens = cfg.max_new_tokens if cfg.eval_generate else None
    if not prepared.eval_tasks:
        metrics, predictions = evaluate_model(
            prepared.model,
            prepared.tokenizer,
            prepared.task,
            prepared.eval_examples,
            prepared.eval,
            num_labels=prepared.num_labels,
            max_new_tokens=generate_tokens,
            exact_match=demo.exact_match if cfg.data is None else None,
        )
        prepared.model.train()
        return metrics, predictions[0] if predictions else "", {}
    per_task, sample = {}, ""
    for name, (examples, batcher) in prepared.eval_tasks.items():
        ids = None if prepared.task_ids is None else [prepared.task_ids[name]] * len(examples)
        per_task[name], predictions = evaluate_model(
            prepared.model,
            prepared.tokenizer,
            prepared.task,
            examples,
            batcher,
            num_labels=prepared.num_labels,
            max_new_tokens=generate_tokens,
            task_ids=ids,
        )
        if name == next(iter(prepared.eval_tasks)) and predictions:
            sample = predictions[0]  # the eval examples come in task order: this is the first one's answer
    metrics = evaluate_loss(prepared.model, prepared.task, prepared.eval)
    shared = set.intersection(*(set(m) for m in per_task.values())) - set(metrics)
    for key in sorted(shared):
        metrics[key] = sum(m[key] for m in per_task.values()) / len(per_task)
    prepared.model.train()
    return metrics, sample, per_task


def log_task_metrics(path: Path, step: int, per_task: dict[str, dict[str, float]], when: str) -> None:
    """One metrics.jsonl line per task: ``{"step", "task", "eval": "before"|"after", metrics...}``."""
    if per_task:
        with open(path, "a") as f:
            for name, metrics in per_task.items():
                f.write(json.dumps({"step": step, "task": name, "eval": when, **metrics}) + "\n")
