"""DoRA against peft's own DoRA on the same weights: logits, checkpoints both ways, merging,
identity at init, mixed batches and the weight-norm cache."""

import pytest
import torch
from conftest import batch, output, randomize_adapters, tiny_gpt2, tiny_llama
from safetensors.torch import load_file

import deltatune as dt

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

CASES = {
    "linear": (tiny_llama, ["q_proj", "v_proj"]),
    "conv1d": (tiny_gpt2, ["c_attn"]),
    "embedding": (tiny_llama, ["q_proj", "embed_tokens"]),
}


def ours(factory, targets, **kw):
    return dt.wrap(factory(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, **kw))


def magnitudes_off_init(model, seed=3):
    """Move the magnitudes away from ‖W0‖ too (randomize_adapters makes them ~0.1 otherwise fine)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.2 * torch.rand(p.shape, generator=g))


@pytest.mark.parametrize("case", sorted(CASES))
def test_identity_at_init(case):
    factory, targets = CASES[case]
    torch.testing.assert_close(output(ours(factory, targets), batch()), output(factory(), batch()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_peft_to_ours(case, tmp_path):
    factory, targets = CASES[case]
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True))
    with torch.no_grad():  # random A and B, magnitudes near peft's own init
        for name, p in theirs.named_parameters():
            if "lora_A" in name or "lora_B" in name or "lora_embedding" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    magnitudes_off_init(theirs)
    theirs.save_pretrained(tmp_path)
    expected = output(theirs, batch())
    assert (expected - output(factory(), batch())).abs().max() > 1e-3
    loaded = dt.DeltaModel.from_pretrained(factory(), tmp_path)
    torch.testing.assert_close(output(loaded, batch()), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_ours_to_peft_and_magnitude_keys(case, tmp_path):
    factory, targets = CASES[case]
    model = ours(factory, targets)
    randomize_adapters(model)  # magnitudes too: a far-from-init direction and scale
    magnitudes_off_init(model)
    model.save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert any(k.endswith(".lora_magnitude_vector") for k in keys)
    theirs = peft.PeftModel.from_pretrained(factory(), tmp_path)
    torch.testing.assert_close(output(model, batch()), output(theirs, batch()), atol=1e-5, rtol=1e-5)


def test_magnitude_init_equals_peft():
    model = ours(tiny_gpt2, ["c_attn", "wte"])
    theirs = peft.get_peft_model(tiny_gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn", "wte"], use_dora=True))
    mine = {k: v for k, v in model.adapter_state_dict().items() if "magnitude" in k}
    their = {k: v for k, v in peft.get_peft_model_state_dict(theirs).items() if "magnitude" in k}
    assert mine.keys() == their.keys() and len(mine) == 3
    for key, value in mine.items():
        torch.testing.assert_close(value, their[key], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_unmerged_and_unmerge_restores(case):
    factory, targets = CASES[case]
    model = ours(factory, targets)
    randomize_adapters(model)
    magnitudes_off_init(model)
    before = {k: v.clone() for k, v in model.base_model.state_dict().items() if "base_layer" in k}
    expected = output(model, batch())
    model.merge_adapter()
    torch.testing.assert_close(output(model, batch()), expected, atol=1e-5, rtol=1e-5)
    model.unmerge_adapter()
    after = model.base_model.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, atol=1e-6, rtol=0)
    torch.testing.assert_close(output(model, batch()), expected, atol=1e-6, rtol=0)
    plain = model.merge_and_unload()
    torch.testing.assert_close(output(plain, batch()), expected, atol=1e-5, rtol=1e-5)


def test_cache_follows_in_place_updates():
    """The cached norm must not survive a change of B (an optimizer step or a load)."""
    model = ours(tiny_llama, ["q_proj", "v_proj"])
    randomize_adapters(model)
    first = output(model, batch())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(3)
    changed = output(model, batch())
    fresh = ours(tiny_llama, ["q_proj", "v_proj"])
    fresh.base_model.load_state_dict(model.base_model.state_dict())
    torch.testing.assert_close(output(fresh, batch()), changed, atol=1e-6, rtol=0)
    assert (changed - first).abs().max() > 1e-4


def test_training_gradients_equal_peft(tmp_path):
    """One loss, same weights: the magnitude and factor gradients match peft's (detached norm)."""
    targets = ["q_proj", "v_proj"]
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=targets, use_dora=True))
    randomize_adapters(theirs)
    magnitudes_off_init(theirs)
    theirs.save_pretrained(tmp_path)
    model = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True)
    inputs = batch()
    for m in (theirs, model):
        m.train()
        m(**inputs, labels=inputs["input_ids"]).loss.backward()

    def grads(m, prefix):
        named = m.named_parameters()
        return {
            k.removeprefix(prefix).replace(".default.weight", ".default"): p.grad for k, p in named if p.requires_grad
        }

    mine, their = grads(model, "base_model."), grads(theirs, "base_model.model.")
    assert mine.keys() == their.keys() and len(mine) == 12
    for key, grad in their.items():
        torch.testing.assert_close(mine[key], grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("case", ["linear", "embedding", "conv1d"])
def test_mixed_batch_matches_each_adapter(case):
    factory, targets = CASES[case]
    model = ours(factory, targets)
    model.add_adapter("plain", dt.LoraConfig(r=2, target_modules=targets))
    randomize_adapters(model)  # only the active adapter trains: give "plain" values too
    model.set_adapter("plain")
    randomize_adapters(model, seed=5)
    magnitudes_off_init(model)
    inputs = batch(rows=3)
    names = ["default", "plain", "__base__"]
    got = output(model.eval(), {**inputs, "adapter_names": names})
    for row, name in enumerate(names):
        one = {k: v[row : row + 1] for k, v in inputs.items()}
        torch.testing.assert_close(got[row : row + 1], output(model, {**one, "adapter_name": name}), atol=1e-5, rtol=0)


def test_dora_on_an_int8_base_equals_its_dequantized_float_base():
    """A quantized base: the norm and the merge use the dequantized weight (float32 products: equal to rounding)."""
    base = dt.quantize_base(tiny_llama(), "int8", matmul_dtype="float32")
    model = dt.wrap(base, dt.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    randomize_adapters(model)
    magnitudes_off_init(model)
    expected = output(model, batch())
    dt.quantization.dequantize_base(model.base_model)
    torch.testing.assert_close(output(model, batch()), expected, atol=1e-4, rtol=1e-4)
    model.merge_adapter()
    torch.testing.assert_close(output(model, batch()), expected, atol=1e-4, rtol=1e-4)
