"""Bottleneck adapters: placement per architecture, 2md+m+d parameters, near-identity init, the
forward against h + up(act(down(h))) by hand, trainable set, checkpoints, no merging, the CLI."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MODELS, batch, output, randomize_adapters
from safetensors.torch import load_file
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.methods.adapter import BottleneckAdapter
from deltatune.methods.base import ModulesToSave
from deltatune.targeting import layer_index

M, D = 8, 32  # bottleneck size; hidden size of every tiny model
# The attention and feed-forward output projections of layer {i}, per architecture.
OUTPUTS = {
    "llama": ("model.layers.{}.self_attn.o_proj", "model.layers.{}.mlp.down_proj"),
    "gpt2": ("transformer.h.{}.attn.c_proj", "transformer.h.{}.mlp.c_proj"),
    "bert": ("bert.encoder.layer.{}.attention.output.dense", "bert.encoder.layer.{}.output.dense"),
}


def adapted(arch: str, **kw) -> tuple[torch.nn.Module, dt.DeltaModel]:
    base = TINY_MODELS[arch]()
    reference = copy.deepcopy(base)
    return reference, dt.wrap(base, dt.AdapterConfig(bottleneck_size=M, **kw))


def adapters(model: dt.DeltaModel) -> dict[str, BottleneckAdapter]:
    return {n: m for n, m in model.base_model.named_modules() if isinstance(m, BottleneckAdapter)}


def norms(model: dt.DeltaModel) -> dict[str, ModulesToSave]:
    return {
        n: m
        for n, m in model.base_model.named_modules()
        if isinstance(m, ModulesToSave) and n.rsplit(".", 1)[-1] != "classifier"
    }


def layer_norm_params(reference: torch.nn.Module, layers: set[int]) -> int:
    return sum(
        p.numel()
        for n, m in reference.named_modules()
        if type(m).__name__.endswith("Norm") and layer_index(n) in layers
        for p in m.parameters()
    )


def head_params(model: dt.DeltaModel) -> int:
    """BERT is a sequence classifier: its new head trains too (DeltaModel's modules_to_save)."""
    heads = [m for n, m in model.base_model.named_modules() if n == "classifier"]
    return sum(p.numel() for h in heads for p in h.adapter_parameters("default"))


@pytest.mark.parametrize(
    ("options", "expected"),
    [({}, {0: (0, 1), 1: (0, 1)}), ({"placement": ("ffn",)}, {0: (1,), 1: (1,)}), ({"leave_out": [0]}, {1: (0, 1)})],
)
def test_wraps_the_chosen_output_projections(arch, options, expected):
    _, model = adapted(arch, **options)
    wanted = {OUTPUTS[arch][kind].format(layer) for layer, kinds in expected.items() for kind in kinds}
    assert set(adapters(model)) == wanted
    assert {layer_index(n) for n in norms(model)} == set(expected)


def test_parameter_counts(arch):
    reference, model = adapted(arch)
    for layer in adapters(model).values():
        assert sum(p.numel() for p in layer.adapter_parameters("default")) == 2 * M * D + M + D
    bottlenecks = 4 * (2 * M * D + M + D)  # 2 layers x (attention, ffn)
    assert model.trainable_parameters()[0] == bottlenecks + layer_norm_params(reference, {0, 1}) + head_params(model)
    _, no_norms = adapted(arch, train_layer_norms=False, leave_out=[0])
    assert not norms(no_norms)
    assert no_norms.trainable_parameters()[0] == 2 * (2 * M * D + M + D) + head_params(no_norms)


def test_zero_up_projection_is_exactly_the_base_model(arch):
    reference, model = adapted(arch)
    assert not torch.equal(output(model, batch()), output(reference, batch()))
    torch.testing.assert_close(output(model, batch()), output(reference, batch()), atol=1e-2, rtol=0)
    with torch.no_grad():
        for layer in adapters(model).values():
            layer.adapter_up["default"].weight.zero_()
    assert torch.equal(output(model, batch()), output(reference, batch()))


@pytest.mark.parametrize(("non_linearity", "act"), [("gelu", F.gelu), ("relu", F.relu)])
@pytest.mark.parametrize("kind", [0, 1])
def test_forward_matches_hand_computed_bottleneck(arch, kind, non_linearity, act):
    _, model = adapted(arch, non_linearity=non_linearity)
    randomize_adapters(model, std=0.3)
    layer = adapters(model)[OUTPUTS[arch][kind].format(1)]
    base = layer.base_layer
    assert isinstance(base, Conv1D) == (arch == "gpt2")
    x = torch.randn(2, 5, base.weight.shape[0] if isinstance(base, Conv1D) else base.in_features)
    down, up = layer.adapter_down["default"], layer.adapter_up["default"]
    with torch.no_grad():
        h = base(x)
        expected = h + F.linear(act(F.linear(h, down.weight, down.bias)), up.weight, up.bias)
        torch.testing.assert_close(layer(x), expected)


def test_only_adapters_and_layer_norms_train_and_get_gradients(arch):
    _, model = adapted(arch, leave_out=[0])
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for name in trainable:
        assert ".adapter_down.default." in name or ".adapter_up.default." in name or ".modules_to_save.default." in name
        assert layer_index(name) == 1 or ".classifier." in name
    assert any(".modules_to_save." in n and ".classifier." not in n for n in trainable)  # layer norms
    model(**batch()).logits.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert (p.grad is not None and p.grad.abs().sum() > 0) == (name in trainable), name


def test_adapters_switch_disable_and_delete(arch):
    reference, model = adapted(arch)
    randomize_adapters(model, seed=1)
    first = output(model, batch())
    model.add_adapter("other", dt.AdapterConfig(bottleneck_size=4, placement=("attention",)))
    model.set_adapter("other")
    randomize_adapters(model, seed=2)
    assert not torch.allclose(output(model, batch()), first)
    with model.disable_adapter():
        assert torch.equal(output(model, batch()), output(reference, batch()))
    model.set_adapter("default")
    assert torch.equal(output(model, batch()), first)
    model.delete_adapter("default")
    assert len(adapters(model)) == 2 and all(layer.adapter_names == ["other"] for layer in adapters(model).values())


def test_save_and_load_reproduces_logits(arch, tmp_path):
    _, model = adapted(arch, leave_out=[0], non_linearity="relu")
    randomize_adapters(model)
    expected = output(model, batch())
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "BOTTLENECK_ADAPTER" and saved["leave_out"] == [0]
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert f"base_model.model.{OUTPUTS[arch][1].format(1)}.adapter_down.weight" in keys
    loaded = dt.DeltaModel.from_pretrained(TINY_MODELS[arch](), tmp_path)
    assert loaded.peft_config["default"].placement == ("attention", "ffn")
    assert torch.equal(output(loaded, batch()), expected)
    assert loaded.trainable_parameters()[0] == 0


def test_merge_is_a_clear_error_and_the_model_keeps_working(arch):
    _, model = adapted(arch)
    randomize_adapters(model)
    expected = output(model, batch())
    with pytest.raises(TypeError, match="do not fold into the base weights"):
        model.merge_and_unload()
    assert model.peft_config and len(adapters(model)) == 4
    assert torch.equal(output(model, batch()), expected)


def test_a_refused_merge_leaves_nothing_marked_merged(arch):
    _, model = adapted(arch)
    with pytest.raises(TypeError):
        model.merge_adapter()
    assert model.merged_adapter is None
    with model.disable_adapter():  # re-merges on exit whatever was marked merged
        pass


def test_config_errors_and_target_modules_override():
    for bad in ({"bottleneck_size": 0}, {"non_linearity": "swishy"}, {"placement": ("mlp",)}):
        with pytest.raises(ConfigError):
            dt.AdapterConfig(**bad)
    base = TINY_MODELS["llama"]()
    base.config.model_type = "mystery"
    with pytest.raises(ConfigError, match=r"no adapter placement known for model type 'mystery'.*llama"):
        dt.wrap(base, dt.AdapterConfig())
    assert not any(isinstance(m, BottleneckAdapter) for m in base.modules())
    model = dt.wrap(base, dt.AdapterConfig(bottleneck_size=M, target_modules=["o_proj"]))
    assert set(adapters(model)) == {f"model.layers.{i}.self_attn.o_proj" for i in (0, 1)}
    with pytest.raises(ConfigError, match="removes every adapter"):
        dt.wrap(TINY_MODELS["gpt2"](), dt.AdapterConfig(leave_out=[0, 1]))


def test_cli_trains_an_adapter_with_the_default_placement(tiny_llama_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i}"} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    argv = ["train", "--method", "adapter", "--bottleneck-size", "8", "--base", str(tiny_llama_dir)]
    argv += ["--data", str(data), "--max-steps", "3", "--output-dir", str(out), "--no-eval-generate", "--threads", "1"]
    assert main(argv) == 0
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "BOTTLENECK_ADAPTER" and config["bottleneck_size"] == 8
    wrapped = {k.split(".adapter_")[0] for k in load_file(Path(out / "adapter" / "adapter_model.safetensors"))}
    assert {w for w in wrapped if "layernorm" not in w} == {
        f"base_model.model.{name.format(i)}" for name in OUTPUTS["llama"] for i in (0, 1)
    }
