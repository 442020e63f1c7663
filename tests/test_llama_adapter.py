"""LLaMA-Adapter: zero-init, top-L layers only, gradients, checkpoints, peft interop, generation."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import batch, output, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from test_train import FAST, alpaca_file, run_cli
from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

import deltatune as dt
from deltatune.methods.llama_adapter import LlamaAdapterAttention

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
LEN, LAYERS = 4, 1


def wrapped(adapter_layers: int = LAYERS, std: float | None = 1.0, seed: int = 0) -> dt.DeltaModel:
    """Tiny Llama (4 heads, 2 KV heads, 2 layers) with LLaMA-Adapter; random (non-zero) gates unless std=None."""
    model = dt.wrap(tiny_llama(), dt.LlamaAdapterConfig(adapter_len=LEN, adapter_layers=adapter_layers))
    if std is not None:
        randomize_adapters(model, seed=seed, std=std)
    return model


def test_output_equals_base_at_init():
    model = wrapped(adapter_layers=2, std=None)
    torch.testing.assert_close(output(model, batch()), output(tiny_llama(), batch()), atol=1e-6, rtol=0)


def test_trainable_parameters_match_peft():
    hidden = tiny_llama().config.hidden_size
    ours = wrapped(adapter_layers=2, std=None)
    theirs = peft.get_peft_model(tiny_llama(), peft.AdaptionPromptConfig(adapter_len=LEN, adapter_layers=2))
    expected = 2 * (LEN * hidden + 1)  # one scalar gate per layer
    assert (
        ours.trainable_parameters()
        == theirs.get_nb_trainable_parameters()
        == (
            expected,
            sum(p.numel() for p in tiny_llama().parameters()) + expected,
        )
    )


def test_non_zero_gates_change_only_the_top_layers():
    model = wrapped()
    assert [(n, type(m)) for n, m in model.delta_layers()] == [("model.layers.1.self_attn", LlamaAdapterAttention)]
    with torch.no_grad():
        ours = model(**batch(), output_hidden_states=True)
        base = tiny_llama()(**batch(), output_hidden_states=True)
    # embeddings and layer 0 untouched; layer 1 (the top one) changed
    for i in (0, 1):
        torch.testing.assert_close(ours.hidden_states[i], base.hidden_states[i], atol=0, rtol=0)
    assert (ours.hidden_states[2] - base.hidden_states[2]).abs().max() > 1e-2
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch()), base.logits, atol=1e-6, rtol=0)


def test_gradients_reach_only_prompts_and_gates():
    model = wrapped(std=None)
    model(**batch()).logits.pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(n.rsplit(".", 2)[-2] for n in grads) == ["adaption_gate", "adaption_prompt"]
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".adaption_" not in n)
    gate = next(g for n, g in grads.items() if "adaption_gate" in n)
    prompt = next(g for n, g in grads.items() if "adaption_prompt" in n)
    # zero-init: the gate learns first; the prompt's gradient flows through the (zero) gate
    assert gate.abs().item() > 0 and prompt.abs().max().item() == 0
    model.zero_grad()
    with torch.no_grad():
        next(p for n, p in model.named_parameters() if "adaption_gate" in n).fill_(0.5)
    model(**batch()).logits.pow(2).mean().backward()
    assert next(p for n, p in model.named_parameters() if "adaption_prompt" in n).grad.abs().max() > 0


def test_save_load_round_trip_with_peft_keys(tmp_path):
    model = wrapped()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {
        "base_model.model.model.layers.1.self_attn.adaption_prompt": (1, LEN, 32),
        "base_model.model.model.layers.1.self_attn.adaption_gate": (1,),
    }
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADAPTION_PROMPT" and config["target_modules"] == "self_attn"
    assert (config["adapter_len"], config["adapter_layers"], config["task_type"]) == (LEN, LAYERS, "CAUSAL_LM")
    loaded = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    torch.testing.assert_close(output(loaded, batch()), output(model, batch()), atol=0, rtol=0)
    assert loaded.trainable_parameters()[0] == 0


def test_adapters_switch_and_delete():
    model = wrapped(adapter_layers=1)
    model.add_adapter("all", dt.LlamaAdapterConfig(adapter_len=2))  # None: every layer
    assert model.peft_config["all"].adapter_layers == 2
    randomize_adapters(model, seed=1)  # only "default" is trainable: give "all" values too
    model.set_adapter("all")
    randomize_adapters(model, seed=2)
    assert model.trainable_parameters()[0] == 2 * (2 * 32 + 1)
    all_logits = output(model, batch())
    model.set_adapter("default")
    assert (output(model, batch()) - all_logits).abs().max() > 1e-3
    model.delete_adapter("default")
    torch.testing.assert_close(output(model, batch()), all_logits, atol=0, rtol=0)
    model.delete_adapter("all")
    assert not list(model.delta_layers())
    torch.testing.assert_close(output(model, batch()), output(tiny_llama(), batch()), atol=0, rtol=0)


# --- peft interop -------------------------------------------------------------------------------
def ours_to_peft(factory, tmp_path, adapter_layers):
    ours = dt.wrap(factory(), dt.LlamaAdapterConfig(adapter_len=LEN, adapter_layers=adapter_layers))
    randomize_adapters(ours, std=1.0)
    ours.save_pretrained(tmp_path)
    expected = output(ours, batch())
    base = ours.unload()
    base_logits = output(base, batch())
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    return expected, output(theirs, batch()), base_logits


def peft_to_ours(factory, tmp_path, adapter_layers):
    config = peft.AdaptionPromptConfig(adapter_len=LEN, adapter_layers=adapter_layers, task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(factory(), config)
    randomize_adapters(theirs, std=1.0)
    theirs.save_pretrained(tmp_path)
    expected = output(theirs, batch())
    with theirs.disable_adapter():
        base_logits = output(theirs, batch())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = dt.DeltaModel.from_pretrained(factory(), tmp_path)
    # every key peft writes is understood (no "ignoring adapter_config.json keys" warning)
    assert not [w for w in caught if "adapter_config.json" in str(w.message)]
    return expected, output(ours, batch()), base_logits


@pytest.mark.parametrize("direction", [ours_to_peft, peft_to_ours])
def test_tiny_llama_agrees_with_peft(direction, tmp_path):
    expected, got, base = direction(tiny_llama, tmp_path, adapter_layers=2)
    assert (expected - base).abs().max() > 1e-3  # the adapter does change the logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def tiny_mistral() -> MistralForCausalLM:
    """Mistral, the other model type peft's adaption_prompt supports: Llama's attention layout."""
    torch.manual_seed(0)
    fields = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    config = tiny_llama().config
    kw = {k: getattr(config, k) for k in (*fields, "num_key_value_heads")}
    return MistralForCausalLM(MistralConfig(**kw, max_position_embeddings=128)).eval()


@pytest.mark.parametrize("direction", [ours_to_peft, peft_to_ours])
def test_tiny_mistral_agrees_with_peft(direction, tmp_path):
    expected, got, base = direction(tiny_mistral, tmp_path, adapter_layers=1)
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_biased_o_proj_still_starts_at_the_base_output():
    """peft adds o_proj's bias to the (zero) prompt branch; we keep zero-init exact, and say so."""
    config = tiny_llama().config
    config.attention_bias = True
    torch.manual_seed(0)
    base = LlamaForCausalLM(config).eval()
    expected = output(base, batch())
    with pytest.warns(UserWarning, match="o_proj has a bias"):
        model = dt.wrap(base, dt.LlamaAdapterConfig(adapter_len=LEN, adapter_layers=2))
    torch.testing.assert_close(output(model, batch()), expected, atol=1e-6, rtol=0)


