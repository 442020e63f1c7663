"""The generation engine behind ``deltatune serve``: dynamic batching across adapters.

    HTTP handlers ──submit()──► bounded queue ──► worker thread ──► one generate() per batch
        ▲  (asyncio)              (full: 429)       gathers up to max_batch requests that arrive
        └──── text deltas, done, errors ◄──────────  together, whatever their adapter, and runs
                                                     them in one pass with adapter_names (mixed.py)

Each row stops on its own: at its ``max_tokens``, at one of its ``stop`` strings, or at the
end-of-sequence token (transformers keeps finished rows padded while the others go on). Rows can
sample at their own temperature/top_p while others decode greedily: a logits processor draws the
sampled rows' tokens and leaves only that token for the greedy pick. Adapters are loaded and
removed between batches, under the same lock the worker holds while it generates.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from deltatune.config import DeltaConfig
from deltatune.mixed import BASE_ADAPTER, mixable
from deltatune.model import DeltaModel

log = logging.getLogger("deltatune.serve")


class QueueFull(RuntimeError):
    """The server already holds as many requests as it may; the client should retry later."""


@dataclass
class Request:
    """One completion: token ids in, text events out (through ``emit``, thread-safe)."""

    adapter: str  # an adapter name, or BASE_ADAPTER
    prompt_ids: list[int]
    max_tokens: int
    emit: Callable[[tuple], None]
    stop: list[str] = field(default_factory=list)
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # filled while generating
    text: str = ""
    sent: int = 0  # characters already emitted
    tokens: int = 0
    finish_reason: str | None = None


def asyncio_sink(loop: asyncio.AbstractEventLoop, events: asyncio.Queue) -> Callable[[tuple], None]:
    """An ``emit`` that hands events from the worker thread to a coroutine's queue."""
    return lambda event: loop.call_soon_threadsafe(events.put_nowait, event)


