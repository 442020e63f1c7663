"""Serving under spread-out traffic: ``deltatune serve`` with continuous vs dynamic batching, vs one
merged adapter, with many adapters on demand, and at 10x capacity (SmolLM2-135M, CPU).

Scenarios (each side a fresh ``deltatune serve`` process, ``OMP_NUM_THREADS=--threads``):

* ``latency``: Poisson arrivals at ``--rate`` requests/s (default: ``--load`` x the capacity
  measured first: a burst of max-batch requests on the continuous server, or ``--capacity``),
  ``--requests`` per run; each request a streamed chat completion (Alpaca instruction), for one of 8 LoRA
  adapters or the base (uniformly), 32-64 new tokens (uniform), greedy. Sides, alternating per
  round: ``continuous``, ``dynamic`` (the earlier policy, kept here to compare with: :class:`GatheringScheduler`,
  served by ``python bench/serve_load.py serve-gathering <deltatune serve flags>``) and ``merged`` (adapter 0
  folded into the weights, served as a plain model; every request to it). Figures: TTFT, inter-token and end-to-end
  latency (median, p95, p99), completion tokens/s.
* ``many``: 200 adapters on disk (hard-linked copies of the 8), ``--max-loaded-adapters 16``,
  requests spread over all 200, vs ``hot``: 16 adapters all loaded, requests spread over them;
  ``--rounds`` alternating rounds, the same arrivals per round on both sides.
* ``overload``: ``--overload-x`` x capacity for ``--overload-duration`` s with ``--max-queue
  --overload-queue``:
  status counts (only 200 and 429 expected), 429 latency, server RSS at start and end, each minute and its
  growth over the second half (flat: no leak), and five requests after the flood (full service afterwards).

Raw lines go to bench/results/serve_load.jsonl (one per scenario run); the summary line (medians
of the rounds, min-max) is printed and appended too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RunMeter, append_result, emit, log, median
from serve import ADAPTERS, ALPACA, BASE, make_adapters, make_merged

from deltatune.serving.rows import Request
from deltatune.serving.scheduling import Joining, Scheduler

KEY = "bench"
RECORD = True  # --dry-run: nothing appended to bench/results


class GatheringScheduler(Scheduler):
    """Dynamic batching, the policy continuous batching replaced: requests join only an empty batch, gathered while
    they keep arriving (a gap of ``arrival_gap_s``, at most ``window_s``), prompts whole, and the batch runs until
    its last row ends."""

    window_s, arrival_gap_s = 0.5, 0.05

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.prefill_chunk = sys.maxsize  # no token budget: every prompt joins whole

    def admit(self, running: list[Request]) -> Joining | None:
        if running:
            return None
        deadline = time.monotonic() + self.window_s
        with self.cond:
            while len(self.waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                count = len(self.waiting)
                self.cond.wait(min(left, self.arrival_gap_s))
                if len(self.waiting) == count:
                    break
        return super().admit(running)


def record(figures: dict[str, Any], meter: RunMeter | None, scenario: str) -> None:
    if RECORD:
        append_result("serve_load", figures, meter, scenario=scenario)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``deltatune serve`` in a child process, ready once /v1/models answers."""

    def __init__(self, base: str, adapters: Path | None, threads: int, *flags: str, gathering: bool = False) -> None:
        self.port = free_port()
        serve = [__file__, "serve-gathering"] if gathering else ["-m", "deltatune", "serve"]
        cmd = [sys.executable, *serve, "--base", base, "--port", str(self.port), "--api-key", KEY]
        cmd += (["--adapters", str(adapters)] if adapters else []) + list(flags)
        env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"deltatune serve exited with {self.process.returncode}: {' '.join(cmd)}")
            try:
                request = urllib.request.Request(f"{self.url}/models", headers={"Authorization": f"Bearer {KEY}"})
                with urllib.request.urlopen(request, timeout=5) as answer:
                    self.models = [m["id"] for m in json.load(answer)["data"]]
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError("the server did not come up within 600 s")

    def rss_mb(self) -> float:
        return round(psutil.Process(self.process.pid).memory_info().rss / 2**20, 1)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()


