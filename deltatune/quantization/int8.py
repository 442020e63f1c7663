"""int8 frozen linear layers: per-output-channel symmetric weights, float activations (weight-only).

W ≈ diag(s)·Q with Q ∈ [-127, 127] and s = max|W_row| / 127. The codes and scales are the only stored
form: the forward and the input-gradient backward dequantize a block of rows at a time and multiply in
the activations' own dtype (``chunked_matmul``), so the error is the weights' rounding alone.

Why weight-only: an int8 GEMM (fbgemm's, activations rounded per token) adds the activations' rounding
error to the weights' and agreed less often with float32's top-1 token when tried on SmolLM2; torch's
``_weight_int8pack_mm`` (weight-only int8 kernel, meant for a few tokens) was slower than float32 on this CPU even
for one token, and its time grows with the tokens far faster than the float matmul's.

Decoding multiplies a few rows by each weight, and there dequantizing the whole weight per token costs far more
than the product itself. So a product of at most :data:`FEW_ROWS` rows, with no gradient to keep, runs
:func:`few_rows_times_codes`: the sum over the int8 codes written as one broadcast reduction and compiled by
inductor, which reads each code once and never writes a float weight (batch-1 decoding figures:
bench/quantized.py ``--parts decode``, docs/quantization.md). Compiling costs about a second per process and
dtype; where inductor cannot compile (no C++ compiler), the path switches off with one warning and the chunked
product runs.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from deltatune.quantization.base import CHUNK_WEIGHTS, QuantizedLinear, QuantizedWeight, chunked_matmul

QMAX = 127
FEW_ROWS = 16  # rows up to which the compiled product beat dequantize-then-matmul (one-off timings, 1-32 rows)

log = logging.getLogger(__name__)


def _rows_times_codes(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x·(diag(scale)·codes)ᵀ for a 2-d x, as one reduction over the input dimension."""
    return ((x[:, None, :] * codes.to(x.dtype)).sum(-1) * scale).to(x.dtype)