@pytest.mark.real_model
@pytest.mark.parametrize("direction", [ours_to_peft, peft_to_ours])
def test_smollm2_agrees_with_peft(direction, tmp_path):
    """SmolLM2-135M: 9 query heads share 3 key/value heads, so the GQA repeat must match peft's.

    In float64 both compute the same numbers exactly; in float32 the two libraries' different
    matmul shapes round differently, by about 1e-6 of the logits' scale (~30 here)."""
    for dtype, atol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):

        def smollm2(dtype=dtype):
            return dt.load_base("smollm2-135m")[0].eval().to(dtype)

        expected, got, base = direction(smollm2, tmp_path / str(dtype), adapter_layers=3)
        assert (expected - base).abs().max() > 1e-3  # the adapter does change the logits
        torch.testing.assert_close(got, expected, atol=atol, rtol=0)


def test_peft_gpt2_checkpoint_is_refused_with_the_reason(tmp_path):
    theirs = peft.get_peft_model(tiny_gpt2(), peft.AdaptionPromptConfig(adapter_len=LEN, adapter_layers=1))
    theirs.save_pretrained(tmp_path)
    base = tiny_gpt2()
    with pytest.raises(dt.ConfigError, match=r"Llama-style attention.*'gpt2'"):
        dt.DeltaModel.from_pretrained(base, tmp_path)
    assert not any(".adaption_" in n for n, _ in base.named_parameters())


