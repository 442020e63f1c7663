"""``deltatune train``: data -> adapter -> train -> evaluate -> report.

Here: reading the data and building the model (:func:`prepare`), and the run as a whole (:func:`train`).
The optimizer steps are in deltatune.training.loop, where a run starts (fresh or ``--resume``) in
deltatune.training.resume, evaluation in deltatune.training.evaluating. Multi-process runs use
torch.distributed (``torchrun``), nothing home-made.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deltatune import methods
from deltatune.attention import set_attention, with_pattern_modules
from deltatune.config import ConfigError
from deltatune.data import Batcher, Example, pack, read_examples, split_train_eval, tokenize_tasks
from deltatune.data.positions import check_features
from deltatune.loading.base_models import load_base
from deltatune.loading.tasks import load_tokenizer, task_of
from deltatune.loss import LossModule
from deltatune.model import DeltaModel, wrap
from deltatune.training import compiling, demo, fsdp
from deltatune.training.checkpoints import Position
from deltatune.training.config import READ_OPTIONS, TrainConfig
from deltatune.training.defaults import with_defaults
from deltatune.training.evaluating import evaluate_all, evaluate_everywhere, log_task_metrics
from deltatune.training.loop import Steps, make_optimizer, micro_batches, run_steps, total_steps, training_device
from deltatune.training.report import plot_loss, print_summary
from deltatune.training.resume import RESUME_KEYS, check_fresh, find_resume_point, start

# The public names, and those that benches and tests import from here (their homes are loop, resume, evaluating).
__all__ = [
    "RESUME_KEYS",
    "TrainConfig",
    "evaluate_all",
    "load_tokenizer",
    "micro_batches",
    "prepare",
    "task_of",
    "train",
    "training_device",
]

DEMO_TRAIN, DEMO_EVAL = 400, 48


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
        model, _ = load_base(
            cfg.base, task=task, num_labels=num_labels or 2, quantize=cfg.quantize, matmul_dtype=cfg.matmul_dtype
        )
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


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run a whole training job; returns the summary also written to ``summary.json``."""
    from transformers import get_scheduler

    rank, world = init_distributed(cfg.fsdp)
    main = rank == 0
    cfg = with_defaults(cfg, cfg.task or task_of(cfg.base), say=main)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.output_dir)
    check_fresh(out, cfg)
    resume_from = find_resume_point(out, main) if cfg.resume else None
    torch.manual_seed(cfg.seed)
    prepared = prepare(cfg)
    model = prepared.model
    if cfg.gradient_checkpointing:
        model.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    steps = total_steps(cfg, prepared.train)
    optimizer = _optimizer(model, cfg)
    warmup = cfg.warmup_steps or int(cfg.warmup_ratio * steps)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=steps)
    position = start(prepared, cfg, resume_from, optimizer, scheduler, main, world)
    compiling.compile_for_training(model, cfg, say=main)
    runner = prepared.root if prepared.root is not None else LossModule(model, prepared.task)
    if prepared.root is None and dist.is_initialized():
        device_ids = [training_device()] if torch.cuda.is_available() else None
        runner = nn.parallel.DistributedDataParallel(runner, device_ids=device_ids)
    if run_steps(runner, prepared, position, Steps(cfg, out, optimizer, scheduler, steps, rank, world)):
        if main:
            print(
                f"Interrupted at step {position.step}: checkpoint saved in {out}/checkpoints; "
                "continue with the same command plus --resume"
            )
        return {"interrupted": True, "step": position.step}
    with compiling.eager():
        return _finish(prepared, cfg, out, position, main)


_optimizer = make_optimizer  # the name tests and benches import


def _sample(example: Example, before: str, after: str) -> dict[str, str] | None:
    """One eval example with the answers before and after training, for the summary."""
    if not after:
        return None
    prompt = example.prompt if isinstance(example.prompt, str) else json.dumps(example.prompt)
    return {"prompt": prompt, "reference": example.target, "before": before, "after": after}


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
