"""Print the claims table of docs/benchmarks.md (markdown) from ``bench/results/claims.jsonl``: what the seed says,
what we measured (mean ± std over seeds), whether it holds here, with the exact command. Never typed by hand.

For each claim the lines used are those run with the latest line's settings (the options that choose ranks, seeds,
k values or methods may differ between invocations: they add runs, they do not change them).
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import load, span

ADDING = {"seeds", "ranks", "frozen", "methods", "configs", "tasks", "select_tasks"}


def latest(lines: list[tuple[int, dict]], *claims: str) -> list[tuple[int, dict]]:
    """Lines of ``claims`` that share the settings of the newest one (options that only add runs aside)."""
    chosen = [(n, r) for n, r in lines if r.get("claim") in claims]
    if not chosen:
        return []
    key = _key(chosen[-1][1])
    return [(n, r) for n, r in chosen if _key(r) == key]


def _key(record: dict) -> str:
    return repr(sorted((k, v) for k, v in (record.get("settings") or {}).items() if k not in ADDING))


def ms(values: list[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def command(lines: list[tuple[int, dict]]) -> str:
    """Every distinct command line the rows come from (an invocation may add ranks or seeds to an earlier one)."""
    commands = dict.fromkeys("`python bench/" + " ".join(r["argv"]) + "`" for _, r in lines)
    return "; ".join(commands)


def source(lines: list[tuple[int, dict]]) -> str:
    return f"lines {span([n for n, _ in lines])}"


def claim_subspace(lines: list[tuple[int, dict]]) -> list[str] | None:
    pairs, seeds_lines = latest(lines, "subspace"), latest(lines, "subspace-seeds")
    if not pairs:
        return None
    types = sorted({k for _, r in pairs for k, v in r["figures"].items() if isinstance(v, dict)})
    parts, verdicts = [], []
    for kind in types:
        values = [r["figures"][kind]["phi_1_1"] for _, r in pairs]
        rand = [r["figures"][kind]["random_phi_1_1"] for _, r in pairs]
        top = [r["figures"][kind]["phi_mean_top8"] for _, r in pairs]
        rtop = [r["figures"][kind]["random_phi_mean_top8"] for _, r in pairs]
        verdicts.append(f"{kind}: " + ("yes" if statistics.fmean(values) > 0.5 else "**no**"))
        parts.append(f"{kind}: φ(1,1) {ms(values, 3)} (random {ms(rand, 3)}), mean φ i,j≤8 {ms(top, 3)} "
                     f"(random {ms(rtop, 3)})")  # fmt: skip
    if seeds_lines:
        for kind in types:
            values = [r["figures"][kind]["phi_1_1"] for _, r in seeds_lines if kind in r["figures"]]
            parts.append(f"{kind} r=8 seed vs seed: φ(1,1) {ms(values, 3)} ({len(values)} pairs)")
    seeds = sorted({r["figures"]["seed"] for _, r in pairs})
    return [
        "1. Subspace: top direction of A, r=8 vs r=64 (SmolLM2 LoRA q,v on E2E)",
        "φ(A_r8, A_r64, 1, 1) > 0.5: the top direction is shared, the others mostly noise (LoRA §7.2)",
        "; ".join(parts),
        str(len(seeds)),
        ", ".join(verdicts) + " (test: mean φ(1,1) over seeds and layers > 0.5)",
        command(pairs),
        source(pairs + seeds_lines),
    ]


def _by(lines: list[tuple[int, dict]], key: str, value) -> dict[Any, list[float]]:
    """``value`` of each run grouped by ``figures[key]``, one per seed: a rerun of a (key, seed) replaces the older."""
    newest: dict[tuple[Any, Any], dict] = {}
    for n, r in lines:
        newest[(r["figures"][key], r["figures"].get("seed", n))] = r["figures"]
    out: dict[Any, list[float]] = {}
    for (group, _), figures in newest.items():
        out.setdefault(group, []).append(value(figures))
    return out


def _rank_row(lines, title, says, metric, better_low: bool) -> list[str] | None:
    if not lines:
        return None
    by_r = _by(lines, "r", metric)
    ranks = sorted(by_r)
    means = {r: statistics.fmean(v) for r, v in by_r.items()}
    noise = max((statistics.stdev(v) for v in by_r.values() if len(v) > 1), default=0.0)
    best = min(means.values()) if better_low else max(means.values())
    low = [means[r] for r in ranks if r <= 4]
    if low and any(r > 4 for r in ranks):
        best_low = min(low) if better_low else max(low)
        holds = abs(best_low - best) <= noise if noise else best_low == best
        verdict = ("yes" if holds else "**no**") + " (test: best r ≤ 4 within the largest seed std of the best r)"
    else:
        verdict = "not measured (needs r ≤ 4 and r > 4)"
    seeds = min(len(v) for v in by_r.values())
    measured = ", ".join(f"r={r}: {ms(by_r[r], 3 if better_low else 1)}" for r in ranks)
    return [title, says, measured, str(seeds), verdict, command(lines), source(lines)]


def claim_rank(lines: list[tuple[int, dict]]) -> list[list[str]]:
    rows = [
        _rank_row(latest(lines, "rank-e2e"), "2a. Rank: E2E dev loss (SmolLM2 LoRA q,v)",
                  "r = 1–4 does about as well as larger r (LoRA §7.2, Table 6)",
                  lambda f: f["dev_loss"], True),
        _rank_row(latest(lines, "rank-sst2"), "2b. Rank: SST-2 accuracy % (MiniLM LoRA query,value)",
                  "r = 1–4 does about as well as larger r", lambda f: f["tasks"]["sst2"]["accuracy"], False),
    ]  # fmt: skip
    return [r for r in rows if r]


def claim_freeze(lines: list[tuple[int, dict]]) -> list[str] | None:
    runs = latest(lines, "freeze")
    if not runs:
        return None
    tasks = sorted({t for _, r in runs for t in r["figures"]["tasks"]})
    layers = runs[-1][1]["figures"]["layers"]
    parts, verdicts = [], []
    for task in tasks:
        acc = _by(runs, "method", lambda f, t=task: f["tasks"][t]["accuracy"])
        majority = runs[-1][1]["figures"]["tasks"][task]["majority"]
        full = statistics.fmean(acc.get("full", [majority]))
        gain = full - majority
        needed = None
        for k in range(layers, -1, -1):  # fewest trained layers first
            values = acc.get(f"freeze{k}")
            if values and gain > 0 and statistics.fmean(values) - majority >= 0.9 * gain:
                needed = layers - k
                break
        by_k = ", ".join(f"k={k}: {ms(acc[f'freeze{k}'])}" for k in range(layers + 1) if f"freeze{k}" in acc)
        parts.append(f"{task}: full {ms(acc.get('full', []))}, majority {majority:.1f}; {by_k}")
        if gain <= 0:
            verdicts.append(f"{task}: not testable (full FT does not beat the majority class)")
        elif needed is None:
            verdicts.append(f"{task}: **no** (no measured k reaches 90%)")
        else:
            quarter = math.ceil(layers / 4)  # a fourth of 6 layers, rounded up to whole layers: 2
            verdicts.append(
                f"{task}: {needed}/{layers} layers reach 90% — " + ("yes" if needed <= quarter else "**no**")
            )
    seeds = min(len(v) for v in _by(runs, "method", lambda f: 0).values())
    return [
        "3. Freezing the first k of 6 layers (MiniLM, partial fine-tuning)",
        "training the top quarter of the layers recovers 90% of full fine-tuning's gain (Lee et al. 2019)",
        "; ".join(parts),
        str(seeds),
        "; ".join(verdicts),
        command(runs),
        source(runs),
    ]


def claim_peft(lines: list[tuple[int, dict]]) -> list[str] | None:
    runs = latest(lines, "peft-vs-full")
    if not runs:
        return None
    tasks = sorted(runs[-1][1]["figures"]["tasks"])
    avg = _by(runs, "method", lambda f: statistics.fmean(f["tasks"][t]["accuracy"] for t in tasks))
    majority = statistics.fmean(runs[-1][1]["figures"]["tasks"][t]["majority"] for t in tasks)
    lrs = {r["figures"]["method"]: r["figures"]["lr"] for _, r in runs}
    pct = {r["figures"]["method"]: r["figures"]["trainable_pct"] for _, r in runs}
    per_task = {t: _by(runs, "method", lambda f, t=t: f["tasks"][t]["accuracy"]) for t in tasks}
    measured = "; ".join(
        f"{m} (lr {lrs[m]:g}, {pct[m]:g}% of the parameters) {ms(v)} ("
        + ", ".join(f"{t} {ms(per_task[t][m])}" for t in tasks)
        + ")"
        for m, v in avg.items()
    )
    full = statistics.fmean(avg["full"]) if "full" in avg else None
    verdicts = []
    for method, limit in (("bitfit", 1.0), ("adapter", 0.4)):
        if full is None or method not in avg:
            continue
        diff = statistics.fmean(avg[method]) - full
        verdicts.append(f"{method} {diff:+.2f} vs full: " + ("yes" if diff >= -limit else "**no**"))
    if full is not None and full <= majority:
        verdicts.append("full FT does not beat the majority class: not testable")
    return [
        f"4. BitFit / Houlsby vs full FT (MiniLM, avg acc % over {', '.join(tasks)})",
        "BitFit within ~1 point, Houlsby adapters within 0.4 points of full fine-tuning (GLUE)",
        f"{measured}; majority class {majority:.1f} ("
        + ", ".join(f"{t} {runs[-1][1]['figures']['tasks'][t]['majority']:.1f}" for t in tasks)
        + ")",
        str(min(len(v) for v in avg.values())),
        "; ".join(verdicts) or "not measured",
        command(runs),
        source(runs),
    ]


def newest_campaign(runs: list[tuple[int, dict]]) -> list[tuple[int, dict]]:
    """The lines of the newest campaign alone: rounds of different days do not mix."""
    campaign = runs[-1][1].get("campaign") if runs else None
    return [(n, r) for n, r in runs if r.get("campaign") == campaign]


def claim_latency(lines: list[tuple[int, dict]]) -> list[str] | None:
    runs = latest(lines, "latency")
    if not runs:
        return None
    runs = newest_campaign(runs)
    rounds: dict[int, dict[str, dict[str, float]]] = {}
    cpu: dict[str, list[float]] = {}
    for _, r in runs:
        rounds.setdefault(r["figures"]["round"], {})[r["figures"]["config"]] = r["figures"]["ms"]
        if "cpu_ms" in r["figures"]:
            cpu.setdefault(r["figures"]["config"], []).append(r["figures"]["cpu_ms"]["1"])
    full = [v for v in rounds.values() if {"base", "adapter", "lora_merged"} <= set(v)]
    sizes = sorted({int(b) for v in full for c in v.values() for b in c})
    parts = []
    for config in ("adapter", "lora", "lora_merged"):
        ratios = [f"bs {b}: {statistics.median(v[config][str(b)] / v['base'][str(b)] for v in full):.2f}"
                  for b in sizes if all(config in v for v in full)]  # fmt: skip
        parts.append(f"{config}/base " + ", ".join(ratios))
    adapter_bs1 = [v["adapter"]["1"] / v["base"]["1"] for v in full]
    merged_bs1 = [v["lora_merged"]["1"] / v["base"]["1"] for v in full]
    rounds_text = ", ".join(f"{a:.2f}/{m:.2f}" for a, m in zip(adapter_bs1, merged_bs1, strict=True))
    base_ms = ", ".join(f"bs {b}: {statistics.median(v['base'][str(b)] for v in full):.0f} ms" for b in sizes)
    contention = [r["run"]["other_procs_cores"] for _, r in runs if r.get("run")]
    cpu_text = (
        "; CPU time at bs 1 (median over rounds) adapter/base "
        f"{statistics.median(cpu['adapter']) / statistics.median(cpu['base']):.3f}, lora_merged/base "
        f"{statistics.median(cpu['lora_merged']) / statistics.median(cpu['base']):.3f}"
        if {"base", "adapter", "lora_merged"} <= set(cpu)
        else ""
    )
    if not full:
        verdict = "not measured"
    elif min(adapter_bs1) > max(merged_bs1):
        verdict = "yes"
    elif max(adapter_bs1) < min(merged_bs1):
        verdict = "**no**"
    else:
        verdict = "undecided: the rounds' ranges overlap"
    return [
        "5. Latency: adapters vs merged LoRA vs base (SmolLM2, seq 128, wall time of a forward: median of "
        f"{runs[-1][1]['settings']['reps']} per batch size in a process, {runs[-1][1]['settings']['threads']} threads)",
        "adapters add latency at batch 1; a merged LoRA adds none (LoRA Table 1)",
        f"median over rounds of wall time; base {base_ms}; "
        + "; ".join(parts)
        + f"; bs 1 per round, adapter/base vs merged/base: {rounds_text}{cpu_text}; other processes used "
        f"{min(contention):.2f}–{max(contention):.2f} cores (of 2)",
        f"{len(full)} rounds",
        verdict + " (test: every round's adapter/base above every round's merged/base at bs 1)",
        command(runs),
        source(runs),
    ]


def slower_p(wins: int, n: int) -> float:
    """One-sided sign test: the chance of ``wins`` or more of ``n`` paired forwards slower by luck alone."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n


