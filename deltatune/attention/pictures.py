"""Pictures of which positions attend, drawn from each pattern's own ``allowed`` function (the one the
tests hold the blocked computation to), so a picture cannot disagree with the code.

    python -m deltatune.attention.pictures docs/attention
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from deltatune.atomic import atomic_path
from deltatune.attention import lsh, options_for
from deltatune.attention.registry import pattern_named

N = 32
# (file, pattern, options, causal, head groups shown, title)
PICTURES = [
    ("sliding_window", "sliding_window", {"window": 4}, True, 1, "sliding_window window=4 (causal)"),
    (
        "sliding_window_dilated_global",
        "sliding_window",
        {"window": 4, "dilation": [1, 3], "global_tokens": 2},
        False,
        2,
        "window=4, dilation 1 | 3 per head group, 2 global (encoder)",
    ),
    (
        "blockwise",
        "blockwise",
        {"block_size": 8, "block_shifts": [0, 1]},
        False,
        2,
        "blockwise block=8, shift 0 | 1 (encoder)",
    ),
    (
        "blockwise_causal",
        "blockwise",
        {"block_size": 8, "block_shifts": [0, 1]},
        True,
        2,
        "blockwise block=8, shift 0 | 1 (causal)",
    ),
    ("s2", "s2", {"group_size": 8}, True, 2, "s2 group=8 while training: plain | shifted half"),
    ("linformer", "linformer", {"k": 8}, False, 1, "linformer k=8: input positions pooled into each key row"),
]


def masks(pattern: str, options: dict, causal: bool, heads: int) -> list[torch.Tensor]:
    record, opts = pattern_named(pattern), options_for(pattern, **options)
    return [record.allowed(N, opts, causal, h, heads) for h in range(heads)]  # one panel per head group


def lsh_masks(seed: int = 0) -> list[torch.Tensor]:
    """LSH's pattern depends on the data: two hash rounds' chunks for random queries and keys."""
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 1, N, 16, generator=g), torch.randn(1, 1, N, 16, generator=g)
    return [lsh.allowed(q, k, options_for("lsh", bucket_size=4, hash_seed=r), True)[0, 0] for r in range(2)]


def draw(panels: list[torch.Tensor], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.9), squeeze=False)
    for ax, mask in zip(axes[0], panels, strict=True):
        ax.imshow(mask.float().numpy(), cmap="Blues", vmin=0, vmax=1.2, interpolation="nearest")
        ax.set_xlabel("key position", fontsize=7)
        ax.set_ylabel("query position" if mask.shape[0] == mask.shape[1] else "key row", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def main(directory: str = "docs/attention") -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, pattern, options, causal, heads, title in PICTURES:
        draw(masks(pattern, options, causal, heads), title, out / f"{name}.png")
        written.append(out / f"{name}.png")
    draw(lsh_masks(), "lsh bucket=4, two hash rounds (causal, random q/k)", out / "lsh.png")
    return [*written, out / "lsh.png"]


if __name__ == "__main__":
    print("\n".join(map(str, main(*sys.argv[1:]))))
