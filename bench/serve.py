"""Serving benchmark: eight LoRA adapters on one SmolLM2-135M through ``deltatune serve``.

The load: ``--requests`` chat completions (Alpaca instructions from ../shared/data) at
``--concurrency`` over loopback, ``--max-tokens`` new tokens each, greedy; request i uses adapter
i mod 8 (LoRA r=8, alpha=16 on q_proj/v_proj, B drawn from N(0, 0.01) so every adapter changes
the text). Four ways to serve it:

* ``mixed``: one server holding the eight adapters; requests in flight together share a batch
  whatever their adapter (deltatune's mixed-adapter batches);
* ``merged``: the same load on one adapter merged into the weights (``merge_and_unload``, served
  as the base model): the cost of a batch with no adapter arithmetic at all;
* ``one_at_a_time``: the mixed server, but the load sent adapter by adapter, as a server that can
  batch only one adapter's requests would run it;
* ``peft``: no server; the same prompts in the same batches through peft 0.21's
  ``generate(adapter_names=...)`` path;
* ``deltatune_direct``: the same, through deltatune's ``generate(adapter_names=...)``: the
  like-for-like comparison of the two mixed paths (the server's HTTP, JSON and client threads
  share the same two cores in the other rows).

Figures: generated tokens/s (completion tokens over wall time) and p50/p95 request latency.
Goal: mixed >= 0.9x merged and >= 1.5x peft. Prints one JSON line; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, load_average, log, median

import deltatune as dt

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_data_first200.json"
ADAPTERS = [f"task{i}" for i in range(8)]
BASE = "smollm2-135m"


def make_adapters(directory: Path, seed: int, names: list[str] = ADAPTERS) -> None:
    """LoRA adapters (the eight by default) with seeded random factors, saved in peft's layout (one folder each)."""
    base, _ = dt.load_base(BASE)
    config = dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    model = dt.wrap(base, config, names[0])
    for name in names[1:]:
        model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
    model.save_pretrained(directory)


def make_merged(adapters: Path, directory: Path) -> None:
    """The first adapter folded into the base weights, saved as a plain transformers model."""
    base, tokenizer = dt.load_base(BASE)
    merged = dt.DeltaModel.from_pretrained(base, adapters / ADAPTERS[0], ADAPTERS[0]).merge_and_unload()
    merged.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``deltatune serve`` in a child process, ready once /v1/models answers."""

    def __init__(self, base: str, adapters: Path | None, max_batch: int, extra: list[str] | None = None) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "deltatune", "serve", "--base", base, "--port", str(self.port)]
        cmd += ["--max-batch", str(max_batch)] + (["--adapters", str(adapters)] if adapters else []) + (extra or [])
        self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}/v1"
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"deltatune serve exited with {self.process.returncode}: {' '.join(cmd)}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as answer:
                    self.models = [m["id"] for m in json.load(answer)["data"]]
                return
            except OSError:
                time.sleep(1)
        raise TimeoutError("the server did not come up within 300 s")

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def send(client: Any, model: str, instruction: str, max_tokens: int) -> tuple[float, int, str]:
    """One chat completion; (latency s, completion tokens, text)."""
    start = time.perf_counter()
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": instruction}], max_tokens=max_tokens, temperature=0
    )
    return time.perf_counter() - start, answer.usage.completion_tokens, answer.choices[0].message.content


def load(url: str, jobs: list[tuple[str, str]], concurrency: int, max_tokens: int) -> dict[str, Any]:
    """Send ``jobs`` (model, instruction) with ``concurrency`` in flight; throughput and latency."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)  # one connection pool, shared
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: send(client, job[0], job[1], max_tokens), jobs))
    return summary(time.perf_counter() - start, [r[0] for r in results], [r[1] for r in results]) | {
        "texts": [r[2] for r in results]
    }


