"""Print the benchmark tables (markdown) of docs/benchmarks.md from the raw results in ``bench/results/*.jsonl``.

Tables are generated from the committed raw lines, never typed: ``python bench/report.py glue`` (or
``train_throughput``, ``methods``, ``lora_train_step``, ``lora_inference``, ``dora``, or no argument for all). Each
table says which file, campaign and lines it shows. ``--campaign`` picks a campaign; the default is the file's latest
one. ``python bench/docs_tables.py`` regenerates every table between that file's markers
(``bench/docs_tables.py``), each headed by what it measured and when.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path
from typing import Any

RESULTS = Path(os.environ.get("DELTATUNE_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
GLUE_NAMES = {
    "full": "full fine-tuning",
    "lora": "LoRA q,v r=8",
    "adapter": "Houlsby adapters m=64",
    "bitfit": "BitFit",
    "partial_top2": "partial, top 2 layers",
    "prompt_tuning": "prompt tuning, 16 tokens",
    "hyperformer": "HyperFormer, 3 tasks in one",
}


def load(bench: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every line of ``bench/results/<bench>.jsonl``."""
    path = RESULTS / f"{bench}.jsonl"
    if not path.is_file():
        return []
    records = [(n, json.loads(line)) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    return [(n, r) for n, r in records if not dirty(r)]


def dirty(record: dict[str, Any]) -> bool:
    """Whether the line was measured on uncommitted code: no commit reproduces it, so no table uses it."""
    git = record.get("git")
    return bool(record.get("library_dirty") or (isinstance(git, dict) and git.get("library_dirty")))


def pick(lines: list[tuple[int, dict]], campaign: str | None) -> tuple[str | None, list[tuple[int, dict]]]:
    campaigns = [r.get("campaign") for _, r in lines if r.get("campaign")]
    chosen = campaign or (campaigns[-1] if campaigns else None)
    return chosen, [(n, r) for n, r in lines if r.get("campaign") == chosen]


def span(numbers: list[int]) -> str:
    """Line numbers as compact ranges: 1-3, 7, 9-10."""
    parts: list[list[int]] = []
    for n in sorted(numbers):
        if parts and n == parts[-1][1] + 1:
            parts[-1][1] = n
        else:
            parts.append([n, n])
    return ", ".join(f"{a}–{b}" if b > a else str(a) for a, b in parts)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}"


def contention_note(records: list[dict]) -> str:
    busy = [r["run"]["other_procs_cores"] for r in records if r.get("run")]
    return f"other processes used {min(busy):.2f}–{max(busy):.2f} cores (of {records[0]['machine']['os_cpu_count']})"


def glue(campaign: str | None) -> str:
    chosen, lines = pick(load("glue"), campaign)
    if not lines:
        return "glue: no results\n"
    runs = [(n, r) for n, r in lines if r.get("split") == "report"]
    select = [(n, r) for n, r in lines if r.get("split") == "select"]
    summary = next((r for _, r in lines if r.get("kind") == "summary"), None)
    settings = (runs or select)[0][1]["settings"]
    tasks = list((runs or select)[0][1]["tasks"]) if runs else []
    methods = list(dict.fromkeys(r["method"] for _, r in runs))
    header = [
        "method (lr chosen on select split)",
        *[{"sst2": "SST-2", "rte": "RTE", "mrpc": "MRPC acc / F1"}[t] for t in tasks],
    ]
    header += ["avg", "seeds", "trainable", "train CPU s (median)", "peak RSS (median)"]
    out = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    for method in methods:
        mine = [r for _, r in runs if r["method"] == method]
        figs = [r["figures"] for r in mine]
        cells = [f"{GLUE_NAMES.get(method, method)} ({mine[0]['lr']:g})"]
        for task in tasks:
            acc = mean_std([f["tasks"][task]["accuracy"] for f in figs])
            if task == "mrpc":
                acc += f" / {mean_std([f['tasks'][task]['f1'] for f in figs])}"
            cells.append(acc)
        cells.append(mean_std([statistics.fmean(f["tasks"][t]["accuracy"] for t in tasks) for f in figs]))
        cells.append(str(len(figs)))
        cells.append(f"{figs[0]['trainable_pct']:g}%")
        cells.append(f"{statistics.median(f['train_cpu_s'] for f in figs):.0f}")
        cells.append(f"{statistics.median(f['peak_rss_mb'] for f in figs):.0f} MB")
        out.append(f"| {' | '.join(cells)} |")
    if runs:
        first = runs[0][1]["figures"]["tasks"]
        base = ["majority class (report split)"] + [
            f"{first[t]['majority']:.1f}"
            + (" / " + f"{200 * first[t]['majority'] / (100 + first[t]['majority']):.1f}" if t == "mrpc" else "")
            for t in tasks
        ]
        out.append(f"| {' | '.join(base)} |" + " |" * (len(header) - len(base)))
    sel = {}
    for _, r in select:
        sel.setdefault(r["method"], []).append(
            f"{r['lr']:g}: {statistics.fmean(v['accuracy'] for v in r['figures']['tasks'].values()):.1f}"
        )
    n_report = {t: runs[0][1]["figures"]["tasks"][t]["n"] for t in tasks} if runs else {}
    notes = [
        f"Source: `bench/results/glue.jsonl`, campaign `{chosen}`: lr selection lines "
        f"{span([n for n, _ in select]) if select else '-'}, reported runs lines "
        f"{span([n for n, _ in runs]) if runs else '-'}"
        + (", summary line present" if summary else ", **campaign incomplete (no summary line yet)**")
        + ".",
        f"Settings: {settings['examples_per_task']} training examples per task x {settings['epochs']} epochs, batch "
        f"{settings['batch']}, max length {settings['max_length']}, {settings['threads']} thread; reported split sizes "
        f"{n_report}; select split {settings['select_examples']} per task "
        f"({'+'.join(select[0][1]['tasks']) if select else '-'}).",
        "Select-split mean accuracy per lr: " + "; ".join(f"{m} {', '.join(v)}" for m, v in sel.items()) + ".",
        "Contention: " + contention_note([r for _, r in lines if r.get("run")]) + ".",
    ]
    return "\n".join(out) + "\n\n" + "\n".join(notes) + "\n"


