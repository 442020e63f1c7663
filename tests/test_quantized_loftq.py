"""LoftQ initialisation (init_lora_weights="loftq"): base + adapter closer to the float weights than plain
quantization, the same factors as peft's loftq_init where the formats match (NF4, blocks of 64), a saved adapter
that reloads onto the same base, peft's config keys, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import batch, output, randomize_adapters, tiny_llama

import deltatune as dt
from deltatune.config import ConfigError, DeltaConfig
from deltatune.loading.quantized import load_streamed
from deltatune.methods.lora_loftq import LoftQConfig, factors
from deltatune.quantization import quantize_base

HAS_BNB = __import__("importlib").util.find_spec("bitsandbytes") is not None
NEEDS_BNB = pytest.mark.skipif(not HAS_BNB, reason="needs the bitsandbytes package: pip install 'deltatune[quant]'")
TARGETS = ["q_proj", "v_proj", "down_proj"]
BITS = [pytest.param("nf4", 4, marks=NEEDS_BNB), ("int8", 8)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    directory = tmp_path_factory.mktemp("loftq-llama")
    tiny_llama().save_pretrained(directory)
    return directory


def loftq_model(saved, kind, bits, iters=1, r=4, alpha=8):
    config = dt.LoraConfig(
        r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights="loftq",
        loftq_config={"loftq_bits": bits, "loftq_iter": iters},
    )  # fmt: skip
    return dt.wrap(load_streamed(saved, "causal-lm", kind), config)


def adapted(model):
    return {n.removeprefix("base_model."): m for n, m in model.named_modules() if hasattr(m, "lora_A")}


@pytest.mark.parametrize(("kind", "bits"), BITS)
@pytest.mark.parametrize("iters", [1, 3])
def test_loftq_reduces_the_quantization_error_of_every_layer(saved, kind, bits, iters):
    float_weights = tiny_llama().state_dict()
    plain = load_streamed(saved, "causal-lm", kind)
    layers = adapted(loftq_model(saved, kind, bits, iters))
    assert len(layers) == 6
    for name, layer in layers.items():
        weight = float_weights[f"{name}.weight"]
        s = layer.scaling["default"]
        start = layer.base_layer.dequantize() + s * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        before = (weight - plain.get_submodule(name).dequantize()).norm()
        assert (weight - start).norm() < 0.97 * before, name


def int8_roundtrip(w):
    """Per-row symmetric int8, written here from the format's definition."""
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def test_int8_base_matches_a_hand_written_alternation(saved):
    """Two alternations by hand (Q = int8(W − s·B·A); B, A from the SVD of (W − Q)/s) give the base's codes and
    the adapter's factors."""
    layer = adapted(loftq_model(saved, "int8", 8, iters=2, r=4, alpha=8))["model.layers.0.self_attn.q_proj"]
    weight, s = tiny_llama().state_dict()["model.layers.0.self_attn.q_proj.weight"], 2.0
    target = weight
    for _ in range(2):
        q = int8_roundtrip(target)
        u, sigma, vh = torch.linalg.svd((weight - q) / s)
        b, a = u[:, :4] * sigma[:4].sqrt(), sigma[:4].sqrt()[:, None] * vh[:4]
        target = weight - s * b @ a
    torch.testing.assert_close(layer.base_layer.dequantize(), q, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer.lora_B["default"].weight @ layer.lora_A["default"].weight, b @ a)


def _cuda_to_cpu(original):
    """``Tensor.to`` with "cuda" read as "cpu": peft's loftq_init sends its work to cuda unconditionally."""

    def is_cuda(d):
        return (isinstance(d, str) and d.startswith("cuda")) or (isinstance(d, torch.device) and d.type == "cuda")

    def to(self, *args, **kwargs):
        args = tuple("cpu" if is_cuda(a) else a for a in args)
        if is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return original(self, *args, **kwargs)

    return to


@pytest.fixture
def peft_loftq(monkeypatch):
    """peft, whose LoraConfig refuses init_lora_weights="loftq" without scipy, which peft no longer uses
    (its pure-torch NF4 went in 0.20): the check is told scipy is there."""
    import importlib.machinery
    import importlib.util

    peft = pytest.importorskip("peft", reason="peft is a test dependency")
    find_spec = importlib.util.find_spec
    spec = importlib.machinery.ModuleSpec("scipy", None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "scipy" else find_spec(name, *a))
    return peft


