"""The training loop behind ``deltatune train``: data -> adapter -> train -> evaluate -> report.

Losses are summed and divided by the token (or example) count of the whole optimizer step across
gradient-accumulation micro-batches and DDP ranks, so 2 processes x batch 2 give the same update
as 1 process x batch 4. Multi-process runs use torch.distributed (``torchrun``), nothing home-made.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deltatune import methods
from deltatune.attention import set_attention, with_pattern_modules
from deltatune.config import ConfigError
from deltatune.data import (
    IGNORE_INDEX,
    Batcher,
    Example,
    pack,
    read_examples,
    split_train_eval,
    tokenize_tasks,
)
from deltatune.data.positions import check_features
from deltatune.evaluation import evaluate_loss, evaluate_model
from deltatune.loading.base_models import load_base
from deltatune.loading.tasks import load_tokenizer, task_of
from deltatune.loss import LossModule
from deltatune.model import DeltaModel, wrap
from deltatune.training import demo, fsdp
from deltatune.training.checkpoints import (
    Position,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_checkpoint,
    remove_leftovers,
    save_checkpoint,
)
from deltatune.training.config import READ_OPTIONS, TrainConfig
from deltatune.training.report import plot_loss, print_summary

__all__ = ["TrainConfig", "load_tokenizer", "prepare", "task_of", "train"]

DEMO_TRAIN, DEMO_EVAL = 400, 48
# Options that must match for --resume to continue a run rather than mix two.
# The global batch (--batch-size x processes) must match too; the number of processes need not.
RESUME_KEYS = (
    "base",
    "task",
    "method",
    "method_options",
    "attention",
    "attention_options",
    "data",
    "grad_accum",
    "seed",
    "packing",
)


@dataclass
class Prepared:
    model: DeltaModel
    tokenizer: Any
    task: str
    train: Batcher
    eval: Batcher
    eval_examples: list[Example]
    num_labels: int | None
    # Multi-task training: each task's eval examples and batcher (in task order), and the task ids the model
    # takes per row (None: the method takes none, so the tasks train one adapter on their union).
    eval_tasks: dict[str, tuple[list[Example], Batcher]] = field(default_factory=dict)
    task_ids: dict[str, int] | None = None
    root: nn.Module | None = None  # --fsdp: the sharded loss module around ``model``


# --- set-up -----------------------------------------------------------------------------------
def init_distributed(sharded: bool = False) -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun (or alone, for --fsdp)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(training_device())  # this rank's GPU, which NCCL and FSDP's mesh use
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend)
    elif sharded and not dist.is_initialized():  # one process: FSDP still needs a group (of one)
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return (dist.get_rank() if dist.is_initialized() else 0), world


def training_device() -> torch.device:
    """This process's GPU under torchrun (LOCAL_RANK), the first GPU alone, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def read_data(cfg: TrainConfig, task: str) -> tuple[list[Example], list[Example]]:
    """Train and eval examples, read and checked before the (slow) model load.

    Multi-task data (``--data NAME=PATH ...`` or ``--task-column``) gives examples with their ``task``; a task
    without an eval file is split per task, so that each task is evaluated, and eval examples come in task order.
    """
    if cfg.data is None:
        if task != "causal-lm":
            raise ConfigError("the built-in demo is a causal-lm task: give --data for classification")
        return demo.make_examples(DEMO_TRAIN, cfg.seed), demo.make_examples(DEMO_EVAL, cfg.seed + 10_000)
    columns = {k: getattr(cfg, k) for k in READ_OPTIONS}
    train = [e for name, path in cfg.data_files().items() for e in read_examples(path, task, **columns, task_name=name)]
    if not cfg.multi_task:
        if cfg.eval_data:
            evaluation = read_examples(cfg.eval_data, task, **columns)
        else:
            train, evaluation = split_train_eval(train, cfg.eval_fraction, cfg.seed)
        return train, evaluation[: cfg.max_eval_examples]
    names = task_names(train)
    eval_files = cfg.eval_data if isinstance(cfg.eval_data, dict) else {}
    evaluation = []
    if isinstance(cfg.eval_data, str):  # one file with a task column
        evaluation = read_examples(cfg.eval_data, task, **columns)
        unknown = sorted(set(task_names(evaluation)) - set(names))
        if unknown:
            raise ConfigError(f"--eval-data {cfg.eval_data} has tasks {unknown} that the training data lacks: {names}")
    kept_train = []
    for name in names:
        part = [e for e in train if e.task == name]
        if name in eval_files:
            evaluation += read_examples(eval_files[name], task, **columns, task_name=name)
        elif not isinstance(cfg.eval_data, str):  # no eval file for this task: hold out part of its data
            part, held = split_train_eval(part, cfg.eval_fraction, cfg.seed)
            evaluation += held
        kept_train += part
    train = kept_train
    by_task = [[e for e in evaluation if e.task == name][: cfg.max_eval_examples] for name in names]
    return train, [e for part in by_task for e in part]


