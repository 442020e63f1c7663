"""Which waiting requests join the batch each step (the Engine's scheduling half): a token budget per step,
one adapter load per step, long prompts prefilled a chunk per step, and the ``dynamic`` policy's gathering
window. The model calls are in :mod:`deltatune.serving.stepping`."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any

from transformers import DynamicCache

from deltatune.constants import BASE_ADAPTER
from deltatune.methods.contract import INPUT_WISE
from deltatune.mixed import mixes
from deltatune.serving.adapters import Adapters
from deltatune.serving.kv import Batch
from deltatune.serving.rows import Request

log = logging.getLogger("deltatune.serve")


class Admission:
    """Admitting waiting requests; mixed into :class:`~deltatune.serving.engine.Engine`, whose state it reads."""

    waiting: collections.deque[Request]
    cond: threading.Condition
    store: Adapters
    batch: Batch
    partial: tuple[Request, DynamicCache, int] | None
    scheduler: str
    max_batch: int
    prefill_chunk: int
    batch_window_s: float
    arrival_gap_s: float
    loads_left: int
    base_model: Any
    model: Any

    def _admit(self) -> None:
        """Waiting requests join within a token budget per step; a prompt longer than the budget
        is prefilled a chunk per step, and short requests keep joining (and decoding) meanwhile."""
        if self.scheduler == "dynamic":
            if self.batch.rows:
                return
            self._gather()
        self.loads_left = 1  # one adapter load per step: rows of loaded adapters wait at most one load
        budget, group = self.prefill_chunk if self.scheduler == "continuous" else float("inf"), []
        free = self.max_batch - len(self.batch.rows) - (self.partial is not None)
        for request in list(self.waiting):
            if len(group) >= free or budget <= 0:
                break
            long = len(request.prompt_ids) > budget
            if long and self.partial is not None:
                continue  # one long prompt at a time: this one starts when it has joined
            if long and group:
                break  # prefill what fits now; the long prompt starts next step
            if not self._ready(request, {r.adapter for r in group}):
                continue
            self._take(request)
            if self._alone(request):
                self._prefill_alone(request)
                free -= 1
            elif long:
                self.partial = (request, DynamicCache(config=self.base_model.config), 0)
                break
            else:
                group.append(request)
                budget -= len(request.prompt_ids)
        if group:
            self._prefill(group)
        if self.partial is not None:
            self._prefill_chunk()

    def _gather(self) -> None:
        """Dynamic batching: wait for requests that arrive close together before starting a batch."""
        deadline = time.monotonic() + self.batch_window_s
        with self.cond:
            while len(self.waiting) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                count = len(self.waiting)
                self.cond.wait(min(left, self.arrival_gap_s))
                if len(self.waiting) == count:
                    break

    def _ready(self, request: Request, joining: set[str]) -> bool:
        """Whether the request's adapter is loaded (loading it now if a slot is free)."""
        if request.adapter == BASE_ADAPTER:
            return True
        if request.mix is not None:
            return self._ready_mix(request, joining)
        if not self.store.find(request.adapter):
            self._take(request)
            request.fail(f"adapter {request.adapter!r} was deleted before this request ran", 404, "model_not_found")
            return False
        if not self._may_load(request.adapter):
            return False
        try:
            return self.store.ensure(request.adapter, self._in_use() | joining)
        except Exception as err:
            log.exception("loading adapter %s failed", request.adapter)
            self._take(request)
            request.fail(f"cannot load adapter {request.adapter!r}: {err}", 500, "adapter_load_failed")
            return False

    def _may_load(self, adapter: str) -> bool:
        """Whether this step may use ``adapter``: a recently used one always, a load only while the step's load
        budget lasts (each load spends one), so that decoding rows are not held up behind many loads."""
        if adapter in self.store.recent:
            return True
        if not self.loads_left:
            return False
        self.loads_left -= 1
        return True

    def _ready_mix(self, request: Request, joining: set[str]) -> bool:
        """Whether the request's mix is loaded (its parts loaded and combined now, if slots are free)."""
        missing = [p for p in request.mix["ids"] if not self.store.find(p)]
        if missing:
            self._take(request)
            message = f"adapter {missing[0]!r} of the mix was deleted before this request ran"
            request.fail(message, 404, "model_not_found")
            return False
        if not self._may_load(request.adapter):
            return False
        try:
            return self.store.ensure_mix(request.adapter, request.mix, self._in_use() | joining)
        except Exception as err:  # adapters that cannot combine (DoRA, ranks a strategy cannot mix, ...)
            log.warning("mixing %s failed: %s", request.mix, err)
            self._take(request)
            request.fail(f"cannot mix these adapters: {err}", 400, "invalid_mix")
            return False

    def _take(self, request: Request) -> None:
        with self.cond:
            if request in self.waiting:
                self.waiting.remove(request)

    def _alone(self, request: Request) -> bool:
        """Rows whose adapter adds virtual tokens or a prefix are prefilled on their own."""
        model = self.model
        config = model.peft_config.get(request.adapter) if model is not None else None
        return config is not None and mixes(config) in INPUT_WISE
