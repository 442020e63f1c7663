"""A load that evicts an adapter of the same shapes copies the new weights into the evicted one's
tensors and renames it (serving/adapters.py ``_swap_into``) instead of making and dropping every
layer's modules. What it serves must equal a fresh load, alone and in slot rows; other shapes load afresh."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, randomize_adapters, tiny_llama

import deltatune as dt
from deltatune.constants import BASE_ADAPTER
from deltatune.serving.adapters import Adapters
from deltatune.serving.slots import SlotTable

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    """LoRA adapters with random weights: a, b, c at rank 2 (c with another alpha and dropout), wide at rank 4,
    q_only at rank 2 on q_proj alone."""
    root = tmp_path_factory.mktemp("adapters")
    configs = {
        "a": dt.LoraConfig(r=2, target_modules=QV),
        "b": dt.LoraConfig(r=2, target_modules=QV),
        "c": dt.LoraConfig(r=2, lora_alpha=5, lora_dropout=0.2, target_modules=QV),
        "wide": dt.LoraConfig(r=4, target_modules=QV),
        "q_only": dt.LoraConfig(r=2, target_modules=["q_proj"]),
    }
    for seed, (name, config) in enumerate(configs.items()):
        model = dt.wrap(tiny_llama(), config)
        randomize_adapters(model, seed, std=0.5)
        model.save_pretrained(root / name)
    return root


def fresh_logits(directory, name: str, inputs) -> torch.Tensor:
    model = dt.DeltaModel.from_pretrained(tiny_llama(), directory / name, name).eval()
    with torch.no_grad():
        return model(**inputs).logits


def a_module(store: Adapters, name: str) -> torch.nn.Module:
    return next(layer for _, layer in store.model.delta_layers()).lora_A[name]


@pytest.mark.parametrize("slots", [None, 2])
def test_a_load_into_an_evicted_adapters_tensors_serves_as_a_fresh_load(directory, slots):
    table = SlotTable(slots, 4) if slots else None
    store = Adapters(tiny_llama().eval(), "tiny", directory, 2, table)
    store.ensure("a", set())
    store.ensure("b", set())
    held = a_module(store, "a")
    assert store.ensure("c", set())  # evicts a, the least recently used: c takes its tensors
    assert a_module(store, "c") is held  # the swap ran: no new module
    assert store.loaded == ["b", "c"] and sorted(store.model.peft_config) == ["b", "c"]
    assert store.model.peft_config["c"].lora_alpha == 5 and store.evictions == 1 and store.loads == 3
    inputs = batch(length=6)
    with torch.no_grad():
        for name in ("b", "c"):
            ours = store.model(**inputs, adapter_name=name).logits
            torch.testing.assert_close(ours, fresh_logits(directory, name, inputs), rtol=1e-5, atol=1e-5)
        if table is not None:
            assert sorted(table.slot_of) == ["b", "c"]
            names = ["c", BASE_ADAPTER, "b"]
            rows = torch.cat([inputs["input_ids"][:1]] * 3)
            mixed = store.model(input_ids=rows, adapter_names=table.rows(names)).logits
            for i, name in enumerate(names):
                alone = store.model(input_ids=rows[i : i + 1], adapter_name=name).logits
                torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    layer = next(layer for _, layer in store.model.delta_layers())
    assert layer.scaling["c"] == pytest.approx(5 / 2) and layer.lora_dropout["c"].p == pytest.approx(0.2)
    assert not layer.lora_dropout["c"].training  # the model's mode
    store.ensure("a", set())  # evicts b
    store.ensure("b", set())  # evicts c, with dropout: b has none
    assert a_module(store, "b") is held and "b" not in layer.lora_dropout and layer.scaling["b"] == 8 / 2
    with torch.no_grad():
        ours = store.model(**inputs, adapter_name="b").logits
    torch.testing.assert_close(ours, fresh_logits(directory, "b", inputs), rtol=1e-5, atol=1e-5)


def test_another_rank_loads_afresh(directory):
    store = Adapters(tiny_llama().eval(), "tiny", directory, 1, SlotTable(1, 4))
    store.ensure("a", set())
    held = a_module(store, "a")
    assert store.ensure("wide", set())
    assert a_module(store, "wide") is not held and a_module(store, "wide").weight.shape[0] == 4
    inputs = batch(length=6)
    with torch.no_grad():
        ours = store.model(**inputs, adapter_name="wide").logits
    torch.testing.assert_close(ours, fresh_logits(directory, "wide", inputs), rtol=1e-5, atol=1e-5)


def test_a_swap_the_checkpoint_refuses_evicts_and_loads_afresh(directory):
    """q_only passes the shape check (rank 2 wherever a holds tensors) but its checkpoint lacks v_proj: the swap
    refuses before copying, a is evicted once, and q_only loads as usual."""
    store = Adapters(tiny_llama().eval(), "tiny", directory, 1, SlotTable(1, 4))
    store.ensure("a", set())
    held = a_module(store, "a")
    assert store.ensure("q_only", set())
    assert store.loaded == ["q_only"] and list(store.model.peft_config) == ["q_only"] and store.evictions == 1
    assert a_module(store, "q_only") is not held
    assert not any("v_proj" in n for n, layer in store.model.delta_layers() if "q_only" in layer.scaling)
    inputs = batch(length=6)
    with torch.no_grad():
        ours = store.model(**inputs, adapter_name="q_only").logits
    torch.testing.assert_close(ours, fresh_logits(directory, "q_only", inputs), rtol=1e-5, atol=1e-5)
