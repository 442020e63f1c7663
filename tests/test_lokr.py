"""LoKr against peft's on the same weights and seed: factor shapes and init, logits both ways,
merging, identity at init, several adapters active, mixed batches."""

import pytest
import torch
from conftest import batch, output, randomize_adapters, tiny_llama

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.methods.lokr import factorization

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
from peft.tuners.lokr.layer import factorization as peft_factorization  # noqa: E402

TARGETS = ["q_proj", "v_proj", "down_proj"]
VARIANTS = [{}, {"r": 2, "decompose_both": True}, {"r": 1, "decompose_factor": 4}, {"r": 16, "alpha": 4}]


def both(seed=3, **kw):
    models = []
    for build, config in ((dt.wrap, dt.LoKrConfig), (peft.get_peft_model, peft.LoKrConfig)):
        base = tiny_llama()
        torch.manual_seed(seed)
        models.append(build(base, config(target_modules=TARGETS, **kw)))
    return models


def test_factorization_equals_peft():
    for dim in [1, 2, 7, 12, 32, 64, 96, 127, 128, 576, 1536, 4096]:
        for factor in [-1, 2, 3, 4, 8, 16]:
            assert factorization(dim, factor) == peft_factorization(dim, factor), (dim, factor)


@pytest.mark.parametrize("kw", VARIANTS)
@pytest.mark.parametrize("init", [True, "lycoris", False])
def test_init_equals_peft(kw, init):
    ours, theirs = both(init_weights=init, **kw)
    mine, their = ours.adapter_state_dict(), peft.get_peft_model_state_dict(theirs)
    assert mine.keys() == their.keys()
    for key, value in mine.items():
        torch.testing.assert_close(value, their[key], atol=0, rtol=0, msg=key)
    if init is not False:
        torch.testing.assert_close(output(ours, batch()), output(tiny_llama(), batch()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kw", VARIANTS)
def test_both_directions(kw, tmp_path):
    ours, theirs = both(**kw)
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    expected = output(theirs, batch())
    assert (expected - output(tiny_llama(), batch())).abs().max() > 1e-3
    loaded = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path / "peft")
    torch.testing.assert_close(output(loaded, batch()), expected, atol=1e-5, rtol=1e-5)
    randomize_adapters(ours, seed=4)
    ours.save_pretrained(tmp_path / "ours")
    back = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "ours")
    torch.testing.assert_close(output(back, batch()), output(ours, batch()), atol=1e-5, rtol=1e-5)


def test_merge_equals_unmerged():
    model, _ = both(r=2, decompose_both=True)
    randomize_adapters(model)
    expected = output(model, batch())
    model.merge_adapter()
    torch.testing.assert_close(output(model, batch()), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    torch.testing.assert_close(output(model, batch()), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(output(model.merge_and_unload(), batch()), expected, atol=1e-5, rtol=1e-5)


def test_several_active_sum_and_mixed_batch():
    model = dt.wrap(tiny_llama(), dt.LoKrConfig(target_modules=TARGETS, r=2))
    model.add_adapter("b", dt.LoKrConfig(target_modules=["q_proj"], r=4, decompose_both=True))
    model.set_adapter(["default", "b"])
    randomize_adapters(model)  # both train while both are active
    inputs = batch(rows=3)
    together = output(model, inputs)
    base = output(model, {**inputs, "adapter_name": "__base__"})
    a, b = (output(model, {**inputs, "adapter_name": n}) for n in ("default", "b"))
    assert (a - base).abs().max() > 1e-3 and (b - base).abs().max() > 1e-3
    assert (together - a).abs().max() > 1e-4 and (together - b).abs().max() > 1e-4
    layer = model.base_model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    expected = layer.base_layer(x) + x @ layer.delta_weight("default").T + x @ layer.delta_weight("b").T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    names = ["default", "b", "__base__"]
    got = output(model, {**inputs, "adapter_names": names})
    for row, (name, ref) in enumerate(zip(names, (a, b, base), strict=True)):
        torch.testing.assert_close(got[row : row + 1], ref[row : row + 1], atol=1e-5, rtol=0, msg=name)


def test_bad_config():
    with pytest.raises(ConfigError, match="init_weights"):
        dt.LoKrConfig(init_weights="gaussian")
    with pytest.raises(ConfigError, match="target_modules"):
        dt.wrap(tiny_llama(), dt.LoKrConfig())
