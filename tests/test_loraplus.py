"""LoRA+: the same parameter groups, learning rates and weight decay as peft's
create_loraplus_optimizer, one optimizer step equal to peft's, and --loraplus-lr-ratio on train."""

import json

import pytest
import torch
from conftest import batch, randomize_adapters, tiny_llama
from test_train import FAST, alpaca_file, run_cli

import deltatune as dt
from deltatune.training.config import TrainConfig
from deltatune.training.trainer import _optimizer

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
from peft.optimizers import create_loraplus_optimizer as peft_loraplus  # noqa: E402

TARGETS = ["q_proj", "v_proj", "embed_tokens"]


def pair(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=TARGETS, use_dora=True))
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    return dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path, is_trainable=True), theirs


def lr_of(model, optimizer, prefix):
    names = {
        id(p): n.removeprefix(prefix).replace(".default.weight", "").replace(".default", "")
        for n, p in model.named_parameters()
    }
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}


def test_groups_equal_peft(tmp_path):
    ours, theirs = pair(tmp_path)
    kw = {"lr": 1e-3, "loraplus_lr_ratio": 16.0, "loraplus_lr_embedding": 1e-5, "loraplus_weight_decay": 0.1}
    mine = lr_of(ours, dt.create_loraplus_optimizer(ours, torch.optim.AdamW, **kw), "base_model.")
    their = lr_of(theirs, peft_loraplus(theirs, torch.optim.AdamW, **kw), "base_model.model.")
    assert mine == their
    assert {lr for lr, _ in mine.values()} == {1e-3, 1.6e-2, 1e-5}


def test_one_step_equals_peft(tmp_path):
    ours, theirs = pair(tmp_path)
    inputs = batch()
    for model in (ours, theirs):
        optimizer = (dt.create_loraplus_optimizer if model is ours else peft_loraplus)(
            model, torch.optim.AdamW, lr=1e-2, loraplus_lr_ratio=8.0
        )
        model.train()
        model(**inputs, labels=inputs["input_ids"]).loss.backward()
        optimizer.step()
    mine = ours.adapter_state_dict()
    their = peft.get_peft_model_state_dict(theirs)
    assert len(mine) == 15 and mine.keys() <= their.keys()  # peft adds the embedding's own weight
    for key, value in mine.items():
        torch.testing.assert_close(value, their[key], atol=1e-6, rtol=1e-5)


def test_trainer_builds_loraplus_groups_from_the_flag():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj"]))
    plain = _optimizer(model, TrainConfig(learning_rate=1e-3))
    assert [g["lr"] for g in plain.param_groups] == [1e-3]
    plus = _optimizer(model, TrainConfig(learning_rate=1e-3, loraplus_lr_ratio=16.0))
    by_lr = {g["lr"]: len(g["params"]) for g in plus.param_groups if g["params"]}
    assert by_lr == {1e-3: 2, 1.6e-2: 2}  # A of the 2 layers at lr, B at 16·lr


def test_train_cli_with_loraplus(tiny_llama_dir, tmp_path):
    data = alpaca_file(tmp_path / "train.jsonl", count=8)
    out = tmp_path / "run"
    args = ["train", "--base", tiny_llama_dir, "--data", data, "--max-steps", 2, "--output-dir", out]
    assert run_cli(*args, "--r", 2, "--target-modules", "q_proj", "--loraplus-lr-ratio", 16, *FAST) == 0
    assert json.loads((out / "summary.json").read_text())["steps"] == 2
    with pytest.raises(SystemExit):
        run_cli(*args[:-1], tmp_path / "bad", "--loraplus-lr-ratio", "fast", *FAST)
