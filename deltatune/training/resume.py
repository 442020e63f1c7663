"""Where a ``deltatune train`` run starts: a fresh folder (the base model measured first), or the newest
intact checkpoint of the same run (``--resume``), with the options it must share checked."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from deltatune.config import ConfigError
from deltatune.training import fsdp
from deltatune.training.checkpoints import (
    Position,
    latest_checkpoint,
    latest_intact_checkpoint,
    load_checkpoint,
    remove_leftovers,
)
from deltatune.training.config import TrainConfig
from deltatune.training.evaluating import evaluate_everywhere, log_task_metrics

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


def check_fresh(out: Path, cfg: TrainConfig) -> None:
    """Refuse to start over a folder holding an earlier run's checkpoints unless resuming it."""
    if latest_checkpoint(out) is not None and not cfg.resume:
        raise ConfigError(
            f"{out} holds checkpoints of an earlier run: pass --resume to continue it, or choose another --output-dir"
        )


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


def start(
    prepared: Any, cfg: TrainConfig, resume_from: Path | None, optimizer, scheduler, main: bool, world: int
) -> Position:
    """The position the loop starts at: the checkpoint's (its options checked), else step 0 with the base
    model's metrics; rank 0 (``main``) then trims metrics.jsonl to it and writes train_config.json."""
    out, root = Path(cfg.output_dir), prepared.root
    position = Position()
    if resume_from is not None:
        if root is None:
            position, saved = load_checkpoint(resume_from, prepared.model, optimizer, scheduler)
        else:
            position, saved = fsdp.load_sharded_checkpoint(resume_from, root, prepared.model, optimizer, scheduler)
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
        trim_metrics(out / "metrics.jsonl", position.step)
        if position.step == 0:
            log_task_metrics(out / "metrics.jsonl", 0, position.before_tasks, "before")
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    return position


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop log lines the killed run wrote after its last checkpoint."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))
