"""Training checkpoints that survive a kill: adapter, optimizer, scheduler, RNG and data position.

Each checkpoint is written to a temporary folder and renamed into place, so a checkpoint folder
either is complete or does not exist. Optimizer state is loaded with ``weights_only=True``:
tensors and plain containers only, never arbitrary pickled objects.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

STATE_NAME = "trainer_state.pt"


@dataclass
class Position:
    """Where training stands: optimizer steps done and the next micro-batch to read."""

    step: int = 0
    epoch: int = 0
    micro: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    before: dict[str, float] = field(default_factory=dict)  # metrics measured before training
    before_sample: str = ""  # the base model's answer to the first eval example


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:08d}"


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted((output_dir / "checkpoints").glob("step-*/" + STATE_NAME))
    return found[-1].parent if found else None


def save_checkpoint(
    output_dir: Path, model, optimizer, scheduler, position: Position, config: dict[str, Any], keep: int
) -> Path:
    target = checkpoint_dir(output_dir, position.step)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, selected_adapters=[model.active_adapter])
        _move_adapter_to_top(tmp, model.active_adapter)
        state = {
            "position": asdict(position),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": config,
        }
        torch.save(state, tmp / STATE_NAME)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(target.parent.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _move_adapter_to_top(directory: Path, adapter_name: str) -> None:
    """save_pretrained puts non-default adapters in a sub-folder; a checkpoint keeps one at the top."""
    sub = directory / adapter_name
    if adapter_name != "default" and sub.is_dir():
        for item in sub.iterdir():
            item.rename(directory / item.name)
        sub.rmdir()


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[Position, dict[str, Any]]:
    state = torch.load(path / STATE_NAME, weights_only=True)
    model.load_adapter_weights(path, model.active_adapter)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return Position(**state["position"]), state["config"]
