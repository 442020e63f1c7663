"""The seeds' claims, measured here: one subcommand per claim, each run appending raw lines to
``bench/results/claims.jsonl`` as it ends (``python bench/claims_report.py`` prints the claims table).

1. ``e2e`` (claims 1 and 2, E2E half): SmolLM2 LoRA on q,v trained on E2E at ``--ranks`` x ``--seeds`` through
   ``deltatune.analysis.sweep`` (the library trainer); a ``rank-e2e`` line per run (dev loss), and for every seed
   whose r=8 and r=64 runs exist a ``subspace`` line: φ(A_r8, A_r64, i, j) and the random baseline, per module
   type; for every pair of seeds at r=8 a ``subspace-seeds`` line.
2. ``rank-sst2``: LoRA on MiniLM (query, value) at several ranks on SST-2: accuracy on the report split.
3. ``freeze``: partial fine-tuning with the first k of L blocks frozen (k = 0..L-1) and full fine-tuning on SST-2
   and RTE: the fraction of layers whose training recovers 90% of full fine-tuning's gain over the majority class.
4. ``peft-vs-full``: BitFit and Houlsby adapters vs full fine-tuning at a larger budget, each learning rate chosen
   on the select split carved from train (``bench/glue.py``'s splits, grid and training loop, imported).
5. ``latency``: forward latency at batch 1..16, sequence 128, of the base model, unmerged LoRA, merged LoRA and
   Houlsby adapters (the LoRA paper's Table 1 layout): each configuration in its own fresh process, ``--rounds``
   alternating rounds, median over rounds; or, with ``--interleaved``, all four in one process, their forwards
   alternating (the differences are smaller than the speed spread between processes on this machine).
6. ``lora-family``: LoRA, DoRA, PiSSA (``pissa_niter_4``), LoRA+ (ratio 16), (IA)³ and LoKr at r = 8 on SST-2
   (rank-sst2's budget and lr) and E2E (the e2e claim's budget and lr), every method at that one lr, per-step
   training losses kept (convergence); with ``--select-lrs`` (SST-2), each method at the lr its select-split run
   prefers instead (``lora-family-select`` / ``lora-family-tuned`` lines).

GLUE claims (2-4) reuse bench/glue.py: same report/select/pool splits, batch 16, AdamW with warm-up and linear
decay, 1 thread. Every subcommand takes ``--seeds``; ``--threads 1`` keeps timings meaningful on a shared machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import glue
from _common import RunMeter, append_result, emit, log, set_threads

BENCH = "claims"
ROOT = Path(__file__).resolve().parents[1]
E2E = glue.SHARED / "e2e"
MINILM_LAYERS = 6


def record(claim: str, figures: dict[str, Any], meter: RunMeter | None, args: argparse.Namespace, **extra: Any) -> None:
    append_result(BENCH, figures, meter, claim=claim, settings=_settings(args), **extra)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("func", "worker", "chosen_lr") and not callable(v)}


# --- claims 1 and 2 (E2E): subspace overlap and rank ------------------------------------------------------------
def e2e_config(args: argparse.Namespace):
    from deltatune.training.config import TrainConfig

    return TrainConfig(
        base="smollm2-135m", data=str(E2E / "trainset.csv"), eval_data=str(E2E / "devset.csv"),
        max_eval_examples=args.eval_examples, max_steps=args.steps, batch_size=args.batch_size,
        learning_rate=args.lr, max_length=128, eval_generate=False, threads=args.threads, log_every=10,
        save_every=10**6, method="lora", method_options={"target_modules": ["q_proj", "v_proj"], "lora_alpha": 8},
    )  # fmt: skip


def cmd_e2e(args: argparse.Namespace) -> None:
    from deltatune.analysis.sweep import sweep

    set_threads(args.threads)
    out = Path(args.work_dir) / "e2e"
    meter = RunMeter()

    def on_run(row: dict[str, Any], trained: bool) -> None:
        nonlocal meter
        if trained:
            figures = {k: row[k] for k in ("r", "seed", "steps", "trainable_params", "train_seconds")}
            figures |= {"dev_loss_before": row["before"].get("loss"), "dev_loss": row["after"].get("loss")}
            record("rank-e2e", figures, meter, args)
        meter = RunMeter()
        subspace_lines(out, row, args)

    sweep(e2e_config(args), out, args.ranks, args.seeds, on_run)


def subspace_lines(out: Path, row: dict[str, Any], args: argparse.Namespace) -> None:
    """Subspace lines that ``row``'s run completes: r=8 vs r=64 of its seed; r=8 of its seed vs earlier seeds."""
    seed, r = row["seed"], row["r"]
    adapter = lambda rank, s: out / f"r{rank}-seed{s}" / "adapter"  # noqa: E731
    pairs = []
    if r in (8, 64) and adapter(8, seed).is_dir() and adapter(64, seed).is_dir():
        pairs.append(("subspace", adapter(8, seed), adapter(64, seed), {"seed": seed}))
    if r == 8:
        for other in sorted(s for s in args.seeds if s < seed and adapter(8, s).is_dir()):
            pairs.append(("subspace-seeds", adapter(8, other), adapter(8, seed), {"seeds": [other, seed]}))
    for claim, a, b, ids in pairs:
        record(claim, {**ids, **subspace_figures(a, b)}, None, args, a=str(a), b=str(b))


