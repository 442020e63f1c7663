"""int8 frozen linear layers: per-output-channel symmetric weights, multiplied in int8 both ways.

W ≈ diag(s)·Q with Q ∈ [-127, 127] and s = max|W_row| / 127. On CPU both directions run on
fbgemm's int8 GEMM (``torch.ops.quantized.linear_dynamic``: the activation is quantized on the
fly to 7 bits, which keeps fbgemm's 16-bit accumulation from saturating, one scale per row: see _fbgemm):

    forward   y  = x · Qᵀ · diag(s)           fbgemm, Q packed once
    backward  dx = (dy · diag(s)) · Q         fbgemm, Qᵀ packed on the first backward (int8 too)

so the frozen base never holds a float32 copy of its weights; the packed forms are caches rebuilt
after ``to()``/requantization and dropped when pickled. Measured on SmolLM2's shapes (1 thread,
512 tokens) this takes 0.44–0.60× the float32 matmul's time in each direction, where dequantizing
on the fly costs more than the float matmul itself. On CUDA the same layer multiplies through
bitsandbytes' int8 matmul (LLM.int8 without outliers: the same Q and s).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from deltatune.quantization.base import QuantizedLinear

QMAX = 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 per-row scales): symmetric, one scale per output channel."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    codes = torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8)
    return codes, scale


def _prepack(codes: torch.Tensor, scale: torch.Tensor | None) -> Any:
    """fbgemm's packed int8 weight; ``scale`` None packs with scale 1 (the transposed codes)."""
    with warnings.catch_warnings():  # torch 2.13 flags quantized-tensor constructors as deprecated
        warnings.simplefilter("ignore")
        if scale is None:
            q = torch._make_per_tensor_quantized_tensor(codes, 1.0, 0)
        else:
            zeros = torch.zeros(codes.shape[0], dtype=torch.long)
            q = torch._make_per_channel_quantized_tensor(codes, scale.double(), zeros, 0)
        return torch.ops.quantized.linear_prepack(q, None)


def _fbgemm(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """x·Wᵀ through fbgemm with per-row (per-token) activation scales: fbgemm quantizes its input with one
    scale per tensor, so each row is brought to unit range first and scaled back after. Without this,
    one outlier token (or gradient row) sets the step for all: SmolLM2's LoRA loss rose instead of fell,
    and tiny gradients fell below fbgemm's minimum scale and came back as zeros."""
    x = x.float()
    norm = x.abs().amax(dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.ops.quantized.linear_dynamic((x / norm).contiguous(), packed, True) * norm


class _Int8Matmul(torch.autograd.Function):
    """x·Wᵀ through int8 codes; the input gradient through the same codes, transposed."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
        ctx.layer = layer
        return _fbgemm(x, layer.packed()).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        layer = ctx.layer
        if not ctx.needs_input_grad[0]:
            return None, None
        return _fbgemm(grad.float() * layer.weight_scale, layer.packed_transposed()).to(grad.dtype), None


class Int8Linear(QuantizedLinear):
    """A frozen ``nn.Linear`` stored as int8 codes (a frozen parameter) and float32 row scales."""

    kind = "int8"
    bits = 8.0

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        codes, scale = quantize_rows(linear.weight)
        self.weight_int8 = nn.Parameter(codes.to(linear.weight.device), requires_grad=False)
        self.register_buffer("weight_scale", scale.to(linear.weight.device))
        self._caches: dict[str, Any] = {}

    def quantized_tensors(self) -> list[torch.Tensor]:
        return [self.weight_int8, self.weight_scale]

    def dequantize(self) -> torch.Tensor:
        return (self.weight_int8.float() * self.weight_scale[:, None]).to(self.compute_dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        codes, scale = quantize_rows(weight)
        with torch.no_grad():
            self.weight_int8.copy_(codes)
            self.weight_scale.copy_(scale)
        self._caches.clear()

    def packed(self) -> Any:
        if "forward" not in self._caches:
            self._caches["forward"] = _prepack(self.weight_int8.detach(), self.weight_scale)
        return self._caches["forward"]

    def packed_transposed(self) -> Any:
        if "backward" not in self._caches:
            self._caches["backward"] = _prepack(self.weight_int8.detach().T.contiguous(), None)
        return self._caches["backward"]

    def _apply(self, *args: Any, **kwargs: Any) -> Int8Linear:
        self._caches = {}
        return super()._apply(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_caches": {}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            out = _cuda_int8(x, self)
        elif torch.is_grad_enabled() and x.requires_grad:
            out = _Int8Matmul.apply(x, self)
        else:
            out = _fbgemm(x, self.packed()).to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)


def _cuda_int8(x: torch.Tensor, layer: Int8Linear) -> torch.Tensor:
    """bitsandbytes' int8 matmul (its GPU path) with our codes and scales; its backward to the
    input dequantizes the same codes."""
    from deltatune.quantization import require

    bnb = require("bitsandbytes")
    state = layer._caches.get("bnb_state")
    if state is None:
        state = bnb.MatmulLtState()
        state.CB, state.SCB = layer.weight_int8, layer.weight_scale * QMAX
        state.has_fp16_weights, state.threshold = False, 0.0
        layer._caches["bnb_state"] = state
    return bnb.matmul(x.half(), layer.weight_int8, state=state).to(x.dtype)
