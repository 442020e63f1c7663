"""Prompt tuning, P-tuning and prefix tuning: peft's semantics and checkpoints, generation, training."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from conftest import VOCAB, batch, output, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from packaging.version import Version
from safetensors.torch import load_file
from test_train import FAST, alpaca_file, run_cli

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.methods.prompt_learning import PromptLearningLayer

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

# peft reads transformers' deprecated is_gradient_checkpointing property
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
N = 4  # virtual tokens
FACTORIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# Our config and peft's for the same adapter.
METHODS = {
    "prompt": (
        lambda: dt.PromptTuningConfig(num_virtual_tokens=N),
        lambda task="CAUSAL_LM": peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N),
    ),
    "p-mlp": (
        lambda: dt.PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=16),
        lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=16),
    ),
    "p-lstm": (
        lambda: dt.PTuningConfig(num_virtual_tokens=N, encoder="lstm", encoder_hidden_size=8),
        lambda: peft.PromptEncoderConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=N, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
        ),
    ),
    "prefix": (
        lambda: dt.PrefixTuningConfig(num_virtual_tokens=N),
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True),
    ),
    "prefix-table": (
        lambda: dt.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=False),
        lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=False),
    ),
}


def padded_prompts() -> dict[str, torch.Tensor]:
    """A left-padded batch, as for batched generation."""
    return {
        "input_ids": torch.tensor([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]]),
        "attention_mask": torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]),
    }


def greedy(model, inputs: dict[str, torch.Tensor], tokens: int = 6, **kw) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that it ignores position ids at every step
        return model.generate(**inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=0, **kw)


def greedy_by_forward(model, inputs: dict[str, torch.Tensor], tokens: int = 6) -> torch.Tensor:
    """Greedy decoding by running the whole text through ``model``'s forward at every step, with
    the positions ``generate`` derives from the mask: a reference that needs no KV cache."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        for _ in range(tokens):
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return ids


# peft 0.21.2 reads the cache as ``past_key_values``, which transformers 5.24 renamed to ``cache``:
# from then on its prompt-learning generate re-adds the virtual tokens at every step.
PEFT_GENERATES_CORRECTLY = Version(transformers.__version__) < Version("5.24")


def saved(directory: Path) -> tuple[dict[str, torch.Tensor], dict]:
    config = json.loads((directory / "adapter_config.json").read_text())
    return load_file(directory / "adapter_model.safetensors"), config


# --- interop with peft: same logits and tokens, both ways -----------------------------------------
def ours_to_peft(factory, method, tmp_path):
    ours = dt.wrap(factory(), METHODS[method][0]())
    randomize_adapters(ours, std=0.5)
    ours.eval().save_pretrained(tmp_path)
    return ours, peft.PeftModel.from_pretrained(factory(), tmp_path).eval()


def peft_to_ours(factory, method, tmp_path):
    theirs = peft.get_peft_model(factory(), METHODS[method][1]())
    randomize_adapters(theirs, std=0.5)
    theirs.eval().save_pretrained(tmp_path)
    return dt.DeltaModel.from_pretrained(factory(), tmp_path), theirs


@pytest.mark.parametrize("direction", [ours_to_peft, peft_to_ours])
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_tiny_models_agree_with_peft(arch, method, direction, tmp_path):
    ours, theirs = direction(FACTORIES[arch], method, tmp_path)
    got, expected = output(ours, batch()), output(theirs, batch())
    assert got.shape[1] == batch()["input_ids"].shape[1] + (0 if method.startswith("prefix") else N)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(output(ours, batch())[:, -9:], output(FACTORIES[arch](), batch()), atol=1e-3)
    inputs = padded_prompts()
    tokens = greedy(ours, inputs)
    assert torch.equal(tokens[:, :6], inputs["input_ids"]) and tokens.shape == (2, 12)  # prompt ids + new tokens
    assert torch.equal(tokens, greedy_by_forward(theirs, inputs))  # peft's forward, step by step
    if PEFT_GENERATES_CORRECTLY:
        assert torch.equal(tokens, greedy(theirs, inputs))