def subspace_figures(a: Path, b: Path) -> dict[str, Any]:
    from deltatune.analysis import analyze_subspace

    result = analyze_subspace(a, b)
    figures = {}
    for kind, s in result["types"].items():
        top = [row[:8] for row in s["phi"][:8]]
        rand = [row[:8] for row in s["random_phi"][:8]]
        figures[kind] = {
            "phi_1_1": round(s["phi_1_1"], 4),
            "random_phi_1_1": round(s["random_phi_1_1"], 4),
            "phi_diag_top8": [round(s["phi"][i][i], 4) for i in range(min(8, len(s["phi"]), len(s["phi"][0])))],
            "phi_mean_top8": round(statistics.fmean(v for row in top for v in row), 4),
            "random_phi_mean_top8": round(statistics.fmean(v for row in rand for v in row), 4),
            "layers": s["layers"],
        }
    return figures


# --- claims 2-4 (GLUE, MiniLM): reuse bench/glue.py's splits and loop ----------------------------------------------
def glue_args(args: argparse.Namespace) -> argparse.Namespace:
    return argparse.Namespace(examples=args.examples, epochs=args.epochs, max_length=64, threads=args.threads,
                              eval_examples=200)  # fmt: skip


def glue_run(method: str, lr: float, seed: int, tasks: list[str], split: str, data: dict, args) -> dict[str, Any]:
    return glue.run_one(method, lr, seed, tasks, split, data, glue_args(args))


def glue_data(tasks: list[str]) -> dict[str, dict[str, list]]:
    return {t: glue.splits(t, 96, 200) for t in tasks}


