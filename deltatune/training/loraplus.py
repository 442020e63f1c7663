"""LoRA+ (Hayou et al., 2024): train B with a larger learning rate than A.

With one learning rate for both factors, LoRA's feature learning is inefficient at large widths;
the paper sets ηB = λ·ηA (λ around 16). :func:`create_loraplus_optimizer` groups parameters as
peft's function of the same name does, so a run is the same under either library:

* A factors and other matrices: ``lr``;
* B factors and every 1-D tensor (DoRA magnitudes, biases): ``lr * loraplus_lr_ratio``, biases and
  layer-norm tensors without weight decay;
* LoRA factors of an embedding layer (not its 1-D DoRA magnitude): ``loraplus_lr_embedding``
  (default 1e-6, as peft).

Weight decay is ``loraplus_weight_decay`` (default 0), again as peft.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.methods.base import DeltaLayer


def _no_decay(model: nn.Module) -> set[str]:
    """Parameters that get no weight decay: biases and those of normalisation layers."""
    norms = {
        f"{m_name}.{p_name}" if m_name else p_name
        for m_name, module in model.named_modules()
        if isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()
        for p_name, _ in module.named_parameters(recurse=False)
    }
    return norms | {n for n, _ in model.named_parameters() if "bias" in n}


def _roles(model: nn.Module) -> dict[int, str]:
    """id(parameter) -> its LoRA+ role, as each layer's ``loraplus_roles`` names its stores."""
    roles = {}
    for module in model.modules():
        if isinstance(module, DeltaLayer):
            for store, role in module.loraplus_roles.items():
                roles.update(dict.fromkeys(map(id, getattr(module, store).parameters()), role))
    return roles


def loraplus_groups(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Trainable parameters by LoRA+ group: ``A``, ``embedding``, ``B``, ``B_no_decay``."""
    no_decay = _no_decay(model)
    roles = _roles(model)
    groups: dict[str, list[nn.Parameter]] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        role = roles.get(id(param))
        if role == "embedding":
            groups["embedding"].append(param)
        elif role == "B" or param.ndim == 1:
            groups["B_no_decay" if name in no_decay else "B"].append(param)
        else:
            groups["A"].append(param)
    return groups


def create_loraplus_optimizer(
    model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], *, lr: float, loraplus_lr_ratio: float, **kwargs: Any
) -> torch.optim.Optimizer:
    """``optimizer_cls`` over ``model``'s trainable parameters with B at ``lr * loraplus_lr_ratio``.
    ``loraplus_lr_embedding`` (1e-6) and ``loraplus_weight_decay`` (0.0) may be passed in ``kwargs``;
    the rest goes to ``optimizer_cls``."""
    if loraplus_lr_ratio <= 0:
        raise ValueError(
            f"loraplus_lr_ratio is ηB/ηA and must be positive (the paper uses ~16), got {loraplus_lr_ratio}"
        )
    decay = kwargs.pop("loraplus_weight_decay", 0.0)
    embedding_lr = kwargs.pop("loraplus_lr_embedding", 1e-6)
    groups = loraplus_groups(model)
    settings = {
        "A": (lr, decay),
        "embedding": (embedding_lr, decay),
        "B": (lr * loraplus_lr_ratio, decay),
        "B_no_decay": (lr * loraplus_lr_ratio, 0.0),
    }
    param_groups = [
        {"params": groups[key], "lr": group_lr, "weight_decay": group_decay}
        for key, (group_lr, group_decay) in settings.items()
    ]
    return optimizer_cls(param_groups, lr=lr, **kwargs)
