"""Hot-swapping LoRA adapters in place: same outputs as loading the new adapter afresh, the same
tensor objects, and no recompilation of a torch.compile'd model (counted by a counting backend)."""

import pytest
import torch
from conftest import batch, randomize_adapters, tiny_llama

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.hotswap import prepare_model_for_compiled_hotswap

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def saved(tmp_path, name, r, alpha, seed, targets=TARGETS, **kw):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw))
    randomize_adapters(model, seed=seed)
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def fresh_logits(path, inputs):
    with torch.no_grad():
        return dt.DeltaModel.from_pretrained(tiny_llama(), path)(**inputs).logits


class CountingBackend:
    """A torch.compile backend that runs the captured graph eagerly and counts compilations."""

    def __init__(self):
        self.compiles = 0

    def __call__(self, graph, example_inputs):
        self.compiles += 1
        return graph.forward


def test_swap_in_place_equals_fresh_load(tmp_path):
    first, second = saved(tmp_path, "a", 4, 8, 1), saved(tmp_path, "b", 8, 32, 2, use_rslora=True)
    model = dt.DeltaModel.from_pretrained(tiny_llama(), first)
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    inputs = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, fresh_logits(first, inputs), atol=1e-5, rtol=0)
    before = {n: p for n, p in model.named_parameters() if "lora_" in n}
    dt.hotswap_adapter(model, second, "default")
    assert all(p is before[n] for n, p in model.named_parameters() if "lora_" in n)  # the same tensors
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, fresh_logits(second, inputs), atol=1e-5, rtol=0)
    dt.hotswap_adapter(model, first, "default")  # and back to a smaller rank (zero-padded)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, fresh_logits(first, inputs), atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "again")  # the padded adapter still saves and loads
    torch.testing.assert_close(fresh_logits(tmp_path / "again", inputs), fresh_logits(first, inputs), atol=1e-5, rtol=0)


def test_compiled_model_does_not_recompile(tmp_path):
    torch._dynamo.reset()
    first, second, third = (
        saved(tmp_path, n, r, a, s) for n, r, a, s in (("a", 4, 8, 1), ("b", 8, 4, 2), ("c", 2, 16, 3))
    )
    model = dt.DeltaModel.from_pretrained(tiny_llama(), first).eval()
    prepare_model_for_compiled_hotswap(model, target_rank=8)
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    inputs = batch()
    with torch.no_grad():
        compiled(**inputs)
        compiles = backend.compiles
        assert compiles >= 1
        for path in (second, third, first):
            dt.hotswap_adapter(compiled, path, "default")
            torch.testing.assert_close(compiled(**inputs).logits, fresh_logits(path, inputs), atol=1e-5, rtol=0)
    assert backend.compiles == compiles


def test_without_preparation_a_new_scale_recompiles(tmp_path):
    """The control: the counter does see a recompilation when the scale is a Python number."""
    torch._dynamo.reset()
    first, second = saved(tmp_path, "a", 4, 8, 1), saved(tmp_path, "b", 4, 4, 2)
    model = dt.DeltaModel.from_pretrained(tiny_llama(), first).eval()
    backend = CountingBackend()
    compiled = torch.compile(model, backend=backend)
    with torch.no_grad():
        compiled(**batch())
        compiles = backend.compiles
        dt.hotswap_adapter(compiled, second, "default")
        torch.testing.assert_close(compiled(**batch()).logits, fresh_logits(second, batch()), atol=1e-5, rtol=0)
    assert backend.compiles > compiles


def test_refusals(tmp_path):
    model = dt.DeltaModel.from_pretrained(tiny_llama(), saved(tmp_path, "a", 4, 8, 1))
    with pytest.raises(ConfigError, match="target_rank=8"):
        dt.hotswap_adapter(model, saved(tmp_path, "big", 8, 8, 2), "default")
    with pytest.raises(ConfigError, match="different modules"):
        dt.hotswap_adapter(model, saved(tmp_path, "other", 4, 8, 2, targets=["q_proj"]), "default")
    with pytest.raises(ConfigError, match="use_dora"):
        dt.hotswap_adapter(model, saved(tmp_path, "dora", 4, 8, 2, use_dora=True), "default")
    compiled = torch.compile(model, backend=CountingBackend())
    with pytest.raises(ValueError, match=r"before torch\.compile"):
        prepare_model_for_compiled_hotswap(compiled, target_rank=8)


def test_dora_adapters_swap_with_their_magnitudes(tmp_path):
    def dora(name, seed):
        model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True))
        randomize_adapters(model, seed=seed)  # magnitudes too
        model.save_pretrained(tmp_path / name)
        return tmp_path / name

    first, second = dora("a", 1), dora("b", 2)
    model = dt.DeltaModel.from_pretrained(tiny_llama(), first)
    inputs = batch()
    with torch.no_grad():
        model(**inputs)  # fills the weight-norm cache, which the swap must invalidate
        dt.hotswap_adapter(model, second, "default")
        torch.testing.assert_close(model(**inputs).logits, fresh_logits(second, inputs), atol=1e-5, rtol=0)