def cmd_rank_sst2(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    data = glue_data(["sst2"])
    for seed, r in itertools.product(args.seeds, args.ranks):
        glue.CONFIGS[f"lora_r{r}"] = lambda dt, r=r: dt.LoraConfig(
            r=r, lora_alpha=16, target_modules=["query", "value"]
        )
        meter = RunMeter()
        figures = glue_run(f"lora_r{r}", args.lr, seed, ["sst2"], "report", data, args)
        record("rank-sst2", {"r": r, "seed": seed, "lr": args.lr, **figures}, meter, args)


def cmd_freeze(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    data = glue_data(args.tasks)
    for seed in args.seeds:
        for k in ["full", *args.frozen]:
            method = "full" if k == "full" else f"freeze{k}"
            if k != "full":
                glue.CONFIGS[method] = lambda dt, k=int(k): dt.PartialConfig(freeze_bottom_layers=k)
            meter = RunMeter()
            figures = glue_run(method, args.lr, seed, args.tasks, "report", data, args)
            frozen = 0 if k == "full" else int(k)
            record("freeze", {"method": method, "frozen": frozen, "layers": MINILM_LAYERS, "seed": seed,
                              "lr": args.lr, **figures}, meter, args)  # fmt: skip


def cmd_peft_vs_full(args: argparse.Namespace) -> None:
    set_threads(args.threads)
    data = glue_data(sorted({*args.tasks, *args.select_tasks}))
    for method in args.methods:
        scores = {}
        for lr in glue.GRID[method]:
            meter = RunMeter()
            figures = glue_run(method, lr, args.select_seed, args.select_tasks, "select", data, args)
            scores[lr] = glue.mean_accuracy(figures)
            record("peft-vs-full-select", {"method": method, "lr": lr, **figures}, meter, args)
        lr = max(scores, key=lambda v: scores[v])
        for seed in args.seeds:
            meter = RunMeter()
            figures = glue_run(method, lr, seed, args.tasks, "report", data, args)
            record("peft-vs-full", {"method": method, "lr": lr, "seed": seed, "select": scores, **figures}, meter, args)


# --- LoRA family (issue 27): LoRA vs DoRA vs PiSSA vs LoRA+ vs IA3 vs LoKr at the budgets above ----------------
FAMILY = ("lora", "dora", "pissa", "loraplus", "ia3", "lokr")
LORAPLUS_RATIO = 16.0  # the LoRA+ paper's ηB/ηA


def family_method(name: str, targets: list[str], alpha: int) -> tuple[str, dict[str, Any]]:
    """(deltatune method, its options) of a family member at rank 8 on ``targets``; IA3 takes peft's default
    targets (keys, values and the feed-forward output), it has no rank."""
    lora = {"r": 8, "lora_alpha": alpha, "target_modules": targets}
    return {
        "lora": ("lora", lora),
        "loraplus": ("lora", lora),
        "dora": ("lora", {**lora, "use_dora": True}),
        "pissa": ("lora", {**lora, "init_lora_weights": "pissa_niter_4"}),
        "ia3": ("ia3", {}),
        "lokr": ("lokr", {"r": 8, "alpha": alpha, "target_modules": targets}),
    }[name]


def family_train(model, batches: list[dict], lr: float, loraplus: bool) -> dict[str, Any]:
    """bench/glue.py's loop (AdamW, 6% warm-up then linear decay, clipping 1.0), with LoRA+'s optimizer when asked
    and every step's training loss kept (how fast each method converges)."""
    import deltatune as dt
    from deltatune.loss import LossModule

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if loraplus:
        optimizer = dt.create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=LORAPLUS_RATIO,
                                                 loraplus_weight_decay=0.01)  # fmt: skip
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    steps = len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / (0.06 * steps + 1)) * max(0.0, 1 - s / steps)
    )
    loss_module, losses = LossModule(model, "classification"), []
    start = time.perf_counter()
    for batch in batches:
        loss_sum, count = loss_module(batch)
        loss = loss_sum / count
        loss.backward()
        losses.append(round(loss.item(), 4))
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return {"train_s": round(time.perf_counter() - start, 1), "steps": steps, "losses": losses}


def family_sst2(method: str, seed: int, data: dict, args: argparse.Namespace, split: str = "report") -> dict[str, Any]:
    import deltatune as dt
    from deltatune import methods

    name, options = family_method(method, ["query", "value"], 16)
    torch.manual_seed(seed)
    base, tokenizer = dt.load_base("minilm-l6", num_labels=2)
    model = dt.wrap(base, methods.config_class_for_name(name)(**options))
    train_data = {"sst2": glue.train_subsample(data["sst2"]["pool"], args.examples, seed)}
    lr = getattr(args, "chosen_lr", args.lr)
    figures = family_train(model, glue.batches_for(train_data, tokenizer, glue_args(args), seed), lr,
                           method == "loraplus")  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    figures["trainable_params"] = trainable
    figures["accuracy"] = glue.accuracy_f1(model, tokenizer, data["sst2"][split], 64)
    return figures