def task_names(examples: list[Example]) -> list[str]:
    """The examples' task names in order of first appearance."""
    return list(dict.fromkeys(e.task for e in examples if e.task is not None))


def method_options_for_tasks(cfg: TrainConfig, tasks: list[str]) -> tuple[dict[str, Any], dict[str, int] | None]:
    """The method's options and the task id of each task name: a method that takes task ids (HyperFormer) gets
    the data's tasks as its task option (``tasks``) unless they are given (then the data's must be among them)."""
    options = dict(cfg.method_options)
    key = methods.method_named(cfg.method).task_option
    if not tasks or key is None:
        return options, None
    if not options.get(key):
        options[key] = list(tasks)
    declared = [options[key]] if isinstance(options[key], str) else list(options[key])
    missing = [t for t in tasks if t not in declared]
    if missing:
        flag = "--" + key.replace("_", "-")
        raise ConfigError(
            f"the data has tasks {missing} that {flag} {' '.join(declared)} does not list; add them to {flag} "
            f"(or leave {flag} out to use the data's task names)"
        )
    return options, {t: declared.index(t) for t in tasks}


def check_packing(cfg: TrainConfig, task: str) -> None:
    """Packed examples are kept apart by restarting position ids with no attention mask; virtual-token methods
    drop or shift those positions and bring a mask or KV cache, so packed examples would attend to each other."""
    if cfg.packing and task == "causal-lm" and not methods.method_named(cfg.method).packable:
        raise ConfigError(
            f"--packing cannot be used with {cfg.method}: its virtual tokens take the positions that keep packed "
            "examples apart, so they would attend to each other. Use --no-packing, or a method such as lora."
        )


def prepare(cfg: TrainConfig) -> Prepared:
    task = cfg.task or task_of(cfg.base)
    if cfg.fsdp:
        fsdp.check_supported(task, cfg.quantize)
    check_packing(cfg, task)
    train_examples, eval_examples = read_data(cfg, task)
    tasks = task_names(train_examples) if cfg.multi_task else []
    options, task_ids = method_options_for_tasks(cfg, tasks)
    if task_ids is not None and cfg.packing and task == "causal-lm":
        raise ConfigError(
            f"--packing puts examples of several tasks in one row, but {cfg.method} takes one task per row; "
            "use --no-packing for multi-task training"
        )
    num_labels = None
    if task == "classification":
        num_labels = cfg.num_labels or max(e.label for e in train_examples + eval_examples) + 1
    method_config = methods.config_class_for_name(cfg.method)(**options)  # validates the options
    # Everything that needs only the tokenizer (a prompt longer than max_length) fails before the weights load.
    tokenizer = load_tokenizer(cfg.base)
    train_features = tokenize_tasks(train_examples, tokenizer, task, cfg.max_length, task_ids)
    eval_features = tokenize_tasks(eval_examples, tokenizer, task, cfg.max_length, task_ids)
    if cfg.packing and task == "causal-lm":
        train_features = pack(train_features, cfg.max_length)
    if not cfg.fsdp:
        model, _ = load_base(cfg.base, task=task, num_labels=num_labels or 2, quantize=cfg.quantize)
    _, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    pad = tokenizer.pad_token_id
    train = Batcher(
        train_features, cfg.batch_size * world, pad_token_id=pad, seed=cfg.seed, group_by_length=cfg.group_by_length
    )
    evaluation = Batcher(eval_features, cfg.batch_size, pad_token_id=pad, seed=cfg.seed, shuffle=False)
    eval_tasks = {}
    for name in tasks:
        part = [e for e in eval_examples if e.task == name]
        if not part:  # a task the eval file lacks
            continue
        ids = None if task_ids is None else {name: task_ids[name]}
        features = tokenize_tasks(part, tokenizer, task, cfg.max_length, ids)
        eval_tasks[name] = (part, Batcher(features, cfg.batch_size, pad_token_id=pad, seed=cfg.seed, shuffle=False))
    root = None
    if cfg.fsdp:
        build = (cfg.base, task, method_config, cfg.attention, cfg.attention_options, tokenizer.pad_token_id)
        delta, root = fsdp.build(*build)
    else:
        set_attention(model, cfg.attention, **cfg.attention_options)
        delta = wrap(model.to(training_device()), with_pattern_modules(method_config, model, cfg.attention))
    check_features(delta, train_features + eval_features, cfg.max_length)  # transformers would only warn
    return Prepared(delta, tokenizer, task, train, evaluation, eval_examples, num_labels, eval_tasks, task_ids, root)


