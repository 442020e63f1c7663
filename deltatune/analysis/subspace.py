"""How much two LoRA adapters' learned subspaces overlap (the LoRA paper, section 7.2).

For the A matrices of two adapters of one module, with U^i the top-i right-singular vectors of A,

    φ(A1, A2, i, j) = ‖U1^iᵀ U2^j‖_F² / min(i, j)   ∈ [0, 1]

(1: one subspace contains the other, 0: orthogonal). All (i, j) come from one product: with
M = U1ᵀ U2 (r1 x r2), ‖U1^iᵀ U2^j‖_F² is the sum of M² over its top-left i x j block, a 2-D cumulative
sum. The baseline is the same for Gaussian matrices of the same shapes: what chance overlap looks like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deltatune.analysis.common import by_type, check_same_base, common_modules, lora_factors, text_table


def right_singular(a: torch.Tensor) -> torch.Tensor:
    """A's right-singular vectors as rows (r x in), strongest first; float64 so the overlaps are exact."""
    return torch.linalg.svd(a.double(), full_matrices=False).Vh


def phi_matrix(a1: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """φ(A1, A2, i, j) for i = 1..r1 (rows) and j = 1..r2 (columns)."""
    overlap = (right_singular(a1) @ right_singular(a2).T) ** 2
    sums = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, sums.shape[0] + 1, dtype=sums.dtype)[:, None]
    j = torch.arange(1, sums.shape[1] + 1, dtype=sums.dtype)[None, :]
    return sums / torch.minimum(i, j)


def random_phi(shape1: torch.Size, shape2: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """φ between Gaussian matrices of the given shapes: the chance level the learned φ is set against."""
    return phi_matrix(torch.randn(shape1, generator=generator), torch.randn(shape2, generator=generator))


def analyze_subspace(
    adapter1: str | Path, adapter2: str | Path, seed: int = 0, same_base: bool = False
) -> dict[str, Any]:
    """φ for every module both LoRA adapters adapt, the random baseline, and a per-type summary.

    ``modules[name]`` (and ``random[name]``) is the φ matrix as rows: row i-1 holds φ(i, j), j = 1..r2.
    ``same_base``: the caller vouches that differently named bases are one model (module shapes are still checked).
    """
    c1, f1 = lora_factors(adapter1, "A")
    c2, f2 = lora_factors(adapter2, "B")
    if not same_base:
        check_same_base((str(adapter1), c1), (str(adapter2), c2))
    shared = common_modules(f1, f2, (str(adapter1), str(adapter2)))
    generator = torch.Generator().manual_seed(seed)
    learned = {m: phi_matrix(f1[m], f2[m]) for m in shared}
    chance = {m: random_phi(f1[m].shape, f2[m].shape, generator) for m in shared}
    return {
        "a": str(adapter1),
        "b": str(adapter2),
        "base_model": c1.base_model_name_or_path or c2.base_model_name_or_path,
        "seed": seed,
        "modules": {m: learned[m].tolist() for m in shared},
        "random": {m: chance[m].tolist() for m in shared},
        "types": summarize(learned, chance),
    }


def summarize(learned: dict[str, torch.Tensor], chance: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per module type, φ averaged over layers (modules of one type share r1, r2 unless a rank_pattern differs:
    then over the common top-left block)."""
    out = {}
    for kind, names in by_type(list(learned)).items():
        mean, rand = _mean_block([learned[n] for n in names]), _mean_block([chance[n] for n in names])
        out[kind] = {
            "layers": len(names),
            "shape": list(mean.shape),
            "phi_1_1": mean[0, 0].item(),
            "random_phi_1_1": rand[0, 0].item(),
            "phi_mean": mean.mean().item(),
            "random_phi_mean": rand.mean().item(),
            "phi": mean.tolist(),
            "random_phi": rand.tolist(),
        }
    return out


def _mean_block(matrices: list[torch.Tensor]) -> torch.Tensor:
    rows = min(m.shape[0] for m in matrices)
    cols = min(m.shape[1] for m in matrices)
    return torch.stack([m[:rows, :cols] for m in matrices]).mean(0)


def subspace_table(result: dict[str, Any]) -> str:
    """The per-type summary as a text table: learned φ against the random baseline."""
    rows = [("module", "layers", "r1 x r2", "φ(1,1)", "random φ(1,1)", "mean φ", "random mean φ")]
    for kind, s in result["types"].items():
        rows.append(
            (
                kind,
                str(s["layers"]),
                "x".join(map(str, s["shape"])),
                f"{s['phi_1_1']:.3f}",
                f"{s['random_phi_1_1']:.3f}",
                f"{s['phi_mean']:.3f}",
                f"{s['random_phi_mean']:.3f}",
            )
        )
    return text_table(rows)


def plot_subspace(result: dict[str, Any], directory: str | Path) -> list[Path]:
    """One PNG per module type: φ(i, j) averaged over layers beside the random baseline (the paper's Figure 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deltatune.atomic import atomic_write

    written = []
    for kind, s in result["types"].items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
        for ax, key, title in zip(axes[0], ("phi", "random_phi"), ("learned", "random Gaussian"), strict=True):
            data = s[key]
            image = ax.imshow(
                data,
                vmin=0,
                vmax=1,
                cmap="viridis",
                aspect="auto",
                origin="upper",
                extent=(0.5, len(data[0]) + 0.5, len(data) + 0.5, 0.5),
            )
            ax.set_title(f"{kind}: φ(A, B, i, j), {title}")
            ax.set_xlabel("j (top-j directions of B)")
            ax.set_ylabel("i (top-i directions of A)")
        fig.colorbar(image, ax=list(axes[0]))
        path = Path(directory) / f"subspace_{kind}.png"
        atomic_write(path, lambda tmp, figure=fig: figure.savefig(tmp, format="png", dpi=100))
        plt.close(fig)
        written.append(path)
    return written
