"""Checkpoints in both directions with the real Hugging Face peft package: the same logits."""

import pytest
import torch
from conftest import ATTENTION_TARGETS, TINY_MODELS, batch, output, randomize_adapters

import deltatune as dt

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
