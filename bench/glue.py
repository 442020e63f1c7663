"""GLUE quality benchmark: PEFT methods vs full fine-tuning on the real all-MiniLM-L6-v2.

For SST-2, RTE and MRPC (train splits in ../shared/data), three disjoint parts are carved from each train file:

* ``report``: a fixed validation split (10% of the file, seed 0, its first ``--eval-examples``), the only figures
  the README shows;
* ``select``: ``--select-examples`` further examples (seed 1), used only to choose each method's learning rate;
* the training pool (everything else): each run trains on ``--examples`` of it, drawn with the run's seed.

Every method trains on the same budget (``--examples`` per task x ``--epochs``, batch 16, ``--max-length``, length-
grouped batches, 1 thread). HyperFormer trains one model on all the tasks at once (mixed batches, a task id per
example) with the same total budget, through the command line users run: ``deltatune train --method hyperformer
--data sst2=... rte=... mrpc=... --eval-data sst2=...`` (same optimizer, schedule and clipping as the loop here),
scored from the per-task metrics it reports.

Each method runs in its own fresh process (methods one after another), which does:

1. lr selection: every learning rate of the method's grid (:data:`GRID`), at ``--select-seed``, trained on
   ``--select-tasks`` and scored on their ``select`` split; the rate with the best mean accuracy wins;
2. report: the chosen rate at each of ``--seeds`` on every task, scored on the ``report`` split.

Each run appends one raw line to ``bench/results/glue.jsonl`` as soon as it ends (``campaign`` ties the lines of one
invocation together; a summary line closes the campaign); ``bench/report.py glue`` prints the README table (mean +-
std over seeds) from those lines. The defaults are the README's budget: ``python bench/glue.py``.

The papers' claim checked on our own runs: LoRA and adapters within 1 point of full fine-tuning with under 1% (LoRA)
/ 4% (adapters) of the parameters; BitFit close behind.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RunMeter, append_result, emit, log, peak_rss_mb, set_threads

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
TASKS = {
    "sst2": SHARED / "sst2" / "train.tsv",
    "rte": SHARED / "rte" / "train.tsv",
    "mrpc": SHARED / "mrpc" / "train.tsv",
}
CONFIGS: dict[str, Any] = {
    "full": None,
    "lora": lambda dt: dt.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"]),
    "adapter": lambda dt: dt.AdapterConfig(bottleneck_size=64),
    "bitfit": lambda dt: dt.BitFitConfig(bias="all"),
    "partial_top2": lambda dt: dt.PartialConfig(train_top_layers=2),
    "prompt_tuning": lambda dt: dt.PromptTuningConfig(num_virtual_tokens=16),
    # The generator's heads are shared by every site and fan in from H hidden units, so one Adam step moves each
    # generated weight ~H times the learning rate: it needs a small rate. H=16 keeps it under 2% of the parameters.
    "hyperformer": "deltatune train --method hyperformer --hypernet-hidden 16 (see cli_multitask)",
}
# Learning-rate grid per method (2 values each, to fit the budget): around the rates the papers use, small for
# full/partial fine-tuning, larger for PEFT.
GRID: dict[str, list[float]] = {
    "full": [5e-5, 2e-4],
    "lora": [1e-3, 4e-3],
    "adapter": [1e-3, 4e-3],
    "bitfit": [2e-3, 1e-2],
    "partial_top2": [1e-4, 5e-4],
    "prompt_tuning": [3e-2, 3e-1],
    "hyperformer": [3e-4, 1e-3],
}
BATCH = 16
# The reference first and the method least likely to move on this budget last, so a cut-short campaign keeps the
# comparisons that matter.
METHOD_ORDER = ["full", "lora", "adapter", "bitfit", "partial_top2", "hyperformer", "prompt_tuning"]
REPORT_FRACTION, REPORT_SEED, SELECT_SEED = 0.1, 0, 1


def splits(task: str, select_examples: int, eval_examples: int) -> dict[str, list]:
    """The task's ``report``, ``select`` and training ``pool`` parts: disjoint, and fixed whatever the run's seed."""
    from deltatune.data import read_examples, split_train_eval

    rest, report = split_train_eval(read_examples(TASKS[task], "classification"), REPORT_FRACTION, REPORT_SEED)
    order = np.random.default_rng(SELECT_SEED).permutation(len(rest))
    chosen = set(order[:select_examples].tolist())
    return {
        "report": report[:eval_examples],
        "select": [e for i, e in enumerate(rest) if i in chosen],
        "pool": [e for i, e in enumerate(rest) if i not in chosen],
    }


def train_subsample(pool: list, examples: int, seed: int) -> list:
    order = np.random.default_rng(seed).permutation(len(pool))[:examples]
    return [pool[i] for i in order.tolist()]


def build_model(method: str, tasks: list[str]):
    import deltatune as dt

    base, tokenizer = dt.load_base("minilm-l6", num_labels=2)
    if method == "full":
        return base, tokenizer
    return dt.wrap(base, CONFIGS[method](dt)), tokenizer


def batches_for(task_data: dict[str, list], tokenizer, args: argparse.Namespace, seed: int) -> list[dict]:
    """Length-grouped, shuffled batches over ``--epochs`` passes."""
    from deltatune.data import Batcher, tokenize_examples

    features = []
    for examples in task_data.values():
        features += tokenize_examples(examples, tokenizer, "classification", args.max_length)
    batcher = Batcher(features, BATCH, pad_token_id=tokenizer.pad_token_id, seed=seed, group_by_length=True)
    return [batcher.collate(indices) for epoch in range(args.epochs) for indices in batcher.epoch_batches(epoch)]


@torch.no_grad()
def accuracy_f1(model, tokenizer, examples, max_length: int) -> dict[str, float]:
    from deltatune.data import Batcher, tokenize_examples
    from deltatune.evaluation import binary_f1

    model.eval()
    features = tokenize_examples(examples, tokenizer, "classification", max_length)
    batcher = Batcher(features, 64, pad_token_id=tokenizer.pad_token_id, seed=0, shuffle=False)
    predictions, labels = [], []
    for indices in batcher.epoch_batches(0):
        batch = batcher.collate(indices)
        labels += batch.pop("labels").tolist()
        predictions += model(**batch).logits.argmax(-1).tolist()
    accuracy = sum(p == g for p, g in zip(predictions, labels, strict=True)) / len(labels)
    return {
        "accuracy": round(100 * accuracy, 2),
        "f1": round(100 * binary_f1(predictions, labels), 2),
        "n": len(labels),
        "majority": round(100 * max(sum(labels), len(labels) - sum(labels)) / len(labels), 2),
    }


def train(model, batches: list[dict], lr: float) -> tuple[float, float]:
    """One pass over ``batches`` (AdamW, linear warm-up 6% then decay, clipping 1.0); (wall s, CPU s)."""
    from deltatune.loss import LossModule

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (0.06 * steps + 1)) * max(0.0, 1 - s / steps)
    )
    loss_module = LossModule(model, "classification")
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in batches:  # task_ids, if any, go to the method's input hook
        loss_sum, count = loss_module(batch)
        (loss_sum / count).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, time.process_time() - cpu_start


def write_jsonl(path: Path, examples: list) -> str:
    with open(path, "w") as f:
        for e in examples:
            pair = {} if e.text_pair is None else {"text_pair": e.text_pair}
            f.write(json.dumps({"text": e.text, **pair, "label": e.label}) + "\n")
    return str(path)


def cli_multitask(lr: float, seed: int, tasks: list[str], split: str, data: dict, args) -> dict[str, Any]:
    """HyperFormer on every task at once through ``deltatune train`` (the command line's multi-task path)."""
    import tempfile

    from deltatune.cli import main as deltatune

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        train_files = [f"{t}={write_jsonl(root / f'{t}.jsonl', train_subsample(data[t]['pool'], args.examples, seed))}"
                       for t in tasks]  # fmt: skip
        eval_files = [f"{t}={write_jsonl(root / f'{t}-{split}.jsonl', data[t][split])}" for t in tasks]
        cpu_start = time.process_time()
        code = deltatune([
            "train", "--method", "hyperformer", "--base", "minilm-l6", "--task", "classification",
            "--data", *train_files, "--eval-data", *eval_files, "--max-eval-examples", str(args.eval_examples),
            "--num-labels", "2", "--hypernet-hidden", "16", "--learning-rate", str(lr), "--lr-scheduler", "linear",
            "--warmup-ratio", "0.06", "--weight-decay", "0.01", "--max-grad-norm", "1.0", "--batch-size", str(BATCH),
            "--epochs", str(args.epochs), "--max-length", str(args.max_length), "--seed", str(seed),
            "--threads", str(args.threads), "--output-dir", str(root / "run"), "--save-every", "1000000",
        ])  # fmt: skip
        if code != 0:
            raise RuntimeError(f"deltatune train exited {code}")
        summary = json.loads((root / "run" / "summary.json").read_text())
    results: dict[str, Any] = {"tasks": {}, "path": "cli"}
    for task in tasks:
        after, labels = summary["tasks"][task]["after"], [e.label for e in data[task][split]]
        results["tasks"][task] = {
            "accuracy": round(100 * after["accuracy"], 2),
            "f1": round(100 * after["f1"], 2),
            "n": len(labels),
            "majority": round(100 * max(sum(labels), len(labels) - sum(labels)) / len(labels), 2),
        }
    results.update(
        train_s=round(summary["train_seconds"], 1),
        train_cpu_s=round(time.process_time() - cpu_start, 1),  # includes the command's own evaluations
        steps=summary["steps"],
        trainable_params=summary["trainable_params"],
        trainable_pct=round(100 * summary["trainable_params"] / summary["total_params"], 3),
        peak_rss_mb=peak_rss_mb(),
    )
    log(f"[hyperformer lr={lr:g} seed={seed} {split}] {tasks} (deltatune train): {results['tasks']}")
    return results


def run_one(method: str, lr: float, seed: int, tasks: list[str], split: str, data: dict, args) -> dict[str, Any]:
    """Train ``method`` at ``lr`` and ``seed`` (on each task in turn, or on all at once) and score it on ``split``."""
    if method == "hyperformer":
        return cli_multitask(lr, seed, tasks, split, data, args)
    results: dict[str, Any] = {"tasks": {}, "train_s": 0.0, "train_cpu_s": 0.0, "steps": 0}
    for group in [[t] for t in tasks]:
        torch.manual_seed(seed)
        model, tokenizer = build_model(method, group)
        train_data = {t: train_subsample(data[t]["pool"], args.examples, seed) for t in group}
        batches = batches_for(train_data, tokenizer, args, seed)
        wall, cpu = train(model, batches, lr)
        results["train_s"] += wall
        results["train_cpu_s"] += cpu
        results["steps"] += len(batches)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        results["trainable_params"] = trainable
        results["trainable_pct"] = round(100 * trainable / total, 3)
        for task in group:
            results["tasks"][task] = accuracy_f1(model, tokenizer, data[task][split], args.max_length)
        log(f"[{method} lr={lr:g} seed={seed} {split}] {group}: {results['tasks']}")
    results["train_s"] = round(results["train_s"], 1)
    results["train_cpu_s"] = round(results["train_cpu_s"], 1)
    results["peak_rss_mb"] = peak_rss_mb()  # of this worker so far: the largest of its runs up to this one
    return results


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One method's whole campaign in this process: lr selection on the select split, then every seed on report.

    Each run appends its raw line to bench/results/glue.jsonl as soon as it ends.
    """
    set_threads(args.threads)
    method = args.worker
    data = {t: splits(t, args.select_examples, args.eval_examples) for t in {*args.tasks, *args.select_tasks}}

    def one(lr: float, seed: int, tasks: list[str], split: str) -> dict[str, Any]:
        meter = RunMeter()
        figures = run_one(method, lr, seed, tasks, split, data, args)
        append_result(
            "glue", figures, meter, campaign=args.campaign, settings=settings(args),
            method=method, lr=lr, seed=seed, split=split, tasks=tasks,
        )  # fmt: skip
        return figures

    fixed = {m: float(v) for m, v in (item.split("=", 1) for item in args.lrs)}
    scores: dict[str, float] = {}
    if method in fixed:
        lr = fixed[method]
    else:
        for candidate in GRID[method]:
            scores[repr(candidate)] = round(
                mean_accuracy(one(candidate, args.select_seed, args.select_tasks, "select")), 2
            )
        lr = float(max(scores, key=lambda k: scores[k]))  # ties: the first (smaller) rate
        log(f"{method}: select-split accuracy {scores} -> lr {lr:g}")
    runs = [one(lr, seed, args.tasks, "report") for seed in args.seeds]
    return {
        "method": method,
        "chosen_lr": lr,
        "select_accuracy": scores,
        "mean_accuracy": {t: round(statistics.fmean(r["tasks"][t]["accuracy"] for r in runs), 2) for t in args.tasks},
    }


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "model": "minilm-l6",
        "examples_per_task": args.examples,
        "epochs": args.epochs,
        "batch": BATCH,
        "max_length": args.max_length,
        "select_examples": args.select_examples,
        "eval_examples": args.eval_examples,
        "threads": args.threads,
        "group_by_length": True,
        "splits": f"report = 10% of train.tsv (seed {REPORT_SEED}); select = seed-{SELECT_SEED} draw from the rest; "
        "training = run-seed draw from what remains",
    }


def mean_accuracy(figures: dict[str, Any]) -> float:
    return statistics.fmean(r["accuracy"] for r in figures["tasks"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--worker", choices=list(CONFIGS), help=argparse.SUPPRESS)
    parser.add_argument("--campaign", help=argparse.SUPPRESS)
    parser.add_argument("--methods", nargs="+", choices=list(CONFIGS), default=METHOD_ORDER)
    parser.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    parser.add_argument("--select-tasks", nargs="+", choices=list(TASKS), default=["sst2", "rte"])
    parser.add_argument("--select-seed", type=int, default=0)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lrs", nargs="+", default=[], metavar="METHOD=LR", help="fixed rates: skip their selection")
    parser.add_argument("--examples", type=int, default=96, help="training examples per task (same for every method)")
    parser.add_argument("--epochs", type=int, default=2, help="passes over those examples")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--select-examples", type=int, default=96, help="lr-selection examples per task")
    parser.add_argument("--eval-examples", type=int, default=200, help="reported examples per task (at most 10%%)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    missing = [t for t in {*args.tasks, *args.select_tasks} if not TASKS[t].is_file()]
    if missing:
        sys.exit(f"GLUE data not found for {missing} under {SHARED} (the shared datasets sit beside the checkout)")
    if args.worker:
        emit(run_worker(args))
        return
    set_threads(args.threads)  # the workers compute; this only makes the recorded thread count theirs
    args.campaign = "glue-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    log(f"campaign {args.campaign}")
    meter = RunMeter()
    summary: dict[str, Any] = {"campaign": args.campaign, "methods": {}}
    for method in args.methods:  # one fresh process per method, which runs its lr selection and then its seeds
        cmd = [sys.executable, __file__, "--worker", method, "--campaign", args.campaign, *worker_options(args)]
        log(f"{method} ...")
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        summary["methods"][method] = json.loads(done.stdout.strip().splitlines()[-1])
    append_result("glue", summary, meter, kind="summary", campaign=args.campaign, settings=settings(args))
    emit(summary)


def worker_options(args: argparse.Namespace) -> list[str]:
    return [
        "--tasks", *args.tasks, "--select-tasks", *args.select_tasks, "--select-seed", str(args.select_seed),
        "--seeds", *map(str, args.seeds), *(["--lrs", *args.lrs] if args.lrs else []),
        "--examples", str(args.examples), "--epochs", str(args.epochs), "--max-length", str(args.max_length),
        "--select-examples", str(args.select_examples), "--eval-examples", str(args.eval_examples),
        "--threads", str(args.threads),
    ]  # fmt: skip


if __name__ == "__main__":
    main()