def one(client: Any, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """One streamed chat completion: status, TTFT, the gaps between text chunks (inter-token latency: the
    server streams a chunk per decoded token that adds text), end-to-end latency, completion tokens."""
    import openai

    start = time.perf_counter()
    first = None
    try:
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        tokens, arrivals = 0, []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.perf_counter() - start)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        end = time.perf_counter() - start
        first = arrivals[0] if arrivals else end
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        return {"status": 200, "ttft": first, "e2e": end, "tokens": tokens, "gaps": gaps}
    except openai.APIStatusError as err:
        return {"status": err.status_code, "e2e": time.perf_counter() - start, "tokens": 0}
    except openai.APIConnectionError:
        return {"status": 0, "e2e": time.perf_counter() - start, "tokens": 0}


def poisson(url: str, jobs: list[tuple[str, str, int]], rate: float, seed: int) -> tuple[list[dict], float]:
    """Send ``jobs`` at Poisson arrival times of ``rate``/s; the answers and the wall time."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=900)
    rng = random.Random(seed)
    results: list[dict] = [{}] * len(jobs)
    start = time.perf_counter()

    def run(i: int, job: tuple[str, str, int]) -> None:
        results[i] = one(client, *job) | {"sent": time.perf_counter() - start}

    with ThreadPoolExecutor(512) as pool:
        at = 0.0
        for i, job in enumerate(jobs):
            at += rng.expovariate(rate)
            time.sleep(max(0.0, at - (time.perf_counter() - start)))
            pool.submit(run, i, job)
    return results, time.perf_counter() - start


def burst(url: str, jobs: list[tuple[str, str, int]]) -> dict[str, Any]:
    """All ``jobs`` at once: the server's capacity in requests/s and tokens/s."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=900)
    start = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: one(client, *job), jobs))
    wall = time.perf_counter() - start
    return {"requests_per_s": len(jobs) / wall, "tokens_per_s": sum(r["tokens"] for r in results) / wall}


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def figures(results: list[dict], wall: float) -> dict[str, Any]:
    ok = [r for r in results if r.get("status") == 200]
    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r.get("status"))] = statuses.get(str(r.get("status")), 0) + 1
    refused = [r["e2e"] for r in results if r.get("status") == 429]
    return {
        "requests": len(results),
        "statuses": statuses,
        "ttft_median_s": pct([r["ttft"] for r in ok], 0.5),
        "ttft_p95_s": pct([r["ttft"] for r in ok], 0.95),
        "ttft_p99_s": pct([r["ttft"] for r in ok], 0.99),
        "itl_median_s": pct([g for r in ok for g in r["gaps"]], 0.5),
        "itl_p99_s": pct([g for r in ok for g in r["gaps"]], 0.99),
        "e2e_median_s": pct([r["e2e"] for r in ok], 0.5),
        "e2e_p95_s": pct([r["e2e"] for r in ok], 0.95),
        "e2e_p99_s": pct([r["e2e"] for r in ok], 0.99),
        "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
        "completion_tokens": sum(r["tokens"] for r in ok),
        "wall_s": round(wall, 1),
        "429_latency_median_s": pct(refused, 0.5),
        "429_latency_p95_s": pct(refused, 0.95),
        "429_latency_max_s": pct(refused, 1.0),
    }


def workload(models: list[str], count: int, seed: int, lo: int, hi: int) -> list[tuple[str, str, int]]:
    prompts = [row["instruction"] for row in json.loads(ALPACA.read_text())]
    rng = random.Random(seed)
    return [(rng.choice(models), rng.choice(prompts), rng.randint(lo, hi)) for _ in range(count)]


def latency_side(side: str, dirs: dict[str, Path], args: argparse.Namespace, rate: float, seed: int) -> dict:
    count = max(1, round(rate * args.duration)) if args.duration else args.requests
    flags = ["--max-batch", str(args.max_batch), "--max-queue", "4096"]
    if side == "merged":
        base, adapters = str(dirs["merged"]), None
    else:
        base, adapters = BASE, dirs["adapters"]
    with Server(base, adapters, args.threads, *flags, gathering=side == "dynamic") as server:
        models = [server.models[0]] if side == "merged" else [server.models[0], *ADAPTERS]
        jobs = workload(models, count, seed, args.min_tokens, args.max_tokens)
        burst(server.url, [(models[0], "Hi", 4)])  # warm-up
        meter = RunMeter()
        results, wall = poisson(server.url, jobs, rate, seed)
        out = figures(results, wall) | {"side": side, "rate_per_s": round(rate, 3), "load": args.load, "seed": seed}
    record(out, meter, "latency")
    return out