# --- generation ---------------------------------------------------------------------------------
def test_greedy_generation_with_cache_matches_no_cache_and_peft(tmp_path):
    model = wrapped(adapter_layers=2)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    ids = batch(rows=2, length=6)
    kw = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(**ids, **kw)
    assert torch.equal(cached, model.generate(**ids, use_cache=False, **kw))
    assert torch.equal(cached, theirs.generate(**ids, **kw))
    with model.disable_adapter():
        assert not torch.equal(cached, model.generate(**ids, **kw))  # the adapter does steer generation


# --- errors -------------------------------------------------------------------------------------
def test_merge_and_unload_refuses_before_changing_anything():
    model = wrapped()
    before = output(model, batch())
    with pytest.raises(TypeError, match=r"cannot be merged.*LlamaAdapterAttention"):
        model.merge_and_unload()
    assert [n for n, _ in model.delta_layers()] == ["model.layers.1.self_attn"] and "default" in model.peft_config
    torch.testing.assert_close(output(model, batch()), before, atol=0, rtol=0)


@pytest.mark.parametrize(("factory", "model_type"), [(tiny_gpt2, "gpt2"), (tiny_bert, "bert")])
def test_other_architectures_are_refused(factory, model_type):
    base = factory()
    with pytest.raises(dt.ConfigError, match=rf"q_proj/k_proj/v_proj/o_proj.*model type '{model_type}'"):
        dt.wrap(base, dt.LlamaAdapterConfig(adapter_layers=1))
    assert not any(".adaption_" in n for n, _ in base.named_parameters())


def test_too_many_adapter_layers_is_refused():
    base = tiny_llama()
    with pytest.raises(dt.ConfigError, match=r"adapter_layers=3 exceeds the number of layers.*has 2"):
        dt.wrap(base, dt.LlamaAdapterConfig(adapter_layers=3))
    assert not any(".adaption_" in n for n, _ in base.named_parameters())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"adapter_len": 0}, "adapter_len must be a positive integer"),
        ({"adapter_layers": -1}, "adapter_layers must be a positive integer"),
        ({"layers_to_transform": [1]}, "does not use layers_to_transform: adapter_layers"),
        ({"target_modules": ["q_proj", "v_proj"]}, "name of the attention modules"),
        ({"adapter_length": 4}, "Did you mean 'adapter_len'"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.LlamaAdapterConfig(**options)


# --- command line -------------------------------------------------------------------------------
def test_cli_trains_llama_adapter(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    data = alpaca_file(tmp_path / "train.jsonl")
    args = ["--method", "llama_adapter", "--adapter-len", 4, "--adapter-layers", 1]
    assert (
        run_cli("train", "--base", tiny_llama_dir, "--data", data, "--max-steps", 12, "--output-dir", out, *args, *FAST)
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["adapter_len"], config["adapter_layers"]) == ("ADAPTION_PROMPT", 4, 1)
    gate = load_file(out / "adapter" / "adapter_model.safetensors")[
        "base_model.model.model.layers.1.self_attn.adaption_gate"
    ]
    assert gate.abs().item() > 0  # the zero-initialised gate has opened
