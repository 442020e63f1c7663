"""The shared target-finding mechanism: names, suffixes, regexes, all-linear, layers, exclusions."""

import pytest
import torch
from conftest import batch, output, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.targeting import find_targets, layer_index


def test_exact_name_and_suffix_select_the_same_modules():
    model = tiny_llama()
    by_leaf = find_targets(model, ["q_proj"])
    by_suffix = find_targets(model, ["self_attn.q_proj"])
    by_full = find_targets(model, ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"])
    assert by_leaf == by_suffix == by_full == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_suffix_matches_whole_components_only():
    # "proj" is not a component suffix of "q_proj": peft's rule is name == t or name.endswith("." + t)
    with pytest.raises(ConfigError, match="'proj' matches no"):
        find_targets(tiny_llama(), ["proj"])


def test_regex_must_match_the_whole_name():
    names = find_targets(tiny_llama(), r".*\.1\.self_attn\.(q|k)_proj")
    assert names == ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    with pytest.raises(ConfigError, match="regex"):
        find_targets(tiny_llama(), r"q_proj")  # a partial match is not enough


@pytest.mark.parametrize("factory, head", [(tiny_llama, "lm_head"), (tiny_gpt2, "lm_head"), (tiny_bert, "classifier")])
def test_all_linear_skips_the_output_head(factory, head):
    model = factory()
    names = find_targets(model, "all-linear")
    linear_count = sum(1 for n, m in model.named_modules() if type(m).__name__ in ("Linear", "Conv1D"))
    assert head not in {n.rsplit(".", 1)[-1] for n in names}
    assert len(names) == linear_count - 1


def test_gpt2_conv1d_is_a_linear_target():
    assert find_targets(tiny_gpt2(), ["c_attn"]) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]


def test_layers_to_transform_and_exclude():
    model = tiny_llama()
    assert find_targets(model, ["q_proj", "v_proj"], layers_to_transform=[1]) == [
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ]
    assert find_targets(model, ["q_proj", "v_proj"], exclude_modules=["v_proj"]) == [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ]
    assert find_targets(tiny_bert(), ["query"], layers_to_transform=[0]) == [
        "bert.encoder.layer.0.attention.self.query"
    ]
    with pytest.raises(ConfigError, match=r"layers \[0, 1\]"):
        find_targets(model, ["q_proj"], layers_to_transform=[7])


def test_no_match_error_lists_existing_module_names():
    with pytest.raises(ConfigError) as err:
        find_targets(tiny_llama(), ["q_proj", "query"])
    message = str(err.value)
    assert "'query'" in message
    for existing in ("q_proj (2)", "down_proj (2)", "lm_head"):
        assert existing in message


def test_layer_index():
    assert layer_index("model.layers.12.mlp.up_proj") == 12
    assert layer_index("transformer.h.3.attn.c_attn") == 3
    assert layer_index("lm_head") is None
    assert layer_index("blocks.4.ffn", layers_pattern="blocks") == 4


# --- targeting sees the base model only, never an adapter's own layers ---------------------------------
def _lora_parameters(model, adapter: str) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if n.endswith(f".{adapter}.weight")}


def test_all_linear_after_a_lora_adapts_base_layers_only():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.add_adapter("b", dt.LoraConfig(r=4, target_modules="all-linear"))
    alone = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"), "b")
    assert _lora_parameters(model, "b") == _lora_parameters(alone, "b")
    assert sum(_lora_parameters(model, "b").values()) == 2 * 4 * (64 + 48 + 48 + 64 + 96 + 96 + 96)  # base linears
    assert not [n for n, _ in model.named_modules() if ".lora_A.default." in n or ".lora_B.default." in n]
    model.set_adapter("b")
    randomize_adapters(model, seed=4)  # b's tensors (the trainable ones) become non-zero
    state = {n: p for n, p in model.named_parameters() if n.endswith(".b.weight")}
    with torch.no_grad():
        for name, param in alone.named_parameters():
            if name in state:
                param.copy_(state[name])
    assert not torch.allclose(output(alone, batch()), output(tiny_llama(), batch()))  # b changes the output
    torch.testing.assert_close(output(model, batch()), output(alone, batch()))


def test_a_second_adapter_with_other_targets_loads(tmp_path):
    saved = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules="all-linear"), "wide")
    randomize_adapters(saved, seed=5)
    saved.save_pretrained(tmp_path)
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.load_adapter(tmp_path / "wide", "wide")  # a non-default adapter is saved in its own folder
    model.set_adapter("wide")
    torch.testing.assert_close(output(model, batch()), output(saved, batch()))
    # and the other way round: a q,v adapter loaded after an all-linear one
    narrow = dt.wrap(tiny_llama(), dt.LoraConfig(r=3, target_modules=["q_proj", "v_proj"]), "narrow")
    randomize_adapters(narrow, seed=6)
    narrow.save_pretrained(tmp_path)
    saved.load_adapter(tmp_path / "narrow", "narrow")
    saved.set_adapter("narrow")
    torch.testing.assert_close(output(saved, batch()), output(narrow, batch()))


def test_regex_and_suffix_patterns_never_reach_adapter_layers():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules="all-linear"))
    assert find_targets(model.base_model, r".*") == find_targets(tiny_llama(), r".*")
    with pytest.raises(ConfigError, match="'lora_A' matches no"):
        find_targets(model.base_model, ["lora_A"], allowed_types=(nn.Module,))
