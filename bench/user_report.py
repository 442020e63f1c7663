"""Tables of the user-loop benches for docs/benchmarks.md (written there by ``bench/docs_tables.py``): the default
learning rates' grid (``bench/defaults.py``) and the E2E test-style evaluation (``bench/e2e_eval.py``)."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report


def defaults_lines() -> list[tuple[int, dict]]:
    return [(n, r) for n, r in report.load("defaults") if r.get("kind") == "run"]


def _rate(record: dict) -> float:
    return float(record["figures"]["printed_rate"] if record["lr"] == "default" else record["lr"])


def defaults(campaign: str | None = None) -> str:
    """Accuracy per method and learning rate (every clean run line), and the rate ``deltatune train`` now picks."""
    from deltatune.training.defaults import default_learning_rate, format_rate

    lines = defaults_lines()
    if not lines:
        return "defaults: no results\n"
    seeds = sorted({r["seed"] for _, r in lines})
    header = ["method", "learning rate", *[f"seed {s}" for s in seeds], "mean", "lines", "default now"]
    out = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for method in dict.fromkeys(r["method"] for _, r in lines):
        chosen, _ = default_learning_rate(method, "classification")
        for rate in sorted({_rate(r) for _, r in lines if r["method"] == method}):
            mine = [(n, r) for n, r in lines if r["method"] == method and _rate(r) == rate]
            by_seed = {r["seed"]: r["figures"]["accuracy"] for _, r in mine}
            cells = [method, format_rate(rate), *[f"{by_seed[s]:.1f}" if s in by_seed else "" for s in seeds]]
            cells += [f"{statistics.fmean(by_seed.values()):.1f}", report.span([n for n, _ in mine])]
            cells.append("**yes**" if rate == chosen else "")
            out.append(f"| {' | '.join(cells)} |")
    settings = lines[0][1]["settings"]
    note = (
        f"Accuracy (%) on {settings['eval_examples']} SST-2 sentences no run trained on, after `deltatune train --base "
        f"minilm-l6 --task classification` on {settings['examples']:,} others (one epoch, the trainer's other "
        "defaults: batch 8, cosine schedule, no warm-up). *default now*: the rate `deltatune train` uses for the "
        "method on classification without `--learning-rate`. Contention: "
        + report.contention_note([r for _, r in lines if r.get("run")])
        + " (accuracy does not depend on it)."
    )
    return "\n".join(out) + "\n\n" + note + "\n"


def e2e_eval(campaign: str | None = None) -> str:
    """One row per ``bench/e2e_eval.py`` line: speed and multi-reference scores."""
    lines = [(n, r) for n, r in report.load("e2e_eval") if r.get("kind") == "summary"]
    if not lines:
        return "e2e_eval: no results\n"
    names = ["bleu", "chrf", "rougeL", "nist"]
    labels = ["BLEU", "chrF", "ROUGE-L", "NIST"]
    header = ["line", "model", "inputs (refs)", "beams", "new tokens", "wall s", "tokens/s", *labels, "other cores"]
    out = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for n, r in lines:
        f, s = r["figures"], r["settings"]
        cells = [
            str(n),
            s["base"] + (f" + {s['adapter']}" if s.get("adapter") else ""),
            f"{f['inputs']} ({f['references']})",
        ]
        cells += [str(f["num_beams"]), str(f["new_tokens"]), f"{f['generate_wall_s']:.0f}", f"{f['tokens_per_s']:.1f}"]
        cells += [f"{f['metrics'][m]:.2f}" if m in f["metrics"] else "" for m in names]
        cells.append(f"{r['run']['other_procs_cores']:.2f}")
        out.append(f"| {' | '.join(cells)} |")
    note = (
        "*other cores*: CPU cores other processes used on average during the run (of "
        f"{lines[0][1]['machine']['os_cpu_count']}); above 0 the wall time and tokens/s were measured on a shared "
        "machine and are upper/lower bounds, not the speed of a quiet one. The scores do not depend on it."
    )
    return "\n".join(out) + "\n\n" + note + "\n"