@pytest.mark.parametrize("direction", [ours_to_peft, peft_to_ours])
def test_bert_classification_prompt_tuning_agrees_with_peft(direction, tmp_path):
    if direction is ours_to_peft:
        ours = dt.wrap(tiny_bert(), dt.PromptTuningConfig(num_virtual_tokens=N))
        assert ours.peft_config["default"].modules_to_save == ["classifier"]
        randomize_adapters(ours, std=0.5)
        ours.eval().save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    else:
        theirs = peft.get_peft_model(tiny_bert(), METHODS["prompt"][1]("SEQ_CLS"))
        randomize_adapters(theirs, std=0.5)
        theirs.eval().save_pretrained(tmp_path)
        ours = dt.DeltaModel.from_pretrained(tiny_bert(), tmp_path)
    tensors, _ = saved(tmp_path)
    assert set(tensors) == {"prompt_embeddings", "base_model.classifier.weight", "base_model.classifier.bias"}
    inputs = {**batch(), "token_type_ids": torch.zeros(2, 9, dtype=torch.long)}
    torch.testing.assert_close(output(ours, inputs), output(theirs, inputs), atol=1e-5, rtol=0)


# --- checkpoint format and model-derived fields ----------------------------------------------------
def test_saved_config_is_complete_and_gqa_prefix_uses_kv_width(tmp_path):
    model = dt.wrap(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=N))  # 4 heads, 2 KV heads of 8
    model.save_pretrained(tmp_path)
    tensors, config = saved(tmp_path)
    assert config["peft_type"] == "PREFIX_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (config["token_dim"], config["num_attention_heads"], config["num_layers"]) == (16, 2, 2)
    assert (config["num_transformer_submodules"], config["encoder_hidden_size"], config["prefix_projection"]) == (
        1,
        16,
        True,
    )
    assert "target_modules" not in config and config["inference_mode"] is True
    assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prompt_embeddings": (N, 2 * 2 * 16)}
    assert (tmp_path / "adapter_training_state.safetensors").is_file()  # the encoder, for resuming

    dt.wrap(tiny_llama(), dt.PromptTuningConfig(num_virtual_tokens=N, init="vocab")).save_pretrained(tmp_path / "p")
    _, config = saved(tmp_path / "p")
    assert config["prompt_tuning_init"] == "SAMPLE_VOCAB" and "init" not in config
    assert (config["token_dim"], config["num_attention_heads"], config["num_layers"]) == (32, 4, 2)
    assert not (tmp_path / "p" / "adapter_training_state.safetensors").exists()  # nothing beyond the table

    dt.wrap(tiny_gpt2(), dt.PTuningConfig(num_virtual_tokens=N, encoder="lstm")).save_pretrained(tmp_path / "t")
    _, config = saved(tmp_path / "t")
    assert config["encoder_reparameterization_type"] == "LSTM" and config["encoder_hidden_size"] == 32


def test_trainable_parameter_counts_follow_the_formulas(tmp_path):
    d, layers, kv, h = 32, 2, 16, 24
    base_total = sum(p.numel() for p in tiny_llama().parameters())

    def trainable(config) -> int:
        return dt.wrap(tiny_llama(), config).trainable_parameters()[0]

    assert trainable(dt.PromptTuningConfig(num_virtual_tokens=N)) == N * d
    mlp = d * h + h + h * h + h + h * d + d
    assert trainable(dt.PTuningConfig(num_virtual_tokens=N, encoder_hidden_size=h)) == N * d + mlp
    projection = kv * h + h + h * 2 * layers * kv + 2 * layers * kv
    model = dt.wrap(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=N, encoder_hidden_size=h))
    assert model.trainable_parameters() == (N * kv + projection, base_total + N * kv + projection)
    assert trainable(dt.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=False)) == N * 2 * layers * kv
    # a loaded adapter is the stored table alone, frozen
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    assert loaded.trainable_parameters() == (0, base_total + N * 2 * layers * kv)
    torch.testing.assert_close(output(loaded, batch()), output(model, batch()))


