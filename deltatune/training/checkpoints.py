"""Training checkpoints that survive a kill: adapter, optimizer, scheduler, RNG and data position.

Each checkpoint is written to a temporary folder and renamed into place, so a checkpoint folder
either is complete or does not exist. A manifest of every file's size and sha256, written last,
lets ``--resume`` tell a whole checkpoint from one damaged afterwards (a disk that filled, a
copy cut short) and fall back to the previous one instead of dying on a truncated file. A kill
during a save leaves only a ``.tmp-*`` folder, which the next resume or save removes.
Optimizer state is loaded with ``weights_only=True``: tensors and plain containers only, never
arbitrary pickled objects.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltatune.atomic import atomic_write_text

STATE_NAME = "trainer_state.pt"
MANIFEST_NAME = "manifest.json"


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
    before_tasks: dict[str, dict[str, float]] = field(default_factory=dict)  # per task, in multi-task training


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:08d}"


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Every checkpoint folder of a run, oldest first, whether intact or not."""
    return sorted(p for p in (output_dir / "checkpoints").glob("step-*") if p.is_dir())


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest checkpoint folder, intact or not: its presence means a run was started here."""
    found = checkpoint_dirs(output_dir)
    return found[-1] if found else None


def _warn(message: str) -> None:
    print(f"deltatune: warning: {message}", file=sys.stderr)


def latest_intact_checkpoint(output_dir: Path, warn: Callable[[str], None] | None = _warn) -> Path | None:
    """The newest checkpoint that passes :func:`verify_checkpoint`; each newer damaged one is named
    in a one-line warning, so a resume says which checkpoint it skipped and why."""
    for path in reversed(checkpoint_dirs(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        if warn is not None:
            warn(f"skipping damaged checkpoint {path}: {problem}")
    return None


def remove_leftovers(output_dir: Path) -> list[Path]:
    """Delete ``.tmp-*`` folders that a kill during a save left behind; returns what was removed."""
    leftovers = sorted((output_dir / "checkpoints").glob(".tmp-*"))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def _file_record(path: Path) -> dict[str, Any]:
    """Size and sha256 of a file, flushed to disk first so the manifest describes what is stored."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        os.fsync(f.fileno())
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_manifest(directory: Path) -> None:
    """Record every file of a finished checkpoint; written last, so its presence means all is written."""
    files = {p.name: _file_record(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_NAME}
    atomic_write_text(directory / MANIFEST_NAME, json.dumps({"files": files}, indent=1) + "\n")


def verify_checkpoint(path: Path) -> str | None:
    """None when every file the manifest lists is there with its size and sha256, else what is wrong."""
    try:
        files = json.loads((path / MANIFEST_NAME).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST_NAME} (its save did not finish)"
    except (ValueError, KeyError, TypeError) as err:
        return f"{MANIFEST_NAME} is unreadable ({err})"
    if not isinstance(files, dict) or STATE_NAME not in files:
        return f"{MANIFEST_NAME} lists no {STATE_NAME}"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        size, record = file.stat().st_size, expected if isinstance(expected, dict) else {}
        if size != record.get("bytes"):
            return f"{name} is {size} bytes, {record.get('bytes')} when saved (truncated or overwritten)"
        if _file_record(file)["sha256"] != record.get("sha256"):
            return f"{name} does not match its sha256 from the save (corrupted)"
    return None


def save_checkpoint(
    output_dir: Path,
    model,
    optimizer,
    scheduler,
    position: Position,
    config: dict[str, Any],
    keep: int,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint; ``optimizer_state`` replaces ``optimizer.state_dict()`` (a sharded run's, gathered)."""
    target = checkpoint_dir(output_dir, position.step)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output_dir)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, selected_adapters=[model.active_adapter])
        _move_adapter_to_top(tmp, model.active_adapter)
        state = {
            "position": asdict(position),
            "optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "config": config,
        }
        torch.save(state, tmp / STATE_NAME)
        write_manifest(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Checkpoints past this step are from before a resume that went back to an earlier one
    # (they failed verification): stale, and they must not count towards ``keep``.
    earlier = [p for p in checkpoint_dirs(output_dir) if p.name <= target.name]
    for old in [p for p in checkpoint_dirs(output_dir) if p.name > target.name] + earlier[:-keep]:
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
    """Restore a run; ``optimizer`` None leaves its state to the caller (a sharded run loads it its own way)."""
    state = torch.load(path / STATE_NAME, weights_only=True)
    model.load_adapter_weights(path, model.active_adapter)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return Position(**state["position"]), state["config"]
