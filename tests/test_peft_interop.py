"""Checkpoints in both directions with the real Hugging Face peft package: the same logits."""

import pytest
import torch
from conftest import ATTENTION_TARGETS, TINY_MODELS, batch, output, randomize_adapters, tiny_bert
from safetensors.torch import load_file, save_file

import deltatune as dt
from deltatune.methods.base import ModulesToSave

peft = pytest.importorskip("peft", reason="peft is a test dependency: pip install -e '.[test]'")
TARGETS = {**ATTENTION_TARGETS, "llama-embed": ["q_proj", "v_proj", "embed_tokens"]}


def ours_to_peft(base_factory, fresh_factory, targets, tmp_path, **kw):
    model = dt.wrap(base_factory(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **kw))
    randomize_adapters(model)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(fresh_factory(), tmp_path)
    return output(model, batch()), output(theirs, batch())


def peft_to_ours(base_factory, fresh_factory, targets, tmp_path, task_type=None, **kw):
    theirs = peft.get_peft_model(
        base_factory(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task_type, **kw)
    )
    randomize_adapters(theirs)
    theirs.save_pretrained(tmp_path)
    ours = dt.DeltaModel.from_pretrained(fresh_factory(), tmp_path)
    return output(theirs, batch()), output(ours, batch())


@pytest.mark.parametrize("direction", [ours_to_peft, peft_to_ours])
def test_tiny_models_agree(arch, direction, tmp_path):
    factory = TINY_MODELS[arch]
    kw = {"task_type": "SEQ_CLS"} if arch == "bert" and direction is peft_to_ours else {}
    expected, got = direction(factory, factory, ATTENTION_TARGETS[arch], tmp_path, **kw)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("direction", [ours_to_peft, peft_to_ours])
def test_embedding_and_rslora_agree(direction, tmp_path):
    factory = TINY_MODELS["llama"]
    expected, got = direction(
        factory, factory, TARGETS["llama-embed"], tmp_path, use_rslora=True, rank_pattern={"v_proj": 2}
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.real_model
@pytest.mark.parametrize("direction", [ours_to_peft, peft_to_ours])
def test_smollm2_agrees(direction, tmp_path):
    def smollm2():
        return dt.load_base("smollm2-135m")[0].eval()

    expected, got = direction(smollm2, smollm2, ["q_proj", "v_proj"], tmp_path)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_classifier_without_task_type_keeps_the_base_head(tmp_path):
    """peft without task_type (plain PeftModel) saves no head: the base model's own head is used."""
    theirs = peft.get_peft_model(tiny_bert(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    assert type(theirs) is peft.PeftModel and theirs.peft_config["default"].task_type is None
    randomize_adapters(theirs, std=1.0)  # B != 0: the adapter really changes the logits
    theirs.save_pretrained(tmp_path)
    assert not any("classifier" in k for k in load_file(tmp_path / "adapter_model.safetensors"))
    expected = output(theirs, batch())
    assert (output(tiny_bert(), batch()) - expected).abs().max() > 1e-3

    ours = dt.DeltaModel.from_pretrained(tiny_bert(), tmp_path)
    torch.testing.assert_close(output(ours, batch()), expected, atol=1e-5, rtol=0)
    ours.save_pretrained(tmp_path / "again")  # and back: peft and deltatune read our copy the same way
    again = peft.PeftModel.from_pretrained(tiny_bert(), tmp_path / "again")
    torch.testing.assert_close(output(again, batch()), expected, atol=1e-5, rtol=0)
    again = dt.DeltaModel.from_pretrained(tiny_bert(), tmp_path / "again")
    torch.testing.assert_close(output(again, batch()), expected, atol=1e-5, rtol=0)

    ours = dt.wrap(tiny_bert(), dt.LoraConfig(r=2, target_modules=["query"]), "other")
    ours.load_adapter(tmp_path, "default")  # the same through load_adapter
    ours.set_adapter("default")
    torch.testing.assert_close(output(ours, batch()), expected, atol=1e-5, rtol=0)
    head = ours.base_model.classifier  # "other" (wrapped here, task inferred) trains a head; "default" not
    assert isinstance(head, ModulesToSave) and head.adapter_names == ["other"]


def test_a_listed_head_without_tensors_is_still_an_error(tmp_path):
    """modules_to_save (here peft's SEQ_CLS head) with its tensors gone is a clear error."""
    peft_to_ours(tiny_bert, tiny_bert, ATTENTION_TARGETS["bert"], tmp_path, task_type="SEQ_CLS")
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if ".classifier." not in k}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(dt.ConfigError, match=r"no tensors for classifier.*modules_to_save"):
        dt.DeltaModel.from_pretrained(tiny_bert(), tmp_path)
