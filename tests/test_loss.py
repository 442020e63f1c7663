"""The training losses against the plain transformers loss, values and gradients."""

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune.cli import main
from deltatune.loss import FusedLinearCrossEntropy, LossModule


def test_fused_linear_cross_entropy_matches_unfused():
    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (37,))
    fused = FusedLinearCrossEntropy.apply(hidden, weight, targets, 8)
    fused.backward()
    grad_fused = hidden.grad.clone()
    hidden.grad = None
    plain = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    plain.backward()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(grad_fused, hidden.grad)


@pytest.mark.parametrize(("rows", "chunk"), [(37, 8), (8, 8), (5, 256)])
def test_fused_loss_equals_full_logits_cross_entropy_with_a_scaled_gradient(rows, chunk):
    """Several chunks and a ragged last one, exactly one, or fewer rows than a chunk; the backward scales by the
    incoming gradient (the trainer multiplies the summed loss by world / count before backward)."""
    torch.manual_seed(1)
    hidden = torch.randn(rows, 24, requires_grad=True)
    weight = torch.randn(300, 24) / 4
    targets = torch.randint(0, 300, (rows,))
    (FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk) * 0.37).backward()
    fused_grad, hidden.grad = hidden.grad, None
    logits = hidden @ weight.T  # the full (rows x vocabulary) logits, once
    (F.cross_entropy(logits, targets, reduction="sum") * 0.37).backward()
    torch.testing.assert_close(fused_grad, hidden.grad, atol=1e-6, rtol=1e-5)
    plain = F.cross_entropy(logits, targets, reduction="sum")
    torch.testing.assert_close(FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk), plain)


def test_deltatune_train_uses_the_fused_loss_by_default(tiny_llama_dir, tmp_path, monkeypatch):
    """`deltatune train` with no loss option: every step's loss is the fused head + cross-entropy, and no
    gradient-taking cross-entropy over full logits runs (evaluation's no-grad loss may)."""
    fused, plain = [], []
    fused_apply, cross_entropy = FusedLinearCrossEntropy.apply, F.cross_entropy
    monkeypatch.setattr(FusedLinearCrossEntropy, "apply", lambda *a: fused.append(1) or fused_apply(*a))
    monkeypatch.setattr(
        F, "cross_entropy", lambda *a, **k: plain.append(torch.is_grad_enabled()) or cross_entropy(*a, **k)
    )
    data = tmp_path / "train.jsonl"
    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": f"{i} {i}"} for i in range(12)]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    args = ["train", "--base", tiny_llama_dir, "--data", data, "--max-steps", 3, "--output-dir", tmp_path / "run"]
    assert main([str(a) for a in (*args, "--batch-size", 4, "--threads", 1, "--no-eval-generate")]) == 0
    assert len(fused) >= 3
    assert not any(plain), "a training step computed the cross-entropy of full logits"


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_loss_module_equals_transformers_loss_and_gradients(factory, monkeypatch):
    calls = []
    fused_apply = FusedLinearCrossEntropy.apply
    monkeypatch.setattr(FusedLinearCrossEntropy, "apply", lambda *a: calls.append(1) or fused_apply(*a))

    def make():
        model = dt.wrap(factory(), dt.LoraConfig(r=4, target_modules="all-linear"))
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_()
        return model

    ids = torch.randint(3, 128, (3, 10))
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    ours, reference = make(), make()
    loss_sum, count = LossModule(ours, "causal-lm")({"input_ids": ids, "labels": labels})
    (loss_sum / count).backward()
    reference(input_ids=ids, labels=labels).loss.backward()
    torch.testing.assert_close(loss_sum / count, reference(input_ids=ids, labels=labels).loss)
    assert calls, "the fused head + loss was not used"
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2])
def test_loss_module_on_a_peft_model_equals_its_own_loss(factory, monkeypatch):
    """A peft PeftModel (LoRA layers injected into the transformers model) trains through the fused path."""
    peft = pytest.importorskip("peft")
    calls = []
    fused_apply = FusedLinearCrossEntropy.apply
    monkeypatch.setattr(FusedLinearCrossEntropy, "apply", lambda *a: calls.append(1) or fused_apply(*a))

    def make():
        model = peft.get_peft_model(factory(), peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_()
        return model

    ids = torch.randint(3, 128, (3, 10))
    labels = ids.clone()
    labels[0, :4] = -100
    ours, reference = make(), make()
    loss_sum, count = LossModule(ours, "causal-lm")({"input_ids": ids, "labels": labels})
    (loss_sum / count).backward()
    expected = reference(input_ids=ids, labels=labels)
    expected.loss.backward()
    torch.testing.assert_close(loss_sum / count, expected.loss, atol=1e-5, rtol=0)
    assert calls, "the fused head + loss was not used"
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    assert grads and all(p.grad is not None for p in ours.parameters() if p.requires_grad)
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4)


def test_loss_module_refuses_peft_prompt_learning_clearly():
    """peft's prompt tuning adds its virtual tokens in the wrapper's forward, which the loss cannot bypass."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_llama(), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    ids = torch.randint(3, 128, (2, 6))
    with pytest.raises(TypeError, match="prompt learning"):
        LossModule(model, "causal-lm")({"input_ids": ids, "labels": ids})
