"""``deltatune eval``: read and check the data first (every mistake before a model loads), then score each
model (the base, or the base plus an adapter) on it, write ``predictions.jsonl`` and ``eval.json``, and put
several models side by side.

Generation tasks are scored per distinct input: rows sharing an input (E2E, WebNLG) or a ``--group-by``
value pool their targets as that input's references, and the model generates once per input.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deltatune.config import ConfigError
from deltatune.data import Example
from deltatune.generation import Decoding, generate_batches
from deltatune.scoring import (
    Group,
    check_metrics,
    classification_scores,
    corpus_scores,
    example_scores,
    group_references,
)

BASE = "base"  # the --adapter value that means the base model alone


@dataclass
class EvalData:
    """The checked data of one evaluation: rows, their tokenized features, and the inputs to generate for."""

    task: str
    examples: list[Example]
    groups: list[Group]
    features: list[dict]
    num_labels: int
    metrics: tuple[str, ...]
    tokenizer: Any


@dataclass
class RunResult:
    name: str
    metrics: dict[str, float]
    records: list[dict[str, Any]]


def prepare(
    base: str,
    data: str,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    max_length: int = 512,
    max_examples: int | None = 200,
    limit: int | None = None,
    group_by: str | None = None,
    prompt_column: str | None = None,
    target_column: str | None = None,
    metrics: Sequence[str] | None = None,
    task_id: int | None = None,
) -> EvalData:
    """Read, group and tokenize ``data``: the metric names, columns and data are all checked here, before any
    weights load. ``limit`` keeps the first N distinct inputs (with all their rows), else the first
    ``max_examples`` rows are read."""
    from deltatune.data import read_examples, tag_tasks, tokenize_examples
    from deltatune.loading.tasks import load_tokenizer, task_of

    task = task or task_of(base)
    chosen = check_metrics(metrics, task)
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    columns = {"prompt_column": prompt_column, "target_column": target_column}
    examples = read_examples(data, task, num_labels=num_labels, **columns)
    keys = group_column(data, group_by, len(examples)) if group_by else None
    generating = task == "causal-lm" and any(e.target is not None for e in examples)
    if task == "causal-lm" and metrics and not generating:
        raise ConfigError(f"{data} has no references to score {', '.join(chosen)} against; name them --target-column")
    groups = group_references(examples, keys) if generating else []
    if limit is not None and groups:
        groups = groups[:limit]
        rows = sorted(i for g in groups for i in g.rows)
        examples = [examples[i] for i in rows]
        groups = group_references(examples, [keys[i] for i in rows] if keys else None)
    else:
        examples = examples[: limit or max_examples]
        groups = group_references(examples, keys[: len(examples)] if keys else None) if generating else []
    if generating and any(not g.references for g in groups):
        raise ConfigError(f"{data}: some inputs have no reference (empty target); fix or drop those rows")
    num_labels = num_labels or (max(e.label for e in examples) + 1 if task == "classification" else 2)
    tokenizer = load_tokenizer(base)
    features = tokenize_examples(examples, tokenizer, task, max_length)
    if task_id is not None:
        features = tag_tasks(features, task_id)
    return EvalData(task, examples, groups, features, num_labels, chosen, tokenizer)


def group_column(data: str | Path, column: str, rows: int) -> list[str]:
    """Each row's ``column`` value (a .csv/.tsv/.json/.jsonl file), the key its references are pooled by."""
    from deltatune.data.formats import _read_csv, _read_json

    path = Path(data)
    if path.suffix.lower() == ".txt":
        raise ConfigError(f"--group-by {column}: a .txt file has no columns")
    records = _read_csv(path) if path.suffix.lower() in (".csv", ".tsv") else _read_json(path)
    for where, record in records:
        if column not in record:
            raise ConfigError(f"--group-by {column}: {where} of {path.name} has no such column; it has {list(record)}")
    if len(records) != rows:
        raise ConfigError(f"--group-by {column}: {len(records)} rows but {rows} examples in {path.name}")
    return [str(record[column]) for _, record in records]


