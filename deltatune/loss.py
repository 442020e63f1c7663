"""Losses as (sum, count) pairs, so that gradient accumulation and DDP ranks add up exactly.

For causal LMs the output head runs only on positions that have a label (with response-only
labels that skips most of the vocabulary-sized head, the costliest matmul of a small LM), and,
when the head is frozen, head and cross-entropy are fused: each chunk's gradient with respect to
the hidden states is computed right away, so the (tokens x vocabulary) logits are never kept.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.compat import get_cache
from deltatune.config import ConfigError
from deltatune.data import IGNORE_INDEX


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformer body and output head of a *ForCausalLM model, when they can be run apart.

    A Hugging Face peft ``PeftModel`` is unwrapped first: its tuner layers (LoRA...) live inside
    the transformers model, so that model's body and head compute what the wrapper does.
    """
    if callable(getattr(model, "get_base_model", None)) and hasattr(model, "active_peft_config"):
        if getattr(model.active_peft_config, "is_prompt_learning", False):
            raise TypeError(
                "a peft prompt learning model adds its virtual tokens or prefix in its own forward, which this "
                "loss does not run: train with deltatune's method (dt.wrap) or use the model's own loss"
            )
        model = model.get_base_model()
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # heads that post-process logits: let the model do it
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None:
        return None
    return backbone, head


class FusedLinearCrossEntropy(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T, targets)) for a frozen ``weight``, chunk by chunk.

    The gradient of the summed loss with respect to the logits is softmax - onehot; multiplied by
    ``weight`` it gives the gradient for ``hidden``, computed in the forward pass and kept instead
    of the logits (hidden-sized rather than vocabulary-sized).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: Any, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        """``weight``: the head's float weight, or the frozen quantized head itself (a QuantizedLinear: its
        weight is dequantized a block of vocabulary rows at a time, never whole)."""
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        for start in range(0, len(hidden), chunk):
            logits = _times_transposed(hidden[start : start + chunk], weight).float()
            target = targets[start : start + chunk]
            log_norm = torch.logsumexp(logits, dim=-1)
            total += (log_norm - logits.gather(1, target[:, None]).squeeze(1)).sum()
            if grad_hidden is not None:
                probs = logits.sub_(log_norm[:, None]).exp_()
                probs[torch.arange(len(target)), target] -= 1
                dtype = weight.dtype if isinstance(weight, torch.Tensor) else weight.compute_dtype
                grad_hidden[start : start + chunk] = _times(probs.to(dtype), weight).to(hidden.dtype)
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def _times_transposed(x: torch.Tensor, weight: Any) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return x @ weight.T
    from deltatune.quantization.base import chunked_matmul

    return chunked_matmul(x, weight)  # x carries no autograd graph here: plain row blocks


def _times(x: torch.Tensor, weight: Any) -> torch.Tensor:
    if isinstance(weight, torch.Tensor):
        return x @ weight
    from deltatune.quantization.base import times_weight

    return times_weight(x, weight)


def _linear_cross_entropy_sum(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    weight = getattr(head, "weight", None)
    if hasattr(weight, "device_mesh"):  # --fsdp: a head split by vocabulary rows across the processes
        from deltatune.vocab_split import split_cross_entropy_sum

        return split_cross_entropy_sum(hidden, weight, targets, 256)
    fusable = type(head) is nn.Linear and head.bias is None and not weight.requires_grad and torch.is_grad_enabled()
    if fusable:
        return FusedLinearCrossEntropy.apply(hidden, weight, targets, 256)
    if _is_quantized_head(head) and torch.is_grad_enabled():  # frozen by construction: fused on its stored form
        return FusedLinearCrossEntropy.apply(hidden, head, targets, 256)
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _is_quantized_head(head: nn.Module) -> bool:
    from deltatune.quantization.base import QuantizedLinear

    return isinstance(head, QuantizedLinear) and head.bias is None


def to_model_device(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    device = next(model.parameters()).device
    return {k: v.to(device) for k, v in batch.items()}


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions, and the number of such positions."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    inputs.setdefault("use_cache", False)  # training needs no KV cache (a prefix method may bring its own)
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    parts = _backbone_and_head(model)
    if parts is None:
        logits = model(**inputs).logits[:, :-1][keep]
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum"), keep.sum()
    backbone, head = parts
    hidden = backbone(**inputs).last_hidden_state[:, :-1][keep]
    return _linear_cross_entropy_sum(hidden, head, targets[keep]), keep.sum()


def classification_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs).logits
    return F.cross_entropy(logits.float(), batch["labels"], reduction="sum"), torch.tensor(len(logits))


class LossModule(nn.Module):
    """The model plus its loss in one forward, so DDP sees (and syncs) every call through it."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model = model
        self.loss_sum = classification_loss_sum if task == "classification" else causal_lm_loss_sum

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from deltatune.model import DeltaModel

        if not isinstance(self.model, DeltaModel):
            return self.loss_sum(self.model, to_model_device(batch, self.model))
        # The method's input changes (virtual tokens extend inputs and labels alike) come first.
        packed = "position_ids" in batch and "attention_mask" not in batch
        with self.model.call_scope():  # what prepare_inputs derives for the layers lives for this call
            batch = self.model.prepare_inputs(to_model_device(batch, self.model))
            if packed:
                _check_still_packed(batch)
            return self.loss_sum(self.model.base_model, batch)


def _check_still_packed(inputs: dict) -> None:
    """Packed rows stay apart only through their position ids without a mask or KV cache (see ``Batcher.collate``);
    a method that drops the positions or adds a mask or cache would let the examples attend to each other."""
    if get_cache(inputs) is not None or "position_ids" not in inputs or "attention_mask" in inputs:
        raise ConfigError(
            "this adapter's method (virtual tokens or a prefix) cannot keep packed examples apart; train it without "
            "--packing (or use a method such as lora)."
        )
