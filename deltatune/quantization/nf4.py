"""4-bit NF4 frozen linear layers (QLoRA's format), through bitsandbytes.

Weights are cut into blocks of 64, each scaled by its absmax and rounded to the 16 NormalFloat
levels (two per byte); ``double_quant`` also quantizes the absmax scales (8-bit, blocks of 256),
from 4.5 to about 4.13 bits per weight. bitsandbytes (≥ 0.48) runs this on x86-64 CPUs and on
CUDA with the same calls; its ``matmul_4bit`` dequantizes a layer's weight for the matmul
(a temporary, freed after it) and the backward to the input does the same, so the frozen base
is stored in 4 bits only. torchao's pure-PyTorch NF4 was tried too and not wired in: it was slower
than bitsandbytes per forward on SmolLM2's shapes (a trial with no raw line in bench/results, so no figure).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltatune.quantization.base import QuantizedLinear, product_dtype

BLOCKSIZE = 64


class NF4Linear(QuantizedLinear):
    """A frozen ``nn.Linear`` stored as packed NF4 codes (a frozen uint8 parameter) and block scales."""

    kind = "nf4"
    bits = 4.0

    def __init__(self, linear: nn.Linear, double_quant: bool = False) -> None:
        super().__init__(linear)
        self.double_quant = double_quant
        codes, self.quant_state = self._quantize(linear.weight)
        self.weight_nf4 = nn.Parameter(codes, requires_grad=False)

    def _quantize(self, weight: torch.Tensor) -> tuple[torch.Tensor, Any]:
        from deltatune.quantization import require

        functional = require("bitsandbytes").functional
        return functional.quantize_4bit(
            weight.detach().to(self.compute_dtype).contiguous(),
            blocksize=BLOCKSIZE,
            compress_statistics=self.double_quant,
            quant_type="nf4",
        )

    def quantized_tensors(self) -> list[torch.Tensor]:
        state = self.quant_state
        tensors = [self.weight_nf4, state.absmax]
        if state.nested:
            tensors += [state.state2.absmax, state.state2.code]
        return tensors

    def dequantize(self) -> torch.Tensor:
        from deltatune.quantization import require

        functional = require("bitsandbytes").functional
        return functional.dequantize_4bit(self.weight_nf4.detach(), self.quant_state).to(self.compute_dtype)

    def requantize_(self, weight: torch.Tensor) -> None:
        codes, self.quant_state = self._quantize(weight)
        with torch.no_grad():
            self.weight_nf4.copy_(codes)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> NF4Linear:
        out = super()._apply(fn, *args, **kwargs)
        self.quant_state.to(self.weight_nf4.device)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from deltatune.quantization import require

        bnb = require("bitsandbytes")
        xm = x.to(product_dtype(self, x))
        out = bnb.matmul_4bit(xm, self.weight_nf4.t(), quant_state=self.quant_state)
        out = out.to(x.dtype)
        return out if self.bias is None else out + self.bias.to(out.dtype)
