"""How a new LoRA adapter's A and B start (peft's ``init_lora_weights``).

* ``True`` (default): Kaiming-uniform A, zero B: the model starts exactly as the base model.
* ``"gaussian"``: normal A with std 1/r, zero B.
* ``"pissa"`` (Meng et al., 2024): A and B take the top-r singular directions of W0 (B·A·s is its
  best rank-r part) and the base weight keeps only the residual W0 − s·B·A, so outputs are still
  the base model's but training moves the principal components. ``"pissa_niter_K"`` uses
  ``torch.svd_lowrank`` with K subspace iterations instead of a full SVD: seconds, not minutes.
* ``"olora"`` (Büyükakyüz, 2024): the same with W0's QR decomposition (B = Q[:, :r], A = R[:r]).
* ``"loftq"`` (Li et al., 2023): for a quantized base, A and B fit the rank-r part of its quantization
  error, alternating with the base's own quantizer (``loftq_config``; deltatune.methods.lora_loftq).
* ``False``: leave torch's default init (debugging; the model no longer starts as the base).

The residual inits change the base weights; ``DeltaModel.save_pretrained(...,
path_initial_model_for_weight_conversion=...)`` turns such an adapter back into a plain LoRA on
the original base (see :func:`convert_to_plain_lora`). Another init registers itself with
:func:`register_init` (a name, or a prefix ending in ``_``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune.config import ConfigError
from deltatune.methods import lora_loftq as loftq

# init(layer, adapter_name, init_string, config) for inits that need the base weight.
WeightInit = Callable[[Any, str, str, Any], None]
_INITS: dict[str, WeightInit] = {}
RESIDUAL_INITS = ("pissa", "olora")  # inits that move part of W0 into the adapter


def register_init(name: str, init: WeightInit) -> None:
    """Make ``init_lora_weights=name`` (or any value starting with ``name`` if it ends in ``_``) call ``init``."""
    _INITS[name] = init


def _lookup(init: str) -> WeightInit | None:
    if init in _INITS:
        return _INITS[init]
    return next((fn for key, fn in _INITS.items() if key.endswith("_") and init.startswith(key)), None)


def check(init: Any) -> None:
    """Raise ConfigError unless ``init`` is an init_lora_weights value deltatune knows."""
    if init in (True, False, "gaussian") or (isinstance(init, str) and _lookup(init) is not None):
        if isinstance(init, str) and init.startswith("pissa_niter_") and not re.fullmatch(r"pissa_niter_\d+", init):
            raise ConfigError(
                f"init_lora_weights={init!r}: write pissa_niter_K with K a whole number, e.g. pissa_niter_4"
            )
        return
    names = ", ".join(["True", "False", "'gaussian'", *(repr(k + "K" if k.endswith("_") else k) for k in _INITS)])
    raise ConfigError(f"init_lora_weights must be one of {names}; got {init!r}")


def check_options(init: Any, loftq_config: Any) -> dict[str, Any]:
    """``loftq_config`` as peft's dict, checked and completed when ``init`` is ``"loftq"``."""
    return loftq.options(init, loftq_config)


def is_residual(init: Any) -> bool:
    """Whether ``init`` changes the base weights (its adapter needs conversion to ship alone)."""
    return isinstance(init, str) and init.split("_")[0] in RESIDUAL_INITS


def initialize(layer: Any, name: str, init: bool | str, config: Any) -> None:
    """Set ``layer``'s A and B for adapter ``name`` (a LoraLinear) as ``init`` says."""
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if init is False:
        return
    if init is True or init == "gaussian":
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1 / a.shape[0])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)
        return
    fn = _lookup(init)
    if fn is None:
        check(init)
    fn(layer, name, init, config)


def _float_weight(layer: Any) -> torch.Tensor:
    """The base weight as float32 out×in; refuses a quantized base (decompose before quantizing)."""
    weight = layer.base_layer.weight
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise ConfigError(
            "PiSSA/OLoRA decompose the base weights: initialise on a float base, then quantize the residual model"
        )
    weight = weight.detach().float()
    return weight.T if layer.transposed else weight


