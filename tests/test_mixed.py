"""Mixed-adapter batches: every row of a batch equals that row run alone with its adapter."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, tiny_gpt2, tiny_llama

import deltatune as dt
from deltatune import routing
from deltatune.loss import IGNORE_INDEX
from deltatune.model import BASE_ADAPTER

ATOL = 1e-5


def randomize(model: dt.DeltaModel, adapter: str, seed: int) -> None:
    """Give an adapter's zero-initialised tensors values, so that it changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f".{adapter}." in f".{name}." or name.endswith(f".{adapter}"):
                param.copy_(torch.randn(param.shape, generator=g) * 0.2)


def many_adapters(base=None) -> dt.DeltaModel:
    """A tiny Llama with LoRA adapters of different ranks and targets, a Houlsby adapter, prompt
    tuning, P-tuning and prefix tuning (LoRA on an embedding: the GPT-2 case below)."""
    model = dt.wrap(base or tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "sql")
    model.add_adapter("chat", dt.LoraConfig(r=8, lora_alpha=16, target_modules=["k_proj", "gate_proj"]))
    model.add_adapter("houlsby", dt.AdapterConfig(bottleneck_size=8))
    model.add_adapter("soft", dt.PromptTuningConfig(num_virtual_tokens=3))
    model.add_adapter("ptune", dt.PTuningConfig(num_virtual_tokens=2))
    model.add_adapter("prefix", dt.PrefixTuningConfig(num_virtual_tokens=5))
    for seed, name in enumerate(model.peft_config):
        randomize(model, name, seed)
    return model.eval()


def alone(model: dt.DeltaModel, name: str, method: str, **kwargs):
    if name == BASE_ADAPTER:
        with model.disable_adapter():
            return getattr(model, method)(**kwargs)
    model.set_adapter(name)
    return getattr(model, method)(**kwargs)


def left_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - len(row) :], mask[i, longest - len(row) :] = row, 1
    return ids, mask


def texts(count: int, seed: int = 0, lengths: list[int] | None = None) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [7] * count
    return [torch.randint(3, VOCAB, (lengths[i % len(lengths)],), generator=g) for i in range(count)]


@torch.no_grad()
def test_forward_rows_equal_each_row_alone():
    model = many_adapters()
    names = [*model.peft_config, BASE_ADAPTER, "sql", "prefix"]
    rows = texts(len(names), lengths=[4, 9, 6, 7])
    ids, mask = left_padded(rows)
    mixed = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    for i, (name, row) in enumerate(zip(names, rows, strict=True)):
        reference = alone(model, name, "forward", input_ids=row[None]).logits[0, -len(row) :]
        torch.testing.assert_close(mixed[i, -len(row) :], reference, atol=ATOL, rtol=0, msg=f"row {i} ({name})")


@torch.no_grad()
def test_a_routing_built_by_the_caller_runs_as_its_names():
    """forward/generate also take a RowAdapters the caller built for rows it checked (the server passes its
    adapter slots' routing): the same rows as the names; rows that all run the base run as the plain model."""
    model = many_adapters()
    names = ["sql", BASE_ADAPTER, "chat", "soft"]
    ids, mask = left_padded(texts(len(names), lengths=[5, 7]))
    expected = model(input_ids=ids, attention_mask=mask, adapter_names=names).logits
    got = model(input_ids=ids, attention_mask=mask, adapter_names=routing.RowAdapters(names)).logits
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    settings = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 3, "do_sample": False, "pad_token_id": 0}
    torch.testing.assert_close(
        model.generate(**settings, adapter_names=routing.RowAdapters(names)),
        model.generate(**settings, adapter_names=names),
    )
    with model.disable_adapter():
        plain = model(input_ids=ids, attention_mask=mask).logits
    bases = model(input_ids=ids, attention_mask=mask, adapter_names=[BASE_ADAPTER] * len(names)).logits
    torch.testing.assert_close(bases, plain, atol=0, rtol=0)
    assert routing.current() is None


@torch.no_grad()
def test_lora_only_batch_keeps_the_models_positions_and_labels():
    """Without prompt-learning rows the inputs pass through as they are (a loss comes back too)."""
    model = many_adapters()
    names = ["sql", "chat", BASE_ADAPTER, "chat", "houlsby"]
    ids = torch.stack(texts(len(names), seed=3))
    out = model(input_ids=ids, labels=ids, adapter_names=names)
    for i, name in enumerate(names):
        reference = alone(model, name, "forward", input_ids=ids[i : i + 1]).logits[0]
        torch.testing.assert_close(out.logits[i], reference, atol=ATOL, rtol=0)
    assert torch.isfinite(out.loss)


@torch.no_grad()
def test_labels_of_virtual_token_rows_are_padded():
    model = many_adapters()
    ids = torch.stack(texts(2, seed=4))
    out = model(input_ids=ids, labels=ids, adapter_names=["soft", "sql"])
    assert out.logits.shape[1] == ids.shape[1] + 3  # the longest virtual prompt, left of every row
    model.set_adapter("soft")
    soft_alone = model(input_ids=ids[:1], labels=ids[:1]).logits[0]
    torch.testing.assert_close(out.logits[0], soft_alone, atol=ATOL, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_greedy_generation_with_cache_matches_each_row_alone(factory):
    if factory is tiny_gpt2:
        model = dt.wrap(factory(), dt.LoraConfig(r=4, target_modules=["c_attn"]), "a")
        model.add_adapter("b", dt.LoraConfig(r=2, target_modules=["c_fc", "wte"]))
        for seed, name in enumerate(model.peft_config):
            randomize(model, name, seed)
        model.eval()
    else:
        model = many_adapters()
    names = [*model.peft_config, BASE_ADAPTER, next(iter(model.peft_config))]
    rows = texts(len(names), seed=5, lengths=[3, 8, 5])
    ids, mask = left_padded(rows)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    mixed = model.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **settings)
    for i, (name, row) in enumerate(zip(names, rows, strict=True)):
        solo = alone(model, name, "generate", input_ids=row[None], attention_mask=torch.ones(1, len(row)), **settings)
        assert mixed.sequences[i, -6:].tolist() == solo.sequences[0, -6:].tolist(), f"row {i} ({name})"
        for step, (mixed_scores, solo_scores) in enumerate(zip(mixed.scores, solo.scores, strict=True)):
            torch.testing.assert_close(mixed_scores[i], solo_scores[0], atol=1e-4, rtol=0, msg=f"{name} step {step}")


