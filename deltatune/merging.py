"""Fold an adapter into its base model's weights and write a plain transformers model directory."""

from __future__ import annotations

from pathlib import Path

from deltatune.atomic import atomic_directory
from deltatune.checkpoint.adapter import check_adapter_dir, load_tensors
from deltatune.config import ConfigError


def head_size(adapter: str | Path) -> int:
    """A classification adapter's number of labels, read from its saved head weights (2 without a head)."""
    heads = [v for k, v in load_tensors(adapter).items() if k.endswith(("classifier.weight", "score.weight"))]
    return heads[0].shape[0] if heads else 2


def merge_adapter(base: str, adapter: str | Path, output: str | Path, task: str | None = None) -> Path:
    """Load ``base`` with ``adapter``, merge it, and write the model and tokenizer to ``output`` atomically (a
    new or empty directory: a crash leaves no half-written model). ``task`` defaults to the adapter's."""
    from deltatune.loading import load_base
    from deltatune.model import DeltaModel

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"--output {output} exists and is not empty; choose a new directory")
    config = check_adapter_dir(adapter)
    task = task or ("classification" if config.task_type == "SEQ_CLS" else None)
    model, tokenizer = load_base(base, task=task, num_labels=head_size(adapter))
    merged = DeltaModel.from_pretrained(model, adapter).eval().merge_and_unload()
    with atomic_directory(output) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output
