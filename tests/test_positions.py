"""Inputs longer than the model's position table are refused with a clear error (transformers
only warns, then computes garbage or fails deep inside)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.cli import main
from deltatune.data.positions import check_features, check_prompts, max_positions


def test_max_positions_reads_each_config_spelling():
    assert max_positions(tiny_llama()) == 128  # max_position_embeddings
    assert max_positions(tiny_gpt2()) == 128  # n_positions
    assert max_positions(dt.wrap(tiny_llama(), dt.LoraConfig(r=2))) == 128  # through the wrapper
    assert max_positions(object()) is None


def test_prompts_and_rows_past_the_positions_are_refused():
    model = tiny_llama()
    check_prompts(model, [[1] * 100, [1] * 120], 8)  # 128: fits exactly
    with pytest.raises(dt.ConfigError, match=r"prompt 1 has 121 tokens .*keep its last 120 tokens"):
        check_prompts(model, [[1] * 100, [1] * 121], 8)
    check_features(model, [{"input_ids": [1] * 128}], 256)
    with pytest.raises(dt.ConfigError, match=r"training row 1 has 129 tokens .* --max-length 128 or less"):
        check_features(model, [{"input_ids": [1] * 5}, {"input_ids": [1] * 129}], 256)


def test_train_refuses_rows_past_the_positions(tiny_llama_dir: Path, tmp_path: Path, capsys):
    """tiny_llama_dir has 512 positions; --max-length 1024 lets a 700-token example through."""
    records = [{"instruction": f"Say {i}.", "input": "", "output": "word " * (700 if i == 3 else 2)} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records))
    args = ["train", "--base", tiny_llama_dir, "--data", data, "--output-dir", tmp_path / "run", "--max-length", 1024]
    args += ["--max-steps", 1, "--batch-size", 4, "--threads", 1, "--no-eval-generate"]
    assert main([str(a) for a in args]) == 2
    error = capsys.readouterr().err
    assert "more than the 512 positions" in error and "--max-length 512" in error, error


def test_generate_refuses_a_prompt_past_the_positions(tiny_llama_dir: Path, capsys):
    prompt = "word " * 600  # more than tiny_llama_dir's 512 positions
    args = ["generate", "--base", tiny_llama_dir, "--prompt", prompt, "--raw", "--max-new-tokens", 4]
    assert main([str(a) for a in args]) == 2
    error = capsys.readouterr().err
    assert "more than the 512 this model has" in error and "keep its last 508 tokens" in error, error


def test_delta_model_generate_refuses_inputs_past_the_positions():
    """DeltaModel.generate checks like the CLI: the mask's tokens plus max_new_tokens must fit."""
    import torch

    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2))  # 128 positions
    ids = torch.ones(2, 121, dtype=torch.long)
    with pytest.raises(dt.ConfigError, match=r"prompt 0 has 121 tokens .*keep its last 120 tokens"):
        model.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    with pytest.raises(dt.ConfigError, match="more than the 128 this model has"):
        model.generate(ids, adapter_names=["default", "default"], max_new_tokens=8, do_sample=False)
    mask = torch.ones_like(ids)
    mask[:, :5] = 0  # left padding: 116 real tokens + 8 fit
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
