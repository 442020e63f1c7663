"""The model calls of a step (the Engine's stepping half): prefill rows together (left-padded), on their own
(prompt learning) or a chunk at a time (long prompts), and one decoding step for every row, each row through
its own adapter. A call that raises is retried row by row, so a failure stays with its rows."""

from __future__ import annotations

import collections
import logging
from typing import Any

import torch
from transformers import DynamicCache

from deltatune import routing
from deltatune.compat import output_cache, set_cache
from deltatune.mixed import check
from deltatune.serving.adapters import Adapters
from deltatune.serving.kv import Batch
from deltatune.serving.rows import Request

log = logging.getLogger("deltatune.serve")


class Stepping:
    """Prefill and decode; mixed into :class:`~deltatune.serving.engine.Engine`, whose state it reads and whose
    ``_join``/``_advance`` (sampling, then adding rows to the batch) it calls."""

    base_model: Any
    model: Any
    store: Adapters
    batch: Batch
    partial: tuple[Request, DynamicCache, int] | None
    pad_id: int
    prefill_chunk: int
    steps: collections.deque[tuple[str, ...]]
    checked_key: tuple | None = None  # what the last mixed.check passed (Stepping._checked)

    def _forward(self, names: list[str], cache: DynamicCache, **inputs: Any) -> torch.Tensor:
        """Last-position logits of one forward, each row through its own adapter: the model's public per-row
        call (``DeltaModel.forward(adapter_names=...)``), given the slots' routing when the server keeps slots."""
        model, slots = self.model, self.store.slots
        names = self._checked(model, names)
        rows = slots.rows(names) if slots is not None else routing.RowAdapters(names)
        set_cache(inputs, self.base_model, cache)
        out = model(**inputs, use_cache=True, logits_to_keep=1, adapter_names=rows)
        return out.logits[:, -1]

    def _checked(self, model: Any, names: list[str]) -> list[str]:
        """``names`` once ``mixed.check`` passes them; a step whose adapters and the model's loaded ones are those
        the last check passed skips it (decoding steps repeat their names; ``check`` walks every layer for a
        merged adapter, and the server never merges one or disables adapters)."""
        key = (id(model), frozenset(names), tuple(model.peft_config))
        if key != self.checked_key:
            names = check(model, names)
            self.checked_key = key
        return names

    def _prefill(self, group: list[Request]) -> None:
        """Prefill rows together (left-padded), pick their first tokens, and add them to the batch."""
        try:
            self._prefill_rows(group)
        except Exception as err:
            if len(group) == 1:
                log.exception("prefill failed")
                group[0].fail(f"generation failed: {type(err).__name__}: {err}")
                return
            for request in group:  # find the row that fails: each alone
                self._prefill([request])

    def _prefill_rows(self, group: list[Request]) -> None:
        longest = max(len(r.prompt_ids) for r in group)
        ids = torch.full((len(group), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, request in enumerate(group):
            ids[i, longest - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[i, longest - len(request.prompt_ids) :] = 1
        cache = DynamicCache(config=self.base_model.config)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self._forward(
            [r.adapter for r in group],
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
        )
        for request in group:
            request.length = len(request.prompt_ids)
        self._join(group, logits, cache, mask)

    def _prefill_alone(self, request: Request) -> None:
        """A prompt-learning row: its virtual tokens or prefix go in first (mixed.prepare_inputs)."""
        try:
            ids = torch.tensor([request.prompt_ids])
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
            set_cache(inputs, self.base_model, DynamicCache(config=self.base_model.config))
            out = self.model(**inputs, use_cache=True, logits_to_keep=1, adapter_names=[request.adapter])
            cache = output_cache(out)
            request.length = cache.get_seq_length()
            self._join([request], out.logits[:, -1], cache, torch.ones(1, request.length, dtype=torch.long))
        except Exception as err:
            log.exception("prefill failed")
            request.fail(f"generation failed: {type(err).__name__}: {err}")

    def _prefill_chunk(self) -> None:
        """The next chunk of the long prompt being prefilled; the last one joins the batch."""
        request, cache, done = self.partial
        chunk = request.prompt_ids[done : done + self.prefill_chunk]
        end = done + len(chunk)
        try:
            logits = self._forward(
                [request.adapter],
                input_ids=torch.tensor([chunk]),
                attention_mask=torch.ones(1, end, dtype=torch.long),
                position_ids=torch.arange(done, end)[None],
                cache=cache,
            )
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
            logits = self._decode_rows(rows, batch.cache, batch.mask)
        except Exception:
            log.exception("a decoding step failed; retrying its rows one by one")
            batch.crop(width)
            logits = self._decode_each(rows)
        else:
            batch.mask = torch.nn.functional.pad(batch.mask, (0, 1), value=1)
        for request in rows:
            request.length += 1
        self._advance(rows, logits)

    def _decode_rows(self, rows: list[Request], cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
        return self._forward(
            [r.adapter for r in rows],
            input_ids=torch.tensor([[r.generated[-1]] for r in rows]),
            attention_mask=torch.nn.functional.pad(mask, (0, 1), value=1),
            position_ids=torch.tensor([[r.length] for r in rows]),
            cache=cache,
        )

    def _decode_each(self, rows: list[Request]) -> torch.Tensor:
        """Each row's step alone; rows that fail alone fail, the others are stacked back together."""
        vocab, kept, logits = None, [], []
        for i, request in enumerate(rows):
            cache, mask = self.batch.row(i)
            try:
                row_logits = self._decode_rows([request], cache, mask)
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