def run_model(
    model: torch.nn.Module,
    data: EvalData,
    decoding: Decoding,
    *,
    name: str = BASE,
    batch_size: int = 8,
    task_id: int | None = None,
    progress: bool = False,
    loss: bool = True,
) -> RunResult:
    """Loss (and perplexity; over every row, unless ``loss`` is off), then the task's metrics, and one record
    per input with its own scores."""
    from deltatune.data import Batcher
    from deltatune.evaluation import evaluate_loss

    model.eval()
    batcher = Batcher(data.features, batch_size, pad_token_id=data.tokenizer.pad_token_id, seed=0, shuffle=False)
    metrics = evaluate_loss(model, data.task, batcher) if loss else {}
    if data.task == "classification":
        scores, records = _classify(model, data, batcher)
    elif data.groups:
        scores, records = _generate(model, data, decoding, batch_size, task_id, progress)
    else:
        scores, records = {}, []
    return RunResult(name, metrics | scores, records)


@torch.no_grad()
def _classify(model, data: EvalData, batcher) -> tuple[dict[str, float], list[dict]]:
    from deltatune.loss import to_model_device

    predictions: list[int] = []
    for indices in batcher.epoch_batches(0):
        batch = to_model_device(batcher.collate(indices), model)
        batch.pop("labels")
        predictions += model(**batch).logits.argmax(-1).tolist()
    labels = [e.label for e in data.examples]
    scores = {k: v for k, v in classification_scores(predictions, labels, data.num_labels).items() if k in data.metrics}
    records = [
        {
            "input": e.text if e.text_pair is None else [e.text, e.text_pair],
            "prediction": p,
            "references": [e.label],
            "scores": {"accuracy": float(p == e.label)},
        }
        for e, p in zip(data.examples, predictions, strict=True)
    ]
    return scores, records


def _generate(model, data: EvalData, decoding, batch_size, task_id, progress) -> tuple[dict[str, float], list[dict]]:
    inputs = [g.example for g in data.groups]
    ids = None if task_id is None else [task_id] * len(inputs)
    start = time.perf_counter()
    out = generate_batches(model, data.tokenizer, inputs, decoding, batch_size, task_ids=ids, progress=progress)
    seconds = time.perf_counter() - start
    print(
        f"generated {out.new_tokens} tokens for {len(inputs)} inputs in {seconds:.1f} s "
        f"({out.new_tokens / max(seconds, 1e-9):.1f} tokens/s, {decoding.num_beams} beam(s))",
        file=sys.stderr,
    )
    references = [g.references for g in data.groups]
    scores = corpus_scores(out.texts, references, data.metrics)
    records = [
        {
            "input": g.key,
            "prediction": p,
            "references": g.references,
            "scores": example_scores(p, g.references, data.metrics),
        }
        for g, p in zip(data.groups, out.texts, strict=True)
    ]
    return scores, records


# --- several models, files, table ------------------------------------------------------------------
def run_names(adapters: Sequence[str | None]) -> list[str]:
    """A column name per run: ``base``, else the adapter folder's name (its path where names repeat)."""
    names = [BASE if a in (None, BASE) else Path(a).name for a in adapters]
    return [n if names.count(n) == 1 else str(a) for n, a in zip(names, adapters, strict=True)]


def write_results(directory: str | Path, results: Sequence[RunResult]) -> None:
    """One run: ``DIR/predictions.jsonl`` and ``DIR/eval.json``. Several: each in ``DIR/NAME/``, and
    ``DIR/eval.json`` maps each name to its metrics. Files are written atomically."""
    from deltatune.atomic import atomic_write_text

    directory = Path(directory)
    for result in results:
        where = directory if len(results) == 1 else directory / _safe(result.name)
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in result.records)
        atomic_write_text(where / "predictions.jsonl", lines)
        atomic_write_text(where / "eval.json", json.dumps(result.metrics, indent=1) + "\n")
    if len(results) > 1:
        table = {r.name: r.metrics for r in results}
        atomic_write_text(directory / "eval.json", json.dumps(table, indent=1) + "\n")


