"""The server's adapter store evicts the least recently used idle adapter, and only that one: the order
is pinned step by step (evicting the most recently used instead, or any other, fails here), an adapter
in use is never evicted, and the adapters that stay loaded keep computing what they computed."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, tiny_llama

import deltatune as dt
from deltatune.serving.adapters import Adapters

NAMES = ("a", "b", "c", "d")


@pytest.fixture(scope="module")
def directory(tmp_path_factory):
    """Four LoRA adapters with random (so distinct) weights, one folder each."""
    root = tmp_path_factory.mktemp("adapters")
    generator = torch.Generator().manual_seed(0)
    for name in NAMES:
        model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for param_name, param in model.named_parameters():
                if ".lora_" in param_name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        model.save_pretrained(root / name)
    return root


def _store(directory, max_loaded: int) -> Adapters:
    return Adapters(tiny_llama(), "tiny", directory, max_loaded)


def _logits(store: Adapters, name: str) -> torch.Tensor:
    store.model.set_adapter(name)
    with torch.no_grad():
        return store.model(**batch(length=6)).logits


def test_least_recently_used_idle_adapter_is_evicted(directory):
    store = _store(directory, max_loaded=2)
    assert store.ensure("a", set()) and store.ensure("b", set()) and store.loaded == ["a", "b"]
    assert store.ensure("a", set()) and store.loaded == ["b", "a"]  # a use makes a the most recent
    assert store.ensure("c", set()) and store.loaded == ["a", "c"]  # b, the least recent, goes
    assert store.ensure("b", set()) and store.loaded == ["c", "b"]  # now a is the least recent
    assert store.ensure("c", set()) and store.ensure("d", set()) and store.loaded == ["c", "d"]
    assert sorted(store.model.peft_config) == ["c", "d"]  # the model holds exactly the loaded ones


def test_an_adapter_in_use_is_skipped_and_a_full_busy_store_waits(directory):
    store = _store(directory, max_loaded=2)
    store.ensure("a", set())
    store.ensure("b", set())
    assert store.ensure("c", busy={"a"}) and store.loaded == ["a", "c"]  # a is least recent but busy: b goes
    assert not store.ensure("d", busy={"a", "c"}) and store.loaded == ["a", "c"]  # nothing idle: wait
    assert store.ensure("d", busy={"c"}) and store.loaded == ["c", "d"]


def test_adapters_that_stay_loaded_compute_as_freshly_loaded(directory):
    store = _store(directory, max_loaded=2)
    store.ensure("a", set())
    store.ensure("b", set())
    store.ensure("a", set())
    store.ensure("c", set())  # evicts b
    fresh = _store(directory, max_loaded=1)
    for name in ("a", "c"):
        fresh.ensure(name, set())
        assert torch.allclose(_logits(store, name), _logits(fresh, name), atol=1e-6)
    assert (_logits(store, "a") - _logits(store, "c")).abs().max() > 1e-3  # the adapters differ
