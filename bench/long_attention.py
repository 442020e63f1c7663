"""Efficient attention for long sequences: does it save time and memory, from which length on, and
what does it cost in quality? deltatune.attention's patterns against dense SDPA.

Subcommands (each prints one JSON line and appends it to ``bench/results/long_attention.jsonl``):

* ``speed``: one attention call with SmolLM2-135M's real shapes (9 query heads, 3 key/value heads,
  head_dim 64, batch 1, float32, causal), through the function transformers' AttentionInterface
  hands the model (dense: transformers' own ``sdpa_attention_forward``, which uses torch's fused
  CPU kernel with ``enable_gqa``). Timed: the attention call only (not the projections, MLP or the
  other 29 layers), forward, and forward + backward to q, k, v. Every (pattern, n, mode) runs in
  a fresh process: peak memory is the rise of the process's peak RSS during the first call over
  its peak after making the inputs, then ``--repeats`` timed calls (median). ``--runs`` rounds
  alternate the patterns; figures are medians over rounds with min-max. The crossover length is
  the first n from which a pattern is faster than SDPA at every measured longer n.
* ``quality``: perplexity of SmolLM2-135M (no training) on the longest Python standard-library
  files (``/usr/lib/python3*/``, the CPython authors' code, not ours), first n tokens, each
  pattern vs full attention.
* ``train-s2``: LoRA + ``s2`` vs LoRA + full attention on those files for ``--steps`` steps at
  length n, both evaluated with full attention on held-out files (LongLoRA's recipe).
* ``rte``: MiniLM (all-MiniLM-L6-v2) + LoRA on RTE at 512 tokens with ``linformer``, ``perceiver``
  and full attention: dev accuracy and step time.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RunMeter, append_result, emit, log, set_threads

BENCH = "long_attention"
PATTERNS = {
    "sdpa": {},
    "sliding_window": {"window": 512},
    "blockwise": {"block_size": 512},
    "lsh": {"bucket_size": 128, "n_hashes": 1},
    "s2": {},
}
# Quality-only variants: a name of their own for a pattern with other options.
VARIANTS = {"sliding_window+4sinks": ("sliding_window", {"window": 512, "global_tokens": 4})}
LENGTHS = [1024, 2048, 4096, 8192, 16384]
GOAL = {"patterns": ["sliding_window", "blockwise"], "n": 16384, "fwd_bwd_speedup>=": 5, "memory_ratio>=": 5}


# --- speed ------------------------------------------------------------------------------------
class _Module(torch.nn.Module):
    """What transformers' attention functions read of a LlamaAttention: GQA ratio and causality."""

    num_key_value_groups = 3
    is_causal = True


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(pattern: str, n: int, modes: list[str], repeats: int) -> dict[str, Any]:
    """Forward first, then forward + backward, in one process: the peak RSS rise over the peak after
    making the inputs is each mode's attention memory (backward's peak includes its forward)."""
    from transformers import AttentionInterface

    from deltatune.attention import _register, options_for
    from deltatune.attention.registry import pattern_named

    module = _Module().train()  # s2 is sparse in training only
    name = "sdpa" if pattern == "sdpa" else _register(pattern_named(pattern), options_for(pattern, **PATTERNS[pattern]))
    fn = AttentionInterface._global_mapping[name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 9, n, 64, generator=g).requires_grad_()
    k = torch.randn(1, 3, n, 64, generator=g).requires_grad_()
    v = torch.randn(1, 3, n, 64, generator=g).requires_grad_()

    def call(grad: bool) -> None:
        with torch.set_grad_enabled(grad):
            out, _ = fn(module, q, k, v, None, scaling=0.125)
            if grad:
                out.sum().backward()
                for t in (q, k, v):
                    t.grad = None

    before = _peak_mb()
    result = {}
    for mode in ("fwd", "fwd_bwd"):
        if mode not in modes:
            continue
        call(mode == "fwd_bwd")
        memory = _peak_mb() - before
        walls, cpus = [], []
        for _ in range(repeats):
            w, c = time.perf_counter(), time.process_time()
            call(mode == "fwd_bwd")
            walls.append(time.perf_counter() - w)
            cpus.append(time.process_time() - c)
        result[mode] = {
            "wall_s": statistics.median(walls),
            "cpu_s": statistics.median(cpus),
            "memory_mb": round(memory, 1),
        }
    return result