def _safe(name: str) -> str:
    return name.strip("/").replace("/", "_") or BASE


def read_predictions(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def side_by_side(results: Sequence[RunResult]) -> str:
    """A table: one row per metric, one column per model."""
    names = list(dict.fromkeys(k for r in results for k in r.metrics))
    width = max(len(n) for n in names) if names else 6
    header = f"{'metric':<{width}}  " + "  ".join(f"{r.name:>12}" for r in results)
    rows = [header]
    for metric in names:
        cells = (f"{r.metrics[metric]:>12.4g}" if metric in r.metrics else f"{'-':>12}" for r in results)
        rows.append(f"{metric:<{width}}  " + "  ".join(cells))
    return "\n".join(rows)


def evaluate(
    base: str,
    adapters: Sequence[str | None],
    data: str,
    decoding: Decoding | None = None,
    *,
    batch_size: int = 8,
    task_name: str | None = None,
    quantize: str | None = None,
    attention: str = "sdpa",
    attention_options: dict | None = None,
    output_dir: str | Path | None = None,
    progress: bool = False,
    loss: bool = True,
    **data_options: Any,
) -> list[RunResult]:
    """Score ``base`` with each of ``adapters`` (None or ``"base"``: the base alone) on ``data``.

    ``data_options`` go to :func:`prepare`; ``decoding=None`` skips generation (loss only), ``loss=False`` the
    loss (a forward pass over every reference row). Every adapter
    folder, the task name, the metrics and the data are checked before the first model loads.
    """
    from deltatune.evaluation import adapter_task_id

    adapters = list(adapters) or [None]
    task_ids = [adapter_task_id(None if a == BASE else a, task_name) for a in adapters]
    prepared = prepare(base, data, task_id=next((t for t in task_ids if t is not None), None), **data_options)
    if decoding is None:
        prepared.groups = []
    results = []
    for adapter, name, task_id in zip(adapters, run_names(adapters), task_ids, strict=True):
        model = _load(base, None if adapter == BASE else adapter, prepared, quantize, attention, attention_options)
        results.append(
            run_model(
                model,
                prepared,
                decoding or Decoding(),
                name=name,
                batch_size=batch_size,
                task_id=task_id,
                progress=progress,
                loss=loss,
            )
        )
        del model
    if output_dir is not None:
        write_results(output_dir, results)
    return results


def _load(base, adapter, prepared: EvalData, quantize, attention, attention_options) -> torch.nn.Module:
    from deltatune.attention import set_attention
    from deltatune.loading import load_base
    from deltatune.model import DeltaModel

    model, _ = load_base(base, task=prepared.task, num_labels=prepared.num_labels, quantize=quantize)
    set_attention(model, attention, **(attention_options or {}))
    if adapter:
        model = DeltaModel.from_pretrained(model, adapter)
    return model.eval()


def evaluate_file(
    base: str,
    adapter: str | None,
    data: str,
    *,
    max_new_tokens: int | None = 48,
    task_name: str | None = None,
    quantize: str | None = None,
    attention: str = "sdpa",
    attention_options: dict | None = None,
    **data_options: Any,
) -> dict[str, float]:
    """Metrics of ``base`` (+ ``adapter``) on ``data`` (greedy generations of ``max_new_tokens``; None: loss
    only). ``data_options`` (task, num_labels, max_length, max_examples, limit, group_by, metrics, ...) go to
    :func:`prepare`; several adapters, decoding options and output files: :func:`evaluate`."""
    decoding = None if not max_new_tokens else Decoding(max_new_tokens=max_new_tokens)
    batch_size = data_options.pop("batch_size", 8)
    results = evaluate(
        base,
        [adapter],
        data,
        decoding,
        batch_size=batch_size,
        task_name=task_name,
        quantize=quantize,
        attention=attention,
        attention_options=attention_options,
        **data_options,
    )
    return results[0].metrics