def _set_residual(layer: Any, name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    """A, B := a, b and W0 := W0 − s·b·a, written into the base weight in place (one fused addmm
    for a float32 base: no full-size temporary)."""
    base = layer.base_layer.weight
    with torch.no_grad():
        layer.lora_A[name].weight.data = a.to(layer.lora_A[name].weight.dtype).contiguous()
        layer.lora_B[name].weight.data = b.to(layer.lora_B[name].weight.dtype).contiguous()
        left, right = (a.T, b.T) if layer.transposed else (b, a)  # Conv1D stores W0 as in×out
        if base.dtype == torch.float32:
            base.addmm_(left, right, alpha=-layer.scaling[name])
        else:
            base.copy_(torch.addmm(base.float(), left, right, alpha=-layer.scaling[name]))


def pissa(layer: Any, name: str, init: str, config: Any) -> None:
    """Principal singular values and vectors: B = U_r·√(S_r/s), A = √(S_r/s)·V_rᵀ."""
    weight = _float_weight(layer)
    r = layer.lora_A[name].weight.shape[0]
    if init == "pissa":
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        u, s, v = torch.svd_lowrank(weight, r, niter=int(init.rsplit("_", 1)[-1]))
        vh = v.T
    root = torch.sqrt(s / layer.scaling[name])
    _set_residual(layer, name, root[:, None] * vh, u * root)


def olora(layer: Any, name: str, init: str, config: Any) -> None:
    """Orthonormal LoRA: W0 = Q·R, B = Q[:, :r], A = R[:r]."""
    q, r_matrix = torch.linalg.qr(_float_weight(layer))
    r = layer.lora_A[name].weight.shape[0]
    _set_residual(layer, name, r_matrix[:r], q[:, :r])


register_init("pissa", pissa)
register_init("pissa_niter_", pissa)
register_init("olora", olora)
register_init("loftq", loftq.initialize)  # a quantized base's own quantizer: deltatune.methods.lora_loftq


def convert_to_plain_lora(
    tensors: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """A residual-init adapter as a plain LoRA on the original base (peft's conversion):
    ΔW = s·(B·A − B0·A0) = s·[B | −B0]·[A ; A0], a LoRA of rank 2r with the same scale once r and
    lora_alpha double. ``initial``: the tensors saved right after initialisation."""
    if any("lora_magnitude_vector" in key for key in tensors):
        raise ConfigError("a DoRA adapter cannot be converted to a plain LoRA: its magnitude rescales W0 too")
    out = dict(tensors)
    for key, value in tensors.items():
        part = key.split(".")[-2] if key.endswith(".weight") else key.split(".")[-1]
        if part not in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            continue
        if key not in initial:
            raise ConfigError(f"the initial adapter lacks {key}: save it right after initialisation, unchanged")
        first = part.endswith("A")  # A stacks rows, B columns (with −B0)
        start = initial[key].to(value)
        out[key] = torch.cat([value, start], dim=0) if first else torch.cat([value, -start], dim=1)
    return out


def plain_lora_config(config: Any) -> Any:
    """The config of :func:`convert_to_plain_lora`'s adapter: rank doubled, same scale, default init."""
    import copy

    config = copy.deepcopy(config)
    growth = 2**0.5 if config.use_rslora else 2  # keeps alpha/r (alpha/√r with rsLoRA)
    config.init_lora_weights = True
    config.r *= 2
    config.lora_alpha *= growth
    config.rank_pattern = {k: 2 * v for k, v in config.rank_pattern.items()}
    config.alpha_pattern = {k: growth * v for k, v in config.alpha_pattern.items()}
    return config


def converted(config: Any, tensors: dict[str, torch.Tensor], initial_path: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(config, tensors)`` of a PiSSA/OLoRA adapter as a plain LoRA for the original base, given
    the directory where it was saved right after initialisation."""
    from deltatune.checkpoint.adapter import load_tensors

    if not is_residual(getattr(config, "init_lora_weights", None)):
        raise ConfigError(
            "path_initial_model_for_weight_conversion converts PiSSA/OLoRA adapters (init_lora_weights="
            f"'pissa', 'pissa_niter_K', 'olora'); this one has init_lora_weights={config.init_lora_weights!r}"
        )
    return plain_lora_config(config), convert_to_plain_lora(tensors, load_tensors(initial_path))
