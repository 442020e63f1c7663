"""The optimizer steps of ``deltatune train``: each rank's micro-batches, a loss normalised over the
whole step, a metrics line every ``--log-every`` steps, checkpoints, and Ctrl-C as "save, then stop".

Losses are summed and divided by the token (or example) count of the whole optimizer step across
gradient-accumulation micro-batches and DDP ranks, so 2 processes x batch 2 give the same update
as 1 process x batch 4.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deltatune.data import IGNORE_INDEX, Batcher
from deltatune.training import fsdp
from deltatune.training.checkpoints import Position, save_checkpoint
from deltatune.training.config import TrainConfig


def training_device() -> torch.device:
    """This process's GPU under torchrun (LOCAL_RANK), the first GPU alone, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
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


def optimizer_step(
    runner: nn.Module,
    feed: Iterator,
    prepared: Any,
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


def log_step(out: Path, position: Position, loss: float, scheduler, bar) -> None:
    """A metrics.jsonl line for this step, and the same figures on the progress bar."""
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


class Steps:
    """What the loop needs beside the model: where it writes, its optimizer and schedule, and who it is."""

    def __init__(self, cfg: TrainConfig, out: Path, optimizer, scheduler, steps: int, rank: int, world: int) -> None:
        self.cfg, self.out, self.optimizer, self.scheduler = cfg, out, optimizer, scheduler
        self.steps, self.rank, self.world, self.main = steps, rank, world, rank == 0

    def save(self, prepared: Any, position: Position) -> None:
        """A checkpoint of this step (every rank's shards under --fsdp; rank 0 alone otherwise)."""
        saved = {**self.cfg.to_dict(), "world_size": self.world}
        keep, model = self.cfg.keep_checkpoints, prepared.model
        if prepared.root is not None:
            fsdp.save_sharded_checkpoint(
                prepared.root, model, self.optimizer, self.scheduler, position, saved, self.out, keep
            )
        elif self.main:
            save_checkpoint(self.out, model, self.optimizer, self.scheduler, position, saved, keep)


def run_steps(runner: nn.Module, prepared: Any, position: Position, run: Steps) -> bool:
    """Optimizer steps from ``position`` to the last (or a Ctrl-C, after a checkpoint); True if stopped."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    stop = StopRequest()
    feed = micro_batches(prepared.train, position.epoch, position.micro, run.rank, run.world)
    bar = tqdm(
        total=run.steps, initial=position.step, disable=not run.main, desc="training", unit="step", dynamic_ncols=True
    )
    started = time.perf_counter() - position.elapsed
    prepared.model.train()
    try:
        while position.step < run.steps and not stop.requested:
            loss, tokens = optimizer_step(
                runner, feed, prepared, cfg, position, run.optimizer, run.scheduler, run.world
            )
            position.step += 1
            position.tokens += tokens
            position.elapsed = time.perf_counter() - started
            if run.main and (position.step % cfg.log_every == 0 or position.step == run.steps):
                log_step(run.out, position, loss, run.scheduler, bar)
            bar.update(1)
            if prepared.root is not None:  # a Ctrl-C seen by any rank: all save together, then stop
                stop.requested = bool(all_reduce(torch.tensor(int(stop.requested))) > 0)
            if position.step % cfg.save_every == 0 or stop.requested:
                run.save(prepared, position)
    finally:
        bar.close()
        stop.restore()
    return stop.requested
