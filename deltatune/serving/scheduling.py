"""The scheduler: which waiting requests join the batch each step. A token budget per step, a time budget for
adapter loads (the first always runs), long prompts prefilled a chunk per step (one at a time). Another admission
policy is a subclass handed to the engine (``Engine(scheduler=...)``); bench/serve_load.py's ``GatheringScheduler``
is the earlier dynamic batching. It owns the waiting queue and the long prompt being prefilled, asks the adapter
store to load what a request needs, and answers with the rows that join; the engine
(:mod:`deltatune.serving.engine`) prefills them through its runner (:mod:`deltatune.serving.stepping`)."""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

from transformers import DynamicCache

from deltatune.constants import BASE_ADAPTER
from deltatune.methods.contract import INPUT_WISE
from deltatune.mixed import mixes
from deltatune.serving.adapters import Adapters
from deltatune.serving.rows import Request

log = logging.getLogger("deltatune.serve")


@dataclasses.dataclass
class Joining:
    """The rows one step admits: prefilled together (``group``), and one by one (``alone``: prompt learning).
    A long prompt admitted is :attr:`Scheduler.partial`, prefilled a chunk per step."""

    group: list[Request]
    alone: list[Request]


class Scheduler:
    """Continuous admission: waiting requests join the running batch at every step, within a token budget."""

    def __init__(
        self,
        store: Adapters,
        cond: threading.Condition,
        new_cache: Callable[[], DynamicCache],
        max_batch: int = 16,
        prefill_chunk: int = 512,
        load_budget_s: float = 0.05,
    ) -> None:
        self.store, self.cond, self.new_cache = store, cond, new_cache
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.waiting: collections.deque[Request] = collections.deque()  # guarded by ``cond``
        self.partial: tuple[Request, DynamicCache, int] | None = None  # a long prompt prefilled chunk by chunk
        # Seconds of adapter loads a step may spend (the first load always runs): running rows wait about that
        # much at most, and a load that swaps into an evicted adapter's tensors (~9 ms) lets several join at once.
        self.load_budget_s = load_budget_s
        self.load_time_left, self.first_load = load_budget_s, True

    def admit(self, running: list[Request]) -> Joining | None:
        """The waiting requests that join a batch running ``running`` now, within a token budget; a prompt longer
        than the budget becomes :attr:`partial`, and short requests keep joining (and decoding) meanwhile.
        None (a subclass's answer): nobody may join this step."""
        self.load_time_left = self.load_budget_s
        self.first_load = True
        budget = self.prefill_chunk
        joining = Joining([], [])
        busy = {r.adapter for r in running} | ({self.partial[0].adapter} if self.partial else set())
        free = self.max_batch - len(running) - (self.partial is not None)
        for request in list(self.waiting):
            group = joining.group
            if len(group) >= free or budget <= 0:
                break
            long = len(request.prompt_ids) > budget
            if long and self.partial is not None:
                continue  # one long prompt at a time: this one starts when it has joined
            if long and group:
                break  # prefill what fits now; the long prompt starts next step
            if not self._ready(request, busy | {r.adapter for r in [*group, *joining.alone]}):
                continue
            self.take(request)
            if self._alone(request):
                joining.alone.append(request)
                free -= 1
            elif long:
                self.partial = (request, self.new_cache(), 0)
                break
            else:
                group.append(request)
                budget -= len(request.prompt_ids)
        return joining

    def _ready(self, request: Request, busy: set[str]) -> bool:
        """Whether the request's adapter is loaded (loading it now if a slot is free)."""
        if request.adapter == BASE_ADAPTER:
            return True
        if request.mix is not None:
            return self._ready_mix(request, busy)
        if not self.store.find(request.adapter):
            self.take(request)
            request.fail(f"adapter {request.adapter!r} was deleted before this request ran", 404, "model_not_found")
            return False
        if not self._may_load(request.adapter):
            return False
        start = time.perf_counter()
        try:
            return self.store.ensure(request.adapter, busy)
        except Exception as err:
            log.exception("loading adapter %s failed", request.adapter)
            self.take(request)
            request.fail(f"cannot load adapter {request.adapter!r}: {err}", 500, "adapter_load_failed")
            return False
        finally:
            self.load_time_left -= time.perf_counter() - start

    def _may_load(self, adapter: str) -> bool:
        """Whether this step may use ``adapter``: a loaded one always; a load if it is the step's first or while
        the step's load time budget lasts, so that decoding rows are not held up behind many loads."""
        if adapter in self.store.recent:
            return True
        if not self.first_load and self.load_time_left <= 0:
            return False
        self.first_load = False
        return True

    def _ready_mix(self, request: Request, busy: set[str]) -> bool:
        """Whether the request's mix is loaded (its parts loaded and combined now, if slots are free)."""
        missing = [p for p in request.mix["ids"] if not self.store.find(p)]
        if missing:
            self.take(request)
            message = f"adapter {missing[0]!r} of the mix was deleted before this request ran"
            request.fail(message, 404, "model_not_found")
            return False
        if not self._may_load(request.adapter):
            return False
        start = time.perf_counter()
        try:
            return self.store.ensure_mix(request.adapter, request.mix, busy)
        except Exception as err:  # adapters that cannot combine (DoRA, ranks a strategy cannot mix, ...)
            log.warning("mixing %s failed: %s", request.mix, err)
            self.take(request)
            request.fail(f"cannot mix these adapters: {err}", 400, "invalid_mix")
            return False
        finally:
            self.load_time_left -= time.perf_counter() - start

    def take(self, request: Request) -> None:
        """Take ``request`` out of the waiting queue (it joins, or it has failed)."""
        with self.cond:
            if request in self.waiting:
                self.waiting.remove(request)

    def _alone(self, request: Request) -> bool:
        """Rows whose adapter adds virtual tokens or a prefix are prefilled on their own."""
        config = self.store.model.peft_config.get(request.adapter)
        return config is not None and mixes(config) in INPUT_WISE