class Engine:
    """A base model, its adapters, and the worker that batches requests across them."""

    def __init__(
        self,
        base_model: torch.nn.Module,
        tokenizer: Any,
        base_name: str,
        adapters_dir: str | Path | None = None,
        max_batch: int = 16,
        max_queue: int = 256,
        batch_window_s: float = 0.5,
        arrival_gap_s: float = 0.05,
    ) -> None:
        self.base_model = base_model.eval()
        self.model: DeltaModel | None = None
        self.tokenizer = tokenizer
        self.base_name = base_name
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        self.max_batch, self.batch_window_s, self.arrival_gap_s = max_batch, batch_window_s, arrival_gap_s
        self.context_length = getattr(base_model.config, "max_position_embeddings", None) or 2048
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.waiting: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self.lock = threading.Lock()
        self.batches: list[list[str]] = []  # each batch's adapters, for tests and logs
        self.worker = threading.Thread(target=self._run, name="deltatune-generate", daemon=True)
        self.worker.start()
        if self.adapters_dir is not None:
            for path in found_adapters(self.adapters_dir):
                self.load_adapter(path.name, path)

    # --- adapters -------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        return list(self.model.peft_config) if self.model is not None else []

    def load_adapter(self, name: str, path: Path) -> None:
        kind = DeltaConfig.load(path).peft_type
        if kind not in mixable():
            raise ValueError(
                f"a {kind} adapter cannot share batches with others; the server takes {', '.join(sorted(mixable()))}"
            )
        with self.lock:
            if self.model is None:
                self.model = DeltaModel.from_pretrained(self.base_model, path, name)
            else:
                self.model.load_adapter(path, name)
            self.model.eval()
        log.info("loaded adapter %s from %s", name, path)

    def delete_adapter(self, name: str) -> None:
        with self.lock:
            self.model.delete_adapter(name)
        log.info("removed adapter %s", name)

    # --- requests -------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        try:
            self.waiting.put_nowait(request)
        except queue.Full:
            raise QueueFull(f"the server holds {self.waiting.maxsize} requests already; retry later") from None

    def _next_batch(self) -> list[Request]:
        """The first waiting request and those that follow it closely: collecting stops when none
        arrives for ``arrival_gap_s``, after ``batch_window_s``, or at ``max_batch``. Clients that
        get their answers together send their next requests a few ms apart; a fixed short window
        would split them into small batches that then queue behind each other."""
        batch = [self.waiting.get()]
        deadline = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch and (left := deadline - time.monotonic()) > 0:
            try:
                batch.append(self.waiting.get(timeout=min(left, self.arrival_gap_s)))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            try:
                with self.lock:
                    self._generate(batch)
            except Exception as err:  # a failed batch fails its requests, never the server
                log.exception("generation failed")
                for request in batch:
                    if request.finish_reason is None:
                        request.emit(("error", f"generation failed: {type(err).__name__}: {err}"))

    def _generate(self, batch: list[Request]) -> None:
        for request in [r for r in batch if r.adapter != BASE_ADAPTER and r.adapter not in self.adapters]:
            request.finish_reason = "error"
            request.emit(("error", f"adapter {request.adapter!r} was removed before this request ran"))
            batch.remove(request)
        if not batch:
            return
        names = [r.adapter for r in batch]
        self.batches.append(names)
        longest = max(len(r.prompt_ids) for r in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, request in enumerate(batch):  # left padding: every row's next token is at the end
            ids[i, longest - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[i, longest - len(request.prompt_ids) :] = 1
        watcher = RowWatcher(batch, self.tokenizer, longest)
        settings = dict(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(r.max_tokens for r in batch),
            do_sample=False,
            pad_token_id=self.pad_id,
            logits_processor=LogitsProcessorList([RowSampler(batch)]),
            stopping_criteria=StoppingCriteriaList([watcher]),
        )
        with torch.no_grad():
            if self.model is None:
                self.base_model.generate(**settings)
            else:
                self.model.generate(**settings, adapter_names=names)
        watcher.finish_all()


def found_adapters(directory: Path) -> list[Path]:
    """``directory`` itself if it holds an adapter, else each sub-directory that does."""
    if (directory / "adapter_config.json").is_file():
        return [directory]
    return sorted(p for p in directory.iterdir() if (p / "adapter_config.json").is_file())


class RowSampler(LogitsProcessor):
    """Per-row temperature and top-p inside a greedy generate: a sampling row's drawn token is
    left as its only candidate, so the greedy pick takes it; greedy rows are untouched."""

    def __init__(self, batch: list[Request]) -> None:
        self.rows = [(i, r) for i, r in enumerate(batch) if r.temperature > 0]
        self.generators = {
            i: torch.Generator().manual_seed(r.seed) if r.seed is not None else None for i, r in self.rows
        }

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for i, request in self.rows:
            probs = torch.softmax(scores[i].float() / request.temperature, dim=-1)
            if request.top_p < 1.0:
                ordered, order = probs.sort(descending=True)
                outside = ordered.cumsum(-1) - ordered > request.top_p  # keep the smallest set reaching top_p
                probs = probs.scatter(0, order, ordered.masked_fill(outside, 0.0))
            token = torch.multinomial(probs, 1, generator=self.generators[i])
            scores[i] = torch.full_like(scores[i], float("-inf")).scatter(0, token, 0.0)
        return scores


class RowWatcher(StoppingCriteria):
    """Runs after every step: decodes each row's new tokens, streams the new text, and stops the
    row at its max_tokens, at a stop string (cut from the text) or at end-of-sequence."""

    def __init__(self, batch: list[Request], tokenizer: Any, prompt_length: int) -> None:
        self.batch, self.tokenizer, self.prompt_length = batch, tokenizer, prompt_length
        eos = tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) if eos is not None else set()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        done = torch.zeros(len(self.batch), dtype=torch.bool, device=input_ids.device)
        for i, request in enumerate(self.batch):
            if request.finish_reason is None:
                self._advance(request, input_ids[i, self.prompt_length :].tolist())
            done[i] = request.finish_reason is not None
        return done

    def _advance(self, request: Request, new_ids: list[int]) -> None:
        if new_ids and new_ids[-1] in self.eos:
            new_ids, request.finish_reason = new_ids[:-1], "stop"
        request.tokens = len(new_ids) + (request.finish_reason == "stop")
        text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in request.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, request.finish_reason = text[:cut], "stop"
        elif request.finish_reason is None and len(new_ids) >= request.max_tokens:
            request.finish_reason = "length"
        request.text = text
        self._send(request)

    def _send(self, request: Request) -> None:
        """Emit the text not yet sent, holding back an unfinished character or a possible stop-string start."""
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

    def finish_all(self) -> None:
        """Rows still open when generate returned ran out of tokens."""
        for request in self.batch:
            if request.finish_reason is None:
                request.finish_reason = "length"
                self._send(request)