def capacity(dirs: dict[str, Path], args: argparse.Namespace) -> dict[str, float]:
    flags = ["--max-batch", str(args.max_batch), "--max-queue", "4096"]
    with Server(BASE, dirs["adapters"], args.threads, *flags) as server:
        jobs = workload([server.models[0], *ADAPTERS], 2 * args.max_batch, 99, args.min_tokens, args.max_tokens)
        burst(server.url, [(jobs[0][0], "Hi", 4)])  # warm-up
        return burst(server.url, jobs)


def many_side(side: str, dirs: dict[str, Path], args: argparse.Namespace, rate: float, seed: int) -> dict:
    names = sorted(p.name for p in dirs[side].iterdir())
    flags = ["--max-batch", str(args.max_batch), "--max-queue", "4096"]
    if side == "many":
        flags += ["--max-loaded-adapters", "16"]
    with Server(BASE, dirs[side], args.threads, *flags) as server:
        jobs = workload(names, args.requests, seed, args.min_tokens, args.max_tokens)
        meter = RunMeter()
        results, wall = poisson(server.url, jobs, rate, seed)
        out = figures(results, wall) | {"side": side, "adapters_on_disk": len(names), "rate_per_s": round(rate, 3)}
    record(out, meter, "many")
    return out


def overload(dirs: dict[str, Path], args: argparse.Namespace, rate: float) -> dict:
    flags = ["--max-batch", str(args.max_batch), "--max-queue", str(args.overload_queue)]
    with Server(BASE, dirs["adapters"], args.threads, *flags) as server:
        models = [server.models[0], *ADAPTERS]
        jobs = workload(models, max(1, int(rate * args.overload_duration)), 7, args.min_tokens, args.max_tokens)
        burst(server.url, [(jobs[0][0], "Hi", 4)])  # warm-up
        rss_start = server.rss_mb()
        samples = [(0.0, rss_start)]  # (seconds into the flood, MB), every second
        done = threading.Event()
        began = time.perf_counter()

        def watch() -> None:
            while not done.wait(1.0):
                samples.append((time.perf_counter() - began, server.rss_mb()))

        threading.Thread(target=watch, daemon=True).start()
        meter = RunMeter()
        results, wall = poisson(server.url, jobs, rate, 7)
        done.set()
        rss_end = server.rss_mb()
        after = [r["status"] for r in burst_each(server.url, workload(models, 5, 8, 8, 8))]
        out = figures(results, wall) | {"rate_per_s": round(rate, 3), "after_flood_statuses": after}
        out |= rss_course(samples, rss_end)
    record(out, meter, "overload")
    return out


