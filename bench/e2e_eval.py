"""E2E test-style evaluation: ``deltatune eval`` over the first ``--limit`` (100) meaning representations of the E2E
devset with all their references, beam search (5 beams, length penalty 0.9, no repeated 4-grams, as the LoRA paper's
recipe), the base model alone unless ``--adapter`` names one.

The command runs as users run it (a fresh ``python -m deltatune eval`` process); this script reads the line it prints
on standard error (tokens generated, wall time, tokens/s) and its ``eval.json`` (multi-reference BLEU, chrF, ROUGE-L,
NIST, exact match), and appends one raw line to ``bench/results/e2e_eval.jsonl`` with the run's contention (wall
time on a shared machine says so in ``run.other_procs_cores``).

``python bench/e2e_eval.py [--limit 100] [--num-beams 5] [--threads 2] [--adapter DIR]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import E2E, RunMeter, append_result, log

ROOT = Path(__file__).resolve().parents[1]
GENERATED = re.compile(
    r"generated (?P<tokens>\d+) tokens for (?P<inputs>\d+) inputs in (?P<seconds>[\d.]+) s "
    r"\((?P<rate>[\d.]+) tokens/s, (?P<beams>\d+) beam"
)


def eval_argv(args: argparse.Namespace, out: Path) -> list[str]:
    argv = [sys.executable, "-m", "deltatune", "eval", "--base", args.base, "--data", str(E2E / "devset.csv")]
    argv += ["--limit", str(args.limit), "--num-beams", str(args.num_beams), "--length-penalty", "0.9"]
    argv += ["--no-repeat-ngram-size", "4", "--max-new-tokens", str(args.max_new_tokens), "--no-loss"]
    argv += ["--batch-size", str(args.batch_size), "--output-dir", str(out), "--metrics", *args.metrics]
    return argv + (["--adapter", args.adapter] if args.adapter else [])


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One ``deltatune eval`` run: its printed speed line and its corpus metrics."""
    with tempfile.TemporaryDirectory() as tmp:
        argv = eval_argv(args, Path(tmp))
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
        done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env)
        if done.returncode != 0:
            raise SystemExit(f"deltatune eval failed ({' '.join(argv)}):\n{done.stderr[-3000:]}")
        speed = GENERATED.search(done.stderr)
        if speed is None:
            raise SystemExit(f"deltatune eval printed no 'generated ... tokens/s' line:\n{done.stderr[-2000:]}")
        metrics = json.loads((Path(tmp) / "eval.json").read_text())
        references = [len(json.loads(line)["references"]) for line in (Path(tmp) / "predictions.jsonl").open()]
    return {
        "inputs": int(speed["inputs"]),
        "references": sum(references),
        "new_tokens": int(speed["tokens"]),
        "generate_wall_s": float(speed["seconds"]),
        "tokens_per_s": float(speed["rate"]),
        "num_beams": int(speed["beams"]),
        "metrics": {k: round(v, 4) for k, v in metrics.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--adapter")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--num-beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--metrics", nargs="+", default=["bleu", "chrf", "rougeL", "nist", "exact_match"])
    args = parser.parse_args()
    meter = RunMeter()
    figures = run(args)
    log(f"{figures['inputs']} inputs, {figures['num_beams']} beams: {figures['generate_wall_s']} s, "
        f"{figures['tokens_per_s']} tokens/s, {figures['metrics']}")  # fmt: skip
    append_result("e2e_eval", figures, meter, kind="summary", settings=vars(args))


if __name__ == "__main__":
    main()
