"""The weight delta an adapter makes, ΔW = W' − W, per module: its size, singular spectrum, effective rank,
and the LoRA paper's amplification factor (section 7.3).

The amplification factor ‖ΔW‖_F / ‖Uᵀ W V‖_F (U, V: ΔW's top-r left/right singular vectors) says how strongly
ΔW amplifies directions that W itself barely uses: large when ΔW points where W is weak. The same ratio for
random orthonormal U, V is the baseline. ΔW comes from the library: a LoRA layer's own ``delta_weight`` (exact,
no float cancellation), else the difference of the weights before and after ``merge_and_unload`` (BitFit,
partial fine-tuning), else the difference between a merged model folder and its base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from deltatune.analysis.common import base_label, by_type, layer_of, module_type, text_table
from deltatune.config import CONFIG_NAME, ConfigError, DeltaConfig

HEADS = ("classifier", "score")  # a base model's fresh classification head has no meaningful delta


def delta_stats(delta: torch.Tensor, weight: torch.Tensor, r: int, generator: torch.Generator) -> dict[str, Any]:
    """Norms, spectrum, effective ranks and amplification of one 2-D delta against its base weight."""
    d, w = delta.double(), weight.double()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = max(1, min(r, s.numel()))
    norm = torch.linalg.matrix_norm(d).item()
    along_delta = torch.linalg.matrix_norm(u[:, :r].T @ w @ vh[:r].T).item()
    q1 = torch.linalg.qr(torch.randn(w.shape[0], r, generator=generator, dtype=w.dtype)).Q
    q2 = torch.linalg.qr(torch.randn(w.shape[1], r, generator=generator, dtype=w.dtype)).Q
    along_random = torch.linalg.matrix_norm(q1.T @ w @ q2).item()
    w_top = torch.linalg.svdvals(w)[:r].norm().item()
    p = s / s.sum() if s.sum() > 0 else s
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    tol = s.max().item() * max(d.shape) * torch.finfo(delta.dtype).eps if s.numel() else 0.0
    return {
        "shape": list(delta.shape),
        "delta_norm": norm,
        "weight_norm": torch.linalg.matrix_norm(w).item(),
        "r": r,
        "singular_values": s.tolist(),
        "rank": int((s > tol).sum().item()),
        "effective_rank": float(torch.tensor(entropy).exp()),
        "proj_norm_delta_dirs": along_delta,
        "proj_norm_weight_dirs": w_top,
        "proj_norm_random_dirs": along_random,
        "amplification": norm / along_delta if along_delta > 0 else float("inf"),
        "random_amplification": norm / along_random if along_random > 0 else float("inf"),
    }


def analyze_delta(
    adapter: str | Path, base: str | None = None, rank: int | None = None, seed: int = 0, spectrum: int = 64
) -> dict[str, Any]:
    """ΔW of every module an adapter (or a merged model folder) changes, against ``base``.

    ``rank``: how many top directions the amplification factor uses (default: the LoRA r, else 8).
    ``spectrum``: how many singular values each module keeps in the result.
    """
    if (rank is not None and rank < 1) or spectrum < 0:
        raise ConfigError(f"--rank must be >= 1 and --spectrum >= 0, got {rank} and {spectrum}")
    adapter = Path(adapter)
    merged_model = not (adapter / CONFIG_NAME).is_file() and (adapter / "config.json").is_file()
    config = None if merged_model else _adapter_config(adapter)
    base = _resolve_base(adapter, base, config)
    before, after, exact = _weights(adapter, base, config, merged_model)
    r = rank or _rank_of(config) or 8
    generator = torch.Generator().manual_seed(seed)
    modules: dict[str, dict[str, Any]] = {}
    for name, new in after.items():
        module, _, kind = name.rpartition(".")
        if module.rsplit(".", 1)[-1] in HEADS or not new.is_floating_point():
            continue
        old = before.get(name)
        delta = exact[name] if name in exact else new.float() - (old.float() if old is not None else 0.0)
        if not delta.any():
            continue
        entry = modules.setdefault(module, {"layer": layer_of(module), "type": module_type(module)})
        if delta.dim() == 2 and old is not None:
            stats = delta_stats(delta, old.float(), r, generator)
            stats["singular_values"] = stats["singular_values"][:spectrum]
            entry[kind] = stats
        else:
            entry[kind] = {
                "shape": list(delta.shape),
                "delta_norm": delta.norm().item(),
                "weight_norm": old.float().norm().item() if old is not None else 0.0,
            }
    if not modules:
        raise ConfigError(f"{adapter} changes no weight of {base}: an untrained adapter, or the base model itself")
    return {
        "adapter": str(adapter),
        "base": base,
        "method": "merged model" if merged_model else config.peft_type,
        "r": r,
        "seed": seed,
        "modules": modules,
        "types": _summary(modules),
    }


def _adapter_config(adapter: Path) -> DeltaConfig:
    from deltatune import methods
    from deltatune.checkpoint.adapter import check_adapter_dir

    config = check_adapter_dir(adapter, "ADAPTER")
    method = methods.method_for(config)
    if not method.merges:
        merging = methods.describe([m for m in methods.registered() if m.merges])
        raise ConfigError(
            f"{adapter} is a {method.name} adapter, whose delta is not a weight change; delta analysis needs a method "
            f"that folds into the weights ({merging})"
        )
    return config


def _resolve_base(adapter: Path, base: str | None, config: DeltaConfig | None) -> str:
    """``base`` if given, else the base the adapter records if it is a folder here."""
    # A merged transformers folder records its own path, not its base's: --base is required for it.
    recorded = config.base_model_name_or_path if config is not None else None
    if base is None:
        if recorded and Path(recorded).is_dir():
            return recorded
        raise ConfigError(
            f"which base model does {adapter} change? pass --base (its config names {recorded or 'none'}, which is "
            "not a directory here)"
        )
    return base


def _check_recorded(adapter: Path, config: DeltaConfig, base: str, loaded: Any) -> None:
    """Refuse a base other than the one the adapter records, compared by the loaded model's own folder name (a
    built-in name such as smollm2-135m loads from a cache folder, which is what training recorded)."""
    recorded = base_label(config.base_model_name_or_path)
    actual = base_label(getattr(getattr(loaded, "config", None), "name_or_path", None))
    if recorded and recorded not in (actual, base_label(base)):
        raise ConfigError(
            f"{adapter} was made for base model {config.base_model_name_or_path!r}, not {base!r}: analyze it against "
            "the base it was trained on (--base)"
        )


def _task(adapter: Path, config: DeltaConfig | None, merged_model: bool) -> tuple[str | None, int]:
    from deltatune.merging import head_size

    if merged_model:
        info = json.loads((adapter / "config.json").read_text())
        classifies = any(a.endswith("ForSequenceClassification") for a in info.get("architectures") or [])
        return ("classification", len(info.get("id2label") or {0: 0, 1: 1})) if classifies else (None, 2)
    return ("classification" if config.task_type == "SEQ_CLS" else None), head_size(adapter)


def _weights(
    adapter: Path, base: str, config: DeltaConfig | None, merged_model: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The base weights, the adapted weights (by state-dict name) and the deltas known exactly: a LoRA layer's
    B·A, which W + ΔW − W would round to float32's digits of W."""
    from deltatune.loading import load_base
    from deltatune.model import DeltaModel

    task, num_labels = _task(adapter, config, merged_model)
    loaded = load_base(base, task=task, num_labels=num_labels)[0]
    if config is not None:
        _check_recorded(adapter, config, base, loaded)
    before = loaded.state_dict()
    if merged_model:
        after = load_base(str(adapter), task=task, num_labels=num_labels)[0].state_dict()
        _check_same_shapes(before, after, adapter, base)
        return before, after, {}
    work, _ = load_base(base, task=task, num_labels=num_labels)
    model = DeltaModel.from_pretrained(work, adapter)
    exact = {}
    for name, layer in model.delta_layers():
        try:
            exact[f"{name}.weight"] = layer.delta_weight("default").detach().float()
        except NotImplementedError:
            continue
    after = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
    return before, after, exact


