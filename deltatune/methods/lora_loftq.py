"""LoftQ (Li et al., 2023): LoRA factors that start by cancelling most of the base's quantization error.

``init_lora_weights="loftq"`` with peft's ``loftq_config={"loftq_bits": 4 | 8, "loftq_iter": N}``. With
W the float weight, s the LoRA scale and r the rank, it alternates N times:

    Q = quantize(W − s·B·A)              (B·A = 0 the first time: Q is plain quantization)
    B, A = the best rank-r fit of (W − Q) / s   (truncated SVD, √ of the singular values on each side)

so that Q + s·B·A is closer to W than Q alone (the rank-r part of the error is gone). The quantizer is the
base's own: on a quantized base (``load_base(path, quantize="nf4" | "int8")``) the layer requantizes
itself, so the codes it keeps are exactly the Q that the factors were fitted to; 4 bits pairs with nf4,
8 with int8. LoftQ needs W itself, which a quantized layer no longer holds: the streamed loader records
where each weight came from (``QuantizedLinear.float_source``) and the init reads that one tensor again
from the checkpoint (one float tensor in memory at a time, as while loading). On a float base it does
what peft does: the base weight becomes the dequantized Q, in float, ready to be quantized by the same
quantizer later. peft ignores the LoRA scale (its factors assume s = 1); here s is divided out, which is
the same at ``lora_alpha == r``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deltatune.config import ConfigError
from deltatune.quantization.base import QuantizedLinear

KIND_OF_BITS = {4: "nf4", 8: "int8"}  # loftq_bits -> the quantizer it alternates with
DEFAULTS = {"loftq_bits": 4, "loftq_iter": 1}  # peft's LoftQConfig defaults


@dataclasses.dataclass
class LoftQConfig:
    """peft's LoftQConfig: ``LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig(...))``."""

    loftq_bits: int = 4
    loftq_iter: int = 1


def options(init: Any, loftq_config: Any) -> dict[str, Any]:
    """``loftq_config`` as a plain dict (peft's JSON form); with ``init == "loftq"``, checked and completed
    with peft's defaults, so a saved config says what ran (and peft, which needs the keys, can read it)."""
    if loftq_config is None:
        loftq_config = {}
    if not isinstance(loftq_config, dict):
        loftq_config = (
            dataclasses.asdict(loftq_config) if dataclasses.is_dataclass(loftq_config) else vars(loftq_config)
        )
    if init != "loftq":
        return dict(loftq_config)
    unknown = set(loftq_config) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"loftq_config: unknown keys {sorted(unknown)}; it takes {', '.join(DEFAULTS)}")
    merged = {**DEFAULTS, **loftq_config}
    if merged["loftq_bits"] not in KIND_OF_BITS:
        raise ConfigError(
            f"loftq_config loftq_bits={merged['loftq_bits']!r}: use 4 (with an nf4 base) or 8 (with an int8 base)"
        )
    if not isinstance(merged["loftq_iter"], int) or merged["loftq_iter"] < 1:
        raise ConfigError(f"loftq_config loftq_iter={merged['loftq_iter']!r}: use a whole number >= 1")
    return merged


@torch.no_grad()
def factors(
    weight: torch.Tensor, quantize: Callable[[torch.Tensor], torch.Tensor], rank: int, scaling: float, iters: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Q, A, B)`` after ``iters`` alternations; ``quantize(w)`` returns the dequantized quantization of
    ``w`` (float32), and its last call is the Q returned (the quantizer's state, if it has one, matches)."""
    weight = weight.float()
    target = weight
    for step in range(iters):
        q = quantize(target)
        u, sigma, vh = torch.linalg.svd(weight - q, full_matrices=False)
        root = torch.sqrt(sigma[:rank] / scaling)
        b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
        if step + 1 < iters:
            target = torch.addmm(weight, b, a, alpha=-scaling)
    return q, a, b


def initialize(layer: Any, name: str, init: str, config: Any) -> None:
    """``lora_init``'s hook: A, B of adapter ``name`` and the base's Q by LoftQ (see the module's text)."""
    settings = options(init, getattr(config, "loftq_config", None))
    bits, iters = settings["loftq_bits"], settings["loftq_iter"]
    rank, scaling = layer.lora_A[name].weight.shape[0], layer.scaling[name]
    base = layer.base_layer
    if isinstance(base, QuantizedLinear):
        _check_kind(base, bits)
        weight = read_float_weight(base)

        def quantize(w: torch.Tensor) -> torch.Tensor:
            base.requantize_(w)
            return base.dequantize().float()

        _, a, b = factors(weight, quantize, rank, scaling, iters)
    else:
        q, a, b = factors(_float_weight(layer), _roundtrip(KIND_OF_BITS[bits]), rank, scaling, iters)
        with torch.no_grad():
            base.weight.copy_(q.T if layer.transposed else q)
    with torch.no_grad():
        layer.lora_A[name].weight.data = a.to(layer.lora_A[name].weight.dtype).contiguous()
        layer.lora_B[name].weight.data = b.to(layer.lora_B[name].weight.dtype).contiguous()


def _check_kind(base: QuantizedLinear, bits: int) -> None:
    if base.kind not in KIND_OF_BITS.values():
        raise ConfigError(
            f"LoftQ cannot run on a {base.kind} base: its blocks are fixed and it holds no float weights; "
            "load the float checkpoint with quantize='nf4' or 'int8' instead"
        )
    if KIND_OF_BITS[bits] != base.kind:
        want = next(b for b, k in KIND_OF_BITS.items() if k == base.kind)
        raise ConfigError(
            f"loftq_config loftq_bits={bits} alternates with {KIND_OF_BITS[bits]}, but the base is {base.kind}: "
            f"set loftq_bits={want} (or quantize the base to {KIND_OF_BITS[bits]})"
        )


def read_float_weight(layer: QuantizedLinear) -> torch.Tensor:
    """The float32 weight (out × in) a streamed-loaded quantized layer was made from, read again from its
    checkpoint."""
    source = layer.float_source
    if source is None:
        raise ConfigError(
            "LoftQ needs the float weights, and this quantized base does not know where they are (it was "
            "quantized in memory): load it with load_base(path, quantize=...) from a safetensors checkpoint, or "
            "add the LoftQ adapter to the float model"
        )
    from deltatune.loading.streaming import read_checkpoint_tensor

    path, tensor_name, transposed = source
    weight = read_checkpoint_tensor(path, tensor_name).float()
    return weight.T if transposed else weight


def _float_weight(layer: Any) -> torch.Tensor:
    weight = layer.base_layer.weight.detach().float()
    return weight.T if layer.transposed else weight


def _roundtrip(kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """dequantize(quantize(w)) with the layer class a ``quantize=kind`` base would use."""
    from deltatune.quantization import _layer_class

    cls = _layer_class(kind)

    def quantize(w: torch.Tensor) -> torch.Tensor:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
        linear.weight = nn.Parameter(w, requires_grad=False)
        return cls(linear).dequantize().float()

    return quantize
