"""The scheduler: which waiting requests join the batch each step. A token budget per step, a time budget for
adapter loads (the first always runs), long prompts prefilled a chunk per step (one at a time). Another admission
policy is a subclass handed to the engine (``Engine(scheduler=...)``); bench/serve_load.py's ``GatheringScheduler``
is the earlier dynamic batching. It owns the waiting queue and the long prompt being prefilled, asks the adapter
store to load what a request needs, and answers with the rows that join; the engine
(:mod:`deltatune.serving.engine`) prefills them through its runner (:mod:`deltatune.serving.stepping`)."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterator

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


@dataclasses.dataclass
class LoadBudget:
    """One step's time for adapter loads (seconds ``left``): the first load always runs, later ones while time is
    left, so that decoding rows are not held up behind many loads. A loaded adapter spends nothing."""

    left: float
    loaded_once: bool = False

    def allows(self) -> bool:
        return not self.loaded_once or self.left > 0

    @contextlib.contextmanager
    def spend(self, loading: bool) -> Iterator[None]:
        """Time the block (an ``ensure``) against the budget if it loads; one of a loaded adapter costs nothing."""
        if not loading:
            yield
            return
        self.loaded_once = True
        start = time.perf_counter()
        try:
            yield
        finally:
            self.left -= time.perf_counter() - start


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

    def admit(self, running: list[Request]) -> Joining | None:
        """The waiting requests that join a batch running ``running`` now, within a token budget; a prompt longer
        than the budget becomes :attr:`partial`, and short requests keep joining (and decoding) meanwhile.
        None (a subclass's answer): nobody may join this step."""
        loads = LoadBudget(self.load_budget_s)  # this step's, passed along: nothing per step is kept on self
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
            if not self._ready(request, busy | {r.adapter for r in [*group, *joining.alone]}, loads):
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

    def _ready(self, request: Request, busy: set[str], loads: LoadBudget) -> bool:
        """Whether the request's adapter is loaded (loading it now if a slot is free and ``loads`` allows)."""
        if request.adapter == BASE_ADAPTER:
            return True
        if request.mix is not None:
            return self._ready_mix(request, busy, loads)
        if not self.store.find(request.adapter):
            self.take(request)
            request.fail(f"adapter {request.adapter!r} was deleted before this request ran", 404, "model_not_found")
            return False
        loading = request.adapter not in self.store.recent
        if loading and not loads.allows():
            return False
        try:
            with loads.spend(loading):
                return self.store.ensure(request.adapter, busy)
        except Exception as err:
            log.exception("loading adapter %s failed", request.adapter)
            self.take(request)
            request.fail(f"cannot load adapter {request.adapter!r}: {err}", 500, "adapter_load_failed")
            return False

    def _ready_mix(self, request: Request, busy: set[str], loads: LoadBudget) -> bool:
        """Whether the request's mix is loaded (its parts loaded and combined now, if slots are free)."""
        missing = [p for p in request.mix["ids"] if not self.store.find(p)]
        if missing:
            self.take(request)
            message = f"adapter {missing[0]!r} of the mix was deleted before this request ran"
            request.fail(message, 404, "model_not_found")
            return False
        loading = request.adapter not in self.store.recent
        if loading and not loads.allows():
            return False
        try:
            with loads.spend(loading):
                return self.store.ensure_mix(request.adapter, request.mix, busy)
        except Exception as err:  # adapters that cannot combine (DoRA, ranks a strategy cannot mix, ...)
            log.warning("mixing %s failed: %s", request.mix, err)
            self.take(request)
            request.fail(f"cannot mix these adapters: {err}", 400, "invalid_mix")
            return False

    def take(self, request: Request) -> None:
        """Take ``request`` out of the waiting queue (it joins, or it has failed)."""
        with self.cond:
            if request in self.waiting:
                self.waiting.remove(request)

    def _alone(self, request: Request) -> bool:
        """Rows whose adapter adds virtual tokens or a prefix are prefilled on their own."""
        config = self.store.model.peft_config.get(request.adapter)
        return config is not None and mixes(config) in INPUT_WISE