def _spawn(args: argparse.Namespace, *extra: str) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", "--threads", str(args.threads), *extra]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _spread(values: list[float]) -> dict[str, Any]:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def speed(args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, list[dict[str, Any]]] = {}
    for n in args.lengths:
        for round_index in range(args.runs):
            for pattern in args.patterns:
                result = _spawn(
                    args, "--pattern", pattern, "--n", str(n), "--modes", *args.modes, "--repeats", str(args.repeats)
                )
                for mode, figures in result.items():
                    raw.setdefault(f"{pattern}|{n}|{mode}", []).append(figures)
                log(f"round {round_index + 1} n={n} {pattern}: {result}")
    return _aggregate(raw, args)


def speed_from_log(args: argparse.Namespace) -> dict[str, Any]:
    """A campaign stopped before its end (the summary is written only at the end): the per-worker results
    its log printed, aggregated the same way. The line says so (``recovered_from_log``), and how many
    rounds each (pattern, n) got."""
    import ast
    import re

    raw: dict[str, list[dict[str, Any]]] = {}
    pattern = re.compile(r"^round (\d+) n=(\d+) (\w+): (\{.*\})$")
    for line in Path(args.from_log).read_text().splitlines():
        match = pattern.match(line)
        if match:
            n, name, result = int(match[2]), match[3], ast.literal_eval(match[4])
            for mode, figures in result.items():
                raw.setdefault(f"{name}|{n}|{mode}", []).append(figures)
    args.lengths = sorted({int(k.split("|")[1]) for k in raw})
    return {**_aggregate(raw, args), "recovered_from_log": args.from_log}


