"""Helpers shared by the benchmark scripts: logging, RSS, timing, loading and LoRA set-up.

Both libraries get the same base weights (``dt.load_base``), the same LoRA settings and the same
LoRA factor values (:func:`init_lora` fills them from a seeded generator in a library-neutral
order), so any difference in a figure comes from the library, not from the set-up.
"""

from __future__ import annotations

import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltatune as dt

MODEL = "smollm2-135m"
LORA_R = 8
LORA_ALPHA = 16
LORA_TARGETS = ["q_proj", "v_proj"]
LIBRARIES = ("deltatune", "peft")


def log(*parts: Any) -> None:
    """Progress messages go to stderr; stdout carries only the JSON result."""
    print(*parts, file=sys.stderr, flush=True)


def emit(result: dict[str, Any]) -> None:
    """Print ``result`` as the one JSON line on stdout."""
    print(json.dumps(result), flush=True)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call of ``fn``."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed_cpu(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds of this process, result) of one call of ``fn``.

    CPU time barely moves when other processes compete for the cores, so it backs up wall time
    on a shared machine.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def load_average() -> float:
    """1-minute load average: above the thread count, other processes were competing for the cores."""
    return round(os.getloadavg()[0], 2)


def median(values: list[float]) -> float:
    return statistics.median(values)


def set_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def load_model() -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct, dense float32, from deltatune's cache (identical weights for both libraries)."""
    model, tokenizer = dt.load_base(MODEL)
    return model.float(), tokenizer


def wrap_lora(model: nn.Module, library: str) -> nn.Module:
    """``model`` with a LoRA adapter (r=8, alpha=16 on q_proj/v_proj, no dropout) from ``library``."""
    if library == "deltatune":
        cfg = dt.LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0)
        return dt.wrap(model, cfg)
    if library == "peft":
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=LORA_R, lora_alpha=LORA_ALPHA, target_modules=LORA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"
        )
        return get_peft_model(model, cfg)
    raise ValueError(f"unknown library {library!r}; choose one of {LIBRARIES}")


def canonical_name(name: str) -> str:
    """A parameter name without the library's wrapper prefix: ``layers.0.self_attn.q_proj.lora_A.default.weight``."""
    return name[name.index("layers.") :] if "layers." in name else name


def lora_factors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The LoRA A/B weights of ``model``, sorted by their library-neutral name."""
    found = [(canonical_name(n), p) for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    return sorted(found, key=lambda item: item[0])


def init_lora(model: nn.Module, seed: int, b_std: float = 0.0) -> float:
    """Fill LoRA factors identically in either library: A kaiming-uniform, B zero or N(0, b_std).

    Returns a checksum of the factors so that callers can confirm both libraries start alike.
    """
    gen = torch.Generator().manual_seed(seed)
    factors = lora_factors(model)
    if not factors:
        raise RuntimeError("the model has no LoRA factors")
    with torch.no_grad():
        for name, param in factors:
            if ".lora_A." in name:
                bound = 1 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=sqrt(5)), as both libraries do
                values = torch.rand(param.shape, generator=gen) * 2 * bound - bound
            else:
                values = torch.randn(param.shape, generator=gen) * b_std
            param.copy_(values.to(param.dtype))
    return round(sum(float(p.detach().double().abs().sum()) for _, p in factors), 6)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    """deltatune's step is its trainer's (LossModule); peft's and full FT's the usual HF forward."""
    from deltatune import DeltaModel
    from deltatune.loss import LossModule

    if isinstance(model, DeltaModel):
        loss_sum, count = LossModule(model, "causal-lm")({"input_ids": ids, "labels": ids})
        loss = loss_sum / count
    else:
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def cpu_counters() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat; (0, 0) where it does not exist."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    tick = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tick, steal / tick


def contention(before: tuple[float, float], after: tuple[float, float], own_cpu_s: float, wall_s: float) -> dict:
    """Cores that other processes used (and that the hypervisor withheld) on average during a measured window.

    ``before``/``after`` come from :func:`cpu_counters`, ``own_cpu_s`` is the measured code's CPU time. Near 0 means
    the timing had the machine to itself; a 2-thread run slows down many times over when others hold a core.
    """
    wall_s = max(wall_s, 1e-9)
    return {
        "other_procs_cores": round(max(after[0] - before[0] - own_cpu_s, 0.0) / wall_s, 2),
        "steal_cores": round((after[1] - before[1]) / wall_s, 2),
    }


# --- raw results ----------------------------------------
# DELTATUNE_BENCH_RESULTS points smoke tests elsewhere, so that only real runs land in the committed files.
E2E = Path(__file__).resolve().parents[2] / "shared" / "data" / "e2e"  # the shared datasets beside the checkout


def dev_references(n: int) -> list[tuple[str, list[str]]]:
    """The first ``n`` distinct MRs of the E2E devset (file order), each with all its references."""
    grouped: dict[str, list[str]] = {}
    with (E2E / "devset.csv").open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            if row["mr"] not in grouped and len(grouped) == n:
                break
            grouped.setdefault(row["mr"], []).append(row["ref"])
    return list(grouped.items())


RESULTS_DIR = Path(os.environ.get("DELTATUNE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def versions() -> dict[str, str]:
    """Versions of the libraries a figure depends on (peft/transformers may be absent: then ``None``)."""
    found: dict[str, str] = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "peft", "deltatune"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None  # type: ignore[assignment]
    return found


def machine() -> dict[str, Any]:
    """The machine a run used: ``os.cpu_count()``, the cores this process may run on, the CPU model."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "os_cpu_count": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
    }


