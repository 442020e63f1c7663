"""The runner: one forward for a batch of rows, each row through its own adapter, and nothing else. It prefills
rows together (left-padded), on their own (prompt learning) or a chunk at a time (long prompts), and runs one
decoding step, always through the model's public per-row call (``DeltaModel.forward(adapter_names=...)``, given
the adapter slots' routing when the server keeps slots). It returns logits and caches; which rows run, their
sampling and what happens when a call fails are the engine's (:mod:`deltatune.serving.engine`)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from deltatune import routing
from deltatune.compat import output_cache, set_cache
from deltatune.mixed import check
from deltatune.serving.adapters import Adapters
from deltatune.serving.rows import Request


class Runner:
    """Model calls over the adapters of ``store`` (its model may hold none: rows then run the base)."""

    def __init__(self, store: Adapters, base_model: Any, pad_id: int) -> None:
        self.store, self.base_model, self.pad_id = store, base_model, pad_id
        self.checked_key: tuple | None = None  # what the last mixed.check passed (Runner.checked)

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.base_model.config)

    def forward(self, names: list[str], cache: DynamicCache, **inputs: Any) -> torch.Tensor:
        """Last-position logits of one forward, each row through its own adapter."""
        model, slots = self.store.model, self.store.slots
        names = self.checked(model, names)
        rows = slots.rows(names) if slots is not None else routing.RowAdapters(names)
        set_cache(inputs, self.base_model, cache)
        out = model(**inputs, use_cache=True, logits_to_keep=1, adapter_names=rows)
        return out.logits[:, -1]

    def checked(self, model: Any, names: list[str]) -> list[str]:
        """``names`` once ``mixed.check`` passes them; a step whose adapters and the model's loaded ones are those
        the last check passed skips it (decoding steps repeat their names; ``check`` walks every layer for a
        merged adapter, and the server never merges one or disables adapters)."""
        key = (id(model), frozenset(names), tuple(model.peft_config))
        if key != self.checked_key:
            names = check(model, names)
            self.checked_key = key
        return names

    def prefill(self, group: list[Request]) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """Rows' prompts together, left-padded: their last logits, their cache and its mask."""
        longest = max(len(r.prompt_ids) for r in group)
        ids = torch.full((len(group), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, request in enumerate(group):
            ids[i, longest - len(request.prompt_ids) :] = torch.tensor(request.prompt_ids)
            mask[i, longest - len(request.prompt_ids) :] = 1
        cache = self.new_cache()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.forward(
            [r.adapter for r in group], input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache
        )
        return logits, cache, mask

    def prefill_alone(self, request: Request) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
        """A prompt-learning row on its own: its virtual tokens or prefix go in first (the per-row call adds
        them, ``mixed.prepare_inputs``); its logits, cache and mask (virtual tokens included)."""
        ids = torch.tensor([request.prompt_ids])
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        set_cache(inputs, self.base_model, self.new_cache())
        out = self.store.model(**inputs, use_cache=True, logits_to_keep=1, adapter_names=[request.adapter])
        cache = output_cache(out)
        return out.logits[:, -1], cache, torch.ones(1, cache.get_seq_length(), dtype=torch.long)

    def prefill_chunk(self, request: Request, cache: DynamicCache, done: int, size: int) -> tuple[torch.Tensor, int]:
        """The next ``size`` tokens of a long prompt whose first ``done`` are in ``cache``: logits and the new end."""
        chunk = request.prompt_ids[done : done + size]
        end = done + len(chunk)
        logits = self.forward(
            [request.adapter],
            input_ids=torch.tensor([chunk]),
            attention_mask=torch.ones(1, end, dtype=torch.long),
            position_ids=torch.arange(done, end)[None],
            cache=cache,
        )
        return logits, end

    def decode(self, rows: list[Request], cache: DynamicCache, mask: torch.Tensor) -> torch.Tensor:
        """One decoding step: each row's last token at its own position, over ``cache`` (``mask``: its columns)."""
        return self.forward(
            [r.adapter for r in rows],
            input_ids=torch.tensor([[r.generated[-1]] for r in rows]),
            attention_mask=torch.nn.functional.pad(mask, (0, 1), value=1),
            position_ids=torch.tensor([[r.length] for r in rows]),
            cache=cache,
        )
