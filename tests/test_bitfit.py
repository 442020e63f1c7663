"""BitFit: only bias deltas train, identity at init, bias-less models, merging, checkpoints, CLI."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from conftest import TINY_MODELS, batch, output, randomize_adapters, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file
from test_train import FAST, run_cli
from torch import nn
from transformers import AutoModelForCausalLM

import deltatune as dt
from deltatune.methods.base import DeltaLayer
from deltatune.methods.bitfit import BitFitLayer

HEAD = "classifier"  # tiny BERT's head, trained whole through modules_to_save


def bitfit(arch: str, **kw) -> tuple[nn.Module, dt.DeltaModel]:
    base = TINY_MODELS[arch]()
    reference = copy.deepcopy(base)
    return reference, dt.wrap(base, dt.BitFitConfig(add_missing=arch == "llama", **kw))


def loss_of(model: nn.Module, arch: str) -> torch.Tensor:
    inputs = batch()
    labels = torch.tensor([0, 2]) if arch == "bert" else inputs["input_ids"]
    return model(**inputs, labels=labels).loss


def train_step(model: nn.Module, arch: str) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss_of(model, arch).backward()
    optimizer.step()


def expected_trainable(arch: str) -> int:
    """Every bias of the plain model but the head's (Llama: one per Linear but lm_head), + the head."""
    model = TINY_MODELS[arch]()
    if arch == "llama":
        return sum(m.out_features for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head")
    biases = sum(p.numel() for n, p in model.named_parameters() if n.endswith(".bias") and not n.startswith(HEAD))
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith(HEAD))
    return biases + head


def test_fresh_adapter_leaves_output_unchanged(arch):
    reference, model = bitfit(arch)
    assert torch.equal(output(model, batch()), output(reference, batch()))


def test_trainable_parameters_are_the_bias_deltas_and_head(arch):
    _, model = bitfit(arch)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.endswith(".bias_delta.default") or f".{HEAD}.modules_to_save." in n for n in trainable)
    assert model.trainable_parameters()[0] == expected_trainable(arch)


def test_one_step_changes_only_bias_deltas_and_head(arch):
    _, model = bitfit(arch)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(model, arch)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed and changed <= trainable  # every frozen tensor is bit-identical
    assert any(n.endswith(".bias_delta.default") for n in changed)


@pytest.mark.parametrize(
    "arch, bias, expected",
    [
        ("gpt2", "attention", {"transformer.h.N.attn.c_attn", "transformer.h.N.attn.c_proj"}),
        ("gpt2", "mlp", {"transformer.h.N.mlp.c_fc", "transformer.h.N.mlp.c_proj"}),
        (
            "bert",
            "attention",
            {f"bert.encoder.layer.N.attention.{m}" for m in ("self.query", "self.key", "self.value", "output.dense")},
        ),
        ("bert", "mlp", {"bert.encoder.layer.N.intermediate.dense", "bert.encoder.layer.N.output.dense"}),
        ("llama", "attention", {f"model.layers.N.self_attn.{p}_proj" for p in "qkvo"}),
        ("llama", "mlp", {f"model.layers.N.mlp.{p}_proj" for p in ("gate", "up", "down")}),
    ],
)
def test_attention_and_mlp_select_their_linears(arch, bias, expected):
    _, model = bitfit(arch, bias=bias)
    wrapped = [n for n, m in model.delta_layers() if isinstance(m, BitFitLayer)]
    assert len(wrapped) == 2 * len(expected)  # two layers
    assert {re.sub(r"\.\d\.", ".N.", n) for n in wrapped} == expected


def test_all_includes_layernorm_biases_as_in_the_paper():
    _, model = bitfit("gpt2")
    wrapped = {n for n, m in model.delta_layers()}
    assert {"transformer.h.0.ln_1", "transformer.h.1.ln_2", "transformer.ln_f"} <= wrapped


def test_model_without_biases_needs_add_missing():
    base = tiny_llama()
    with pytest.raises(dt.ConfigError, match="add_missing=True"):
        dt.wrap(base, dt.BitFitConfig())
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())


def test_added_biases_train_on_llama():
    reference, model = bitfit("llama")
    first = loss_of(model, "llama").item()
    for _ in range(5):
        train_step(model, "llama")
        model.zero_grad()
    assert loss_of(model, "llama").item() < first
    assert not torch.allclose(output(model, batch()), output(reference, batch()), atol=1e-4)