def summary(wall: float, latencies: list[float], tokens: list[int]) -> dict[str, Any]:
    ordered = sorted(latencies)
    return {
        "tokens_per_s": round(sum(tokens) / wall, 1),
        "p50_latency_s": round(median(ordered), 2),
        "p95_latency_s": round(ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], 2),
        "generated_tokens": sum(tokens),
        "wall_s": round(wall, 1),
    }


def load_direct(library: str, adapters: Path) -> tuple[Any, Any]:
    """The eight adapters on SmolLM2 in-process, with ``library``'s own loader."""
    base, tokenizer = dt.load_base(BASE)
    if library == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(adapters / ADAPTERS[0]), adapter_name=ADAPTERS[0])
        for name in ADAPTERS[1:]:
            model.load_adapter(str(adapters / name), adapter_name=name)
    else:
        model = dt.DeltaModel.from_pretrained(base, adapters / ADAPTERS[0], ADAPTERS[0])
        for name in ADAPTERS[1:]:
            model.load_adapter(adapters / name, name)
    return model.eval(), tokenizer


def run_direct(library: str, adapters: Path, jobs: list[tuple[str, str]], batch: int, max_tokens: int) -> dict:
    """A library's mixed path with no server: the same prompts, ``batch`` rows per generate call
    (each row's latency: its batch's)."""
    model, tokenizer = load_direct(library, adapters)
    tokenizer.padding_side = "left"
    latencies, tokens = [], []
    start = time.perf_counter()
    for i in range(0, len(jobs), batch):
        chunk = jobs[i : i + batch]
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            for _, text in chunk
        ]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        began = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                **inputs,
                adapter_names=[name for name, _ in chunk],
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        latencies += [time.perf_counter() - began] * len(chunk)
        new = out[:, inputs["input_ids"].shape[1] :]
        tokens += [int((row != tokenizer.pad_token_id).sum()) for row in new]
    return summary(time.perf_counter() - start, latencies, tokens)


SLOTS = ["--max-loaded-adapters", str(len(ADAPTERS)), "--max-lora-rank", "8"]


def compare_slots(args: argparse.Namespace, jobs: list[tuple[str, str]]) -> None:
    """``--slots-runs N``: the eight adapters mixed with adapter slots, without them (the general
    mixed path), and one merged adapter; N rounds, each server a fresh process, the order rotated
    every round; one raw line per round in bench/results/serve_slots.jsonl, medians (min-max) printed."""
    from _common import RunMeter, append_result

    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters, merged = Path(tmp) / "adapters", Path(tmp) / "merged"
        make_adapters(adapters, args.seed)
        make_merged(adapters, merged)
        ways = {
            "mixed_slots": (BASE, adapters, SLOTS),
            "mixed_no_slots": (BASE, adapters, []),
            "merged": (str(merged), None, []),
        }
        for i in range(args.slots_runs):
            order = list(ways)[i % 3 :] + list(ways)[: i % 3]
            meter, figures = RunMeter(), {}
            for way in order:
                base, folder, extra = ways[way]
                with Server(base, folder, args.concurrency, extra) as server:
                    sent = [(server.models[0] if folder is None else name, text) for name, text in jobs]
                    load(server.url, sent[: args.concurrency], args.concurrency, 4)  # warm-up
                    log(f"round {i + 1}: {way} ...")
                    figures[way] = load(server.url, sent, args.concurrency, args.max_tokens)["tokens_per_s"]
            figures |= {
                f"{w}_vs_merged": round(figures[w] / figures["merged"], 3) for w in ("mixed_slots", "mixed_no_slots")
            }
            append_result("serve_slots", figures, meter, settings=vars(args), order=order)
            rounds.append(figures)
    emit(
        {
            "bench": "serve_slots",
            "rounds": len(rounds),
            "median (min-max)": {
                key: [median([r[key] for r in rounds]), min(r[key] for r in rounds), max(r[key] for r in rounds)]
                for key in rounds[0]
            },
            "goal": {"mixed_slots_vs_merged": 0.95},
        }
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def time_loads(adapters: Path, names: list[str], slots: int) -> dict[str, float]:
    """Adapter load time with ``slots`` slots: the server's adapter store (serving/adapters.py) on
    SmolLM2 in this process, each of ``names`` made loaded twice over in turn, so after the first
    ``slots`` every load evicts the least recently used one: ms per load (read, load, slot write,
    eviction), p50 and p99."""
    from deltatune.serving.adapters import Adapters
    from deltatune.serving.slots import SlotTable

    base, _ = dt.load_base(BASE)
    gc.freeze()  # as the server does once its base is loaded (deltatune/cli/serve.py)
    store = Adapters(base, BASE, adapters, slots, SlotTable(slots, 8))
    times = []
    for name in names + names:
        start = time.perf_counter()
        store.ensure(name, set())
        times.append((time.perf_counter() - start) * 1000)
    return {
        "load_ms_p50": round(percentile(times, 0.5), 1),
        "load_ms_p99": round(percentile(times, 0.99), 1),
        "loads_timed": len(times),
    }


def scrape(server: Server, metric: str) -> float:
    """One counter of the server's /metrics (summed over labels)."""
    with urllib.request.urlopen(server.url.removesuffix("/v1") + "/metrics", timeout=10) as answer:
        text = answer.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(metric))


