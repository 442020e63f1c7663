"""The README's main job, `deltatune train` with no arguments, as a recorded run.

Runs the built-in demo in a fresh process (exactly the README's command), then appends its
before/after metrics, step count, tokens and wall time to ``bench/results/demo.jsonl``, so the
figures the README shows under "What `deltatune train` shows" trace to a raw line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import RunMeter, append_result, emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("extra", nargs="*", help="options passed on to `deltatune train` (none: the README's command)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        meter = RunMeter()
        command = [sys.executable, "-m", "deltatune", "train", "--output-dir", str(out), *args.extra]
        subprocess.run(command, check=True)
        summary = json.loads((out / "summary.json").read_text())
    emit(append_result("demo", summary, meter))


if __name__ == "__main__":
    main()