def claim_latency_interleaved(lines: list[tuple[int, dict]]) -> list[str] | None:
    runs = newest_campaign(latest(lines, "latency-interleaved"))
    if not runs:
        return None
    by_bs = {r["figures"]["batch_size"]: r["figures"]["ms"] for _, r in runs}
    parts, tests = [], {}
    for config in [c for c in ("adapter", "lora", "lora_merged") if c in by_bs[min(by_bs)]]:
        ratios = []
        for bs, ms_ in sorted(by_bs.items()):
            per_rep = [c / b for c, b in zip(ms_[config], ms_["base"], strict=True)]
            ratios.append(f"bs {bs}: {statistics.median(per_rep):.3f} ({min(per_rep):.2f}–{max(per_rep):.2f})")
        parts.append(f"{config}/base " + ", ".join(ratios))
        one = by_bs[min(by_bs)]
        wins = sum(c > b for c, b in zip(one[config], one["base"], strict=True))
        tests[config] = (wins, len(one["base"]), slower_p(wins, len(one["base"])))
    text = "; ".join(f"{c} slower than base in {w}/{n} pairs (p = {pv:.3f})" for c, (w, n, pv) in tests.items())
    if not {"adapter", "lora_merged"} <= set(tests):
        return None  # a campaign without the two configurations the claim compares
    holds = tests["adapter"][2] < 0.05 and tests["lora_merged"][2] >= 0.05
    base_ms = ", ".join(f"bs {bs}: {statistics.median(m['base']):.0f} ms" for bs, m in sorted(by_bs.items()))
    return [
        "5b. Latency, one process: the configurations' forwards alternate (SmolLM2, seq 128, "
        f"{runs[-1][1]['settings']['threads']} threads)",
        "adapters add latency at batch 1; a merged LoRA adds none (LoRA Table 1)",
        "median (min–max) over repetitions (order rotated each time) of a forward's time / the same "
        f"repetition's base forward; base {base_ms}; " + "; ".join(parts),
        f"{tests['adapter'][1]} repetitions at bs 1",
        ("yes" if holds else "**no**") + f" at bs 1: {text} (test: sign test, adapter p < 0.05, merged p ≥ 0.05)",
        command(runs),
        source(runs),
    ]