def fmt_spread(s: dict[str, Any], digits: int = 0) -> str:
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def train_throughput(campaign: str | None) -> str:
    chosen, lines = pick(load("train_throughput"), campaign)
    summary = [(n, r) for n, r in lines if r.get("kind") == "summary"]
    workers = [(n, r) for n, r in lines if r.get("kind") == "worker"]
    if not summary:
        return f"train_throughput: campaign {chosen} has no summary line yet ({len(workers)} worker lines)\n"
    n_sum, rec = summary[-1]
    f, st = rec["figures"], rec["settings"]
    names = {"deltatune": "deltatune train", "peft_trainer": "Trainer + peft (group_by_length)"}
    header = (
        "| | tokens/s, median (min–max) | train loop s | peak RSS MB | padding | dev loss | BLEU (round 1) "
        "| other procs' cores |"
    )
    out = [header, "|---|---|---|---|---|---|---|---|"]
    for side, s in f["sides"].items():
        bleu = f"{s['bleu'][0]:.1f}" if s["bleu"] else "–"
        busy = ", ".join(f"{c:.2f}" for c in s["other_procs_cores_during_training"])
        out.append(
            f"| {names[side]} | {fmt_spread(s['tokens_per_s'], 1)} | {s['train_seconds']['median']:.0f} | "
            f"{s['peak_rss_mb']['median']:.0f} | {100 * s['pad_fraction']['median']:.1f}% | "
            f"{s['dev_loss']['median']:.3f} | {bleu} | {busy} |"
        )
    lo, hi = f["tokens_per_s_ratio_range"]
    out.append(
        f"| ratio of medians (goal ≥ {f['goal']['tokens_per_s_ratio>=']}) | "
        f"**{f['tokens_per_s_ratio_of_medians']:.2f}** "
        f"({lo:.2f}–{hi:.2f} at the extremes) | | {f['peak_rss_ratio_of_medians']:.2f} | | | | |"
    )
    met = "met" if f["goal_met"] else "**not met**"
    scored = any(side["bleu"] for side in f["sides"].values())
    bleu_note = f"BLEU on {st['bleu_examples']} devset MRs." if scored else "no BLEU."
    notes = [
        f"Source: `bench/results/train_throughput.jsonl`, campaign `{chosen}`: worker lines "
        f"{span([n for n, _ in workers])}, summary line {n_sum}. Goal {met}. "
        f"Same tokens on both sides: {f['same_tokens']}.",
        f"Settings: {st['train_examples']} E2E examples, {st['steps']} steps x {st['batch_size']}, {st['threads']} "
        f"thread(s), {st['runs']} alternating rounds, fresh process each; {bleu_note} "
        f"Command: `python bench/{' '.join(rec['argv'])}`.",
    ]
    return "\n".join(out) + "\n\n" + "\n".join(notes) + "\n"


