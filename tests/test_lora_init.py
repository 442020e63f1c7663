"""LoRA initialisations (gaussian, PiSSA, PiSSA with randomized SVD, OLoRA) against peft's on the
same seed, identity at init, and the conversion to a plain LoRA on the original base."""

import pytest
import torch
from conftest import batch, output, randomize_adapters, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.config import ConfigError

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")

TARGETS = ["q_proj", "v_proj", "down_proj"]
INITS = ["gaussian", "pissa", "pissa_niter_4", "olora"]


def both(init, seed=7, factory=tiny_llama, targets=TARGETS, **kw):
    """(ours, peft's), each built after the same manual_seed, so random draws line up."""
    models = []
    for build, config in ((dt.wrap, dt.LoraConfig), (peft.get_peft_model, peft.LoraConfig)):
        base = factory()
        torch.manual_seed(seed)
        models.append(build(base, config(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=init, **kw)))
    return models


@pytest.mark.parametrize("init", INITS)
def test_init_equals_peft(init):
    ours, theirs = both(init)
    mine = {k.removeprefix("base_model.").replace(".default", ""): v for k, v in ours.state_dict().items()}
    their = {k.removeprefix("base_model.model.").replace(".default", ""): v for k, v in theirs.state_dict().items()}
    assert mine.keys() == their.keys()
    for key, value in mine.items():  # the factors and the residual base weights
        torch.testing.assert_close(value, their[key], atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("init", INITS)
def test_starts_as_the_base_model(init):
    ours, _ = both(init)
    torch.testing.assert_close(output(ours, batch()), output(tiny_llama(), batch()), atol=1e-4, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_moved_into_base(init):
    ours, _ = both(init)
    layer = ours.base_model.model.layers[0].self_attn.q_proj
    assert (layer.base_layer.weight - tiny_llama().model.layers[0].self_attn.q_proj.weight).abs().max() > 1e-3
    torch.testing.assert_close(
        layer.base_layer.weight + layer.delta_weight("default"),
        tiny_llama().model.layers[0].self_attn.q_proj.weight,
        atol=1e-5,
        rtol=0,
    )


def test_pissa_on_conv1d_and_dora():
    ours, theirs = both("pissa_niter_2", factory=tiny_gpt2, targets=["c_attn"], use_dora=True)
    torch.testing.assert_close(output(ours, batch()), output(tiny_gpt2(), batch()), atol=1e-4, rtol=0)
    torch.testing.assert_close(output(ours, batch()), output(theirs, batch()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("rslora", [False, True])
def test_conversion_to_plain_lora_on_the_original_base(init, rslora, tmp_path):
    model = dt.wrap(
        tiny_llama(),
        dt.LoraConfig(
            r=4,
            target_modules=[*TARGETS, "embed_tokens"],
            init_lora_weights=init,
            use_rslora=rslora,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"v_proj": 4},
        ),
    )
    model.save_pretrained(tmp_path / "init")
    randomize_adapters(model, std=0.05)  # stands for training
    expected = output(model, batch())
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    config = dt.DeltaConfig.load(tmp_path / "lora")
    assert config.init_lora_weights is True and config.r == 8 and config.rank_pattern == {"v_proj": 4}
    plain = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    torch.testing.assert_close(output(plain, batch()), expected, atol=1e-5, rtol=1e-5)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "lora")
    torch.testing.assert_close(output(theirs, batch()), expected, atol=1e-5, rtol=1e-5)


def test_conversion_refuses_a_plain_init_and_bad_names(tmp_path):
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ConfigError, match="converts PiSSA/OLoRA"):
        model.save_pretrained(tmp_path, path_initial_model_for_weight_conversion=tmp_path)
    with pytest.raises(ConfigError, match="pissa_niter_K"):
        dt.LoraConfig(init_lora_weights="pissa_niter_x")
    with pytest.raises(ConfigError, match="init_lora_weights must be one of"):
        dt.LoraConfig(init_lora_weights="pisa")


def test_init_flag_takes_a_name_or_a_boolean():
    import argparse

    from deltatune.flags import add_dataclass_flags

    parser = argparse.ArgumentParser()
    add_dataclass_flags(parser, dt.LoraConfig)
    assert parser.parse_args(["--init-lora-weights", "pissa_niter_4"]).init_lora_weights == "pissa_niter_4"
    assert parser.parse_args(["--init-lora-weights", "False"]).init_lora_weights is False
    assert parser.parse_args(["--use-dora"]).use_dora is True
