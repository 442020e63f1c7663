"""int8 frozen linear layers: per-output-channel symmetric weights, float activations (weight-only).

W ≈ diag(s)·Q with Q ∈ [-127, 127] and s = max|W_row| / 127. The codes and scales are the only stored
form: the forward and the input-gradient backward dequantize a block of rows at a time and multiply in
the activations' own dtype (``chunked_matmul``), so the error is the weights' rounding alone.

Why weight-only: an int8 GEMM (fbgemm's, activations rounded per token) adds the activations' rounding
error to the weights' and agreed less often with float32's top-1 token when tried on SmolLM2; torch's
``_weight_int8pack_mm`` (weight-only int8 kernel) is fast for a few tokens but its time grows with the tokens
far faster than the float matmul's. Both trials have no raw line in bench/results, so no figure is quoted.
"""

from __future__ import annotations

import torch
from torch import nn

from deltatune.quantization.base import QuantizedLinear, chunked_matmul

QMAX = 127


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 per-row scales): symmetric, one scale per output channel. One float32
    temporary of the weight's size at most (the rounding runs in place on it)."""
    w = weight.detach().float()
    scale = (torch.linalg.vector_norm(w, ord=float("inf"), dim=1) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
    w = w / scale[:, None]  # a new tensor: the caller's weight is left alone
    codes = w.round_().clamp_(-QMAX, QMAX).to(torch.int8)
    return codes, scale


class Int8Linear(QuantizedLinear):
    """A frozen ``nn.Linear`` stored as int8 codes (a frozen parameter) and float32 row scales, nothing else."""

    kind = "int8"
    bits = 8.0

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__(linear)
        codes, scale = quantize_rows(linear.weight)
        self.weight_int8 = nn.Parameter(codes.to(linear.weight.device), requires_grad=False)
        self.register_buffer("weight_scale", scale.to(linear.weight.device))

    def quantized_tensors(self) -> list[torch.Tensor]:
        return [self.weight_int8, self.weight_scale]

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        rows = self.weight_int8[start:end].float() * self.weight_scale[start:end, None]
        return rows.to(self.compute_dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        codes, scale = quantize_rows(weight)
        with torch.no_grad():
            self.weight_int8.copy_(codes)
            self.weight_scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = chunked_matmul(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)