def methods(campaign: str | None) -> str:
    chosen, lines = pick(load("methods"), campaign)
    summary = [(n, r) for n, r in lines if r.get("kind") == "summary"]
    if not summary:
        return f"methods: campaign {chosen} has no summary line yet ({len(lines)} lines)\n"
    n_sum, rec = summary[-1]
    f = rec["figures"]
    out = [
        "| method | trainable | step s, median (min–max) | peak RSS MB | peft step s | peft RSS MB | time ratio "
        "| RSS ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for method, row in f["training"].items():
        ours, theirs = row["deltatune"], row.get("peft")
        if "error" in ours:
            out.append(f"| {method} | {ours['error']} | | | | | | |")
            continue
        peft_cells = (
            [fmt_spread(theirs["step_time_median_s"], 2), f"{theirs['peak_rss_mb']['median']:.0f}"]
            if theirs and "error" not in theirs
            else ["–", "–"]
        )
        ratios = (
            [f"{row['step_time_ratio']:.2f}", f"{row['peak_rss_ratio']:.2f}"] if "step_time_ratio" in row else ["", ""]
        )
        out.append(
            f"| {method} | {ours['trainable_params']:,} ({ours['trainable_pct']:g}%) | "
            f"{fmt_spread(ours['step_time_median_s'], 2)} | {ours['peak_rss_mb']['median']:.0f} | "
            + " | ".join(peft_cells + ratios)
            + " |"
        )
    workers = [n for n, r in lines if r.get("kind") == "train"]
    notes = [
        f"Source: `bench/results/methods.jsonl`, campaign `{chosen}`: run lines {span(workers)}, summary line {n_sum}. "
        f"Rounds: {rec['settings']['rounds']}. Command: `python bench/{' '.join(rec['argv'])}`.",
        "Contention: " + contention_note([r for _, r in lines if r.get("kind") == "train"]) + ".",
    ]
    if f.get("latency_batch1"):
        notes.append(
            "Batch-1 latency, ms/token: "
            + ", ".join(f"{k} {v.get('ms_per_token', '–')}" for k, v in f["latency_batch1"].items())
        )
    return "\n".join(out) + "\n\n" + "\n".join(notes) + "\n"


def lora_train_step(campaign: str | None) -> str:
    chosen, lines = pick(load("lora_train_step"), campaign)
    summary = [(n, r) for n, r in lines if r.get("kind") == "summary"]
    if not summary:
        return f"lora_train_step: campaign {chosen} has no summary line yet ({len(lines)} lines)\n"
    n_sum, rec = summary[-1]
    f = rec["figures"]
    names = {
        "deltatune": "deltatune (its trainer's step)",
        "peft": "peft (`model(..., labels=...)`)",
        "full": "full FT",
        "gemms": "deltatune's step GEMMs alone (the limit)",
    }
    out = ["| | step s, median (min–max) | CPU s per step (median) | peak RSS MB (median) |", "|---|---|---|---|"]
    for worker, w in f["workers"].items():
        out.append(
            f"| {names.get(worker, worker)} | {fmt_spread(w['step_time_median_s'], 2)} | "
            f"{w['step_cpu_time_s']['median']:.2f} | {w['peak_rss_mb']['median']:.0f} |"
        )
    goal, met = f["goal"], f["goal_met"]
    out.append(
        f"| ratio of medians (goal ≤ {goal['step_time_ratio<=']} / ≤ {goal['peak_rss_ratio<=']}) | "
        f"**{f['step_time_ratio_of_medians']:.2f}** ({'met' if met['step_time'] else 'not met'}) | "
        f"{f['step_cpu_time_ratio_of_medians']:.2f} | **{f['peak_rss_ratio_of_medians']:.2f}** "
        f"({'met' if met['peak_rss'] else 'not met'}) |"
    )
    if f.get("limit_ratio_of_medians") is not None:
        out.append(
            f"| deltatune's step / its GEMMs alone (goal ≤ {goal['limit_ratio<=']}) | "
            f"**{f['limit_ratio_of_medians']:.3f}** ({'met' if met['limit'] else 'not met'}) | | |"
        )
    workers = [n for n, r in lines if r.get("kind") == "worker"]
    notes = [
        f"Source: `bench/results/lora_train_step.jsonl`, campaign `{chosen}`: run lines {span(workers)}, summary line "
        f"{n_sum}. Command: `python bench/{' '.join(rec['argv'])}`. Max loss difference between the libraries: "
        f"{f['max_loss_diff']:.1e}.",
        "Contention: " + contention_note([r for _, r in lines if r.get("kind") == "worker"]) + ".",
    ]
    st = f.get("settings") or {}
    notes.append(
        f"Settings: batch {st.get('batch')}×{st.get('seq')}, {st.get('threads')} thread(s), compile "
        f"{'on' if st.get('compile') else 'off'}, gradient checkpointing "
        f"{'on' if st.get('gradient_checkpointing') else 'off'}."
    )
    return "\n".join(out) + "\n\n" + "\n".join(notes) + "\n"


def lora_inference(campaign: str | None, last: int = 3) -> str:
    """The median over the latest ``last`` invocations (one raw line each) of every configuration's ms/token."""
    lines = [(n, r) for n, r in load("lora_inference") if r.get("kind") == "summary"][-last:]
    if not lines:
        return "lora_inference: no results\n"
    figs = [r["figures"] for _, r in lines]
    out = ["| configuration | ms/token, median (min–max) |", "|---|---|"]
    for config in figs[0]["ms_per_token"]:
        values = [f["ms_per_token"][config] for f in figs]
        out.append(f"| {config} | {statistics.median(values):.1f} ({min(values):.1f}–{max(values):.1f}) |")
    ratio = [f["merged_over_base"] for f in figs]
    versus = [f["unmerged_over_peft_unmerged"] for f in figs]
    checks = all(f["merged_tokens_equal_unmerged"] and f["peft_tokens_equal_deltatune"] for f in figs)
    notes = [
        f"Source: `bench/results/lora_inference.jsonl`, lines {span([n for n, _ in lines])} ({len(lines)} "
        f"invocations). Command: `python bench/{' '.join(lines[-1][1]['argv'])}`.",
        f"Merged / base, per invocation: {', '.join(f'{v:.2f}' for v in ratio)}; deltatune unmerged / peft unmerged: "
        f"{', '.join(f'{v:.2f}' for v in versus)}; merged tokens = unmerged and peft tokens = deltatune's in every "
        f"invocation: {checks}.",
        "Contention: " + contention_note([r for _, r in lines]) + ".",
    ]
    return "\n".join(out) + "\n\n" + "\n".join(notes) + "\n"


def _dora_summary(part: str, campaign: str | None) -> tuple[int, dict] | None:
    lines = [(n, r) for n, r in load("dora") if r.get("kind") == "summary" and r["figures"]["part"] == part]
    if campaign:
        lines = [(n, r) for n, r in lines if r.get("campaign") == campaign]
    return lines[-1] if lines else None


def _verdict(ratio: float, goal: str, met: bool) -> str:
    return f"{ratio:.2f} ({goal.replace('<=', '≤')}: {'met' if met else '**NOT MET**'})"


def dora(campaign: str | None) -> str:
    """DoRA's training step and unmerged forward against LoRA and peft's DoRA, and PiSSA's init time."""
    labels = {"train": "training step, 4 × 128 tokens, s", "infer": "unmerged forward, 1 × 128 tokens, s"}
    out = ["| figure | deltatune LoRA | deltatune DoRA | peft DoRA | DoRA / LoRA (goal) |", "|---|---|---|---|---|"]
    notes = []
    for part, label in labels.items():
        found = _dora_summary(part, campaign)
        if not found:
            continue
        n, rec = found
        w = rec["figures"]["workers"]
        cells = [fmt_spread({k[:-2]: v for k, v in w[s].items() if k.endswith("_s")}, 2) for s in ("lora", "dora")]
        cells.append(fmt_spread({k[:-2]: v for k, v in w["peft_dora"].items() if k.endswith("_s")}, 2))
        verdict = _verdict(rec["figures"]["dora/lora"], rec["figures"]["goal"], rec["figures"]["goal_met"])
        out.append(f"| {label} | {' | '.join(cells)} | {verdict} |")
        notes.append(f"{part}: campaign `{rec['campaign']}`, summary line {n}")
    found = _dora_summary("pissa", campaign)
    if found:
        n, rec = found
        w = rec["figures"]["workers"]
        spread = {s: fmt_spread({k[:-2]: v for k, v in w[s].items() if k.endswith("_s")}, 2) for s in w}
        out += [
            "",
            "| figure | deltatune | peft | goal |",
            "|---|---|---|---|",
            f"| PiSSA init, all linear layers, r=16, `pissa_niter_4`, s | {spread['pissa']} | {spread['peft_pissa']} "
            f"| {rec['figures']['goal'].replace('<=', '≤')}: {'met' if rec['figures']['goal_met'] else '**NOT MET**'} "
            f"(median {w['pissa']['median_s']:.2f}) |",
        ]
        if all("cpu" in w[s] for s in ("pissa", "peft_pissa")):  # the work alone, without the wait for a core
            cpu = {s: fmt_spread({k[:-2]: v for k, v in w[s]["cpu"].items()}, 2) for s in ("pissa", "peft_pissa")}
            cores = [c for s in w for c in w[s]["other_procs_cores"]]
            out.append(f"| the same, process CPU time, s (other processes held {min(cores):.2f}–{max(cores):.2f} of "
                       f"the cores meanwhile) | {cpu['pissa']} | {cpu['peft_pissa']} | – |")  # fmt: skip
        notes.append(f"pissa: campaign `{rec['campaign']}`, summary line {n}")
    return "\n".join(out) + "\n\nSource: `bench/results/dora.jsonl`; " + "; ".join(notes) + ".\n"


def simple(bench: str, campaign: str | None) -> str:
    """Benches that append one summary line per invocation: the median over the latest invocations."""
    lines = [(n, r) for n, r in load(bench) if r.get("kind") == "summary"]
    if not lines:
        return f"{bench}: no results\n"
    return "\n".join(f"line {n} ({r['date']}): {json.dumps(r['figures'])[:400]}" for n, r in lines) + "\n"


def demo_lines(campaign: str | None) -> list[tuple[int, dict[str, Any]]]:
    """The README main job's runs at the two commits ``campaign`` names as ``OLD..NEW`` (short hashes)."""
    old, new = (campaign or "..").split("..")
    return [(n, r) for n, r in load("demo") if old and new and r["git"]["commit"].startswith((old, new))]


def demo(campaign: str | None) -> str:
    """``deltatune train`` with no arguments at two commits (``OLD..NEW``): wall time, training time, scores."""
    lines = demo_lines(campaign)
    if not campaign or not lines:
        return "demo: name two commits, OLD..NEW, that have runs in bench/results/demo.jsonl\n"
    out = [
        "| commit | runs | whole command s, median (min–max) | training s, median (min–max) | loss after "
        "| exact match after | other procs' cores |",
        "|---|---|---|---|---|---|---|",
    ]
    medians = {}
    for prefix in campaign.split(".."):
        runs = [r for _, r in lines if r["git"]["commit"].startswith(prefix)]
        wall = [r["run"]["wall_s"] for r in runs]
        train = [r["figures"]["train_seconds"] for r in runs]
        after = [r["figures"]["after"] for r in runs]
        medians[prefix] = (statistics.median(wall), statistics.median(train))
        busy = ", ".join(f"{r['run']['other_procs_cores']:.2f}" for r in runs)
        losses = ", ".join(f"{a['loss']:.5f}" for a in after)
        exact = ", ".join(f"{a['exact_match']:.2f}" for a in after)
        out.append(
            f"| {prefix} | {len(runs)} | {statistics.median(wall):.0f} ({min(wall):.0f}–{max(wall):.0f}) | "
            f"{statistics.median(train):.0f} ({min(train):.0f}–{max(train):.0f}) | "
            f"{losses} | {exact} | {busy} |"
        )
    (old_wall, old_train), (new_wall, new_train) = medians.values()
    notes = [
        f"Speed-up, ratio of medians (old / new): whole command **{old_wall / new_wall:.2f}×**, training "
        f"**{old_train / new_train:.2f}×** (goal ≥ 1.3×: {'met' if old_wall / new_wall >= 1.3 else '**not met**'} on "
        "the whole command). Command: `python bench/demo.py` (the README's `deltatune train`), each run "
        "alternating with another commit's, fresh processes. "
        f"Source: `bench/results/demo.jsonl` lines {span([n for n, _ in lines])}."
    ]
    return "\n".join(out) + "\n\n" + "\n".join(notes) + "\n"


TABLES = ("glue", "train_throughput", "methods", "lora_train_step", "lora_inference", "dora")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("bench", nargs="*", default=list(TABLES))
    parser.add_argument("--campaign")
    args = parser.parse_args()
    for bench in args.bench:
        print(f"### {bench}\n")
        if bench in TABLES:
            print(globals()[bench](args.campaign))
        else:
            print(simple(bench, args.campaign))


if __name__ == "__main__":
    main()