@pytest.fixture
def peft_on_cpu(monkeypatch, peft_loftq):
    peft = peft_loftq
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(torch.Tensor, "to", _cuda_to_cpu(torch.Tensor.to))
    monkeypatch.setattr(bnb.nn.Params4bit, "to", _cuda_to_cpu(bnb.nn.Params4bit.to))
    return peft


@NEEDS_BNB
@pytest.mark.parametrize("iters", [1, 2])
def test_factors_equal_peft_loftq_init(peft_on_cpu, iters):
    from peft.utils.loftq_utils import loftq_init

    from deltatune.methods.lora_loftq import _roundtrip

    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(3))
    q_peft, a_peft, b_peft = loftq_init(weight, num_bits=4, reduced_rank=8, num_iter=iters)
    with torch.no_grad():
        q, a, b = factors(weight, _roundtrip("nf4"), 8, 1.0, iters)
    assert torch.equal(q, q_peft)
    torch.testing.assert_close(a, a_peft, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, b_peft, atol=1e-5, rtol=1e-5)


@NEEDS_BNB
def test_float_base_equals_peft_loftq_model(peft_on_cpu):
    """On a float base, LoftQ leaves the dequantized Q in the base weights, as peft does (lora_alpha == r)."""
    peft = peft_on_cpu
    kw = {"r": 4, "lora_alpha": 4, "target_modules": TARGETS, "init_lora_weights": "loftq"}
    ours = dt.wrap(tiny_llama(), dt.LoraConfig(**kw, loftq_config=LoftQConfig(loftq_bits=4, loftq_iter=2)))
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(**kw, loftq_config=peft.LoftQConfig(4, 2)))
    mine = {k.removeprefix("base_model.").replace(".default", ""): v for k, v in ours.state_dict().items()}
    their = {k.removeprefix("base_model.model.").replace(".default", ""): v for k, v in theirs.state_dict().items()}
    assert mine.keys() == their.keys()
    original = tiny_llama().state_dict()
    changed = [k for k, v in mine.items() if not torch.equal(v, original.get(k.replace(".base_layer", ""), v))]
    assert len(changed) == 6  # the six adapted base weights became Q
    for key, value in mine.items():
        torch.testing.assert_close(value, their[key], atol=1e-5, rtol=1e-5, msg=key)


@NEEDS_BNB
def test_saved_loftq_adapter_reloads_onto_the_same_base_and_keeps_peft_keys(saved, tmp_path, peft_loftq):
    model = loftq_model(saved, "nf4", 4, iters=2)
    randomize_adapters(model)
    expected = output(model, batch())
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "adapter_config.json").read_text())
    assert written["init_lora_weights"] == "loftq" and written["loftq_config"] == {"loftq_bits": 4, "loftq_iter": 2}
    loaded = dt.DeltaModel.from_pretrained(load_streamed(saved, "causal-lm", "nf4"), tmp_path)
    assert torch.equal(output(loaded, batch()), expected)  # the base re-ran the same alternation: the same Q
    assert peft_loftq.LoraConfig.from_pretrained(tmp_path).loftq_config == {"loftq_bits": 4, "loftq_iter": 2}


def test_peft_written_loftq_config_loads_with_its_keys(tmp_path, peft_loftq):
    peft = peft_loftq
    config = peft.LoraConfig(r=4, init_lora_weights="loftq", loftq_config=peft.LoftQConfig(loftq_bits=8, loftq_iter=2))
    config.save_pretrained(tmp_path)
    ours = DeltaConfig.load(tmp_path)
    assert ours.init_lora_weights == "loftq" and ours.loftq_config == {"loftq_bits": 8, "loftq_iter": 2}
    assert dt.LoraConfig(init_lora_weights="loftq").loftq_config == {"loftq_bits": 4, "loftq_iter": 1}


def test_clear_errors(saved):
    with pytest.raises(ConfigError, match="set loftq_bits=8"):
        loftq_model(saved, "int8", 4)
    with pytest.raises(ConfigError, match="loftq_bits=3"):
        dt.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 3})
    with pytest.raises(ConfigError, match="does not know where"):
        dt.wrap(
            quantize_base(tiny_llama(), "int8"),
            dt.LoraConfig(init_lora_weights="loftq", loftq_config={"loftq_bits": 8}),
        )