def family_e2e(method: str, seed: int, args: argparse.Namespace) -> dict[str, Any] | None:
    import dataclasses

    from deltatune.analysis.sweep import sweep

    name, options = family_method(method, ["q_proj", "v_proj"], 8)
    cfg = dataclasses.replace(
        e2e_config(args), method=name, method_options=options, log_every=1, learning_rate=args.e2e_lr,
        loraplus_lr_ratio=LORAPLUS_RATIO if method == "loraplus" else None,
    )  # fmt: skip
    out = Path(args.work_dir) / "lora-family" / method
    if (out / f"seed{seed}" / "summary.json").is_file():
        return None  # recorded when it ran: a resumed campaign skips it
    row = sweep(cfg, out, None, [seed])["runs"][-1]
    metrics = [json.loads(x) for x in (out / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()]
    losses = [round(m["loss"], 4) for m in metrics if "loss" in m and "eval" not in m]  # the eval lines aside
    return {
        "steps": row["steps"], "trainable_params": row["trainable_params"], "train_s": row["train_seconds"],
        "dev_loss_before": row["before"].get("loss"), "dev_loss": row["after"].get("loss"), "losses": losses,
    }  # fmt: skip


def family_tuned(args: argparse.Namespace) -> None:
    """SST-2 with each method's own lr: every lr of ``--select-lrs`` on the select split (``--select-seed``), the
    best one then on the report split for every seed (bench/glue.py's protocol); methods in turn."""
    data = glue_data(["sst2"])
    for method in args.methods:
        scores = {}
        for lr in args.select_lrs:
            meter, args.chosen_lr = RunMeter(), lr
            figures = family_sst2(method, args.select_seed, data, args, "select")
            scores[lr] = figures["accuracy"]["accuracy"]
            record("lora-family-select", {"task": "sst2", "method": method, "lr": lr, **figures}, meter, args)
        args.chosen_lr = max(scores, key=lambda v: scores[v])  # ties: the first (smallest) lr
        for seed in args.seeds:
            meter = RunMeter()
            figures = family_sst2(method, seed, data, args)
            fields = {"task": "sst2", "method": method, "seed": seed, "lr": args.chosen_lr, "select": scores}
            record("lora-family-tuned", {**fields, **figures}, meter, args)
            log(f"[lora-family-tuned {method} lr {args.chosen_lr:g} seed {seed}] {figures['accuracy']}")


def cmd_lora_family(args: argparse.Namespace) -> None:
    """Every task in ``--tasks`` order, seed by seed, every method per seed: a campaign cut short stays complete
    per (task, seed). With ``--select-lrs``: :func:`family_tuned` instead."""
    set_threads(args.threads)
    if args.select_lrs:
        if args.tasks != ["sst2"]:
            raise SystemExit("--select-lrs chooses each method's lr on SST-2's select split: pass --tasks sst2")
        family_tuned(args)
        return
    data = glue_data(["sst2"]) if "sst2" in args.tasks else {}
    for task in args.tasks:
        for seed in args.seeds:
            for method in args.methods:
                meter = RunMeter()
                run = family_sst2 if task == "sst2" else lambda m, s, _, a: family_e2e(m, s, a)
                figures = run(method, seed, data, args)
                if figures is None:
                    continue
                record("lora-family", {"task": task, "method": method, "seed": seed, **figures}, meter, args)
                log(f"[lora-family {task} {method} seed {seed}] {json.dumps(figures)[:200]}")


# --- claim 5: latency -----------------------------------------------------------------------------------------------
LATENCY_CONFIGS = ("base", "lora", "lora_merged", "adapter")


def latency_model(config: str):
    import deltatune as dt

    base, _ = dt.load_base("smollm2-135m")
    if config == "base":
        return base
    if config == "adapter":
        return dt.wrap(base, dt.AdapterConfig(bottleneck_size=64))
    model = dt.wrap(base, dt.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, layer in model.delta_layers():
            layer.lora_B["default"].weight.copy_(
                torch.randn(layer.lora_B["default"].weight.shape, generator=gen) * 0.01
            )
    return model.merge_and_unload() if config == "lora_merged" else model


def latency_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One configuration in this fresh process: a warm-up forward, then each batch size's forward timed."""
    set_threads(args.threads)
    model = latency_model(args.worker).eval()
    gen = torch.Generator().manual_seed(0)
    ms, cpu_ms = {}, {}
    with torch.inference_mode():
        model(input_ids=torch.randint(3, 1000, (1, args.seq), generator=gen), logits_to_keep=1, use_cache=False)
        for bs in args.batch_sizes:
            ids = torch.randint(3, 1000, (bs, args.seq), generator=gen)
            times, cpu = [], []
            for _ in range(args.reps):
                start, cpu_start = time.perf_counter(), time.process_time()
                model(input_ids=ids, logits_to_keep=1, use_cache=False)
                times.append(time.perf_counter() - start)
                cpu.append(time.process_time() - cpu_start)
            ms[str(bs)] = round(1000 * statistics.median(times), 1)
            cpu_ms[str(bs)] = round(1000 * statistics.median(cpu), 1)
    # CPU time of the one thread barely moves when other processes hold the cores: the work each forward does.
    return {"config": args.worker, "ms": ms, "cpu_ms": cpu_ms}


def latency_interleaved(args: argparse.Namespace) -> None:
    """Every configuration in this one process, their forwards alternating within each repetition.

    Fresh processes running the same model differ by ~±10% here (the speed of the whole process, its CPU time
    moves with it), more than the few percent an adapter adds; adjacent forwards in one process share that
    state, so their ratio is what the configurations change. The order rotates each repetition. ``--reps``
    repetitions at batch 1, ``reps // bs`` (at least 3) at larger batches; one line per batch size with every
    forward's time.
    """
    set_threads(args.threads)
    models = {c: latency_model(c).eval() for c in args.configs}
    campaign = f"latency-interleaved-{time.strftime('%Y%m%dT%H%M%S')}"
    gen = torch.Generator().manual_seed(0)

    def forward(model, ids: torch.Tensor) -> float:
        start = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1, use_cache=False)
        return round(1000 * (time.perf_counter() - start), 1)

    with torch.inference_mode():
        for bs in args.batch_sizes:
            meter = RunMeter()
            ids = torch.randint(3, 1000, (bs, args.seq), generator=gen)
            for model in models.values():  # warm-up at this shape
                forward(model, ids)
            ms: dict[str, list[float]] = {c: [] for c in models}
            order = list(models)
            for rep in range(max(3, args.reps // bs)):
                for config in order[rep % len(order) :] + order[: rep % len(order)]:  # rotated: no fixed position
                    ms[config].append(forward(models[config], ids))
            record("latency-interleaved", {"batch_size": bs, "ms": ms}, meter, args, campaign=campaign)
            log(f"bs {bs}: " + ", ".join(f"{c} {statistics.median(v):.0f} ms" for c, v in ms.items()))


def cmd_latency(args: argparse.Namespace) -> None:
    if args.worker:
        emit(latency_worker(args))
        return
    if args.interleaved:
        latency_interleaved(args)
        return
    runs: dict[str, list[dict[str, float]]] = {c: [] for c in args.configs}
    campaign = f"latency-{time.strftime('%Y%m%dT%H%M%S')}"
    for round_ in range(args.rounds):
        for config in args.configs:  # alternating: a busy spell hits every configuration alike
            meter = RunMeter()
            cmd = [sys.executable, __file__, "latency", "--worker", config, "--threads", str(args.threads),
                   "--seq", str(args.seq), "--reps", str(args.reps),
                   "--batch-sizes", *map(str, args.batch_sizes)]  # fmt: skip
            done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
            figures = json.loads(done.stdout.strip().splitlines()[-1])
            runs[config].append(figures["ms"])
            record("latency", {**figures, "round": round_}, meter, args, campaign=campaign)
            log(f"round {round_} {config}: {figures['ms']}")
    medians = {c: {str(bs): statistics.median(r[str(bs)] for r in runs[c]) for bs in args.batch_sizes} for c in runs}
    record(
        "latency-summary", {"median_ms": medians, "rounds": args.rounds}, None, args, kind="summary", campaign=campaign
    )
    emit(medians)


# --- command line ---------------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    sub = p.add_subparsers(dest="claim", required=True)

    def add(name: str, func, seeds: list[int], help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_)
        sp.set_defaults(func=func)
        sp.add_argument("--seeds", type=int, nargs="+", default=seeds, help="seeds (default: %(default)s)")
        sp.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
        return sp

    e = add("e2e", cmd_e2e, [0, 1, 2], "claims 1-2: SmolLM2 LoRA q,v on E2E at several ranks; subspace overlap")
    e.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="LoRA ranks (default: %(default)s)")
    e.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=4, help="examples per step (default: %(default)s)")
    e.add_argument("--lr", type=float, default=2e-3, help="learning rate (default: %(default)s)")
    e.add_argument("--eval-examples", type=int, default=64, help="devset examples for the dev loss")
    e.add_argument("--work-dir", default=str(ROOT / "runs" / "claims"), help="where the runs' folders go")
    glue_claims = (
        ("rank-sst2", cmd_rank_sst2, "claim 2: LoRA rank on SST-2 (MiniLM)"),
        ("freeze", cmd_freeze, "claim 3: freezing the first k layers (MiniLM)"),
        ("peft-vs-full", cmd_peft_vs_full, "claim 4: BitFit/Houlsby vs full fine-tuning"),
    )
    for name, func, help_ in glue_claims:
        g = add(name, func, [0, 1, 2], help_)
        g.add_argument("--examples", type=int, default=400, help="training examples per task (default: %(default)s)")
        g.add_argument("--epochs", type=int, default=2, help="passes over them (default: %(default)s)")
        if name == "rank-sst2":
            g.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 64], help="LoRA ranks")
            g.add_argument("--lr", type=float, default=4e-3, help="lr (bench/glue.py's select-split choice for LoRA)")
        if name == "freeze":
            g.add_argument("--tasks", nargs="+", default=["sst2", "rte"], help="GLUE tasks")
            g.add_argument("--frozen", nargs="+", default=[str(k) for k in range(MINILM_LAYERS)], help="k values")
            g.add_argument("--lr", type=float, default=2e-4, help="lr (bench/glue.py's select-split choice for full)")
        if name == "peft-vs-full":
            g.add_argument("--methods", nargs="+", default=["full", "bitfit", "adapter"], choices=list(glue.GRID))
            g.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "sst2"], help="reported tasks")
            g.add_argument("--select-tasks", nargs="+", default=["rte", "mrpc"], help="tasks whose select split "
                           "chooses the learning rate")  # fmt: skip
            g.add_argument("--select-seed", type=int, default=0, help="seed of the lr-selection runs")
    fam = add("lora-family", cmd_lora_family, [0, 1, 2], "LoRA vs DoRA/PiSSA/LoRA+/IA3/LoKr on SST-2 and E2E")
    fam.add_argument("--methods", nargs="+", default=list(FAMILY), choices=FAMILY)
    fam.add_argument("--tasks", nargs="+", default=["sst2", "e2e"], choices=["sst2", "e2e"])
    fam.add_argument("--examples", type=int, default=400, help="SST-2 training examples (rank-sst2's budget)")
    fam.add_argument("--epochs", type=int, default=2, help="SST-2 passes (rank-sst2's budget)")
    fam.add_argument("--lr", type=float, default=4e-3, help="SST-2 lr, every method (rank-sst2's LoRA lr)")
    fam.add_argument(
        "--select-lrs",
        type=float,
        nargs="+",
        help="SST-2: choose each method's lr among these on "
        "the select split, then run the seeds at it (claims lora-family-select / lora-family-tuned)",
    )
    fam.add_argument("--select-seed", type=int, default=0, help="seed of the lr-selection runs")
    fam.add_argument("--e2e-lr", type=float, default=2e-3, help="E2E lr, every method (the e2e claim's)")
    fam.add_argument("--steps", type=int, default=40, help="E2E optimizer steps (the e2e claim's)")
    fam.add_argument("--batch-size", type=int, default=4, help="E2E examples per step")
    fam.add_argument("--eval-examples", type=int, default=64, help="E2E devset examples for the dev loss")
    fam.add_argument("--work-dir", default=str(ROOT / "runs" / "claims"), help="where the E2E runs' folders go")
    lat = add("latency", cmd_latency, [0], "claim 5: forward latency of adapters vs merged LoRA vs base")
    lat.add_argument("--worker", choices=LATENCY_CONFIGS, help=argparse.SUPPRESS)
    lat.add_argument("--configs", nargs="+", default=list(LATENCY_CONFIGS), choices=LATENCY_CONFIGS)
    lat.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="batch sizes")
    lat.add_argument("--seq", type=int, default=128, help="sequence length (default: %(default)s)")
    lat.add_argument("--rounds", type=int, default=3, help="alternating rounds, fresh process each (default: 3)")
    lat.add_argument("--reps", type=int, default=1, help="timed forwards per batch size in a process (median)")
    lat.add_argument("--interleaved", action="store_true", help="all configurations in one process, forwards "
                     "alternating per repetition (--reps at batch 1, reps // bs at larger batches)")  # fmt: skip
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    if args.claim == "latency" and args.interleaved and "base" not in args.configs:
        p.error("--interleaved compares every configuration with the base forward of the same repetition: "
                "keep 'base' in --configs")  # fmt: skip
    args.func(args)


if __name__ == "__main__":
    main()
