"""What DeltaModel repeats at each adapter load (a server loads one per request), made fast and kept exact:
the walk over wrapped layers gives what ``named_modules`` gives, ``set_adapter`` trains exactly the named
adapters, and a new adapter takes the model's train/eval mode without a ``model.eval()`` over every module."""

from __future__ import annotations

import pytest
import torch
from conftest import batch, tiny_bert, tiny_llama

import deltatune as dt
from deltatune.methods.base import DeltaLayer

QV = ["q_proj", "v_proj"]


def by_named_modules(model: dt.DeltaModel) -> list[tuple[str, int]]:
    return [(n, id(m)) for n, m in model.base_model.named_modules() if isinstance(m, DeltaLayer)]


def walked(model: dt.DeltaModel) -> list[tuple[str, int]]:
    return [(n, id(m)) for n, m in model.delta_layers()]


def test_walk_equals_named_modules_with_many_adapters_and_methods():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV), "a")
    for name in "bcd":
        model.add_adapter(name, dt.LoraConfig(r=2, target_modules=QV))
    model.add_adapter("ia3", dt.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]))
    assert len(walked(model)) == 2 * 2 + 2  # q and v of both layers, down_proj of both
    assert walked(model) == by_named_modules(model)


def test_walk_equals_named_modules_with_copies_and_a_shared_module():
    model = dt.wrap(tiny_bert(), dt.LoraConfig(r=4, target_modules=["query", "value"]), "a")
    assert any(type(m).__name__ == "ModulesToSave" for _, m in model.delta_layers())  # the classifier's copy
    shared = model.base_model.bert.encoder.layer[1].attention.self.query
    model.base_model.bert.embeddings.alias = shared  # one module at two paths: named_modules gives it once, first
    assert walked(model) == by_named_modules(model)
    assert dict(walked(model))["bert.embeddings.alias"] == id(shared)


def trainable(model: dt.DeltaModel) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_set_adapter_trains_exactly_the_named_adapters():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV, lora_dropout=0.1), "a")
    for name in "bc":
        model.add_adapter(name, dt.LoraConfig(r=2, target_modules=QV))
    every = {n for n, _ in model.named_parameters() if ".lora_" in n}
    for names in (["b"], ["a", "c"], ["a"]):
        model.set_adapter(names if len(names) > 1 else names[0])
        expected = {n for n in every if any(f".{a}." in n or n.endswith(f".{a}") for a in names)}
        assert expected and trainable(model) == expected


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_new_adapter_takes_the_model_mode(mode):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV), "a")
    getattr(model, mode)()
    model.add_adapter("b", dt.LoraConfig(r=4, target_modules=[*QV, "o_proj"], lora_dropout=0.5))
    assert {m.training for m in model.modules()} == {mode == "train"}  # o_proj's new wrapper too
    if mode == "eval":
        inputs = batch()
        with torch.no_grad():
            first, second = (model(**inputs, adapter_name="b").logits for _ in range(2))
        torch.testing.assert_close(first, second, rtol=0, atol=0)  # no dropout at work


def test_rename_adapter_keeps_what_runs():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=QV), "a").eval()
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=QV))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(generator=torch.Generator().manual_seed(len(name)))
    inputs = batch()
    with torch.no_grad():
        before = model(**inputs).logits  # the active adapter, a
        model.rename_adapter("a", "z")
        after = model(**inputs).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert model.active_adapter == "z" and list(model.peft_config) == ["z", "b"]
    assert all(layer.active_adapter == "z" and "a" not in layer.scaling for _, layer in model.delta_layers())
    model.set_adapter(["z", "b"])
    model.rename_adapter("b", "y")
    assert model.active_adapters == ["z", "y"]
    with pytest.raises(ValueError, match="z"):
        model.rename_adapter("y", "z")  # taken
