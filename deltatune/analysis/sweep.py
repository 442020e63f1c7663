"""Train one task at several LoRA ranks and/or seeds in one call: runs side by side in one folder
(``r8-seed0/``, ``r64-seed0/``, ...), each a normal ``deltatune train`` run folder, plus ``sweep.json``
with every run's figures, ready for ``deltatune analyze subspace``."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from deltatune.analysis.common import text_table
from deltatune.atomic import atomic_write_text
from deltatune.config import ConfigError

SWEEP_FILE = "sweep.json"


def run_name(rank: int | None, seed: int) -> str:
    return f"r{rank}-seed{seed}" if rank is not None else f"seed{seed}"


def plan(cfg: Any, ranks: list[int] | None, seeds: list[int] | None) -> list[tuple[int | None, int]]:
    """(rank, seed) of every run; a bad rank list fails before any training starts."""
    from deltatune import methods

    if ranks:
        if methods.method_named(cfg.method).rank_option is None:
            ranked = methods.describe([m for m in methods.registered() if m.rank_option is not None])
            raise ConfigError(f"--ranks needs a method with a rank ({ranked}); --method {cfg.method} has none")
        bad = [r for r in ranks if r < 1]
        if bad:
            raise ConfigError(f"--ranks must be positive integers, got {bad}")
    if not ranks and not seeds:
        raise ConfigError("a sweep needs --ranks and/or --seeds (e.g. --ranks 1 2 4 8 --seeds 0 1 2)")
    return [(r, s) for s in (seeds or [cfg.seed]) for r in (ranks or [None])]  # all ranks of a seed together


def sweep(
    cfg: Any,
    output_dir: str | Path,
    ranks: list[int] | None = None,
    seeds: list[int] | None = None,
    on_run: Callable[[dict[str, Any], bool], None] | None = None,
) -> dict:
    """Train ``cfg`` (a :class:`~deltatune.training.config.TrainConfig`) once per rank and seed.

    A run whose folder already holds ``summary.json`` is kept, not retrained, so an interrupted sweep
    continues where it stopped. ``on_run(row, trained)`` is called after each run (``trained``: False for a
    kept one), for callers that record results as they come. Returns (and writes to ``sweep.json``) the runs.
    """
    from deltatune import methods
    from deltatune.training.trainer import train

    out = Path(output_dir)
    runs = []
    rank_option = methods.method_named(cfg.method).rank_option
    for rank, seed in plan(cfg, ranks, seeds):
        folder = out / run_name(rank, seed)
        options = dict(cfg.method_options) | ({rank_option: rank} if rank is not None else {})
        run_cfg = dataclasses.replace(cfg, seed=seed, output_dir=str(folder), method_options=options)
        done = folder / "summary.json"
        kept = done.is_file()
        summary = json.loads(done.read_text()) if kept else train(run_cfg)
        runs.append(_row(rank, seed, folder, summary))
        result = {"output_dir": str(out), "method": cfg.method, "runs": runs}
        atomic_write_text(out / SWEEP_FILE, json.dumps(result, indent=2))
        if on_run is not None:
            on_run(runs[-1], not kept)
    return result


def _row(rank: int | None, seed: int, folder: Path, summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": folder.name,
        "r": rank,
        "seed": seed,
        "adapter": str(folder / "adapter"),
        "steps": summary.get("steps"),
        "trainable_params": summary.get("trainable_params"),
        "train_seconds": summary.get("train_seconds"),
        "before": summary.get("before", {}),
        "after": summary.get("after", {}),
    }


def sweep_table(result: dict[str, Any]) -> str:
    """One line per run: rank, seed, the after-training metrics, and the adapter folder."""
    keys = [k for k in ("loss", "accuracy", "bleu", "rougeL") if any(k in r["after"] for r in result["runs"])]
    rows = [("run", "r", "seed", "trainable", *keys, "adapter")]
    for run in result["runs"]:
        metrics = [f"{run['after'][k]:.4g}" if k in run["after"] else "" for k in keys]
        rows.append(
            (
                run["name"],
                str(run["r"] or ""),
                str(run["seed"]),
                f"{run['trainable_params']:,}",
                *metrics,
                run["adapter"],
            )
        )
    return text_table(rows)