def rss_course(samples: list[tuple[float, float]], end: float) -> dict[str, Any]:
    """The server's RSS over the flood: at the start (after one warm-up request), at its end, its peak, the last
    sample of each minute, and the growth over the second half (``rss_growth_second_half_mb``: what a leak would
    show; the first minutes fill the working set of full batches, KV caches and allocator pools)."""
    by_minute: dict[int, float] = {}
    for at, mb in samples:
        by_minute[int(at // 60)] = mb
    half = samples[-1][0] / 2
    at_half = next(mb for at, mb in samples if at >= half)
    return {
        "rss_start_mb": samples[0][1],
        "rss_end_mb": end,
        "rss_max_mb": max(end, *(mb for _, mb in samples)),
        "rss_by_minute_mb": [by_minute[m] for m in sorted(by_minute)],
        "rss_growth_second_half_mb": round(end - at_half, 1),
    }


def burst_each(url: str, jobs: list[tuple[str, str, int]]) -> list[dict]:
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=900)
    return [one(client, *job) for job in jobs]


def prepare(root: Path, seed: int, scenarios: set[str]) -> dict[str, Path]:
    dirs = {"adapters": root / "adapters", "merged": root / "merged", "many": root / "many", "hot": root / "hot"}
    log("saving 8 adapters and a merged copy ...")
    make_adapters(dirs["adapters"], seed)
    if "latency" in scenarios:
        make_merged(dirs["adapters"], dirs["merged"])
    if "many" in scenarios:
        for i in range(200):  # hard links: 200 adapters on disk without 200 copies of the bytes
            source = dirs["adapters"] / ADAPTERS[i % len(ADAPTERS)]
            for side, count in (("many", 200), ("hot", 16)):
                if i < count:
                    target = dirs[side] / f"lora{i:03d}"
                    target.mkdir(parents=True)
                    for file in source.iterdir():
                        os.link(file, target / file.name)
    return dirs


def spread(values: list[float | None]) -> dict[str, Any]:
    values = [v for v in values if v is not None]
    return {"median": round(median(values), 3), "min": min(values), "max": max(values)} if values else {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--scenarios", default="latency,many,overload")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds of the latency and many-adapters sides"
    )
    parser.add_argument("--requests", type=int, default=16, help="requests per latency or many-adapters run")
    parser.add_argument("--capacity", type=float, help="requests/s the server sustains (default: measure a burst)")
    parser.add_argument("--rate", type=float, help="arrivals/s (default: --load x capacity)")
    parser.add_argument("--load", type=float, default=0.8, help="fraction of capacity for the latency runs")
    parser.add_argument("--duration", type=float, help="latency runs: seconds of arrivals (rate x duration requests)")
    parser.add_argument("--sides", default="continuous,dynamic,merged", help="latency runs: which sides")
    parser.add_argument("--overload-x", type=float, default=10.0)
    parser.add_argument("--overload-duration", type=float, default=60.0)
    parser.add_argument("--overload-queue", type=int, default=8, help="--max-queue of the overload server")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--min-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dry-run", action="store_true", help="print only; append nothing to bench/results")
    args = parser.parse_args()
    global RECORD
    RECORD = not args.dry_run
    scenarios = set(args.scenarios.split(","))
    summary: dict[str, Any] = {"bench": "serve_load", "model": BASE, "settings": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        dirs = prepare(Path(tmp), args.seed, scenarios)
        cap = {"requests_per_s": args.capacity} if args.capacity else capacity(dirs, args)
        log(f"capacity: {cap}")
        rate = args.rate or args.load * cap["requests_per_s"]
        summary["capacity"] = {k: round(v, 3) for k, v in cap.items()} | {"rate_per_s": round(rate, 3)}
        if "latency" in scenarios:
            runs: dict[str, list[dict]] = {side: [] for side in args.sides.split(",")}
            for r in range(args.rounds):
                for side in runs:
                    log(f"latency round {r + 1}: {side} at {rate:.2f}/s ...")
                    runs[side].append(latency_side(side, dirs, args, rate, args.seed + r))
            keys = ("ttft_median_s", "ttft_p95_s", "ttft_p99_s", "itl_median_s", "itl_p99_s", "e2e_median_s")
            keys += ("e2e_p95_s", "e2e_p99_s", "tokens_per_s")
            summary["latency"] = {side: {k: spread([x[k] for x in got]) for k in keys} for side, got in runs.items()}
            med = {side: {k: v["median"] for k, v in got.items()} for side, got in summary["latency"].items()}
            summary["ratios"] = {
                f"{key}_continuous_vs_{other}": round(med["continuous"][key] / med[other][key], 3)
                for other in ("dynamic", "merged")
                for key in ("ttft_median_s", "tokens_per_s")
                if "continuous" in med and other in med
            }
            summary["goals"] = {"tokens_vs_dynamic": ">= 1.3", "tokens_vs_merged": ">= 0.95"}  # issue 29
        if "many" in scenarios:
            many_runs: dict[str, list[dict]] = {"hot": [], "many": []}
            for r in range(args.rounds):
                for side in many_runs:
                    log(f"many-adapters round {r + 1}: {side} at {rate:.2f}/s ...")
                    many_runs[side].append(many_side(side, dirs, args, rate, args.seed + r))
            summary["many"] = {
                side: {k: spread([x[k] for x in got]) for k in ("tokens_per_s", "e2e_median_s", "ttft_median_s")}
                | {"failed": sum(x["requests"] - x["statuses"].get("200", 0) for x in got)}
                for side, got in many_runs.items()
            }
            summary["ratios_many"] = {
                "tokens_per_s_many_vs_hot": round(
                    summary["many"]["many"]["tokens_per_s"]["median"]
                    / summary["many"]["hot"]["tokens_per_s"]["median"],
                    3,
                )
            }
        if "overload" in scenarios:
            summary["overload"] = overload(dirs, args, args.overload_x * cap["requests_per_s"])
    record(summary, None, "summary")
    emit(summary)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve-gathering"]:  # a server child with the dynamic policy (Server(gathering=True))
        from deltatune.cli.serve import run_server, serve_config

        sys.exit(run_server(serve_config(sys.argv[2:]), GatheringScheduler))
    main()
