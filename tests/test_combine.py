"""add_weighted_adapter: exact combinations against a dense reference, svd/cat/ties/dare against
peft's own, several adapters active at once against peft, and `deltatune merge --combine`."""

import pytest
import torch
from conftest import batch, output, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.config import ConfigError

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

T1, T2 = ["q_proj", "v_proj", "embed_tokens"], ["q_proj", "o_proj"]


def randomize(model, names, seed=0):
    """Random A and B for every adapter (all of them, trainable or not)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def pair(factory=tiny_llama, t1=T1, t2=T2, r2=2, **kw):
    """Our model and peft's with the same adapters 'x' (r=4) and 'b' (r=r2) on the same weights."""
    ours = dt.wrap(factory(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=t1, **kw), "x")
    ours.add_adapter("y", dt.LoraConfig(r=r2, lora_alpha=4, target_modules=t2, **kw))
    theirs = peft.get_peft_model(factory(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=t1, **kw), "x")
    theirs.add_adapter("y", peft.LoraConfig(r=r2, lora_alpha=4, target_modules=t2, **kw))
    randomize(ours, ["x", "y"])
    randomize(theirs, ["x", "y"])
    return ours, theirs


def dense_reference(model, names, weights):
    """Base weights + Σ wᵢ·ΔWᵢ, computed layer by layer from delta_weight, on a copy of the base."""
    merged = {}
    for layer_name, layer in model.delta_layers():
        delta = sum(w * layer.delta_weight(n) for n, w in zip(names, weights, strict=True) if n in layer.adapter_names)
        merged[layer_name] = layer.base_layer.weight + delta
    return merged


@pytest.mark.parametrize("kind", ["linear", "cat"])
def test_exact_kinds_equal_the_weighted_sum(kind):
    ours, _ = pair()
    weights = [0.7, -1.3]
    ours.add_weighted_adapter(["x", "y"], weights, "ab", combination_type=kind)
    reference = dense_reference(ours, ["x", "y"], weights)
    for layer_name, layer in ours.delta_layers():
        got = layer.base_layer.weight + layer.delta_weight("ab")
        torch.testing.assert_close(got, reference[layer_name], atol=1e-5, rtol=1e-5)
    assert ours.peft_config["ab"].r == 6


@pytest.mark.parametrize("kind", ["cat", "svd"])
def test_equal_to_peft_where_peft_is_exact(kind):
    ours, theirs = pair(factory=tiny_gpt2, t1=["c_attn", "wte"], t2=["c_attn", "c_proj"])
    weights = [0.6, 1.5]
    ours.add_weighted_adapter(
        ["x", "y"], weights, "ab", combination_type=kind, **({"svd_rank": 3} if kind == "svd" else {})
    )
    theirs.add_weighted_adapter(
        ["x", "y"], weights, "ab", combination_type=kind, **({"svd_rank": 3} if kind == "svd" else {})
    )
    ours.set_adapter("ab")
    theirs.set_adapter("ab")
    expected = output(theirs, batch())
    assert (expected - output(tiny_gpt2(), batch())).abs().max() > 1e-3
    torch.testing.assert_close(output(ours, batch()), expected, atol=1e-4, rtol=1e-4)


def test_svd_is_the_best_rank_k_approximation():
    ours, _ = pair(r2=4)
    ours.add_weighted_adapter(["x", "y"], [1.0, 1.0], "k2", combination_type="svd", svd_rank=2)
    layer = ours.base_model.model.layers[0].self_attn.q_proj
    exact = layer.delta_weight("x") + layer.delta_weight("y")
    u, s, vh = torch.linalg.svd(exact)
    torch.testing.assert_close(layer.delta_weight("k2"), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "kind", ["ties", "magnitude_prune", "dare_linear", "dare_ties", "ties_svd", "dare_ties_svd", "magnitude_prune_svd"]
)
def test_heuristics_equal_peft(kind):
    ours, theirs = pair(r2=4)
    options = {"combination_type": kind, "density": 0.5, "majority_sign_method": "frequency"}
    for model in (ours, theirs):
        torch.manual_seed(11)  # DARE's random drops: the same draws
        model.add_weighted_adapter(["x", "y"], [0.8, 0.4], "ab", **options)
        model.set_adapter("ab")
    torch.testing.assert_close(output(ours, batch()), output(theirs, batch()), atol=1e-4, rtol=1e-4)


def test_several_active_sum_as_peft_and_refusals():
    ours, theirs = pair()
    ours.set_adapter(["x", "y"])
    theirs.base_model.set_adapter(["x", "y"])
    expected = output(theirs, batch())
    torch.testing.assert_close(output(ours, batch()), expected, atol=1e-5, rtol=1e-5)
    assert ours.active_adapters == ["x", "y"]
    assert sum(p.requires_grad for p in ours.parameters()) == sum(p.requires_grad for p in theirs.parameters()) == 18
    with pytest.raises(ConfigError, match="same r"):
        ours.add_weighted_adapter(["x", "y"], [1, 1], "t", combination_type="ties", density=0.5)
    with pytest.raises(ConfigError, match="density"):
        ours.add_weighted_adapter(["x", "x"], [1, 1], "t", combination_type="ties")
    with pytest.raises(ConfigError, match="combination_type"):
        ours.add_weighted_adapter(["x", "y"], [1, 1], "t", combination_type="mean")
    ours.add_adapter("d", dt.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    with pytest.raises(ConfigError, match="DoRA"):
        ours.add_weighted_adapter(["x", "d"], [1, 1], "t")
    for name in ("m1", "m2"):  # two trained copies of one head: only one can run
        ours.add_adapter(name, dt.LoraConfig(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(ValueError, match="cannot be active at once"):
        ours.set_adapter(["m1", "m2"])


def test_merge_cli_combine(tmp_path, tiny_llama_dir):
    from deltatune.cli import main

    base = dt.load_base(str(tiny_llama_dir))[0]
    model = dt.wrap(base, dt.LoraConfig(r=2, target_modules=["q_proj"]), "x")
    model.add_adapter("y", dt.LoraConfig(r=2, target_modules=["v_proj"]))
    randomize(model, ["x", "y"])
    model.save_pretrained(tmp_path / "ab", selected_adapters=["x", "y"])
    args = ["merge", "--base", str(tiny_llama_dir), "--combine", "cat", str(tmp_path / "ab" / "x")]
    assert main([*args, str(tmp_path / "ab" / "y"), "--weights", "0.5", "2", "--output", str(tmp_path / "out")]) == 0
    combined = dt.DeltaModel.from_pretrained(dt.load_base(str(tiny_llama_dir))[0], tmp_path / "out")
    model.add_weighted_adapter(["x", "y"], [0.5, 2.0], "ab", combination_type="cat")
    inputs = batch()
    torch.testing.assert_close(
        output(combined, inputs), output(model, {**inputs, "adapter_name": "ab"}), atol=1e-5, rtol=0
    )
