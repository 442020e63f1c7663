"""An evicted adapter's slot is reset to zeros in every layer that stays (serving/slots.py says so), also
when another loaded adapter shares those layers, and the adapter that stays keeps its factors.

No output can see a stale slot (a step reads only loaded adapters' slots, and a load zeroes its slot
before writing), so this reads the table itself: it pins the documented state, not a computed result."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import deltatune as dt
from deltatune.serving.adapters import Adapters
from deltatune.serving.slots import SlotTable


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    """Two LoRA adapters on the same layers (q, v), random so non-zero."""
    root = tmp_path_factory.mktemp("shared-layers")
    generator = torch.Generator().manual_seed(3)
    for name in ("a", "b"):
        model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if ".lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator))
        model.save_pretrained(root / name)
    return root


def test_an_eviction_zeroes_its_slot_where_another_adapter_stays(directory):
    store = Adapters(tiny_llama(), "tiny", directory, 2, SlotTable(slots=2, max_rank=4))
    assert store.ensure("a", set()) and store.ensure("b", set())
    table = store.slots
    gone, kept = table.slot_of["a"], table.slot_of["b"]
    assert all(a[gone].any() and b[gone].any() for _, a, b, _ in table.tables.values())
    store.unload("a")
    assert table.slot_of == {"b": kept} and len(table.tables) == 4  # q and v of both layers stay, for b
    for layer, a, b, _ in table.tables.values():
        assert not a[gone].any() and not b[gone].any()
        assert torch.equal(a[kept, :2], layer.lora_A["b"].weight)
        assert torch.equal(b[kept, :2], (layer.lora_B["b"].weight * layer.scaling["b"]).T)
