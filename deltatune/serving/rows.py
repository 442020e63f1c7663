"""One request's row while it generates: its sampling, its text, its stop strings.

Everything a row needs travels in :class:`Request`, so rows of any adapter, sampling setting
and length share a batch; the engine only feeds each row's next token and reads its logits.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

SEED_LIMIT = 2**63  # torch.Generator seeds are 64-bit; the API takes 0 .. 2**63 - 1


class QueueFull(RuntimeError):
    """The server already holds as many requests as it may; the client should retry later."""


@dataclass(eq=False)
class Request:
    """One completion: token ids in, events out through ``emit`` (thread-safe):
    ``("text", str)``, ``("done", finish_reason, tokens)``, ``("error", message, status, code)``."""

    adapter: str  # an adapter name, or BASE_ADAPTER
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    stop: list[str] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    mix: dict[str, Any] | None = None  # a per-request mix (serving/mixes.py); ``adapter`` is then its name
    cancelled: bool = False  # set by the client side (a dropped connection): the row leaves at the next step
    # filled while generating
    generated: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters already emitted
    finish_reason: str | None = None
    length: int = 0  # positions this row holds in the KV cache (its next token's position)
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None  # monotonic times, for the metrics
    last_token_at: float | None = None
    generator: torch.Generator | None = None

    @property
    def tokens(self) -> int:
        return len(self.generated)

    def cancel(self) -> None:
        self.cancelled = True

    def fail(self, message: str, status: int = 500, code: str = "generation_failed") -> None:
        if self.finish_reason is None:
            self.finish_reason = "error"
            self.emit(("error", message, status, code))


def asyncio_sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[tuple], None]:
    """An ``emit`` that hands events from the worker thread to a coroutine's queue."""

    def emit(event: tuple) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
            loop.call_soon_threadsafe(events.put_nowait, event)

    return emit


def pick(request: Request, logits: torch.Tensor) -> int:
    """The row's next token from its last-position logits: greedy at temperature 0, otherwise a
    draw at its temperature/top_p from its own seeded generator. Scaling after subtracting the
    maximum keeps any positive temperature finite (1e-45 behaves as greedy, not as inf/nan)."""
    if request.temperature == 0:
        return int(logits.argmax())
    scaled = (logits.double() - logits.max().double()) / request.temperature
    probs = torch.softmax(scaled, dim=-1)
    if request.top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        outside = ordered.cumsum(-1) - ordered > request.top_p  # keep the smallest set reaching top_p
        probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise ValueError("the sampling distribution is not finite")
    if request.generator is None and request.seed is not None:
        request.generator = torch.Generator().manual_seed(request.seed)
    return int(torch.multinomial(probs.float(), 1, generator=request.generator))


class Detokenizer:
    """Turns each row's tokens into streamed text: stops the row at its max_tokens, at a stop
    string (cut from the text) or at end-of-sequence, and holds back what may still change."""

    def __init__(self, tokenizer: Any, observe: Callable[[Request], None] | None = None) -> None:
        self.tokenizer, self.observe = tokenizer, observe  # observe: each token, before the client hears of it
        eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()

    def advance(self, request: Request, token: int) -> None:
        """Add ``token`` to the row; emit new text, and ``done`` when the row has finished."""
        if token in self.eos:
            request.finish_reason = "stop"
            request.generated.append(token)
        else:
            request.generated.append(token)
            ids = request.generated
            request.text = self.tokenizer.decode(ids, skip_special_tokens=True)
            start = max(0, request.sent - max((len(s) for s in request.stop), default=0))
            cut = min((i for i in (request.text.find(s, start) for s in request.stop) if i >= 0), default=-1)
            if cut >= 0:
                request.text, request.finish_reason = request.text[:cut], "stop"
            elif len(ids) >= request.max_tokens:
                request.finish_reason = "length"
        if self.observe is not None:
            self.observe(request)
        self._send(request)

    def _send(self, request: Request) -> None:
        end = len(request.text)
        if request.finish_reason is None:
            if request.text.endswith("\ufffd"):  # a multi-byte character still being decoded
                end = request.text.rfind("\ufffd")
            hold = max((len(s) - 1 for s in request.stop), default=0)
            end = min(end, len(request.text) - hold)
        if end > request.sent:
            request.emit(("text", request.text[request.sent : end]))
            request.sent = end
        if request.finish_reason is not None:
            request.emit(("done", request.finish_reason, request.tokens))
