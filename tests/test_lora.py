"""LoRA: identity at init, the forward against W0 + s·BA computed by hand, merging, many adapters."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import ATTENTION_TARGETS, TINY_MODELS, batch, output, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.methods.base import DeltaLayer
from deltatune.methods.lora import LoraEmbedding, LoraLinear


def lora(arch: str, **kw) -> tuple[nn.Module, dt.DeltaModel]:
    base = TINY_MODELS[arch]()
    reference = copy.deepcopy(base)
    cfg = dt.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION_TARGETS[arch], **kw)
    return reference, dt.wrap(base, cfg)


def test_fresh_adapter_leaves_output_unchanged(arch):
    reference, model = lora(arch)
    assert torch.equal(output(model, batch()), output(reference, batch()))


def test_merge_equals_unmerged_and_unmerge_restores_weights(arch):
    reference, model = lora(arch)
    randomize_adapters(model)
    unmerged = output(model, batch())
    assert not torch.allclose(unmerged, output(reference, batch()), atol=1e-4)
    model.merge_adapter()
    assert model.merged_adapter == "default"
    torch.testing.assert_close(output(model, batch()), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    restored = model.unload().state_dict()
    for name, weight in reference.state_dict().items():
        torch.testing.assert_close(restored[name], weight, atol=1e-5, rtol=0)


def test_merge_and_unload_returns_a_plain_model(arch):
    reference, model = lora(arch)
    randomize_adapters(model)
    expected = output(model, batch())
    plain = model.merge_and_unload()
    assert type(plain) is type(reference)
    assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(reference.state_dict())
    torch.testing.assert_close(output(plain, batch()), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_forward_matches_hand_computed_low_rank_update(rslora):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(6, 5))
    layer.add("a", r=3, alpha=12, dropout=0.0, rslora=rslora, init=True)
    layer.active_adapter = "a"
    nn.init.normal_(layer.lora_B["a"].weight)
    x = torch.randn(4, 6)
    scale = 12 / 3**0.5 if rslora else 12 / 3
    w = layer.base_layer.weight + scale * layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    torch.testing.assert_close(layer(x), F.linear(x, w, layer.base_layer.bias))


def test_conv1d_forward_and_merge_use_the_transposed_weight():
    torch.manual_seed(0)
    layer = LoraLinear(Conv1D(5, 6))  # Conv1D(nf=out, nx=in): weight is in×out
    layer.add("a", r=2, alpha=2, dropout=0.0, rslora=False, init=True)
    layer.active_adapter = "a"
    nn.init.normal_(layer.lora_B["a"].weight)
    x = torch.randn(3, 6)
    w = layer.base_layer.weight + (layer.lora_B["a"].weight @ layer.lora_A["a"].weight).T
    expected = x @ w + layer.base_layer.bias
    torch.testing.assert_close(layer(x), expected)
    layer.merge("a")
    torch.testing.assert_close(layer(x), expected)


def test_embedding_forward_matches_updated_table():
    torch.manual_seed(0)
    layer = LoraEmbedding(nn.Embedding(10, 4))
    layer.add("a", r=2, alpha=4, dropout=0.0, rslora=False, init=True)
    layer.active_adapter = "a"
    ids = torch.tensor([[1, 5, 9]])
    torch.testing.assert_close(layer(ids), layer.base_layer(ids))  # zero-initialised update
    nn.init.normal_(layer.lora_embedding_A["a"])
    table = layer.base_layer.weight + 2 * (layer.lora_embedding_B["a"] @ layer.lora_embedding_A["a"]).T
    torch.testing.assert_close(layer(ids), F.embedding(ids, table))


def test_only_adapter_parameters_train_and_get_gradients():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    trainable_count, total = model.trainable_parameters()
    # q_proj: 32->32, v_proj: 32->16 (2 kv heads of 8), r=4, 2 layers
    assert trainable_count == 2 * (4 * 32 + 32 * 4 + 4 * 32 + 16 * 4)
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable_count
    inputs = batch()
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())


def test_several_adapters_switch_delete_and_disable():
    reference = tiny_llama()
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["v_proj", "o_proj"]))
    randomize_adapters(model, seed=1)  # only "default" is trainable, so only it changes
    model.set_adapter("b")
    randomize_adapters(model, seed=2)
    out_b = output(model, batch())
    model.set_adapter("default")
    out_default = output(model, batch())
    assert not torch.allclose(out_b, out_default, atol=1e-4)
    assert {n.split(".")[-2] for n, p in model.named_parameters() if p.requires_grad} == {"default"}
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch()), output(reference, batch()))
    model.delete_adapter("default")
    assert model.active_adapter == "b"
    torch.testing.assert_close(output(model, batch()), out_b)
    assert not any(isinstance(m, DeltaLayer) for m in model.base_model.model.layers[0].self_attn.q_proj.modules())


def test_rank_and_alpha_patterns():
    model = dt.wrap(
        tiny_llama(),
        dt.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 1},
        ),
    )
    attn0, attn1 = (layer.self_attn for layer in model.base_model.model.layers)
    assert attn0.v_proj.lora_A["default"].out_features == 2
    assert attn0.q_proj.lora_A["default"].out_features == 4
    assert attn0.q_proj.scaling["default"] == 2 and attn1.q_proj.scaling["default"] == 0.25


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "positive integer"),
        ({"lora_dropout": 1.0}, r"\[0, 1\)"),
        ({"bias": "all"}, "BitFit"),
        ({"lora_alhpa": 3}, "Did you mean 'lora_alpha'"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.LoraConfig(target_modules=["q_proj"], **kwargs)


def test_bad_target_changes_nothing():
    base = tiny_llama()
    with pytest.raises(dt.ConfigError, match="'nope' matches no"):
        dt.wrap(base, dt.LoraConfig(target_modules=["q_proj", "nope"]))
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())
    model = dt.wrap(base, dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError):
        model.add_adapter("x", dt.LoraConfig(target_modules=["q_proj"], modules_to_save=["missing_head"]))
    assert "x" not in model.peft_config and all("x" not in layer.adapter_names for _, layer in model.delta_layers())
    with pytest.raises(ValueError, match="already exists"):
        model.add_adapter("default", dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(KeyError, match="no adapter named 'zz'"):
        model.set_adapter("zz")


def test_generate_merged_equals_unmerged():
    model = dt.wrap(tiny_gpt2(), dt.LoraConfig(r=4, target_modules=["c_attn", "c_fc"]))
    randomize_adapters(model, std=0.3)
    prompt = batch(rows=1, length=5)
    unmerged = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    model.merge_adapter()
    assert torch.equal(model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=0), unmerged)


def test_classification_head_trains_with_the_adapter():
    reference = tiny_bert()
    model = dt.wrap(tiny_bert(), dt.LoraConfig(target_modules=["query", "value"]))
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    assert model.peft_config["default"].modules_to_save == ["classifier"]
    assert {n for n, p in model.named_parameters() if p.requires_grad and "classifier" in n} == {
        "base_model.classifier.modules_to_save.default.weight",
        "base_model.classifier.modules_to_save.default.bias",
    }
    randomize_adapters(model)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch()), output(reference, batch()))


def test_default_targets_follow_peft_and_are_recorded(tmp_path):
    model = dt.wrap(tiny_llama(), dt.LoraConfig())
    assert model.peft_config["default"].target_modules == ["q_proj", "v_proj"]
    assert sorted({n.rsplit(".", 1)[-1] for n, _ in model.delta_layers()}) == ["q_proj", "v_proj"]
    model.save_pretrained(tmp_path)
    assert '"q_proj"' in (tmp_path / "adapter_config.json").read_text()
    weird = tiny_llama()
    weird.config.model_type = "mystery"
    with pytest.raises(dt.ConfigError, match="set target_modules"):
        dt.wrap(weird, dt.LoraConfig())


def test_dropout_drops_only_while_training():
    """Eval mode is the exact low-rank update (no dropout); training mode drops entries of the branch's input."""
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 8))
    layer.add("a", r=4, alpha=4, dropout=0.5, rslora=False, init=True)
    layer.active_adapter = "a"
    nn.init.normal_(layer.lora_B["a"].weight)
    x = torch.randn(32, 16)
    w = layer.base_layer.weight + layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    exact = F.linear(x, w, layer.base_layer.bias)
    layer.eval()
    torch.testing.assert_close(layer(x), exact)
    layer.train()
    assert not torch.allclose(layer(x), exact, atol=1e-3)
