"""Partial fine-tuning: exactly the chosen blocks train, checkpoints hold only them, merging, CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import TINY_MODELS, batch, output, randomize_adapters, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from test_train import FAST, run_cli
from torch import nn

import deltatune as dt
from deltatune.checkpoint.adapter import KEY_PREFIX
from deltatune.methods.base import DeltaLayer, ModulesToSave
from deltatune.methods.partial import find_blocks

HEAD = "classifier"  # tiny BERT's head, trained whole through modules_to_save


def partial(arch: str, **kw) -> tuple[nn.Module, dt.DeltaModel]:
    base = TINY_MODELS[arch]()
    reference = copy.deepcopy(base)
    return reference, dt.wrap(base, dt.PartialConfig(**(kw or {"train_top_layers": 1})))


def trained_names(arch: str) -> list[str]:
    """The plain model's modules that train_top_layers=1 trains: the last block (+ BERT's head)."""
    top = find_blocks(TINY_MODELS[arch]())[1]
    return [top, HEAD] if arch == "bert" else [top]


def inside(name: str, modules: list[str]) -> bool:
    return any(name.startswith(m + ".") for m in modules)


def train_step(model: nn.Module, arch: str) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs = batch()
    labels = torch.tensor([0, 2]) if arch == "bert" else inputs["input_ids"]
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()


def test_fresh_adapter_leaves_output_unchanged(arch):
    reference, model = partial(arch)
    assert torch.equal(output(model, batch()), output(reference, batch()))


def test_trainable_count_is_the_top_block_and_head(arch):
    _, model = partial(arch)
    plain = TINY_MODELS[arch]()
    expected = sum(p.numel() for n, p in plain.named_parameters() if inside(n, trained_names(arch)))
    assert model.trainable_parameters()[0] == expected


def test_one_step_changes_exactly_the_top_block(arch):
    reference, model = partial(arch)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_step(model, arch)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # bit-identical
    trained = model.merge_and_unload().state_dict()
    changed = {n for n, p in reference.state_dict().items() if not torch.equal(p, trained[n])}
    assert changed and all(inside(n, trained_names(arch)) for n in changed)
    top = find_blocks(reference)[1]
    assert {n.removeprefix(top + ".").split(".")[0] for n in changed if n.startswith(top)} == {
        n.split(".")[0] for n, _ in reference.get_submodule(top).named_parameters()
    }  # every part of the block (attention, MLP, norms) trained


def test_freeze_bottom_layers_selects_the_rest():
    blocks = find_blocks(tiny_llama())
    for kw, trained in [({"freeze_bottom_layers": 1}, [1]), ({"freeze_bottom_layers": 0}, [0, 1])]:
        _, model = partial("llama", **kw)
        wrapped = [n for n, m in model.delta_layers() if isinstance(m, ModulesToSave)]
        assert wrapped == [blocks[i] for i in trained]


def test_save_holds_only_the_trained_layers_and_loads_onto_a_fresh_base(arch, tmp_path):
    _, model = partial(arch)
    train_step(model, arch)
    model.eval()
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    plain = TINY_MODELS[arch]().state_dict()
    expected = {KEY_PREFIX + n for n in plain if inside(n, trained_names(arch))}
    assert set(tensors) == expected  # peft's layout: the module's own keys, no adapter name
    loaded = dt.DeltaModel.from_pretrained(TINY_MODELS[arch](), tmp_path)
    assert loaded.trainable_parameters()[0] == 0
    assert json.loads((tmp_path / "adapter_config.json").read_text())["train_top_layers"] == 1
    torch.testing.assert_close(output(loaded, batch()), output(model, batch()), atol=0, rtol=0)


def test_merge_and_unload_swaps_the_trained_copies_in(arch):
    reference, model = partial(arch)
    randomize_adapters(model)
    expected = output(model, batch())
    plain = model.merge_and_unload()
    assert type(plain) is type(reference)
    assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
    assert set(plain.state_dict()) == set(reference.state_dict())
    torch.testing.assert_close(output(plain, batch()), expected, atol=0, rtol=0)


def test_adapters_switch_and_disable():
    reference = tiny_gpt2()
    model = dt.wrap(tiny_gpt2(), dt.PartialConfig(train_top_layers=1))
    model.add_adapter("both", dt.PartialConfig(train_top_layers=2))
    randomize_adapters(model, seed=1)
    model.set_adapter("both")
    randomize_adapters(model, seed=2)
    out_both = output(model, batch())
    model.set_adapter("default")
    assert not torch.allclose(output(model, batch()), out_both, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch()), output(reference, batch()), atol=0, rtol=0)
    model.delete_adapter("default")
    torch.testing.assert_close(output(model, batch()), out_both)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of train_top_layers"),
        ({"train_top_layers": 1, "freeze_bottom_layers": 1}, "exactly one"),
        ({"train_top_layers": 0}, ">= 1"),
        ({"freeze_bottom_layers": -1}, ">= 0"),
        ({"train_top_layers": 1, "layers_to_transform": [1]}, "layers_to_transform is not supported"),
        ({"train_top_layers": 1, "target_modules": ["q_proj"]}, "target_modules is not supported"),
    ],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.PartialConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [{"train_top_layers": 3}, {"freeze_bottom_layers": 2}])
def test_too_many_layers_names_the_layer_count(kwargs):
    base = tiny_llama()
    with pytest.raises(dt.ConfigError, match="has 2 layers"):
        dt.wrap(base, dt.PartialConfig(**kwargs))
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())


def test_layers_already_carrying_an_adapter_are_refused():
    model = dt.wrap(tiny_llama(), dt.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(dt.ConfigError, match="already carries an adapter"):
        model.add_adapter("top", dt.PartialConfig(train_top_layers=1))


def test_cli_trains_the_top_layer(tiny_bert_dir, tmp_path):
    data = tmp_path / "sst.tsv"
    rows = [f"{'great fun' if i % 2 else 'dull mess'} number {i}\t{i % 2}" for i in range(24)]
    data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = ["train", "--method", "partial", "--train-top-layers", 1, "--base", tiny_bert_dir, "--data", data]
    assert run_cli(*args, "--max-steps", 3, "--output-dir", out, "--eval-fraction", "0.25", *FAST) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "PARTIAL" and config["train_top_layers"] == 1
    keys = load_file(out / "adapter" / "adapter_model.safetensors")
    trained = tuple(KEY_PREFIX + m for m in ("bert.encoder.layer.1.", "classifier."))
    assert keys and all(k.startswith(trained) for k in keys)


def test_lora_added_after_partial_wraps_the_base_modules():
    model = dt.wrap(tiny_llama(), dt.PartialConfig(train_top_layers=1))
    model.add_adapter("lora", dt.LoraConfig(r=2, target_modules=["q_proj"]))
    wrapped = sorted(n for n, m in model.base_model.named_modules() if type(m).__name__ == "LoraLinear")
    assert wrapped == ["model.layers.0.self_attn.q_proj", "model.layers.1.base_layer.self_attn.q_proj"]