def test_options_use_peft_spellings_too():
    assert dt.PromptTuningConfig(prompt_tuning_init="SAMPLE_VOCAB").init == "vocab"
    assert dt.PromptTuningConfig(init="TEXT", init_text="hi").prompt_tuning_init_text == "hi"
    assert dt.PTuningConfig(encoder_reparameterization_type="LSTM").encoder == "lstm"
    with pytest.raises(ConfigError, match="disagree"):
        dt.PromptTuningConfig(init="vocab", prompt_tuning_init="RANDOM")
    with pytest.raises(ConfigError, match="init must be one of"):
        dt.PromptTuningConfig(init="zeros")
    with pytest.raises(ConfigError, match="needs init_text"):
        dt.PromptTuningConfig(init="text")
    with pytest.raises(ConfigError, match="adapts no modules"):
        dt.PromptTuningConfig(target_modules=["q_proj"])


# --- forward semantics ---------------------------------------------------------------------------
def test_labels_and_mask_shift_and_loss_ignores_virtual_positions():
    model = dt.wrap(tiny_llama(), dt.PTuningConfig(num_virtual_tokens=N))
    inputs = {**batch(), "labels": batch()["input_ids"]}
    prepared = model.prepare_inputs(dict(inputs))
    assert prepared["inputs_embeds"].shape == (2, N + 9, 32) and "input_ids" not in prepared
    assert torch.equal(prepared["labels"][:, :N], torch.full((2, N), -100))
    assert torch.equal(prepared["labels"][:, N:], inputs["labels"])
    assert torch.equal(prepared["attention_mask"], torch.ones(2, N + 9, dtype=torch.long))
    out = model(**inputs)
    logits = out.logits[:, N - 1 : -1]  # from the last virtual token on, each position predicts the next token
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), inputs["labels"].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    torch.testing.assert_close(model(batch()["input_ids"]).logits, output(model, {"input_ids": batch()["input_ids"]}))


@pytest.mark.parametrize("method", ["prompt", "p-lstm", "prefix"])
def test_disabled_adapter_is_the_base_model(method):
    model = dt.wrap(tiny_llama(), METHODS[method][0]())
    randomize_adapters(model)
    base = output(tiny_llama(), batch())
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch()), base, atol=0, rtol=0)
        assert torch.equal(greedy(model, padded_prompts()), greedy(tiny_llama(), padded_prompts()))
    assert not torch.allclose(output(model, batch())[:, -9:], base, atol=1e-3)
    with pytest.raises(TypeError, match="cannot be merged"):
        model.merge_adapter()
    plain = model.unload()
    assert not any(isinstance(m, PromptLearningLayer) for m in plain.modules())
    torch.testing.assert_close(output(plain, batch()), base, atol=0, rtol=0)


def test_prefix_reaches_attention_at_every_layer():
    model = dt.wrap(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=N, prefix_projection=False))
    randomize_adapters(model, std=1.0)
    model.base_model.config._attn_implementation = "eager"
    with torch.no_grad():
        attentions = model(**batch(), output_attentions=True).attentions
    assert len(attentions) == 2
    for weights in attentions:  # (batch, heads, queries, prefix + keys), every query attends to the prefix
        assert weights.shape[-1] == N + 9 and (weights[..., :N].sum(-1) > 0.01).all()
    # each layer's own slice of the prefix changes the output
    reference = output(model, batch())
    table = model.base_model.get_input_embeddings().prompt_encoder["default"].embedding.weight
    for layer in range(2):
        with torch.no_grad():
            saved_slice = table[:, layer * 32 : (layer + 1) * 32].clone()
            table[:, layer * 32 : (layer + 1) * 32] = 0
            changed = output(model, batch())
            table[:, layer * 32 : (layer + 1) * 32] = saved_slice
        assert not torch.allclose(changed, reference, atol=1e-4), f"layer {layer}'s prefix has no effect"