def _compiled_rows_times_codes(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _compile_once()(x, codes, scale)


@functools.cache
def _compile_once() -> Callable[..., torch.Tensor]:
    """Compiled at first use: importing dynamo adds ~110 MB of RSS, which a process that only trains should not pay."""
    return torch.compile(_rows_times_codes, dynamic=True)


_compiled_works = True  # False after inductor failed once in this process


def few_rows_times_codes(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor | None:
    """``x @ (scale·codes)ᵀ`` for x of at most FEW_ROWS rows (any leading dims) through the compiled kernel, or
    None where the kernel is unavailable (the caller then takes the chunked path)."""
    global _compiled_works
    rows = x.reshape(-1, x.shape[-1])
    if torch.compiler.is_compiling():  # inside a caller's compiled graph: inductor fuses the plain expression
        return _rows_times_codes(rows, codes, scale).reshape(*x.shape[:-1], codes.shape[0])
    if not _compiled_works:
        return None
    try:
        out = _compiled_rows_times_codes(rows, codes, scale)
    except Exception as err:  # any compile failure: fall back, once, loudly
        _compiled_works = False
        log.warning("int8 decoding kernel unavailable (%s: %s); using dequantize-then-matmul", type(err).__name__, err)
        return None
    return out.reshape(*x.shape[:-1], codes.shape[0])


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 codes, float32 per-row scales): symmetric, one scale per output channel. Rows are rounded a
    block at a time, so the float temporaries are one block's (CHUNK_WEIGHTS), whatever the weight's size."""
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device)
    step = max(1, CHUNK_WEIGHTS // max(1, weight.shape[1]))
    for i in range(0, weight.shape[0], step):
        w = weight.detach()[i : i + step].float()
        s = (torch.linalg.vector_norm(w, ord=float("inf"), dim=1) / QMAX).clamp(min=torch.finfo(torch.float32).tiny)
        codes[i : i + step] = (w / s[:, None]).round_().clamp_(-QMAX, QMAX)  # w / s: the caller's weight stays
        scale[i : i + step] = s
    return codes, scale


class Int8Linear(QuantizedLinear):
    """A frozen ``nn.Linear`` stored as int8 codes (a frozen parameter) and float32 row scales, nothing else."""

    kind = "int8"
    bits = 8.0

    def __init__(self, linear: nn.Linear, stored: tuple[nn.Parameter, nn.Parameter] | None = None) -> None:
        super().__init__(linear)
        if stored is not None:  # a head tied to an Int8Embedding: the same two parameters, stored once
            self.weight_int8, self.weight_scale = stored
            return
        codes, scale = quantize_rows(linear.weight)
        self.weight_int8 = nn.Parameter(codes.to(linear.weight.device), requires_grad=False)
        self.register_buffer("weight_scale", scale.to(linear.weight.device))

    def quantized_tensors(self) -> list[torch.Tensor]:
        return [self.weight_int8, self.weight_scale]

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        rows = self.weight_int8[start:end].float() * self.weight_scale[start:end, None]
        return rows.to(self.compute_dtype)

    def dequantize_rows_into(self, start: int, end: int, out: torch.Tensor) -> torch.Tensor:
        out.copy_(self.weight_int8[start:end])  # codes in [-127, 127]: exact in any float dtype
        return self.weight_scale[start:end]

    def requantize_(self, weight: torch.Tensor) -> None:
        codes, scale = quantize_rows(weight)
        with torch.no_grad():
            self.weight_int8.copy_(codes)
            self.weight_scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = None
        if x.numel() <= FEW_ROWS * self.in_features and not (torch.is_grad_enabled() and x.requires_grad):
            out = few_rows_times_codes(x, self.weight_int8, self.weight_scale)
        if out is None:
            out = chunked_matmul(x, self)
        return out if self.bias is None else out + self.bias.to(out.dtype)


class Int8Embedding(nn.Embedding):
    """A frozen token embedding stored as int8 row codes and float32 row scales (a row per token): a lookup
    gathers and dequantizes only the rows it needs. A tied output head is an :class:`Int8Linear` on the same
    two parameters (:func:`tie_head`), so the vocabulary table is stored once, in int8."""

    kind = "int8"

    def __init__(self, embedding: nn.Embedding) -> None:
        nn.Module.__init__(self)  # nn.Embedding's own __init__ would allocate a float table
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = embedding.padding_idx, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.compute_dtype = embedding.weight.dtype
        codes, scale = quantize_rows(embedding.weight)
        self.weight_int8 = nn.Parameter(codes, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)  # a parameter: a tied head shares it

    # what QuantizedWeight reads: the table is out_features (tokens) x in_features (dimensions)
    @property
    def out_features(self) -> int:
        return self.num_embeddings

    @property
    def in_features(self) -> int:
        return self.embedding_dim

    @property
    def weight(self) -> QuantizedWeight:  # type: ignore[override]
        return QuantizedWeight(self)  # type: ignore[arg-type]

    def storage_device(self) -> torch.device:
        return self.weight_int8.device

    def dequantize(self) -> torch.Tensor:
        return Int8Linear.dequantize_rows(self, 0, self.num_embeddings)  # type: ignore[arg-type]

    def requantize_(self, weight: torch.Tensor) -> None:
        Int8Linear.requantize_(self, weight)  # type: ignore[arg-type]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.weight_int8[flat].float() * self.weight_scale[flat, None]
        return rows.to(self.compute_dtype).reshape(*ids.shape, self.embedding_dim)

    def to_float(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` with the dequantized table (what a float merge writes)."""
        embedding = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx, device="meta")
        embedding.weight = nn.Parameter(self.dequantize(), requires_grad=False)
        return embedding

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, kind=int8"


def tie_head(model: nn.Module) -> bool:
    """For a model whose token embedding is an :class:`Int8Embedding`: an output head tied to it (not loaded:
    still on the meta device) becomes an Int8Linear on the same parameters. Returns whether the embedding is
    int8 (then transformers' ``tie_weights``, which would tie a float weight, must not run)."""
    embedding = model.get_input_embeddings()
    if not isinstance(embedding, Int8Embedding):
        return False
    head = model.get_output_embeddings()
    if head is not None and getattr(model.config, "tie_word_embeddings", False) and head.weight.is_meta:
        name = next(n for n, m in model.named_modules() if m is head)
        parent_name, _, child = name.rpartition(".")
        layer = Int8Linear(head, stored=(embedding.weight_int8, embedding.weight_scale))
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    return True


def quantize_embedding(model: nn.Module) -> None:
    """Make ``model``'s token embedding an :class:`Int8Embedding` in place (a plain ``nn.Embedding`` only),
    and a head tied to it an Int8Linear on the same codes."""
    embedding = model.get_input_embeddings()
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None:
        return
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    quantized = Int8Embedding(embedding)
    model.set_input_embeddings(quantized)
    if tied:
        name = next(n for n, m in model.named_modules() if m is head)
        parent_name, _, child = name.rpartition(".")
        layer = Int8Linear(head, stored=(quantized.weight_int8, quantized.weight_scale))
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