@torch.no_grad()
def test_bitfit_rows_mix():
    model = dt.wrap(tiny_gpt2(), dt.BitFitConfig(), "one")
    model.add_adapter("two", dt.BitFitConfig(bias="attention"))
    for seed, name in enumerate(model.peft_config):
        randomize(model, name, seed)
    names = ["two", BASE_ADAPTER, "one", "two"]
    ids = torch.stack(texts(len(names), seed=6))
    mixed = model(input_ids=ids, adapter_names=names).logits
    for i, name in enumerate(names):
        torch.testing.assert_close(mixed[i], alone(model, name, "forward", input_ids=ids[i : i + 1]).logits[0])


def test_unknown_adapter_name_is_an_error_naming_the_adapters():
    model = many_adapters()
    ids = torch.stack(texts(2))
    with pytest.raises(KeyError, match=r"typo.*this model has: sql, chat"):
        model(input_ids=ids, adapter_names=["sql", "typo"])
    with pytest.raises(KeyError, match="typo"):
        model.generate(input_ids=ids, adapter_names=["typo", "sql"], max_new_tokens=2)
    with pytest.raises(ValueError, match="3 entries for a batch of 2 rows"):
        model(input_ids=ids, adapter_names=["sql", "chat", "sql"])
    with pytest.raises(TypeError, match="one adapter name per row"):
        model(input_ids=ids, adapter_names="sql")
    assert routing.current() is None  # no call scope left behind


def test_mixing_refuses_merged_and_unmixable_adapters():
    model = many_adapters()
    ids = torch.stack(texts(2))
    model.merge_adapter("sql")
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model(input_ids=ids, adapter_names=["sql", "chat"])
    model.unmerge_adapter()
    model.add_adapter("llama_adapter", dt.LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    with pytest.raises(ValueError, match=r"llama_adapter \(ADAPTION_PROMPT\) cannot share a batch"):
        model(input_ids=ids, adapter_names=["llama_adapter", "sql"])


def test_mixed_batch_trains_each_rows_adapter():
    """Gradients reach each row's own adapter through the gathered factors, and only those."""
    model = many_adapters()
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if ".sql." in name or ".chat." in name or ".houlsby." in name:
            p.requires_grad_(True)
    ids = torch.stack(texts(3, seed=9))
    labels = ids.clone()
    labels[:, :2] = IGNORE_INDEX
    model(input_ids=ids, labels=labels, adapter_names=["sql", "chat", BASE_ADAPTER]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".houlsby." not in n)
    assert all(g is None or g.abs().sum() == 0 for n, g in grads.items() if ".houlsby." in n)


def test_lora_rows_agree_with_peft_adapter_names(tmp_path):
    """The same adapters loaded into peft, whose adapter_names path runs each adapter's rows
    separately: a reference computed another way (LoRA on an embedding and mixed ranks included)."""
    peft = pytest.importorskip("peft")
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"]), "one")
    model.add_adapter("two", dt.LoraConfig(r=2, lora_alpha=5, target_modules=["k_proj", "down_proj"]))
    for seed, name in enumerate(model.peft_config):
        randomize(model, name, seed)
    model.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "one"), adapter_name="one")
    theirs.load_adapter(str(tmp_path / "two"), adapter_name="two")
    names = ["two", BASE_ADAPTER, "one", "two"]
    ids = torch.stack(texts(len(names), seed=8))
    with torch.no_grad():
        expected = theirs(input_ids=ids, adapter_names=names).logits
        got = model.eval()(input_ids=ids, adapter_names=names).logits
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.real_model
@pytest.mark.slow
@torch.no_grad()
def test_smollm2_mixed_generation_matches_each_adapter_alone(smol_tokenizer):
    base, _ = dt.load_base("smollm2-135m")
    model = dt.wrap(base.eval(), dt.LoraConfig(r=8, init_lora_weights=False), "poet")
    model.add_adapter("coder", dt.LoraConfig(r=4, init_lora_weights=False, target_modules=["o_proj", "up_proj"]))
    for seed, name in enumerate(model.peft_config):
        randomize(model, name, seed)
        for param_name, param in model.named_parameters():
            if f".{name}." in param_name:
                param.mul_(0.05)  # a nudge, so the text stays text
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    names = ["poet", "coder", BASE_ADAPTER]
    smol_tokenizer.padding_side = "left"
    inputs = smol_tokenizer(prompts, return_tensors="pt", padding=True)
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=smol_tokenizer.pad_token_id)
    mixed = model.generate(**inputs, adapter_names=names, **settings)[:, -8:]
    for i, (name, prompt) in enumerate(zip(names, prompts, strict=True)):
        solo = alone(model, name, "generate", **smol_tokenizer(prompt, return_tensors="pt"), **settings)[:, -8:]
        assert mixed[i].tolist() == solo[0].tolist(), f"{name}: {smol_tokenizer.decode(mixed[i])!r}"
    assert len({tuple(row.tolist()) for row in mixed}) == 3
