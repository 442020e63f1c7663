"""What every quantized frozen linear layer shares, whatever its number format.

A :class:`QuantizedLinear` is an ``nn.Linear`` (so targeting, ``all-linear`` and LoRA find it)
whose ``weight`` is a :class:`QuantizedWeight` handle instead of a float tensor: it has the shape,
device and compute dtype of the float weight, so methods size their own tensors from it, and
``weight += delta`` (how a DeltaLayer merges) dequantizes, adds and requantizes. The float
weight is never stored; its quantized form lives in the subclass's own parameters.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, ClassVar

import torch
from torch import nn

CHUNK_WEIGHTS = 1 << 22  # weights dequantized at once by chunked_matmul: a 16 MB float32 temporary at most


def _row_chunks(layer: QuantizedLinear) -> list[tuple[int, int]]:
    step = max(1, CHUNK_WEIGHTS // layer.in_features)
    return [(i, min(i + step, layer.out_features)) for i in range(0, layer.out_features, step)]


@functools.cache
def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bfloat16 in hardware: an x86 CPU with AVX512-BF16 or AMX tiles (where oneDNN's
    bfloat16 GEMM ran about 4x float32's, docs/quantization.md), or a CUDA GPU that supports it. Elsewhere (plain
    AVX2/AVX512, Arm) bfloat16 would be converted in software, so float32 stays."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return device.type == "cpu" and any(callable(probe) and probe() for probe in probes)


def product_dtype(layer: QuantizedLinear, like: torch.Tensor) -> torch.dtype:
    """The dtype ``layer``'s products with ``like`` multiply in (see QuantizedLinear.matmul_dtype)."""
    if layer.matmul_dtype != "auto":
        return getattr(torch, layer.matmul_dtype)
    native = like.dtype == torch.float32 and native_bfloat16(like.device)
    return torch.bfloat16 if native else like.dtype


_SCRATCH = threading.local()  # per thread: {(device, dtype): the float block buffer}


def _block(
    layer: QuantizedLinear, start: int, end: int, like: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows ``start:end`` of the weight in ``like``'s dtype and device, and the per-row scales still to apply to
    the product (or None): see :meth:`QuantizedLinear.dequantize_rows_into`. The block is written into this
    thread's reused buffer (valid until the next call): a fresh block per matmul would cost page faults,
    hundreds of times per step."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key, numel = (like.device, like.dtype), (end - start) * layer.in_features
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(max(numel, CHUNK_WEIGHTS), dtype=like.dtype, device=like.device)
    out = buffer[:numel].view(end - start, layer.in_features)
    return out, layer.dequantize_rows_into(start, end, out)


def _forward(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    xm, parts = x.to(product_dtype(layer, x)), []
    for i, j in _row_chunks(layer):
        block, scale = _block(layer, i, j, xm)
        part = xm @ block.T
        parts.append(part if scale is None else part * scale)  # the scale in float32: no rounding to xm's dtype
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)).to(x.dtype)


class _ChunkedMatmul(torch.autograd.Function):
    """x·Wᵀ with W dequantized a block of output rows at a time, in the forward and in the input-gradient
    backward: the stored form is the only copy of the weight, and each float block is a temporary."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
        ctx.layer = layer
        return _forward(x, layer)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        return times_weight(grad, ctx.layer), None


def times_weight(grad: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """``grad @ layer.dequantize()`` (the input gradient of x·Wᵀ), a block of rows of W at a time."""
    like, dx = grad.new_empty(0, dtype=product_dtype(layer, grad)), None
    for i, j in _row_chunks(layer):
        block, scale = _block(layer, i, j, like)
        rows = grad[..., i:j] if scale is None else grad[..., i:j] * scale
        part = rows.to(like.dtype) @ block
        dx = part if dx is None else dx.add_(part)
    return dx.to(grad.dtype)


def chunked_matmul(x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:
    """``x @ layer.dequantize().T`` (no bias) without ever holding the whole float weight."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _ChunkedMatmul.apply(x, layer)
    return _forward(x, layer)


class QuantizedWeight:
    """Stands where ``layer.weight`` stands: shape, dtype and device, ``dequantize()``, and ``+=``/``-=``
    that requantize (merge/unmerge: each rounds, so unmerge is not an exact inverse)."""

    def __init__(self, layer: QuantizedLinear) -> None:
        self.layer = layer

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.layer.out_features, self.layer.in_features))

    @property
    def dtype(self) -> torch.dtype:
        return self.layer.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.layer.storage_device()

    requires_grad = False

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dequantize(self) -> torch.Tensor:
        return self.layer.dequantize()

    def __iadd__(self, delta: torch.Tensor) -> QuantizedWeight:
        self.layer.requantize_(self.layer.dequantize() + delta.to(self.layer.compute_dtype))
        return self

    def __isub__(self, delta: torch.Tensor) -> QuantizedWeight:
        self.layer.requantize_(self.layer.dequantize() - delta.to(self.layer.compute_dtype))
        return self

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.layer.kind}, shape={tuple(self.shape)})"


class QuantizedLinear(nn.Linear):
    """A frozen linear layer in ``kind``'s format; subclasses store it and multiply by it."""

    kind: ClassVar[str] = ""
    bits: ClassVar[float] = 32.0  # storage bits per weight, scales included (see storage_bytes)
    # (checkpoint path, tensor name, stored in×out) of the float weight, set by the streamed loader: LoftQ
    # reads it again (deltatune.methods.lora_loftq); None for a layer quantized in memory
    float_source: tuple[str, str, bool] | None = None
    # what the products multiply in (activations and weight blocks; results come back in the activations'
    # dtype): "float32", "bfloat16", or "auto": bfloat16 for float32 activations on a device that multiplies it in
    # hardware (native_bfloat16), else the activations' own dtype. deltatune.quantization.set_matmul_dtype sets it.
    matmul_dtype: str = "auto"

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a float weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.compute_dtype = linear.weight.dtype
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    @property
    def weight(self) -> QuantizedWeight:  # type: ignore[override]
        return QuantizedWeight(self)

    @weight.setter
    def weight(self, value: QuantizedWeight) -> None:
        if not (isinstance(value, QuantizedWeight) and value.layer is self):  # `weight += d` sets it back
            raise TypeError(f"{type(self).__name__}.weight is quantized: use requantize_(float_weight) to replace it")

    def storage_device(self) -> torch.device:
        return next(iter(self.parameters())).device

    def dequantize(self) -> torch.Tensor:
        return self.dequantize_rows(0, self.out_features)

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        """Rows ``start:end`` of the float weight (what chunked_matmul multiplies by)."""
        raise NotImplementedError

    def dequantize_rows_into(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor | None:
        """Write rows ``start:end`` of the float weight into ``out`` (any float dtype: cast as ``.to`` would) and
        return None; or write them without a per-row scale and return that scale (float32, one per row), which
        the product's columns are then multiplied by: a format whose codes are exact in ``out``'s dtype (int8 in
        bfloat16) then adds no rounding of its own to a narrower matmul."""
        out.copy_(self.dequantize_rows(start, end))
        return None

    def requantize_(self, weight: torch.Tensor) -> None:
        raise NotImplementedError

    def storage_bytes(self) -> int:
        """Bytes the quantized weight takes (codes and scales; the bias is counted as float by callers)."""
        return sum(t.numel() * t.element_size() for t in self.quantized_tensors())

    def quantized_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` with the dequantized weight (what a float merge starts from)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().clone(), requires_grad=False)
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"
