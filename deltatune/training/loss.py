"""Losses as (sum, count) pairs, so that gradient accumulation and DDP ranks add up exactly.

For causal LMs the output head runs only on positions that have a label. With response-only
labels that skips most of the (vocabulary-sized) head, the costliest single matmul of a small LM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deltatune.training.data import IGNORE_INDEX


def _backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """The transformer body and output head of a *ForCausalLM model, when they can be run apart."""
    config = getattr(model, "config", None)
    if getattr(config, "final_logit_softcapping", None) or getattr(config, "logit_scale", None):
        return None  # heads that post-process logits: let the model do it
    backbone = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or backbone is model or head is None:
        return None
    return backbone, head


def causal_lm_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions, and the number of such positions."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE_INDEX
    parts = _backbone_and_head(model)
    if parts is None:
        logits = model(**inputs).logits[:, :-1][keep]
    else:
        backbone, head = parts
        hidden = backbone(**inputs).last_hidden_state[:, :-1][keep]
        logits = head(hidden)
    loss = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
    return loss, keep.sum()


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

        model = self.model.base_model if isinstance(self.model, DeltaModel) else self.model
        return self.loss_sum(model, batch)