def evaluate_everywhere(prepared: Prepared, cfg: TrainConfig) -> tuple:
    """:func:`evaluate_all`; a sharded model needs every rank running it (with the root gathered)."""
    if prepared.root is None:
        return evaluate_all(prepared, cfg)
    with fsdp.unsharded(prepared.root):
        return evaluate_all(prepared, cfg)


# --- evaluation -------------------------------------------------------------------------------
def evaluate_all(prepared: Prepared, cfg: TrainConfig) -> tuple[dict[str, float], str, dict[str, dict[str, float]]]:
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


# --- the loop ---------------------------------------------------------------------------------
def micro_batches(batcher: Batcher, epoch: int, micro: int, rank: int, world: int) -> Iterator[tuple[int, int, list]]:
    """(epoch, index, this rank's rows) from a position on, forever; every rank gets a share."""
    while True:
        batches = batcher.epoch_batches(epoch)
        for i in range(micro, len(batches)):
            rows = batches[i][rank::world]
            if len(batches[i]) >= world:
                yield epoch, i, rows
        epoch, micro = epoch + 1, 0


def count_targets(batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    if task == "classification":
        return torch.tensor(len(batch["labels"]), dtype=torch.float64)
    return (batch["labels"][:, 1:] != IGNORE_INDEX).sum().to(torch.float64)


def all_reduce(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (on the training device: NCCL reduces only GPU tensors); returns a CPU tensor."""
    if dist.is_initialized():
        value = value.to(training_device())
        dist.all_reduce(value)
    return value.cpu()


class StopRequest:
    """Turns Ctrl-C into 'save a checkpoint at the end of this step, then stop'."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGINT, self._previous)


def total_steps(cfg: TrainConfig, batcher: Batcher) -> int:
    return cfg.max_steps or max(1, math.ceil(cfg.epochs * len(batcher) / cfg.grad_accum))


def check_resume(saved: dict[str, Any], cfg: TrainConfig, world: int, out: Path) -> None:
    """The options a resumed run must share with the saved one: the data, method, ... and the global batch
    (per-process batch x processes), so that any number of processes, sharded or not, continues the run."""
    current = cfg.to_dict()
    changed = [k for k in RESUME_KEYS if saved.get(k) != current.get(k)]
    saved_world = saved.get("world_size", world)  # checkpoints from before world_size was saved
    if saved.get("batch_size", 0) * saved_world != cfg.batch_size * world:
        changed.append(
            f"the global batch (--batch-size x processes: {saved.get('batch_size')} x {saved_world} then, "
            f"{cfg.batch_size} x {world} now)"
        )
    if changed:
        raise ConfigError(f"--resume: {', '.join(changed)} differ from the run in {out}; use the same options")


def find_resume_point(out: Path, main: bool) -> Path | None:
    """The newest intact checkpoint to resume from, checked before the model loads.

    A damaged checkpoint is skipped with a warning naming it (an earlier one still gives the same
    adapter, just later), and leftovers of a save cut short by a kill are removed.
    """
    if not main:
        return latest_intact_checkpoint(out, warn=None)
    remove_leftovers(out)
    found = latest_intact_checkpoint(out)
    where = f"resuming from {found}" if found else f"no intact checkpoint in {out / 'checkpoints'}; starting at step 0"
    print(f"deltatune: --resume: {where}", file=sys.stderr)
    return found


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a whole training job; returns the summary also written to ``summary.json``."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    rank, world = init_distributed(cfg.fsdp)
    main = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    if latest_checkpoint(out) is not None and not cfg.resume:
        raise ConfigError(
            f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or choose another --output-dir"
        )
    resume_from = find_resume_point(out, main) if cfg.resume else None
    torch.manual_seed(cfg.seed)
    prepared = prepare(cfg)
    model = prepared.model
    if cfg.gradient_checkpointing:
        model.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    steps = total_steps(cfg, prepared.train)
    root = prepared.root
    optimizer = _optimizer(model, cfg)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * steps)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    position = Position()
    if resume_from is not None:
        if root is None:
            position, saved = load_checkpoint(resume_from, model, optimizer, scheduler)
        else:
            position, saved = fsdp.load_sharded_checkpoint(resume_from, root, model, optimizer, scheduler)
        check_resume(saved, cfg, world, out)
    elif main or root is not None:
        if main:
            out.mkdir(parents=True, exist_ok=True)
        if main and cfg.data is None:
            print(
                f"No --data given: training {cfg.method} on the built-in task ({len(prepared.train.features)} "
                "sentences -> JSON records). Measuring the base model first..."
            )
        position.before, position.before_sample, position.before_tasks = evaluate_everywhere(prepared, cfg)
    if main:
        _trim_metrics(out / "metrics.jsonl", position.step)
        if position.step == 0:
            log_task_metrics(out / "metrics.jsonl", 0, position.before_tasks, "before")
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    runner = root if root is not None else LossModule(model, prepared.task)
    if root is None and dist.is_initialized():
        device_ids = [training_device()] if torch.cuda.is_available() else None
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=device_ids)
    stop = StopRequest()
    feed = micro_batches(prepared.train, position.epoch, position.micro, rank, world)
    bar = tqdm(total=steps, initial=position.step, disable=not main, desc="training", unit="step", dynamic_ncols=True)
    started = time.perf_counter() - position.elapsed
    model.train()
    try:
        while position.step < steps and not stop.requested:
            loss, tokens = _optimizer_step(runner, feed, prepared, cfg, position, optimizer, scheduler, world)
            position.step += 1
            position.tokens += tokens
            position.elapsed = time.perf_counter() - started
            if main and (position.step % cfg.log_every == 0 or position.step == steps):
                record = {
                    "step": position.step,
                    "epoch": position.epoch,
                    "loss": loss,
                    "lr": scheduler.get_last_lr()[0],
                    "tokens": position.tokens,
                    "tokens_per_s": position.tokens / max(position.elapsed, 1e-9),
                    "elapsed_s": position.elapsed,
                }
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            bar.update(1)
            if root is not None:  # a Ctrl-C seen by any rank: all save together, then stop
                stop.requested = bool(all_reduce(torch.tensor(int(stop.requested))) > 0)
            if position.step % cfg.save_every == 0 or stop.requested:
                saved = {**cfg.to_dict(), "world_size": world}
                if root is not None:
                    fsdp.save_sharded_checkpoint(
                        root, model, optimizer, scheduler, position, saved, out, cfg.keep_checkpoints
                    )
                elif main:
                    save_checkpoint(out, model, optimizer, scheduler, position, saved, cfg.keep_checkpoints)
    finally:
        bar.close()
        stop.restore()
    if stop.requested:
        if main:
            print(
                f"Interrupted at step {position.step}: checkpoint saved in {out}/checkpoints; "
                "continue with the same command plus --resume"
            )
        return {"interrupted": True, "step": position.step}
    return _finish(prepared, cfg, out, position, main)


