"""Saving and loading adapters: round trips, strict key checks, atomic writes, no pickles."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ATTENTION_TARGETS, TINY_MODELS, batch, output, randomize_adapters, tiny_llama
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.methods.base import DeltaLayer


def trained(arch: str, **kw) -> dt.DeltaModel:
    model = dt.wrap(TINY_MODELS[arch](), dt.LoraConfig(r=4, lora_alpha=8, target_modules=ATTENTION_TARGETS[arch], **kw))
    randomize_adapters(model)
    return model


def test_round_trip_reproduces_logits(arch, tmp_path):
    model = trained(arch)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    loaded = dt.DeltaModel.from_pretrained(TINY_MODELS[arch](), tmp_path)
    torch.testing.assert_close(output(loaded, batch()), output(model, batch()), atol=1e-6, rtol=0)
    assert loaded.trainable_parameters()[0] == 0  # loaded for inference unless is_trainable
    assert dt.DeltaModel.from_pretrained(TINY_MODELS[arch](), tmp_path, is_trainable=True).trainable_parameters()[0] > 0


def test_file_uses_peft_keys_and_config(tmp_path):
    trained("llama").save_pretrained(tmp_path)
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert all(".default." not in k for k in keys)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["task_type"] == "CAUSAL_LM"


def test_several_adapters_save_in_subdirectories_and_load_by_name(tmp_path):
    model = trained("llama")
    model.add_adapter("other", dt.LoraConfig(r=2, target_modules=["o_proj"]))
    model.set_adapter("other")
    randomize_adapters(model, seed=5)
    out_other = output(model, batch())
    model.save_pretrained(tmp_path)
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()
    loaded = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    loaded.set_adapter("other")
    torch.testing.assert_close(output(loaded, batch()), out_other, atol=1e-6, rtol=0)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    trained("llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors.pop(dropped)
    tensors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = tiny_llama()
    with pytest.raises(dt.ConfigError) as err:
        dt.DeltaModel.from_pretrained(base, tmp_path)
    assert "lora_B.weight" in str(err.value) and "layers.1.self_attn.v_proj" in str(err.value)
    assert "mlp.up_proj.lora_A.weight" in str(err.value)
    assert not any(isinstance(m, DeltaLayer) for m in base.modules())  # the failed load left no trace


def test_shape_mismatch_names_the_tensor(tmp_path):
    trained("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["r"] = 2
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        dt.ConfigError, match=r"shape mismatch for lora_A.weight: checkpoint \(4, 32\), model \(2, 32\)"
    ):
        dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)


def test_unknown_config_keys_from_newer_peft_warn(tmp_path):
    model = trained("llama")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update({"some_future_option": 3, "peft_version": "9.9.9", "another_off_switch": None})
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    messages = [str(w.message) for w in caught if "ignoring" in str(w.message)]
    assert len(messages) == 1 and "some_future_option" in messages[0] and "another_off_switch" not in messages[0]
    torch.testing.assert_close(output(loaded, batch()), output(model, batch()), atol=1e-6, rtol=0)


def test_never_unpickles(tmp_path):
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    trained("llama").peft_config["default"].save(tmp_path)
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)


def test_unknown_method_in_config(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA", "r": 4}))
    with pytest.raises(dt.ConfigError, match="'VERA' is not supported"):
        dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)


def test_writes_are_atomic(tmp_path, monkeypatch):
    """A writer that dies midway must leave the old file whole and no temporary file behind.

    The fake writer really writes half a file to the path it is given before failing, so a
    save that wrote to the final path directly would be caught here.
    """
    model = trained("llama")
    model.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    randomize_adapters(model, seed=9)

    def dies_midway(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise OSError("disk full")

    monkeypatch.setattr("deltatune.checkpoint.adapter.save_file", dies_midway)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before  # old file intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    fresh = tmp_path / "fresh"
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(fresh)
    assert not (fresh / "adapter_model.safetensors").exists()  # no half-written file under the real name
    assert list(fresh.iterdir()) == []  # and no temporary file left


@pytest.mark.parametrize(
    "poison, message",
    [
        (lambda t: t.index_fill(0, torch.tensor([1]), float("nan")), "holds 4 NaN or infinite value.s. of 64"),
        (lambda t: t.index_fill(0, torch.tensor([0, 2]), float("inf")), "NaN or infinite"),
        (lambda t: t.round().to(torch.int64), "dtype torch.int64"),
    ],
    ids=["nan", "inf", "integer"],
)
def test_nan_inf_or_integer_tensors_are_refused_naming_the_tensor(tmp_path, poison, message):
    trained("llama").save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    tensors[key] = poison(tensors[key])
    save_file(tensors, file)
    with pytest.raises(dt.ConfigError, match=message) as err:
        dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    assert key in str(err.value)
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2))
    with pytest.raises(dt.ConfigError, match=message):
        model.load_adapter(tmp_path, "second")
    assert list(model.peft_config) == ["default"]  # nothing half-loaded


def test_saved_files_get_the_permissions_of_any_new_file(tmp_path):
    """Atomic writes go through mkstemp (0600); the saved adapter must still be readable as the umask allows."""
    import os

    umask = os.umask(0o022)
    try:
        model = dt.wrap(tiny_llama(), dt.LoraConfig(r=2, target_modules=["q_proj"]))
        model.save_pretrained(tmp_path / "out")
        reference = tmp_path / "plain"
        reference.write_text("x")
    finally:
        os.umask(umask)
    expected = reference.stat().st_mode & 0o777
    for file in (tmp_path / "out").iterdir():
        assert file.stat().st_mode & 0o777 == expected, file.name
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