def compare_many(args: argparse.Namespace, instructions: list[str]) -> None:
    """``--many-runs N``: ``--many-adapters`` adapters (request i uses adapter i mod that, so with
    fewer slots every request loads its adapter, evicting another) served with ``--many-slots``
    slots against all of them resident in slots (each loaded by a warm-up request before timing);
    N rounds, fresh servers, the order alternating; then the adapter load time (time_loads). One raw
    line per round in bench/results/serve_slots.jsonl (mode many_adapters), medians printed."""
    from _common import RunMeter, append_result

    names = [f"task{i}" for i in range(args.many_adapters)]
    jobs = [(names[i % len(names)], instructions[i % len(instructions)]) for i in range(args.requests)]
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        adapters = Path(tmp) / "adapters"
        log(f"saving {len(names)} adapters ...")
        make_adapters(adapters, args.seed, names)
        ways = {
            "slots": ["--max-loaded-adapters", str(args.many_slots), "--max-lora-rank", "8"],
            "all_resident": ["--max-loaded-adapters", str(len(names)), "--max-lora-rank", "8"],
        }
        for i in range(args.many_runs):
            order = list(ways)[i % 2 :] + list(ways)[: i % 2]
            meter, figures = RunMeter(), {}
            for way in order:
                with Server(BASE, adapters, args.concurrency, ways[way]) as server:
                    warm = [(n, "Hi") for n in names] if way == "all_resident" else jobs[: args.concurrency]
                    load(server.url, warm, args.concurrency, 1 if way == "all_resident" else 4)
                    before = scrape(server, "deltatune:adapter_loads_total")
                    log(f"round {i + 1}: {way} ...")
                    figures[way] = load(server.url, jobs, args.concurrency, args.max_tokens)["tokens_per_s"]
                    figures[f"{way}_loads_during_run"] = scrape(server, "deltatune:adapter_loads_total") - before
            figures["slots_vs_all_resident"] = round(figures["slots"] / figures["all_resident"], 3)
            log(f"round {i + 1}: timing adapter loads ...")
            figures |= time_loads(adapters, names, args.many_slots)
            settings = vars(args) | {"adapters": len(names)}
            append_result("serve_slots", figures, meter, settings=settings, order=order, mode="many_adapters")
            rounds.append(figures)
    emit(
        {
            "bench": "serve_slots",
            "mode": "many_adapters",
            "rounds": len(rounds),
            "median (min-max)": {
                key: [median([r[key] for r in rounds]), min(r[key] for r in rounds), max(r[key] for r in rounds)]
                for key in rounds[0]
            },
            "goal": {"slots_vs_all_resident": 0.95},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--slots-runs", type=int, help="compare adapter slots / no slots / merged, N rounds")
    parser.add_argument("--many-runs", type=int, help="many adapters in few slots vs all resident, N rounds")
    parser.add_argument("--many-adapters", type=int, default=200, help="with --many-runs: adapters on disk")
    parser.add_argument("--many-slots", type=int, default=16, help="with --many-runs: adapter slots")
    parser.add_argument("--allow-dirty", action="store_true", help="record figures from uncommitted code")
    args = parser.parse_args()
    instructions = [row["instruction"] for row in json.loads(ALPACA.read_text())]
    jobs = [(ADAPTERS[i % len(ADAPTERS)], instructions[i % len(instructions)]) for i in range(args.requests)]
    if args.many_runs:
        compare_many(args, instructions)
        return
    if args.slots_runs:
        compare_slots(args, jobs)
        return
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        adapters, merged = Path(tmp) / "adapters", Path(tmp) / "merged"
        log("saving 8 adapters and a merged copy ...")
        make_adapters(adapters, args.seed)
        make_merged(adapters, merged)
        with Server(BASE, adapters, args.concurrency) as server:
            load(server.url, jobs[: args.concurrency], args.concurrency, 4)  # warm-up
            log("mixed ...")
            results["mixed"] = load(server.url, jobs, args.concurrency, args.max_tokens)
            log("one adapter at a time ...")
            waves = [
                load(server.url, [j for j in jobs if j[0] == name], args.concurrency, args.max_tokens)
                for name in ADAPTERS
            ]
            wall = sum(w["wall_s"] for w in waves)
            results["one_at_a_time"] = {
                "tokens_per_s": round(sum(w["generated_tokens"] for w in waves) / wall, 1),
                "wall_s": round(wall, 1),
                "p50_latency_s (per wave)": median([w["p50_latency_s"] for w in waves]),
            }
        with Server(str(merged), None, args.concurrency) as server:
            load(server.url, [(server.models[0], text) for _, text in jobs[: args.concurrency]], args.concurrency, 4)
            log("merged ...")
            results["merged"] = load(
                server.url, [(server.models[0], t) for _, t in jobs], args.concurrency, args.max_tokens
            )
        log("deltatune adapter_names, no server ...")
        results["deltatune_direct"] = run_direct("deltatune", adapters, jobs, args.concurrency, args.max_tokens)
        if not args.skip_peft:
            log("peft adapter_names, no server ...")
            results["peft"] = run_direct("peft", adapters, jobs, args.concurrency, args.max_tokens)
    pairs = zip(jobs, results["mixed"].pop("texts"), results["merged"].pop("texts"), strict=True)
    own = [a == b for (name, _), a, b in pairs if name == ADAPTERS[0]]
    for r in results.values():
        r.pop("texts", None)
    mixed = results["mixed"]["tokens_per_s"]
    ratios = {"mixed_vs_merged": round(mixed / results["merged"]["tokens_per_s"], 2)}
    if "peft" in results:
        ratios["mixed_vs_peft"] = round(mixed / results["peft"]["tokens_per_s"], 2)
        ratios["direct_vs_peft (same batches, no server)"] = round(
            results["deltatune_direct"]["tokens_per_s"] / results["peft"]["tokens_per_s"], 2
        )
    emit(
        {
            "bench": "serve",
            "settings": vars(args) | {"adapters": len(ADAPTERS), "threads": torch.get_num_threads()},
            "results": results,
            "ratios": ratios,
            "goal": {"mixed_vs_merged": 0.9, "mixed_vs_peft": 1.5},
            "load_average": load_average(),
            "check": f"{sum(own)}/{len(own)} of {ADAPTERS[0]}'s answers in mixed batches equal the merged server's",
            "cpu_count": os.cpu_count(),
        }
    )


if __name__ == "__main__":
    main()
