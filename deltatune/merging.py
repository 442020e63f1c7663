"""Fold an adapter into its base model's weights and write a plain transformers model directory."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F

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


def combine_adapters(
    base: str, adapters: list[str | Path], weights: list[float], combination_type: str, output: str | Path, **options
) -> Path:
    """Combine LoRA ``adapters`` (``DeltaModel.add_weighted_adapter``) and write the result to ``output``
    (a new or empty directory) as one adapter for ``base``, in peft's format."""
    from deltatune.loading import load_base
    from deltatune.model import DeltaModel

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"--output {output} exists and is not empty; choose a new directory")
    if len(weights) != len(adapters):
        raise ConfigError(f"--weights: give one weight per adapter ({len(adapters)} adapters, {len(weights)} weights)")
    config = check_adapter_dir(adapters[0])
    task = "classification" if config.task_type == "SEQ_CLS" else None
    model, _ = load_base(base, task=task, num_labels=head_size(adapters[0]))
    model = DeltaModel.from_pretrained(model, adapters[0], "input0")
    for i, path in enumerate(adapters[1:], start=1):
        check_adapter_dir(path)
        model.load_adapter(path, f"input{i}")
    names = [f"input{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, weights, "default", combination_type=combination_type, **options)
    with atomic_directory(output) as tmp:
        model.save_pretrained(tmp, selected_adapters=["default"])
    return output


PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "name[The Eagle], eatType[coffee shop], food[French], priceRange[moderate], area[riverside]",
    "def add(a, b):\n    return a + b",
    "Translate to French: the weather is nice today.",
)


def probe_batch(tokenizer) -> dict:
    """A small fixed batch of varied text, to measure what a merge changes in the model's outputs."""
    return dict(tokenizer(list(PROBE_TEXTS), return_tensors="pt", padding=True))


def output_error(reference: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """max |Δlogits| and mean KL(reference ‖ other) per token, over the real (unpadded) positions."""
    keep = mask.bool()
    ref, other = reference[keep].float(), logits[keep].float()
    kl = F.kl_div(other.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="batchmean")
    return {"max_abs_logits": (ref - other).abs().max().item(), "kl": kl.item()}


def merge_quantized(
    base: str, adapter: str | Path, output: str | Path, quantize: str, task: str | None = None
) -> tuple[Path, dict[str, dict[str, float]]]:
    """Merge an adapter trained on a ``quantize``d base and say what merging costs, on a probe batch,
    against that base + the unmerged adapter (what was trained):

    - ``requantized``: ΔW added to the dequantized weights, then quantized again (what
      ``merge_adapter()`` does in memory on a quantized base): the rounding of W0 + ΔW.
    - ``float``: dequantized base + ΔW in float32, the model written to ``output``.
    """
    from deltatune.loading import load_base
    from deltatune.model import DeltaModel
    from deltatune.quantization import dequantize_base

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise ConfigError(f"--output {output} exists and is not empty; choose a new directory")
    config = check_adapter_dir(adapter)
    task = task or ("classification" if config.task_type == "SEQ_CLS" else None)
    # float32 products: the errors reported are merging's, not a bfloat16 product's rounding
    model, tokenizer = load_base(
        base, task=task, num_labels=head_size(adapter), quantize=quantize, matmul_dtype="float32"
    )
    delta = DeltaModel.from_pretrained(model, adapter).eval()
    probe = probe_batch(tokenizer)
    with torch.no_grad():
        reference = delta(**probe).logits
        requantized = copy.deepcopy(delta)
        requantized.merge_adapter()
        errors = {"requantized": output_error(reference, requantized(**probe).logits, probe["attention_mask"])}
        del requantized
        merged = dequantize_base(delta).merge_and_unload()
        errors["float"] = output_error(reference, merged(**probe).logits, probe["attention_mask"])
    with atomic_directory(output) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return output, errors
