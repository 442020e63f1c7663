"""What a finished run shows a person: a loss curve (matplotlib) and a short before/after table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Metrics where a larger value is better; the table marks each change as better or worse.
HIGHER_IS_BETTER = {"accuracy", "f1", "bleu", "rougeL", "exact_match"}


def plot_loss(metrics_path: Path, image_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
    records = [r for r in map(json.loads, filter(None, lines)) if "eval" not in r]  # training lines, not eval ones
    if not records:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], marker=".")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("deltatune training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(image_path, dpi=100)
    plt.close(fig)


def _size(num_bytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1024 or unit == "GB":
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return ""


def print_summary(summary: dict[str, Any]) -> None:
    before, after = summary["before"], summary["after"]
    if summary.get("sample"):
        sample = summary["sample"]
        print(f"\nexample: {sample['prompt']}")
        print(f"  expected      {sample['reference']}")
        print(f"  base model    {sample['before']!r}")
        print(f"  with adapter  {sample['after']!r}")
    rows = [("metric", "before", "after")]
    for key in [k for k in after if k in before]:
        better = after[key] > before[key] if key in HIGHER_IS_BETTER else after[key] < before[key]
        rows.append((key, f"{before[key]:.4g}", f"{after[key]:.4g} {'better' if better else 'worse'}"))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in width))
    if summary.get("tasks"):
        print_task_table(summary["tasks"])
    trainable, total = summary["trainable_params"], summary["total_params"]
    print(f"\ntrainable parameters  {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)")
    print(f"adapter file          {_size(summary['adapter_bytes'])} (base model {_size(summary['base_bytes'])})")
    print(
        f"training              {summary['steps']} steps, {summary['tokens']:,} tokens, "
        f"{summary['train_seconds']:.0f} s"
    )
    print(f"adapter saved to      {summary['adapter_dir']}")


def print_task_table(tasks: dict[str, dict[str, dict[str, float]]]) -> None:
    """Per-task metrics of multi-task training: one line per task and metric, before -> after."""
    print("\nper task:")
    for name, both in tasks.items():
        before, after = both.get("before", {}), both["after"]
        cells = [
            f"{key} {before[key]:.4g} -> {value:.4g}" if key in before else f"{key} {value:.4g}"
            for key, value in after.items()
        ]
        print(f"  {name:<12} " + ", ".join(cells))
