"""(IA)³ against peft's on the same weights: logits both ways, defaults, merging, identity at init,
several adapters active (scales multiply) and mixed batches."""

import pytest
import torch
from conftest import TINY_MODELS, batch, output, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.config import ConfigError

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

CASES = {  # arch: (targets, feed-forward targets); None: peft's defaults for the model type
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "gpt2": (["c_attn", "mlp.c_proj"], ["mlp.c_proj"]),
    "bert": (None, None),
}


def randomize_scales(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))


def ours(arch, **kw):
    targets, ff = CASES[arch]
    return dt.wrap(TINY_MODELS[arch](), dt.IA3Config(target_modules=targets, feedforward_modules=ff, **kw))


@pytest.mark.parametrize("arch", sorted(CASES))
def test_identity_at_init(arch):
    torch.testing.assert_close(output(ours(arch), batch()), output(TINY_MODELS[arch](), batch()), atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_peft_to_ours(arch, tmp_path):
    targets, ff = CASES[arch]
    theirs = peft.get_peft_model(TINY_MODELS[arch](), peft.IA3Config(target_modules=targets, feedforward_modules=ff))
    randomize_scales(theirs)
    theirs.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(TINY_MODELS[arch](), tmp_path)
    expected = output(theirs, batch())
    assert (expected - output(TINY_MODELS[arch](), batch())).abs().max() > 1e-3 * expected.abs().max()
    torch.testing.assert_close(output(loaded, batch()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_ours_to_peft(arch, tmp_path):
    model = ours(arch)
    randomize_scales(model)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(TINY_MODELS[arch](), tmp_path)
    torch.testing.assert_close(output(theirs, batch()), output(model, batch()), atol=1e-5, rtol=1e-5)
    assert set(theirs.peft_config["default"].feedforward_modules) == set(
        model.peft_config["default"].feedforward_modules
    )


def test_default_targets_equal_peft():
    theirs = peft.get_peft_model(tiny_llama(), peft.IA3Config())
    model = dt.wrap(tiny_llama(), dt.IA3Config())
    assert set(model.adapter_state_dict()) == set(peft.get_peft_model_state_dict(theirs))
    assert sorted(model.peft_config["default"].feedforward_modules) == sorted(
        theirs.peft_config["default"].feedforward_modules
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_merge_equals_unmerged_and_unmerge_restores(arch):
    model = ours(arch)
    randomize_scales(model)
    with torch.no_grad():  # the tiny models' biases start at 0: give the scaled bias something to do
        for name, p in model.base_model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items()}
    expected = output(model, batch())
    model.merge_adapter()
    torch.testing.assert_close(output(model, batch()), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    for key, value in model.base_model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(output(model.merge_and_unload(), batch()), expected, atol=1e-5, rtol=1e-5)


def test_several_active_multiply_as_peft():
    targets, ff = CASES["gpt2"]
    theirs = peft.get_peft_model(tiny_gpt2(), peft.IA3Config(target_modules=targets, feedforward_modules=ff))
    theirs.add_adapter("other", peft.IA3Config(target_modules=targets, feedforward_modules=ff))
    model = ours("gpt2")
    model.add_adapter("other", dt.IA3Config(target_modules=targets, feedforward_modules=ff))
    for m in (theirs, model):
        for i, name in enumerate(["default", "other"]):
            m.set_adapter(name) if m is model else m.base_model.set_adapter(name)
            randomize_scales(m, seed=i)
    theirs.base_model.set_adapter(["default", "other"])
    model.set_adapter(["default", "other"])
    torch.testing.assert_close(output(model, batch()), output(theirs, batch()), atol=1e-5, rtol=1e-5)


def test_mixed_batch_and_bad_config():
    model = ours("llama")
    model.add_adapter("b", dt.IA3Config(target_modules=["k_proj"]))
    randomize_scales(model)
    inputs = batch(rows=3)
    names = ["default", "b", "__base__"]
    got = output(model, {**inputs, "adapter_names": names})
    for row, name in enumerate(names):
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        torch.testing.assert_close(got[row : row + 1], output(model, {**one, "adapter_name": name}), atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="not in target_modules"):
        dt.IA3Config(target_modules=["k_proj"], feedforward_modules=["down_proj"])