def _check_same_shapes(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], adapter: Path, base: str
) -> None:
    bad = [k for k, v in after.items() if k in before and before[k].shape != v.shape]
    if bad or not set(after) & set(before):
        raise ConfigError(
            f"{adapter} is not a merged copy of {base}: "
            + (
                f"{bad[0]} has shape {tuple(after[bad[0]].shape)} vs {tuple(before[bad[0]].shape)}"
                if bad
                else "no weight names in common"
            )
            + "; pass the base model it was merged from (--base)"
        )


def _summary(modules: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per module type, means over layers of the 2-D deltas' figures (bias-only types: the norm)."""
    out = {}
    for kind, names in by_type(list(modules)).items():
        stats = [modules[n].get("weight") or modules[n].get("bias") for n in names]
        stats = [s for s in stats if s is not None]
        row: dict[str, Any] = {"modules": len(names), "delta_norm": _mean(s["delta_norm"] for s in stats)}
        if "amplification" in stats[0]:
            for key in ("effective_rank", "rank", "amplification", "random_amplification", "weight_norm"):
                row[key] = _mean(s[key] for s in stats)
        out[kind] = row
    return out


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values)


def delta_table(result: dict[str, Any]) -> str:
    """Per module type: mean ‖ΔW‖_F, effective rank and amplification (learned vs random directions)."""
    rows = [("module", "count", "‖ΔW‖_F", "‖W‖_F", "eff. rank", "rank", f"amplif. (r={result['r']})", "random")]
    for kind, s in result["types"].items():
        cells = [kind, str(s["modules"]), f"{s['delta_norm']:.4g}"]
        if "amplification" in s:
            cells += [
                f"{s['weight_norm']:.4g}",
                f"{s['effective_rank']:.2f}",
                f"{s['rank']:.1f}",
                f"{s['amplification']:.2f}",
                f"{s['random_amplification']:.2f}",
            ]
        else:
            cells += ["", "", "", "", ""]
        rows.append(tuple(cells))
    return text_table(rows)


def plot_delta(result: dict[str, Any], directory: str | Path) -> Path:
    """``delta_norms.png``: ‖ΔW‖_F by layer, one line per module type (biases as ``type.bias``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltatune.atomic import atomic_write

    series: dict[str, list[tuple[int, float]]] = {}
    for entry in result["modules"].values():
        for kind in ("weight", "bias"):
            if kind in entry:
                label = entry["type"] if kind == "weight" else f"{entry['type']}.bias"
                series.setdefault(label, []).append((entry["layer"], entry[kind]["delta_norm"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("‖ΔW‖_F")
    ax.set_title(f"{Path(result['adapter']).name}: delta norm by layer")
    ax.legend(fontsize="small")
    path = Path(directory) / "delta_norms.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path


def _rank_of(config: Any) -> int | None:
    """The adapter's own rank (its method's ``rank_option``), None for a method without one or no adapter."""
    from deltatune import methods

    return None if config is None else methods.method_for(config).rank_of(config)