# ``--allow-dirty`` on any bench's command line (or DELTATUNE_BENCH_ALLOW_DIRTY=1): append results measured on
# uncommitted code anyway; the line records it. Taken out of sys.argv here, before a script's argparse reads it,
# so every script inherits it; the environment carries it to the worker processes a bench spawns.
ARGV = [Path(sys.argv[0]).name, *sys.argv[1:]]  # as given, --allow-dirty included
if "--allow-dirty" in sys.argv[1:]:
    sys.argv[1:] = [a for a in sys.argv[1:] if a != "--allow-dirty"]
    os.environ["DELTATUNE_BENCH_ALLOW_DIRTY"] = "1"
CODE = ("deltatune", "bench", ":(exclude)bench/results")  # what a figure depends on


def allow_dirty() -> bool:
    return os.environ.get("DELTATUNE_BENCH_ALLOW_DIRTY", "") not in ("", "0")


def git_revision() -> dict[str, Any]:
    """The checkout's commit and whether tracked files differed from it: ``library_dirty`` for deltatune/,
    ``tree_dirty`` for deltatune/ and bench/ (results excluded), the changed files, and ``allow_dirty``."""
    repo = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.rstrip("\n")

    try:
        commit = git("rev-parse", "HEAD")
        changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no", "--", *CODE).splitlines()]
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "library_dirty": None, "tree_dirty": None, "allow_dirty": allow_dirty()}
    return {
        "commit": commit,
        "library_dirty": any(path.startswith("deltatune/") for path in changed),
        "tree_dirty": bool(changed),
        "changed": changed[:20],
        "allow_dirty": allow_dirty(),
    }


def refuse_dirty(revision: dict[str, Any], bench: str) -> None:
    """Stop before appending a figure no commit reproduces, unless ``--allow-dirty`` was given."""
    if revision["tree_dirty"] is False or allow_dirty():
        return
    what = "is not a git checkout" if revision["commit"] is None else f"has uncommitted changes: {revision['changed']}"
    raise SystemExit(
        f"bench: not appending to {RESULTS_DIR / (bench + '.jsonl')}: the code {what}. Commit, then run from a clean "
        "worktree (git worktree add --detach /work/wt-NAME HEAD; cd there; PYTHONPATH=. python bench/...), or pass "
        "--allow-dirty (the line records it)."
    )


class RunMeter:
    """Wall time, own CPU time (this process and its waited-for children) and other processes' CPU use of a run.

    ``other_procs_cores``: cores' worth of CPU that processes other than this one and its children used on average
    over the run, from /proc/stat's busy time minus our own; 0 means the run had the machine to itself.
    """

    def __init__(self) -> None:
        self.start_wall, self.start_own, self.start_counters = time.perf_counter(), self._own(), cpu_counters()

    @staticmethod
    def _own() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def read(self) -> dict[str, Any]:
        wall, own = time.perf_counter() - self.start_wall, self._own() - self.start_own
        return {
            "wall_s": round(wall, 1),
            "own_cpu_s": round(own, 1),
            **contention(self.start_counters, cpu_counters(), own, wall),
            "load_avg_1m_end": load_average(),
        }


def append_result(bench: str, figures: dict[str, Any], meter: RunMeter | None = None, **extra: Any) -> dict[str, Any]:
    """Append one raw result line to ``bench/results/<bench>.jsonl`` and return it.

    The line carries the date, versions, machine, the exact command line (``sys.argv``), the run's contention (from
    ``meter``) and ``figures``. Refused (SystemExit) when deltatune/ or bench/ differ from the commit, unless
    ``--allow-dirty`` was given (``git.allow_dirty`` in the line). One ``write`` of one line in append mode, flushed
    and fsynced, so a run killed half-way leaves whole lines only.
    """
    revision = git_revision()
    refuse_dirty(revision, bench)
    now = datetime.datetime.now(datetime.timezone.utc)
    line = {
        "bench": bench,
        "run_id": f"{bench}-{now.strftime('%Y%m%dT%H%M%S.%f')}-{os.getpid()}",
        "date": now.isoformat(timespec="seconds"),
        "argv": ARGV,
        "versions": versions(),
        "git": revision,
        "machine": machine(),
        "run": meter.read() if meter is not None else None,
        **extra,
        "figures": figures,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with open(RESULTS_DIR / f"{bench}.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
        f.flush()
        os.fsync(f.fileno())
    log(f"appended {line['run_id']} to {RESULTS_DIR / (bench + '.jsonl')}")
    return line
