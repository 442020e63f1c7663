"""The generation engine behind ``deltatune serve``: continuous batching across adapters.

    HTTP handlers ──submit()──► waiting (bounded: 429) ──► worker thread, one loop turn per step:
        ▲  (asyncio)                                        1. adapter commands (load/delete), between steps
        │                                                   2. rows that finished or were cancelled leave
        │                                                   3. waiting requests join: their adapter loaded on
        │                                                      demand, prompts prefilled (long ones a chunk
        │                                                      per step), stacked into the batch (kv.Batch)
        └──── text deltas, done, errors ◄────────────────── 4. one decoding step for every row, mixed adapters

Each row keeps its own KV cache rows, position, sampling, stop strings and max_tokens, so a row
that joins late computes exactly what it would alone. Who joins is the scheduler's: ``scheduler=``
takes another :class:`~deltatune.serving.scheduling.Scheduler` class (bench/serve_load.py hands it the earlier
dynamic batching, to compare with).

Why not transformers' continuous batching (``generation/continuous_batching``): it packs every
request into one ragged row (``input_ids`` of shape 1 × total tokens, ``cu_seq_lens``) over a
paged cache, while deltatune's mixed-adapter layers route by batch row (routing.RowAdapters: one
adapter per row of dim 0); its own scheduler and sampling also own the loop where per-row
temperature/seed, stop strings and on-demand adapter loading must live.

A failure stays with its rows: a prefill or step that raises is retried row by row, and only the
rows that fail alone get an error.

This module holds the worker, its commands, each step's prefills and decoding (with their row-by-row retries)
and the per-row sampling. The engine holds three parts, each readable alone: who joins a step is the
:class:`~deltatune.serving.scheduling.Scheduler`'s, the model calls the :class:`~deltatune.serving.stepping.Runner`'s,
what is loaded the :class:`~deltatune.serving.adapters.Adapters` store's (LRU over the slots).
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from deltatune.serving.adapters import Adapters
from deltatune.serving.kv import Batch
from deltatune.serving.metrics import Metrics
from deltatune.serving.rows import Detokenizer, QueueFull, Request, pick
from deltatune.serving.scheduling import Scheduler
from deltatune.serving.slots import SlotTable
from deltatune.serving.stepping import Runner

log = logging.getLogger("deltatune.serve")


class Engine:
    """A base model, its adapters, and the worker that runs requests across them in one batch. It holds three
    parts that read alone: the adapter store (``store``: what is loaded, LRU over the slots), the scheduler
    (``scheduler``: who joins each step) and the runner (``runner``: one forward for a batch of rows)."""

    def __init__(
        self,
        base_model: torch.nn.Module,
        tokenizer: Any,
        base_name: str,
        adapters_dir: str | Path | None = None,
        max_batch: int = 16,
        max_queue: int = 256,
        max_loaded: int | None = None,
        max_lora_rank: int | None = None,
        prefill_chunk: int = 512,
        scheduler: type[Scheduler] = Scheduler,
    ) -> None:
        self.base_model = base_model.eval()
        self.tokenizer, self.base_name = tokenizer, base_name
        self.adapters_dir = Path(adapters_dir).resolve() if adapters_dir else None
        slots = SlotTable(max_loaded, max_lora_rank) if max_loaded and max_lora_rank else None
        self.store = Adapters(self.base_model, base_name, self.adapters_dir, max_loaded, slots)
        self.max_queue = max_queue
        self.context_length = getattr(base_model.config, "max_position_embeddings", None) or 2048
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.runner = Runner(self.store, self.base_model, self.pad_id)
        self.metrics = Metrics(self)
        self.detokenizer = Detokenizer(tokenizer, self.metrics.token)
        self.commands: collections.deque[tuple[Callable[[], Any], concurrent.futures.Future]] = collections.deque()
        self.cond = threading.Condition()  # guards the waiting queue, the commands and ``stopping``
        self.scheduler = scheduler(
            self.store, self.cond, self.runner.new_cache, max_batch=max_batch, prefill_chunk=prefill_chunk
        )
        self.lock = threading.Lock()  # held by the worker for each step; tests hold it to pause the worker
        self.batch = Batch()
        self.steps: collections.deque[tuple[str, ...]] = collections.deque(maxlen=256)  # recent steps' adapters
        self.stopping = False
        if max_loaded is None:  # everything on disk, loaded now (as before on-demand loading)
            for name in self.store.servable:
                self.store.ensure(name, set())
        self.worker = threading.Thread(target=self._run, name="deltatune-generate", daemon=True)
        self.worker.start()

    # --- the HTTP side ----------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self.store.model

    @property
    def waiting(self) -> collections.deque[Request]:
        """Requests not admitted yet (the scheduler's queue)."""
        return self.scheduler.waiting

    @property
    def partial(self) -> tuple[Request, DynamicCache, int] | None:
        """The long prompt being prefilled a chunk per step (the scheduler's): its request, cache and tokens done."""
        return self.scheduler.partial

    @partial.setter
    def partial(self, value: tuple[Request, DynamicCache, int] | None) -> None:
        self.scheduler.partial = value

    @property
    def adapters(self) -> list[str]:
        """Adapters that can be served (loaded or on disk)."""
        return self.store.servable

    def servable(self, name: str) -> bool:
        return self.store.find(name)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def running_requests(self) -> list[Request]:
        """Requests in the batch, and the long prompt being prefilled."""
        return [*self.batch.rows, *([self.partial[0]] if self.partial else [])]

    @property
    def open_requests(self) -> int:
        """Requests taken and not yet answered: waiting, being prefilled, or generating."""
        return len(self.waiting) + len(self.batch.rows) + (self.partial is not None)

    def busy(self) -> bool:
        return bool(self.waiting or self.batch.rows or self.partial or self.commands)

    def submit(self, request: Request) -> None:
        with self.cond:
            if self.stopping:
                raise QueueFull("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the server holds {self.max_queue} waiting requests already; retry later")
            self.waiting.append(request)
            self.cond.notify()

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the worker between two steps (adapter loads and deletes change the model)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self.cond:
            self.commands.append((fn, future))
            self.cond.notify()
        return future

    def load_adapter(self, name: str, path: Path) -> concurrent.futures.Future:
        def load() -> None:
            self.store.register(name, path)
            try:
                self.store.ensure(name, self._in_use())
            except Exception:
                self.store.forget(name)
                raise

        return self.call(load)

    def delete_adapter(self, name: str) -> concurrent.futures.Future:
        def delete() -> None:
            message = f"adapter {name!r} was deleted while this request ran"
            for request in [*self.waiting, *self.batch.rows, *([self.partial[0]] if self.partial else [])]:
                if request.adapter == name:
                    request.fail(message, 404, "model_not_found")
            self._drop_finished()
            self.store.forget(name, deleted=True)

        return self.call(delete)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still open get a 503 error."""
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.worker.join(timeout)
        for request in [*self.waiting, *self.batch.rows, *([self.partial[0]] if self.partial else [])]:
            request.fail("the server is shutting down", 503, "shutting_down")

    # --- the worker ---------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self.cond:
                while not (self.stopping or self.busy()):
                    self.cond.wait()
                if self.stopping:
                    return
                commands = list(self.commands)
                self.commands.clear()
            with self.lock:
                for fn, future in commands:
                    self._command(fn, future)
                try:
                    self._step()
                except Exception as err:  # never the server: the open rows fail, the worker goes on
                    log.exception("a step failed")
                    self._fail_open(f"generation failed: {type(err).__name__}: {err}")
            if not self.batch.rows and not self.partial and self.waiting:
                time.sleep(0.001)  # waiting rows that cannot run yet (no adapter slot free): yield the CPU

    def _fail_open(self, message: str) -> None:
        for request in [*self.batch.rows, *([self.partial[0]] if self.partial else [])]:
            request.fail(message)
        self.batch, self.partial = Batch(), None

    @staticmethod
    def _command(fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        try:
            future.set_result(fn())
        except Exception as err:
            future.set_exception(err)

    def _step(self) -> None:
        self._drop_finished()
        with torch.no_grad():
            self._admit()
            if self.batch.rows:
                self._decode()
        self._drop_finished()

    def _admit(self) -> None:
        """The rows the scheduler admits are prefilled (and join the batch); a long prompt takes its next chunk."""
        joining = self.scheduler.admit(self.batch.rows)
        if joining is None:
            return
        for request in joining.alone:
            self._prefill_alone(request)
        if joining.group:
            self._prefill(joining.group)
        if self.partial is not None:
            self._prefill_chunk()

    def _in_use(self) -> set[str]:
        rows = [*self.batch.rows, *([self.partial[0]] if self.partial else [])]
        return {r.adapter for r in rows}

    def _drop_finished(self) -> None:
        with self.cond:
            for request in [r for r in self.waiting if r.cancelled or r.finish_reason is not None]:
                self.waiting.remove(request)
        if self.partial and (self.partial[0].cancelled or self.partial[0].finish_reason is not None):
            self.partial = None
        if self.batch.rows:
            self.batch.keep([i for i, r in enumerate(self.batch.rows) if not r.cancelled and r.finish_reason is None])

    # --- a step's prefills and decoding: the runner's calls, a failure kept to its rows -------------
    def _prefill(self, group: list[Request]) -> None:
        """Prefill rows together (left-padded), pick their first tokens, and add them to the batch."""
        try:
            logits, cache, mask = self.runner.prefill(group)
            for request in group:
                request.length = len(request.prompt_ids)
            self._join(group, logits, cache, mask)
        except Exception as err:
            if len(group) == 1:
                log.exception("prefill failed")
                group[0].fail(f"generation failed: {type(err).__name__}: {err}")
                return
            for request in group:  # find the row that fails: each alone
                self._prefill([request])

    def _prefill_alone(self, request: Request) -> None:
        """A prompt-learning row: its virtual tokens or prefix go in first."""
        try:
            logits, cache, mask = self.runner.prefill_alone(request)
            request.length = mask.shape[1]
            self._join([request], logits, cache, mask)
        except Exception as err:
            log.exception("prefill failed")
            request.fail(f"generation failed: {type(err).__name__}: {err}")

    def _prefill_chunk(self) -> None:
        """The next chunk of the long prompt being prefilled; the last one joins the batch."""
        request, cache, done = self.partial
        try:
            logits, end = self.runner.prefill_chunk(request, cache, done, self.scheduler.prefill_chunk)
        except Exception as err:
            log.exception("prefill failed")
            self.partial = None
            request.fail(f"generation failed: {type(err).__name__}: {err}")
            return
        if end < len(request.prompt_ids):
            self.partial = (request, cache, end)
            return
        self.partial = None
        request.length = end
        self._join([request], logits, cache, torch.ones(1, end, dtype=torch.long))

    def _decode(self) -> None:
        batch = self.batch
        rows, width = list(batch.rows), batch.length
        self.steps.append(tuple(r.adapter for r in rows))
        try:
            logits = self.runner.decode(rows, batch.cache, batch.mask)
        except Exception:
            log.exception("a decoding step failed; retrying its rows one by one")
            batch.crop(width)
            logits = self._decode_each(rows)
        else:
            batch.mask = torch.nn.functional.pad(batch.mask, (0, 1), value=1)
        for request in rows:
            request.length += 1
        self._advance(rows, logits)

    def _decode_each(self, rows: list[Request]) -> torch.Tensor:
        """Each row's step alone; rows that fail alone fail, the others are stacked back together."""
        vocab, kept, logits = None, [], []
        for i, request in enumerate(rows):
            cache, mask = self.batch.row(i)
            try:
                row_logits = self.runner.decode([request], cache, mask)
            except Exception as err:
                request.fail(f"generation failed: {type(err).__name__}: {err}")
                logits.append(None)
                continue
            vocab = row_logits.shape[-1]
            kept.append((request, cache, torch.nn.functional.pad(mask, (0, 1), value=1)))
            logits.append(row_logits[0])
        fresh = Batch()
        for request, cache, mask in kept:
            fresh.add([request], cache, mask)
        self.batch.rows, self.batch.cache, self.batch.mask = fresh.rows, fresh.cache, fresh.mask
        filler = torch.zeros(vocab or 1)
        return torch.stack([row if row is not None else filler for row in logits])

    def _join(self, group: list[Request], logits: torch.Tensor, cache: DynamicCache, mask: torch.Tensor) -> None:
        self._advance(group, logits)
        keep = [i for i, r in enumerate(group) if r.finish_reason is None and not r.cancelled]  # cancelled: no token
        if not keep:
            return
        if len(keep) < len(group):
            index = torch.tensor(keep)
            cache.batch_select_indices(index)
            mask, group = mask[index], [group[i] for i in keep]
        self.batch.add(group, cache, mask)

    def _advance(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Each row's next token from its logits; a row whose sampling fails fails alone."""
        greedy = logits.argmax(-1).tolist()
        for i, request in enumerate(rows):
            if request.finish_reason is not None or request.cancelled:
                continue
            try:
                token = greedy[i] if request.temperature == 0 else pick(request, logits[i])
                self.detokenizer.advance(request, token)
            except Exception as err:
                log.exception("sampling failed")
                request.fail(f"generation failed: {type(err).__name__}: {err}")
