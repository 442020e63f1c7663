"""Default learning rates by measurement: ``deltatune train`` as a new user runs it, over a small grid of rates.

Each run is the command line users type (a fresh ``python -m deltatune train`` process), on the real MiniLM-L6 and
SST-2 (``../shared/data/sst2/train.tsv``): the file's rows shuffled once (seed 0), the first ``--examples`` (4,000)
to train on and the next ``--eval-examples`` (200) as ``--eval-data``, a dev set no run trains on. Every run uses the
trainer's defaults except ``--method``, ``--seed`` and ``--learning-rate`` (a rate of ``default`` leaves the flag
out, so the run uses, and the line records, the default the trainer chose). Each run appends one raw line to
``bench/results/defaults.jsonl`` (``campaign`` ties one invocation's lines together): the method, task, rate,
seed, the accuracy on the 200 dev sentences and the final eval loss, besides date, versions, commit and argv.

``python bench/defaults.py --methods lora adapter bitfit prompt_tuning --rates 2e-4 1e-3 5e-3 --seeds 0 1``;
``bench/report.py defaults`` prints the table (mean over seeds per method and rate).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import random
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RunMeter, append_result, log

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
ROOT = Path(__file__).resolve().parents[1]
CHOSEN = re.compile(r"^learning rate (\S+) \((.*)\)$", re.M)  # the trainer's first line about the rate


def split_sst2(folder: Path, examples: int, eval_examples: int) -> tuple[Path, Path]:
    """train.tsv (``examples`` rows) and dev.tsv (the next ``eval_examples``) from SST-2 shuffled with seed 0."""
    with SST2.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    random.Random(0).shuffle(rows)
    paths = []
    for name, part in (("train", rows[:examples]), ("dev", rows[examples : examples + eval_examples])):
        path = folder / f"{name}.tsv"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["sentence", "label"], delimiter="\t")
            writer.writeheader()
            writer.writerows(part)
        paths.append(path)
    return paths[0], paths[1]


def run_once(method: str, rate: str, seed: int, data: tuple[Path, Path], out: Path, threads: int) -> dict[str, Any]:
    """One ``deltatune train`` run; its summary's figures and the rate it printed as chosen."""
    argv = [sys.executable, "-m", "deltatune", "train", "--base", "minilm-l6", "--task", "classification"]
    argv += ["--method", method, "--data", str(data[0]), "--eval-data", str(data[1]), "--seed", str(seed)]
    argv += ["--output-dir", str(out), "--threads", str(threads)]
    if rate != "default":
        argv += ["--learning-rate", rate]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"deltatune train failed ({' '.join(argv)}):\n{done.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    chosen = CHOSEN.search(done.stdout)
    return {
        "accuracy": round(100 * summary["after"]["accuracy"], 2),
        "eval_loss": round(summary["after"]["loss"], 4),
        "accuracy_before": round(100 * summary["before"]["accuracy"], 2),
        "steps": summary["steps"],
        "train_seconds": round(summary["train_seconds"], 1),
        "trainable_params": summary["trainable_params"],
        "printed_rate": chosen.group(1) if chosen else None,
        "printed_source": chosen.group(2) if chosen else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "adapter", "bitfit", "prompt_tuning"])
    parser.add_argument("--rates", nargs="+", default=["2e-4", "1e-3", "5e-3"], help="rates, or 'default'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    campaign = "defaults-" + datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    settings = {"base": "minilm-l6", "task": "classification", "data": "sst2", **vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        data = split_sst2(Path(tmp), args.examples, args.eval_examples)
        for method in args.methods:
            for rate in args.rates:
                for seed in args.seeds:
                    meter = RunMeter()
                    figures = run_once(method, rate, seed, data, Path(tmp) / f"{method}-{rate}-{seed}", args.threads)
                    log(f"{method} lr {rate} seed {seed}: {figures['accuracy']}%")
                    append_result(
                        "defaults", figures, meter, campaign=campaign, kind="run", method=method,
                        task="classification", lr=rate, seed=seed, settings=settings,
                    )  # fmt: skip


if __name__ == "__main__":
    main()