def _optimizer(model, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; with --loraplus-lr-ratio, LoRA+'s groups (B faster)."""
    if cfg.loraplus_lr_ratio:
        from deltatune.training.loraplus import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=cfg.learning_rate,
            loraplus_lr_ratio=cfg.loraplus_lr_ratio,
            loraplus_weight_decay=cfg.weight_decay,
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _optimizer_step(
    runner: nn.Module,
    feed: Iterator,
    prepared: Prepared,
    cfg: TrainConfig,
    position: Position,
    optimizer,
    scheduler,
    world: int,
) -> tuple[float, int]:
    """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss, tokens seen)."""
    micro = [next(feed) for _ in range(cfg.grad_accum)]
    batches = [prepared.train.collate(rows) for _, _, rows in micro]
    count = all_reduce(sum(count_targets(b, prepared.task) for b in batches))
    total = torch.zeros((), dtype=torch.float64)
    is_ddp = isinstance(runner, nn.parallel.DistributedDataParallel)
    for j, batch in enumerate(batches):
        with runner.no_sync() if is_ddp and j < len(batches) - 1 else contextlib.nullcontext():
            loss_sum, _ = runner(batch)
            (loss_sum * (world / count).to(loss_sum.dtype)).backward()
        total += loss_sum.detach().to("cpu", torch.float64)
    if cfg.max_grad_norm:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    epoch, index, _ = micro[-1]
    position.epoch, position.micro = epoch, index + 1
    tokens = int(all_reduce(torch.tensor(sum(int(prepared.train.lengths[rows].sum()) for _, _, rows in micro))))
    return float(all_reduce(total) / count), tokens


def _sample(example: Example, before: str, after: str) -> dict[str, str] | None:
    """One eval example with the answers before and after training, for the summary."""
    if not after:
        return None
    prompt = example.prompt if isinstance(example.prompt, str) else json.dumps(example.prompt)
    return {"prompt": prompt, "reference": example.target, "before": before, "after": after}


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines the killed run wrote after its last checkpoint."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def _finish(prepared: Prepared, cfg: TrainConfig, out: Path, position: Position, main: bool) -> dict[str, Any]:
    """Final evaluation, the adapter, the loss plot and the summary (rank 0 only; a sharded model has every
    rank evaluate and gather the adapter's whole tensors)."""
    if prepared.root is not None:
        after, after_sample, after_tasks = evaluate_everywhere(prepared, cfg)
        whole = fsdp.gather_trainable(prepared.root)
    if not main:
        dist.barrier()
        return {}
    model = prepared.model
    if prepared.root is None:
        after, after_sample, after_tasks = evaluate_all(prepared, cfg)
    log_task_metrics(out / "metrics.jsonl", position.step, after_tasks, "after")
    adapter_dir = out / "adapter"
    with fsdp.whole_trainable(prepared.root, whole) if prepared.root is not None else contextlib.nullcontext():
        model.save_pretrained(adapter_dir)
    trainable, total = model.trainable_parameters()
    base_bytes = sum(
        p.numel() * p.element_size() for n, p in model.base_model.named_parameters() if not p.requires_grad
    )
    summary = {
        "base": cfg.base,
        "method": cfg.method,
        "task": prepared.task,
        "steps": position.step,
        "before": position.before,
        "after": after,
        "trainable_params": trainable,
        "total_params": total,
        "adapter_bytes": (adapter_dir / "adapter_model.safetensors").stat().st_size,
        "base_bytes": base_bytes,
        "train_seconds": position.elapsed,
        "tokens": position.tokens,
        "adapter_dir": str(adapter_dir),
        "sample": _sample(prepared.eval_examples[0], position.before_sample, after_sample),
    }
    if after_tasks:
        before_tasks = position.before_tasks
        summary["tasks"] = {name: {"before": before_tasks.get(name, {}), "after": m} for name, m in after_tasks.items()}
        summary["task_ids"] = prepared.task_ids
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    plot_loss(out / "metrics.jsonl", out / "loss.png")
    print_summary(summary)
    if dist.is_initialized():
        dist.barrier()
    return summary