# --- LoRA family (issue 27): one row per paper claim, SST-2 and E2E side by side ----------------------------------
FAMILY_TASKS = {"sst2": ("SST-2", "acc %", False), "e2e": ("E2E", "dev loss", True)}  # (name, metric, lower better)


def _family_runs(chosen: list[tuple[int, dict]]) -> dict[str, dict[str, dict[int, dict]]]:
    """task -> method -> seed -> figures (the newest run of each)."""
    out: dict[str, dict[str, dict[int, dict]]] = {}
    for _, r in chosen:
        f = r["figures"]
        out.setdefault(f["task"], {}).setdefault(f["method"], {})[f["seed"]] = f
    return out


def _score(task: str, figures: dict) -> float:
    return figures["accuracy"]["accuracy"] if task == "sst2" else figures["dev_loss"]


def _early(_task: str, figures: dict) -> float:
    """Mean training loss over the first half of the steps: lower = converged faster (area under the curve)."""
    losses = figures["losses"]
    return statistics.fmean(losses[: max(1, len(losses) // 2)])


def _compare(runs: dict, a: str, b: str, value, low: bool, mode: str, task: str) -> tuple[str, str]:
    """(measured difference a − b, verdict) over the seeds both ran. ``mode``: ``better`` (the claim holds if a is
    the better one in every seed), ``worse`` (a worse in every seed) or ``match`` (a's mean no worse than b's by more
    than the larger of their seed stds)."""
    seeds = sorted(set(runs.get(a, {})) & set(runs.get(b, {})))
    if not seeds:
        return "–", "not measured"
    diffs = [value(task, runs[a][s]) - value(task, runs[b][s]) for s in seeds]
    better = sum((d < 0) if low else (d > 0) for d in diffs)
    mean = statistics.fmean(diffs)
    text = f"{mean:+.4f} (better in {better}/{len(seeds)} seeds)"
    if mode == "match":
        spread = max(statistics.stdev(v) if len(v) > 1 else 0.0 for v in (
            [value(task, runs[m][s]) for s in seeds] for m in (a, b)))  # fmt: skip
        holds = (mean <= spread) if low else (mean >= -spread)
        basis = f"mean difference vs the larger seed std {spread:.4f}" if len(seeds) > 1 else "1 seed: no spread"
        return text, ("yes" if holds else "**no**") + f" ({basis})"
    wins = better if mode == "better" else len(seeds) - better
    return text, "yes" if wins == len(seeds) else ("**no**" if wins == 0 else "mixed")


def _family_scores(runs: dict, methods: tuple[str, ...]) -> str:
    parts = []
    for task, (name, metric, low) in FAMILY_TASKS.items():
        cells = [f"{m} {ms([_score(task, f) for f in runs[task][m].values()], 3 if low else 1)}"
                 for m in methods if m in runs.get(task, {})]  # fmt: skip
        if cells:
            majority = next(iter(runs[task][methods[0]].values()))["accuracy"]["majority"] if task == "sst2" else None
            parts.append(
                f"{name} {metric}: " + ", ".join(cells) + (f" (majority class {majority})" if majority else "")
            )
    return "; ".join(parts)


def _params(runs: dict, methods: tuple[str, ...]) -> str:
    cells = [f"{FAMILY_TASKS[t][0]} " + " vs ".join(
        f"{m} {next(iter(runs[t][m].values()))['trainable_params']:,}" for m in methods if m in runs[t])
        for t in FAMILY_TASKS if t in runs]  # fmt: skip
    return "trainable params (with the classifier head on SST-2): " + "; ".join(cells)


def _family_row(runs, chosen, title: str, says: str, pair: tuple[str, str], early: bool, mode: str) -> list[str]:
    measured, verdicts = [_family_scores(runs, (pair[1], pair[0]))], []
    if mode != "better" or not early:
        measured.append(_params(runs, (pair[1], pair[0])))
    for task, (name, metric, low) in FAMILY_TASKS.items():
        value, what = (_early, "early training loss") if early else (_score, metric)
        diff, verdict = _compare(runs.get(task, {}), *pair, value, low or early, mode, task)
        measured.append(f"{name} {what} {pair[0]} − {pair[1]}: {diff}")
        verdicts.append(f"{name}: {verdict}")
    if early:
        measured.append("early training loss = mean training loss over the first half of the steps")
    seeds = ", ".join(
        f"{FAMILY_TASKS[t][0]} {min(len(v) for v in runs[t].values())}" for t in FAMILY_TASKS if t in runs
    )
    return [title, says, "; ".join(measured), seeds, "; ".join(verdicts), command(chosen), source(chosen)]


def _family_latest(lines: list[tuple[int, dict]], claim: str) -> list[tuple[int, dict]]:
    """Like :func:`latest`, also ignoring where the runs' folders were and the lr-selection options (absent from
    the first campaign's lines), which do not change a same-lr run."""
    ignore = ADDING | {"work_dir", "select_lrs", "select_seed"}
    key = lambda r: repr(sorted((k, v) for k, v in (r.get("settings") or {}).items() if k not in ignore))  # noqa: E731
    chosen = [(n, r) for n, r in lines if r.get("claim") == claim]
    return [(n, r) for n, r in chosen if key(r) == key(chosen[-1][1])] if chosen else []


def claim_family_tuned(lines: list[tuple[int, dict]]) -> list[str] | None:
    chosen = latest(lines, "lora-family-tuned")
    if not chosen:
        return None
    runs, st = _family_runs(chosen), chosen[-1][1]["settings"]
    sst2 = runs["sst2"]
    lrs = {m: next(iter(v.values()))["lr"] for m, v in sst2.items()}
    measured = [f"{m} lr {lrs[m]:g}: {ms([f['accuracy']['accuracy'] for f in v.values()])} "
                f"({next(iter(v.values()))['trainable_params']:,} params)" for m, v in sst2.items()]  # fmt: skip
    verdicts = []
    for method, mode, what in (("ia3", "match", "(IA)³ as good as LoRA"), ("lokr", "match", "LoKr as good as LoRA"),
                               ("loraplus", "better", "LoRA+ more accurate than LoRA")):  # fmt: skip
        diff, verdict = _compare(sst2, method, "lora", _score, False, mode, "sst2")
        measured.append(f"{method} − lora: {diff}")
        verdicts.append(f"{what}: {verdict}")
    select = latest(lines, "lora-family-select")
    at_lr = {(r["figures"]["method"], r["figures"]["lr"]): r["figures"]["accuracy"]["accuracy"] for _, r in select}
    same = [f"{lr:g}: {at_lr[('loraplus', lr)]:.1f} vs {at_lr[('lora', lr)]:.1f}" for lr in st["select_lrs"]
            if ("loraplus", lr) in at_lr and ("lora", lr) in at_lr]  # fmt: skip
    if same:
        measured.append("LoRA+ vs LoRA at the same lr (select split, seed 0) " + ", ".join(same))
    seeds, grid = min(len(v) for v in sst2.values()), ", ".join(f"{x:g}" for x in st["select_lrs"])
    return [
        f"6f. SST-2, each method at its own lr (chosen on the select split among {grid}; MiniLM, r = 8, "
        f"{st['examples']} examples × {st['epochs']} epochs)",
        "6d and 6e's claims with each method at its own lr ((IA)³ and LoKr train few parameters, which usually want "
        "a larger lr); LoRA+ vs LoRA, each at its best lr",
        "; ".join(measured), str(seeds), "; ".join(verdicts), command(chosen), source(sorted(select + chosen)),
    ]  # fmt: skip


def claim_family(lines: list[tuple[int, dict]]) -> list[list[str]]:
    chosen = _family_latest(lines, "lora-family")
    if not chosen:
        return []
    runs, st = _family_runs(chosen), chosen[-1][1]["settings"]
    setup = (
        f"SST-2: MiniLM query,value, lr {st['lr']:g}, {st['examples']} examples × {st['epochs']} epochs; E2E: "
        f"SmolLM2 q,v, {st['steps']} steps × {st['batch_size']}, lr {st['e2e_lr']:g}; r = 8, one lr for all"
    )
    rows = [
        _family_row(runs, chosen, f"6a. DoRA vs LoRA at equal rank ({setup})", "DoRA beats LoRA at the same rank "
                    "(DoRA, Liu et al. 2024)", ("dora", "lora"), False, "better"),
        _family_row(runs, chosen, "6b. PiSSA vs LoRA: convergence", "PiSSA's principal-component init converges "
                    "faster than LoRA's (PiSSA, Meng et al. 2024)", ("pissa", "lora"), True, "better"),
        _family_row(runs, chosen, "6c. LoRA+ vs LoRA at the same lr: convergence", "B at 16× A's lr trains faster "
                    "than LoRA at the same lr (LoRA+, Hayou et al. 2024)", ("loraplus", "lora"), True, "better"),
        _family_row(runs, chosen, "6d. (IA)³ vs LoRA", "(IA)³ trains ~10× fewer parameters than LoRA and scores as "
                    "well (T-Few, Liu et al. 2022; few-shot T0-3B)", ("ia3", "lora"), False, "match"),
        _family_row(runs, chosen, "6e. LoKr vs LoRA: parameter efficiency", "Kronecker factors match LoRA's "
                    "quality with fewer parameters (LyCORIS, Yeh et al. 2024)", ("lokr", "lora"), False, "match"),
        claim_family_tuned(lines),
    ]  # fmt: skip
    return [row for row in rows if row]


def table() -> str:
    lines = load("claims")
    if not lines:
        return "no results yet in bench/results/claims.jsonl"
    rows = [
        claim_subspace(lines),
        *claim_rank(lines),
        claim_freeze(lines),
        claim_peft(lines),
        claim_latency(lines),
        claim_latency_interleaved(lines),
        *claim_family(lines),
    ]
    out = [
        "| claim | what the seed says | measured here (mean ± std over seeds) | seeds | holds here? | command | "
        "claims.jsonl |",
        "|---|---|---|---|---|---|---|",
    ]
    out += ["| " + " | ".join(row) + " |" for row in rows if row]
    return "\n".join(out)


if __name__ == "__main__":
    print(table())