@pytest.mark.parametrize("method", ["prompt", "p-mlp", "prefix"])
@pytest.mark.parametrize("arch", sorted(FACTORIES))
def test_generation_with_and_without_cache_gives_the_same_tokens(arch, method):
    model = dt.wrap(FACTORIES[arch](), METHODS[method][0]())
    randomize_adapters(model, std=0.5)
    model.eval()
    cached = greedy(model, padded_prompts(), tokens=8)
    assert torch.equal(cached, greedy(model, padded_prompts(), tokens=8, use_cache=False))
    # the cached run matches step-by-step greedy decoding with full forwards (unpadded row)
    ids = padded_prompts()["input_ids"][1:]
    for _ in range(8):
        ids = torch.cat([ids, output(model, {"input_ids": ids})[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached[1:], ids)


def test_prefix_tuning_refuses_gradient_checkpointing():
    model = dt.wrap(tiny_llama(), dt.PrefixTuningConfig(num_virtual_tokens=N)).train()
    model.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    with pytest.raises(ConfigError, match="gradient checkpointing"):
        model(**batch(), labels=batch()["input_ids"])


# --- initialisation, loading, errors -------------------------------------------------------------
def test_vocab_and_text_initialisation(tiny_llama_dir, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    weight = base.get_input_embeddings().weight.detach().clone()
    model = dt.wrap(base, dt.PromptTuningConfig(num_virtual_tokens=6, init="vocab"))
    rows = model.base_model.get_input_embeddings().prompt("default").detach()
    assert all((weight == row).all(-1).any() for row in rows)
    model.unload()

    text = "Classify the sentiment"
    model = dt.wrap(base, dt.PromptTuningConfig(num_virtual_tokens=6, init="text", init_text=text))
    ids = smol_tokenizer(text)["input_ids"]
    ids = (ids * 6)[:6]
    torch.testing.assert_close(model.base_model.get_input_embeddings().prompt("default").detach(), weight[ids])
    assert model.peft_config["default"].tokenizer_name_or_path == str(tiny_llama_dir)  # recorded for peft


def test_encoder_weights_come_back_for_training_and_peft_files_train_the_stored_tokens(tmp_path):
    model = dt.wrap(tiny_llama(), dt.PTuningConfig(num_virtual_tokens=N, encoder="lstm"))
    randomize_adapters(model)
    model.save_pretrained(tmp_path / "ours")
    trained = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path / "ours", is_trainable=True)
    encoder = trained.base_model.get_input_embeddings().prompt_encoder["default"]
    original = model.base_model.get_input_embeddings().prompt_encoder["default"]
    assert encoder.reparametrized and encoder.lstm_head is not None
    for (name, got), expected in zip(encoder.state_dict().items(), original.state_dict().values(), strict=True):
        assert torch.equal(got, expected), name
    assert trained.trainable_parameters()[0] == model.trainable_parameters()[0]

    theirs = peft.get_peft_model(tiny_llama(), METHODS["p-mlp"][1]())
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.warns(UserWarning, match="not the encoder"):
        ours = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path / "peft", is_trainable=True)
    assert ours.trainable_parameters()[0] == N * 32  # the stored tokens themselves
    torch.testing.assert_close(output(ours, batch()), output(theirs.eval(), batch()), atol=1e-5, rtol=0)


def test_checkpoints_that_do_not_fit_say_why(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), METHODS["prefix"][1]())
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "token_dim": 32, "num_attention_heads": 4}))  # sized by query heads
    with pytest.raises(ConfigError, match="key/value heads"):
        dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    path.write_text(json.dumps({**config, "num_virtual_tokens": N + 1}))
    with pytest.raises(ConfigError, match=r"prompt_embeddings has shape \(4, 64\) but this adapter needs \(5, 64\)"):
        dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    with pytest.raises(ConfigError, match="task_type CAUSAL_LM"):
        dt.wrap(tiny_bert(), dt.PrefixTuningConfig())