def _aggregate(raw: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> dict[str, Any]:
    table = {}
    for key, runs in raw.items():
        table[key] = {f: _spread([r[f] for r in runs]) for f in ("wall_s", "cpu_s", "memory_mb")}
        table[key]["rounds"] = len(runs)
    return {"table": table, "versus_sdpa": _versus(table, args), "raw": raw}


def _versus(table: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pattern in args.patterns:
        if pattern == "sdpa":
            continue
        for mode in args.modes:
            rows, wins = {}, []
            for n in args.lengths:
                ours, dense = table.get(f"{pattern}|{n}|{mode}"), table.get(f"sdpa|{n}|{mode}")
                if not ours or not dense:
                    continue
                speedup = dense["cpu_s"]["median"] / ours["cpu_s"]["median"]
                memory = dense["memory_mb"]["median"] / max(ours["memory_mb"]["median"], 0.1)
                rows[n] = {"speedup_cpu": round(speedup, 2), "memory_ratio": round(memory, 2)}
                wins.append((n, speedup > 1))
            crossover = next((n for i, (n, _) in enumerate(wins) if all(w for _, w in wins[i:])), None)
            out[f"{pattern}|{mode}"] = {"by_n": rows, "crossover_n": crossover}
    return out


# --- quality ----------------------------------------------------------------------------------
def documents(count: int) -> list[Path]:
    """The longest .py files of the installed Python standard library (not its tests, no third-party packages)."""
    files = [
        Path(p)
        for p in glob.glob("/usr/lib/python3.[0-9]*/**/*.py", recursive=True)
        if not any(skip in p for skip in ("/test", "-packages/"))
    ]
    return sorted(files, key=lambda p: p.stat().st_size, reverse=True)[:count]


def _perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=ids[None]).logits[0, :-1]
    return math.exp(torch.nn.functional.cross_entropy(logits.float(), ids[1:]).item())


def quality(args: argparse.Namespace) -> dict[str, Any]:
    import deltatune as dt

    model, tokenizer = dt.load_base("smollm2-135m")
    model.eval()
    docs = documents(args.docs)
    results: dict[str, Any] = {"documents": [str(d) for d in docs], "by_n": {}}
    for n in args.lengths:
        per: dict[str, list[float]] = {}
        for doc in docs:
            ids = torch.tensor(tokenizer(doc.read_text(encoding="utf-8"))["input_ids"][:n])
            if len(ids) < n:
                log(f"{doc} has fewer than {n} tokens; skipped")
                continue
            for pattern in args.patterns:
                name, options = _quality_setting(pattern)
                dt.set_attention(model, name, **options)
                t = time.perf_counter()
                per.setdefault(pattern, []).append(_perplexity(model, ids))
                log(f"n={n} {doc.name} {pattern}: ppl {per[pattern][-1]:.3f} ({time.perf_counter() - t:.1f} s)")
        dt.set_attention(model, "sdpa")
        results["by_n"][n] = {
            p: {"per_doc": [round(x, 4) for x in v], "mean": round(statistics.mean(v), 4)} for p, v in per.items()
        }
    return results


def _quality_setting(name: str) -> tuple[str, dict[str, Any]]:
    """(pattern, options) of a pattern or variant name."""
    return VARIANTS.get(name) or (name, PATTERNS.get(name, {}))


# --- training ---------------------------------------------------------------------------------
def train_s2(args: argparse.Namespace) -> dict[str, Any]:
    import deltatune as dt

    docs = documents(args.docs + 2)
    train_docs, eval_docs = docs[2:], docs[:2]
    out: dict[str, Any] = {
        "train_documents": [str(d) for d in train_docs],
        "eval_documents": [str(d) for d in eval_docs],
    }
    for pattern in ("s2", "sdpa"):
        base, tokenizer = dt.load_base("smollm2-135m")
        torch.manual_seed(args.seed)
        model = dt.wrap(
            base, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        )
        dt.set_attention(model, pattern)
        windows = _windows(tokenizer, train_docs, args.n)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        model.train()
        start = time.process_time()
        losses = []
        for step in range(args.steps):
            ids = windows[step % len(windows)][None]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(round(loss.item(), 4))
            log(f"{pattern} step {step + 1}: loss {losses[-1]}")
        train_cpu = time.process_time() - start
        model.eval()
        dt.set_attention(model, "sdpa")
        ppl = [_perplexity(model, w) for w in _windows(tokenizer, eval_docs, args.n)[:4]]
        out[pattern] = {
            "train_cpu_s": round(train_cpu, 1),
            "losses": losses,
            "eval_ppl_full_attention": round(statistics.mean(ppl), 4),
        }
    return out


def _windows(tokenizer, docs: list[Path], n: int) -> list[torch.Tensor]:
    out = []
    for doc in docs:
        ids = torch.tensor(tokenizer(doc.read_text(encoding="utf-8"))["input_ids"])
        out += [ids[i : i + n] for i in range(0, len(ids) - n + 1, n)]
    return out


def rte(args: argparse.Namespace) -> dict[str, Any]:
    import csv

    import deltatune as dt

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "rte" / "train.tsv"
    with open(data, encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    # GLUE's dev split is held out here: the last 277 training rows (dev's size) are the evaluation set.
    train, dev = rows[:-277][: args.train_examples], rows[-277:][: args.eval_examples]
    out: dict[str, Any] = {"data": str(data), "train_examples": len(train), "eval_examples": len(dev)}
    dev_labels = [r["label"] for r in dev]
    out["majority"] = round(max(map(dev_labels.count, set(dev_labels))) / len(dev), 4)
    for pattern, options in (("sdpa", {}), ("linformer", {"k": 64}), ("perceiver", {"num_latents": 64})):
        torch.manual_seed(args.seed)  # the same head and latent initialisation for every side
        base, tokenizer = dt.load_base("minilm-l6", task="classification", num_labels=2)
        dt.set_attention(base, pattern, **options)
        extra = dt.attention.trainable_modules(pattern)
        model = dt.wrap(
            base,
            dt.LoraConfig(
                r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier", *extra]
            ),
        )
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
        labels = {"entailment": 0, "not_entailment": 1}

        def encode(batch, tokenizer=tokenizer, labels=labels):
            enc = tokenizer(
                [r["sentence1"] for r in batch],
                [r["sentence2"] for r in batch],
                truncation=True,
                max_length=512,
                padding="max_length",
                return_tensors="pt",
            )
            return enc, torch.tensor([labels[r["label"]] for r in batch])

        model.train()
        times = []
        for _ in range(args.epochs):
            for i in range(0, len(train), args.batch_size):
                enc, y = encode(train[i : i + args.batch_size])
                t = time.process_time()
                loss = torch.nn.functional.cross_entropy(model(**enc).logits, y)
                loss.backward()
                opt.step()
                opt.zero_grad()
                times.append(time.process_time() - t)
                if len(times) % 10 == 0:
                    log(f"rte {pattern} step {len(times)}: loss {loss.item():.4f}, {times[-1]:.2f} CPU s")
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(dev), 16):
                enc, y = encode(dev[i : i + 16])
                correct += (model(**enc).logits.argmax(-1) == y).sum().item()
        out[pattern] = {
            "accuracy": round(correct / len(dev), 4),
            "step_cpu_s_median": round(statistics.median(times), 3),
        }
        log(f"rte {pattern}: {out[pattern]}")
    return out


# --- README tables ----------------------------------------------------------------------------
def tables(args: argparse.Namespace) -> str:
    """Markdown tables from the newest ``speed`` and ``quality`` lines of the results file."""
    from _common import RESULTS_DIR

    lines = [json.loads(x) for x in (RESULTS_DIR / f"{BENCH}.jsonl").read_text().splitlines() if x.strip()]
    out = []
    speed_line = next((x for x in reversed(lines) if x.get("kind") == "speed"), None)
    if speed_line:
        table = speed_line["figures"]["table"]
        patterns = speed_line["settings"]["patterns"]
        out.append("| n | mode | " + " | ".join(patterns) + " |")
        out.append("|---|---|" + "---|" * len(patterns))
        for n in speed_line["settings"]["lengths"]:
            for mode in speed_line["settings"]["modes"]:
                cells = []
                for p in patterns:
                    cell = table.get(f"{p}|{n}|{mode}")
                    cells.append(
                        f"{cell['cpu_s']['median']:.3g} s, {cell['memory_mb']['median']:.0f} MB" if cell else "-"
                    )
                out.append(f"| {n} | {mode} | " + " | ".join(cells) + " |")
        out.append("")
        out.append("| pattern | mode | crossover n | speed-up at longest n | memory ratio at longest n |")
        out.append("|---|---|---|---|---|")
        for key, row in speed_line["figures"]["versus_sdpa"].items():
            last = row["by_n"][max(row["by_n"], key=int)] if row["by_n"] else {}
            out.append(
                f"| {key.replace('|', ' | ')} | {row['crossover_n'] or 'none'} | "
                f"{last.get('speedup_cpu', '-')}x | {last.get('memory_ratio', '-')}x |"
            )
    by_n: dict[str, dict[str, Any]] = {}  # every quality line, newer ones winning per (n, pattern)
    for line in (x for x in lines if x.get("kind") == "quality"):
        for n, row in line["figures"]["by_n"].items():
            by_n.setdefault(n, {}).update(row)
    if by_n:
        patterns = list(dict.fromkeys(p for row in by_n.values() for p in row))
        out += ["", "| n | " + " | ".join(patterns) + " |", "|---|" + "---|" * len(patterns)]
        for n, row in by_n.items():
            out.append(f"| {n} | " + " | ".join(f"{row[p]['mean']:.3f}" if p in row else "-" for p in patterns) + " |")
    out += _training_tables(lines)
    return "\n".join(out)


def _training_tables(lines: list[dict[str, Any]]) -> list[str]:
    """The newest ``train-s2`` and ``rte`` lines as tables, each side against full attention."""
    out: list[str] = []
    s2 = next((x for x in reversed(lines) if x.get("kind") == "train-s2"), None)
    if s2:
        f, n, steps = s2["figures"], s2["settings"]["n"], s2["settings"]["steps"]
        out += ["", f"| LoRA training, n={n}, {steps} steps | train CPU s | eval perplexity (full attention) |"]
        out.append("|---|---|---|")
        for side in ("s2", "sdpa"):
            out.append(f"| {side} | {f[side]['train_cpu_s']} | {f[side]['eval_ppl_full_attention']:.3f} |")
        out.append(
            f"| s2 / sdpa | {f['s2']['train_cpu_s'] / f['sdpa']['train_cpu_s']:.2f}x | "
            f"{f['s2']['eval_ppl_full_attention'] / f['sdpa']['eval_ppl_full_attention']:.3f}x |"
        )
    rte_line = next((x for x in reversed(lines) if x.get("kind") == "rte"), None)
    if rte_line:
        f = rte_line["figures"]
        out += [
            "",
            f"| MiniLM + LoRA on RTE, 512 tokens ({f['train_examples']} train, {f['eval_examples']} held out) "
            f"| accuracy (majority {100 * f.get('majority', 0):.1f}%) | step CPU s (median) |",
            "|---|---|---|",
        ]
        for side in ("sdpa", "linformer", "perceiver"):
            out.append(f"| {side} | {100 * f[side]['accuracy']:.1f}% | {f[side]['step_cpu_s_median']} |")
    return out


# --- command line -----------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("speed", "quality", "train-s2", "rte", "worker", "tables"):
        p = sub.add_parser(name)
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
        if name in ("speed", "quality"):
            p.add_argument("--patterns", nargs="+", default=list(PATTERNS))
            p.add_argument("--lengths", nargs="+", type=int, default=LENGTHS if name == "speed" else [2048, 4096])
        if name == "speed":
            p.add_argument("--from-log", help="aggregate the worker results a stopped campaign's log printed")
        if name in ("speed", "worker"):
            p.add_argument("--modes", nargs="+", default=["fwd", "fwd_bwd"], choices=["fwd", "fwd_bwd"])
            p.add_argument("--repeats", type=int, default=1)
        if name == "speed":
            p.add_argument("--runs", type=int, default=3)
        if name in ("quality", "train-s2"):
            p.add_argument("--docs", type=int, default=3)
        if name == "train-s2":
            p.add_argument("--n", type=int, default=2048)
            p.add_argument("--steps", type=int, default=200)
            p.add_argument("--lr", type=float, default=2e-4)
        if name == "rte":
            p.add_argument("--train-examples", type=int, default=2213)
            p.add_argument("--eval-examples", type=int, default=277)
            p.add_argument("--epochs", type=int, default=1)
            p.add_argument("--batch-size", type=int, default=8)
            p.add_argument("--lr", type=float, default=5e-4)
        if name == "worker":
            p.add_argument("--pattern", required=True)
            p.add_argument("--n", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    if args.command == "worker":
        emit(worker(args.pattern, args.n, args.modes, args.repeats))
        return
    if args.command == "tables":
        print(tables(args))
        return
    meter = RunMeter()
    run = {"speed": speed, "quality": quality, "train-s2": train_s2, "rte": rte}[args.command]
    if args.command == "speed" and args.from_log:
        run = speed_from_log
    figures = {"subcommand": args.command, **run(args)}
    if args.command == "speed":
        figures["goal"] = GOAL
    settings = {k: v for k, v in vars(args).items() if k != "command"}
    append_result(BENCH, figures, meter, kind=args.command, settings=settings)
    emit({k: v for k, v in figures.items() if k != "raw"})


if __name__ == "__main__":
    main()