def test_merge_and_unload_folds_deltas_into_the_bias(arch):
    reference, model = bitfit(arch)
    randomize_adapters(model)
    expected = output(model, batch())
    plain = model.merge_and_unload()
    assert type(plain) is type(reference)
    assert not any(isinstance(m, DeltaLayer) for m in plain.modules())
    torch.testing.assert_close(output(plain, batch()), expected, atol=1e-5, rtol=0)
    new = set(plain.state_dict()) - set(reference.state_dict())
    assert all(k.endswith(".bias") for k in new) and bool(new) == (arch == "llama")


def test_unmerge_restores_base_biases(arch):
    reference, model = bitfit(arch)
    randomize_adapters(model)
    unmerged = output(model, batch())
    model.merge_adapter()
    torch.testing.assert_close(output(model, batch()), unmerged, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    restored = model.unload().state_dict()
    assert set(restored) == set(reference.state_dict())  # Llama: the biases merge created are gone
    for name, weight in reference.state_dict().items():
        torch.testing.assert_close(restored[name], weight, atol=1e-6, rtol=0)


def test_merged_llama_keeps_its_new_biases_through_save_pretrained(tmp_path):
    _, model = bitfit("llama")
    randomize_adapters(model)
    expected = output(model, batch())
    plain = model.merge_and_unload()  # declares the new biases in the config (bitfit.finalize_merged)
    assert plain.config.attention_bias and plain.config.mlp_bias
    plain.save_pretrained(tmp_path)
    torch.testing.assert_close(output(AutoModelForCausalLM.from_pretrained(tmp_path), batch()), expected)


def test_save_load_round_trip_holds_only_bias_vectors(arch, tmp_path):
    _, model = bitfit(arch)
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    deltas = {k: v for k, v in tensors.items() if f".{HEAD}." not in k}
    assert deltas and all(k.endswith(".bias_delta") and v.dim() == 1 for k, v in deltas.items())
    assert sum(v.numel() for v in tensors.values()) == expected_trainable(arch)
    loaded = dt.DeltaModel.from_pretrained(TINY_MODELS[arch](), tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "BITFIT"
    torch.testing.assert_close(output(loaded, batch()), output(model, batch()))


def test_adapters_switch_and_disable():
    reference = tiny_gpt2()
    model = dt.wrap(tiny_gpt2(), dt.BitFitConfig())
    model.add_adapter("mlp", dt.BitFitConfig(bias="mlp"))
    randomize_adapters(model, seed=1)
    model.set_adapter("mlp")
    randomize_adapters(model, seed=2)
    out_mlp = output(model, batch())
    model.set_adapter("default")
    assert not torch.allclose(output(model, batch()), out_mlp, atol=1e-4)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, batch()), output(reference, batch()))
    model.delete_adapter("default")
    torch.testing.assert_close(output(model, batch()), out_mlp)
    assert not isinstance(model.base_model.transformer.h[0].attn.c_attn, DeltaLayer)


def test_exclude_and_layers_to_transform_narrow_the_selection():
    model = dt.wrap(tiny_bert(), dt.BitFitConfig(bias="attention", layers_to_transform=[1], exclude_modules=["key"]))
    names = [n for n, m in model.delta_layers() if isinstance(m, BitFitLayer)]
    assert len(names) == 3 and all(".layer.1." in n and not n.endswith("key") for n in names)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"bias": "lora_only"}, "all, attention, mlp"), ({"target_modules": ["query"]}, "not target_modules")],
)
def test_bad_config_is_a_clear_error(kwargs, message):
    with pytest.raises(dt.ConfigError, match=message):
        dt.BitFitConfig(**kwargs)


def test_cli_trains_bitfit_on_a_classifier(tiny_bert_dir, tmp_path):
    data = tmp_path / "sst.tsv"
    rows = [f"{'great fun' if i % 2 else 'dull mess'} number {i}\t{i % 2}" for i in range(24)]
    data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = ["train", "--method", "bitfit", "--bias", "all", "--base", tiny_bert_dir, "--data", data]
    assert run_cli(*args, "--max-steps", 4, "--output-dir", out, "--eval-fraction", "0.25", *FAST) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BITFIT" and config["modules_to_save"] == [HEAD]
    tensors = load_file(out / "adapter" / "adapter_model.safetensors")
    assert all(v.dim() == 1 for k, v in tensors.items() if f".{HEAD}." not in k)