def test_prompt_adapter_beside_lora_switches_and_deletes():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    model.add_adapter("prompt", dt.PromptTuningConfig(num_virtual_tokens=N))
    randomize_adapters(model)  # the LoRA adapter's tensors
    lora = output(model, batch())
    model.set_adapter("prompt")
    assert output(model, batch()).shape[1] == N + 9
    assert model.trainable_parameters()[0] == N * 32
    model.delete_adapter("prompt")
    assert isinstance(model.base_model.get_input_embeddings(), torch.nn.Embedding)
    torch.testing.assert_close(output(model, batch()), lora)


# --- training ------------------------------------------------------------------------------------
def test_cli_trains_prompt_tuning_and_loss_decreases(tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    args = ["train", "--base", tiny_llama_dir, "--data", alpaca_file(tmp_path / "train.jsonl"), "--max-steps", 15]
    assert run_cli(*args, "--method", "prompt_tuning", "--num-virtual-tokens", 8, "--output-dir", out, *FAST) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["after"]["loss"] < summary["before"]["loss"]
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]
    tensors, config = saved(out / "adapter")
    assert tensors["prompt_embeddings"].shape == (8, 32) and config["num_virtual_tokens"] == 8


def test_cli_prefix_tuning_resumes_with_its_encoder(tiny_llama_dir, tmp_path):
    data = alpaca_file(tmp_path / "train.jsonl", count=16)
    common = ["train", "--base", tiny_llama_dir, "--data", data, "--method", "prefix_tuning"]
    common += ["--num-virtual-tokens", 4, "--save-every", 2, "--lr-scheduler", "constant", "--no-eval-generate", *FAST]
    assert run_cli(*common, "--max-steps", 4, "--output-dir", tmp_path / "whole") == 0
    assert run_cli(*common, "--max-steps", 2, "--output-dir", tmp_path / "split") == 0
    assert run_cli(*common, "--max-steps", 4, "--output-dir", tmp_path / "split", "--resume") == 0
    for name in ("adapter_model.safetensors", "adapter_training_state.safetensors"):
        expected = load_file(tmp_path / "whole" / "adapter" / name)
        got = load_file(tmp_path / "split" / "adapter" / name)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-6, rtol=1e-5)


# --- SmolLM2 -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2():
    """One SmolLM2 for every test here (each leaves it as it found it). One thread: these inputs are
    tiny, and a second thread only contends with other processes on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = dt.load_base("smollm2-135m")[0].eval()
    reference = output(model, batch())
    yield model
    torch.testing.assert_close(output(model, batch()), reference, atol=0, rtol=0)
    torch.set_num_threads(threads)


@pytest.mark.real_model
@pytest.mark.parametrize("method", ["prompt", "p-mlp", "prefix"])
def test_smollm2_agrees_with_peft_both_ways(smollm2, method, tmp_path):
    inputs = {**padded_prompts(), "input_ids": padded_prompts()["input_ids"] + 100}
    inputs["input_ids"][0, :2] = 0
    ours = dt.wrap(smollm2, METHODS[method][0]())
    if method == "prefix":
        assert ours.peft_config["default"].token_dim == 3 * 64  # 3 key/value heads of 64
    randomize_adapters(ours, std=0.2)
    ours.save_pretrained(tmp_path / "ours")
    logits, tokens = output(ours, inputs), greedy(ours, inputs, tokens=4)
    ours.unload()
    theirs = peft.PeftModel.from_pretrained(smollm2, tmp_path / "ours").eval()
    torch.testing.assert_close(output(theirs, inputs), logits, atol=5e-4, rtol=0)
    assert torch.equal(greedy_by_forward(theirs, inputs, tokens=4), tokens)

    theirs = peft.get_peft_model(smollm2, METHODS[method][1]())
    randomize_adapters(theirs, std=0.2)
    theirs.eval().save_pretrained(tmp_path / "peft")
    logits, tokens = output(theirs, inputs), greedy_by_forward(theirs, inputs, tokens=4)
    ours = dt.DeltaModel.from_pretrained(smollm2, tmp_path / "peft")
    torch.testing.assert_close(output(ours, inputs), logits, atol=5e-4, rtol=0)
    assert torch.equal(greedy(ours, inputs, tokens=4), tokens)
    ours.unload()
