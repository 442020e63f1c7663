"""A quantized frozen base (int8, NF4): exact about what it computes, and LoRA on it is ordinary LoRA."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from conftest import batch, tiny_llama
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.cli import main
from deltatune.config import ConfigError
from deltatune.quantization import QuantizedLinear, base_storage, int8, quantize_base
from deltatune.quantization.int8 import Int8Linear
from deltatune.training.config import FLAG_GROUPS

HAS_BNB = __import__("importlib").util.find_spec("bitsandbytes") is not None
NEEDS_BNB = pytest.mark.skipif(
    not HAS_BNB, reason="needs the bitsandbytes package: pip install 'deltatune[quant]'"
)  # reported as a skip, never dropped from collection
KINDS = ["int8", pytest.param("nf4", marks=NEEDS_BNB)]
TARGETS = ["q_proj", "v_proj"]
# QLoRA's NormalFloat-4 levels (Dettmers et al. 2023, appendix E), written from the paper, not read from bitsandbytes
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])  # fmt: skip


def quantized_layer(kind: str, seed: int = 0) -> tuple[nn.Linear, QuantizedLinear]:
    """Products in float32: these tests check a format's arithmetic (bfloat16 products: test_quantized_matmul)."""
    torch.manual_seed(seed)
    linear = nn.Linear(64, 48)
    return linear, quantize_base(nn.Sequential(linear), kind, matmul_dtype="float32")[0]


def int8_reference(weight: torch.Tensor) -> torch.Tensor:
    """int8 per-row symmetric rounding written out: step = max|row| / 127, each weight to the nearest step."""
    step = weight.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(weight / step) * step


def nf4_reference_errors(weight: torch.Tensor, dequantized: torch.Tensor, block: int = 64) -> dict[str, float]:
    """How far ``dequantized`` is from NF4 of ``weight`` as the paper defines it: blocks of 64 scaled by their
    absmax, each weight at one of the 16 levels, and that level the nearest one to the scaled weight."""
    w, d = weight.reshape(-1, block), dequantized.reshape(-1, block)
    absmax = w.abs().amax(dim=1, keepdim=True)
    levels = NF4_LEVELS * absmax[..., None]  # (blocks, 1, 16)
    off_grid = (d[..., None] - levels).abs().amin(dim=-1) / absmax  # 0 when every value is an NF4 level
    nearest = levels.squeeze(1).gather(1, (w[..., None] - levels).abs().argmin(dim=-1))
    return {"off_grid": off_grid.max().item(), "not_nearest": ((d - nearest).abs() / absmax).max().item()}


def test_int8_codes_are_per_row_rounding_to_half_a_step():
    linear, layer = quantized_layer("int8")
    w = linear.weight.detach()
    step = w.abs().amax(dim=1) / 127
    torch.testing.assert_close(layer.weight_scale, step, rtol=1e-6, atol=0)
    torch.testing.assert_close(layer.dequantize(), int8_reference(w), rtol=0, atol=1e-7)
    assert torch.all((layer.dequantize() - w).abs() <= step[:, None] / 2 * (1 + 1e-5))  # half a step, per row


@NEEDS_BNB
def test_nf4_weights_are_the_papers_levels_nearest_to_each_weight():
    linear, layer = quantized_layer("nf4")
    errors = nf4_reference_errors(linear.weight.detach(), layer.dequantize())
    assert errors["off_grid"] < 1e-6 and errors["not_nearest"] < 1e-6, errors


@NEEDS_BNB
def test_the_nf4_check_rejects_another_4bit_format():
    """bitsandbytes' FP4 (another 4-bit code book, same blocks) must fail the NF4 checks above."""
    functional = __import__("bitsandbytes").functional
    linear, _ = quantized_layer("int8")
    w = linear.weight.detach().contiguous()
    codes, state = functional.quantize_4bit(w, blocksize=64, quant_type="fp4")
    errors = nf4_reference_errors(w, functional.dequantize_4bit(codes, state))
    assert errors["off_grid"] > 0.01 and errors["not_nearest"] > 0.01, errors


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_linear_equals_dequantize_then_matmul(kind):
    linear, layer = quantized_layer(kind)
    x = torch.randn(3, 5, 64)
    reference = x @ layer.dequantize().T + linear.bias  # weight-only: activations stay float
    torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=1e-5)


def test_chunked_dequantization_equals_one_whole_matmul_both_ways(monkeypatch):
    """Large layers dequantize a block of rows at a time: the blocks must add up to the whole product."""
    import deltatune.quantization.base as base

    _, layer = quantized_layer("int8")
    x = torch.randn(3, 64, requires_grad=True)
    grad_out = torch.randn(3, 48)
    w = layer.dequantize()
    monkeypatch.setattr(base, "CHUNK_WEIGHTS", 64 * 5)  # 5 rows a block: 10 blocks, the last one short
    layer(x).backward(grad_out)
    torch.testing.assert_close(layer(x), x @ w.T + layer.bias, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, grad_out @ w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("size", [1.0, 1e-7])  # real gradients are tiny: an int8 kernel once zeroed them
def test_input_gradient_goes_through_the_quantized_weight(kind, size):
    _, layer = quantized_layer(kind)
    x = torch.randn(4, 64, requires_grad=True)
    grad_out = torch.randn(4, 48) * size
    layer(x).backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out @ layer.dequantize(), atol=1e-5 * size, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_a_quantized_layer_holds_its_weight_in_one_form(kind):
    """No float copy, no packed copy, no transposed copy beside the codes, before or after a backward."""
    _, layer = quantized_layer(kind)
    x = torch.randn(4, 64, requires_grad=True)
    layer(x).sum().backward()
    tensors = [*layer.parameters(), *layer.buffers()]
    tensors += [v for v in vars(layer).values() if isinstance(v, torch.Tensor)]
    weight_sized = [t for t in tensors if t.numel() * t.element_size() >= 64 * 48 / 2]  # 4-bit codes at least
    assert len(weight_sized) == 1 and not weight_sized[0].is_floating_point(), [t.shape for t in weight_sized]
    assert not [k for k, v in vars(layer).items() if isinstance(v, dict) and v and k.startswith("_cache")]


def count_compiled_calls(monkeypatch) -> list[int]:
    """Record the rows of each product the compiled few-rows kernel ran."""
    calls: list[int] = []
    compiled = int8._compiled_rows_times_codes
    monkeypatch.setattr(int8, "_compiled_rows_times_codes", lambda x, *a: calls.append(x.shape[0]) or compiled(x, *a))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64), (2, 3, 64), (int8.FEW_ROWS, 64)])
def test_few_rows_without_gradient_run_the_compiled_codes_product(shape, dtype, monkeypatch):
    """Decoding's products (a few rows, no gradient) read the int8 codes directly: x·(s·Q)ᵀ + b, as the
    dequantized weight gives it, with no float weight made."""
    calls = count_compiled_calls(monkeypatch)
    _, layer = quantized_layer("int8")
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        out = layer(x)
    expected = (x.float() @ int8_reference(layer.dequantize()).T + layer.bias).to(dtype)
    tolerance = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}
    torch.testing.assert_close(out, expected, **tolerance)
    assert out.dtype == dtype and calls == [x.numel() // 64]


def test_many_rows_or_a_gradient_take_the_chunked_product(monkeypatch):
    calls = count_compiled_calls(monkeypatch)
    _, layer = quantized_layer("int8")
    with torch.no_grad():
        layer(torch.randn(int8.FEW_ROWS + 1, 64))
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 48) @ layer.dequantize(), atol=1e-5, rtol=1e-5)
    assert calls == []


def test_the_few_rows_kernel_falls_back_once_where_inductor_cannot_compile(monkeypatch, caplog):
    def fail(*_):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(int8, "_compiled_rows_times_codes", fail)
    monkeypatch.setattr(int8, "_compiled_works", True)
    _, layer = quantized_layer("int8")
    x = torch.randn(2, 64)
    with torch.no_grad(), caplog.at_level("WARNING"):
        outs = [layer(x), layer(x)]
    for out in outs:
        torch.testing.assert_close(out, x @ layer.dequantize().T + layer.bias, atol=1e-5, rtol=1e-5)
    assert int8._compiled_works is False
    assert [r.message for r in caplog.records if "int8 decoding kernel" in r.message] == [
        "int8 decoding kernel unavailable (RuntimeError: no C++ compiler); using dequantize-then-matmul"
    ]


def test_greedy_decoding_on_an_int8_base_equals_the_dequantized_float_model():
    """generate() runs prefill (many rows: chunked) then one row a step (compiled): the same greedy tokens as the
    float model made of the dequantized weights."""
    torch.manual_seed(0)
    quantized = quantize_base(tiny_llama(), "int8").eval()
    dequantized = copy.deepcopy(quantized)
    for name, module in list(dequantized.named_modules()):
        if isinstance(module, Int8Linear):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            linear.weight.data, linear.bias = module.dequantize(), module.bias
            dequantized.set_submodule(name, linear)
    ids = torch.randint(3, 100, (1, 7))
    kwargs = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False}
    with torch.no_grad():
        assert torch.equal(quantized.generate(ids, **kwargs), dequantized.generate(ids, **kwargs))


@pytest.mark.parametrize("kind", KINDS)
def test_lora_on_a_quantized_llama_starts_as_the_quantized_base_and_trains_only_a_and_b(kind):
    base = quantize_base(tiny_llama(), kind)
    inputs = batch()
    with torch.no_grad():
        expected = base(**inputs).logits
    model = dt.wrap(base, dt.LoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)
    model.train()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    lora = {n for n, p in model.named_parameters() if ".lora_" in n}
    assert with_grad == lora and len(lora) == 2 * 2 * len(TARGETS)  # A and B of q,v in both layers
    assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in lora if "lora_B" in n)
    trainable, total = model.trainable_parameters()
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable  # weights, not packed codes


@pytest.mark.parametrize("kind", KINDS)
def test_lora_training_steps_on_a_quantized_base_follow_float_training(kind):
    losses = {}
    for name in ("float", kind):
        base = tiny_llama() if name == "float" else quantize_base(tiny_llama(), kind)
        model = dt.wrap(base, dt.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights="gaussian"))
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        inputs = batch(rows=4, length=16)
        losses[name] = []
        for _ in range(4):
            loss = model(**inputs, labels=inputs["input_ids"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[name].append(loss.item())
    drops = {name: values[0] - values[-1] for name, values in losses.items()}
    assert drops["float"] > 0.01 and drops[kind] == pytest.approx(drops["float"], rel=0.1)


def trained_adapter(kind: str, path, base=None) -> tuple[dt.DeltaModel, torch.Tensor]:
    base = base if base is not None else tiny_llama()
    model = dt.wrap(quantize_base(base, kind), dt.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    model.save_pretrained(path)
    with torch.no_grad():
        return model, model(**batch()).logits


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_trained_on_quantized_base_loads_on_float_quantized_and_peft(kind, tmp_path):
    peft = pytest.importorskip("peft")
    trained, logits = trained_adapter(kind, tmp_path)
    inputs = batch()
    requantized = dt.DeltaModel.from_pretrained(quantize_base(tiny_llama(), kind), tmp_path)
    float_ours = dt.DeltaModel.from_pretrained(tiny_llama(), tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        assert torch.equal(requantized(**inputs).logits, logits)
        on_float = float_ours(**inputs).logits
        torch.testing.assert_close(theirs(**inputs).logits, on_float, atol=1e-5, rtol=0)
    # the float-base model is the same adapter: its factors are the trained ones, and its output
    # differs from the quantized model's only by the base's quantization
    for name, p in trained.named_parameters():
        if ".lora_" in name:
            assert torch.equal(float_ours.get_parameter(name), p)
    assert 0 < (on_float - logits).abs().max() < 0.1


@pytest.mark.parametrize("kind", KINDS)
def test_merge_on_quantized_base_in_memory_requantizes_and_unmerge_is_not_exact(kind, tmp_path):
    model, logits = trained_adapter(kind, tmp_path)
    layer = model.base_model.model.layers[0].self_attn.q_proj
    before = layer.base_layer.dequantize()
    expected = before + layer.delta_weight("default")
    model.merge_adapter()
    merged = layer.base_layer
    assert isinstance(merged, QuantizedLinear)
    fresh = quantize_base(nn.Sequential(nn.Linear(32, 32, bias=False)), kind)[0]
    fresh.requantize_(expected)  # merge = quantize(dequantize(W) + ΔW), computed another way
    assert torch.equal(merged.dequantize(), fresh.dequantize())
    with torch.no_grad():  # the rounding of W0 + ΔW (ΔW as large as W0 here): 4 bits round 16x coarser than 8
        assert (model(**batch()).logits - logits).abs().max() < (0.1 if kind == "int8" else 0.4)
    model.unmerge_adapter()
    assert (layer.base_layer.dequantize() - before).abs().max() < (0.02 if kind == "int8" else 0.2)


@pytest.mark.parametrize("kind", KINDS)
def test_cli_merge_on_quantized_base_reports_its_error_and_writes_the_float_model(
    kind, tiny_llama_dir, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM

    from deltatune.merging import output_error, probe_batch

    # float32 products, as merge_quantized uses: its report measures merging, not bfloat16 rounding
    base, tokenizer = dt.load_base(str(tiny_llama_dir), quantize=kind, matmul_dtype="float32")
    model = dt.wrap(base, dt.LoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # ΔW about as large as W0 (std 0.02)
    model.save_pretrained(tmp_path / "adapter")
    assert main(["merge", "--base", str(tiny_llama_dir), "--adapter", str(tmp_path / "adapter"),
                 "--output", str(tmp_path / "merged"), "--quantize", kind]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    reported = [
        float(line.split("max |Δlogits| ")[1].split(",")[0]) for line in printed.splitlines() if "Δlogits" in line
    ]
    assert len(reported) == 2 and "written model" in printed and f"requantized to {kind}" in printed
    written = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    probe = probe_batch(tokenizer)
    with torch.no_grad():
        trained = model.eval()(**probe).logits
        expected = output_error(trained, written(**probe).logits, probe["attention_mask"])
        model.merge_adapter()  # in memory, on the quantized base: requantized
        requantized = output_error(trained, model(**probe).logits, probe["attention_mask"])
    scale = trained.abs().max().item()
    assert reported[0] == pytest.approx(expected["max_abs_logits"], rel=1e-3, abs=1e-6)
    assert reported[1] == pytest.approx(requantized["max_abs_logits"], rel=1e-3, abs=1e-6)
    # both bases multiply in float (weight-only): the written float model is the trained one, to rounding
    assert reported[0] < 1e-4 * scale
    bound = 0.1 if kind == "int8" else 0.3  # ΔW as large as W0, requantized: 4 bits round 16x coarser than 8
    assert 0 < reported[1] < bound * scale, (printed, scale)  # requantizing rounds, and says so


def test_missing_bitsandbytes_names_the_package_and_the_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"'bitsandbytes'.*pip install"):
        quantize_base(tiny_llama(), "nf4")
    with pytest.raises(ConfigError, match="int8, nf4"):
        quantize_base(tiny_llama(), "int4")


def test_partial_fine_tuning_is_refused_and_bitfit_trains_on_a_quantized_base():
    with pytest.raises(ConfigError, match=r"partial fine-tuning trains the base weights.*quantized"):
        dt.wrap(quantize_base(tiny_llama(), "int8"), dt.PartialConfig(train_top_layers=1))
    model = dt.wrap(quantize_base(tiny_llama(), "int8"), dt.BitFitConfig(bias="all", add_missing=True))
    model.train()
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all("bias_delta" in n for n in grads)


def test_base_storage_counts_bytes_per_weight():
    float_model = tiny_llama()
    linear = sum(
        m.weight.numel() for n, m in float_model.named_modules() if type(m) is nn.Linear and "lm_head" not in n
    )
    rows = sum(m.out_features for n, m in float_model.named_modules() if type(m) is nn.Linear and "lm_head" not in n)
    other = sum(p.numel() for p in float_model.parameters()) - linear
    size, weights = base_storage(quantize_base(tiny_llama(), "int8"))
    assert (size, weights) == (linear + 4 * rows + 4 * other, linear + other)
    assert base_storage(float_model) == (4 * (linear + other), linear + other)


def test_train_cli_quantize_int8_smoke(tiny_llama_dir, tmp_path):
    from test_train import FAST, alpaca_file

    assert "quantize" in FLAG_GROUPS["training"]
    out = tmp_path / "run"
    args = ["train", "--base", tiny_llama_dir, "--data", alpaca_file(tmp_path / "t.jsonl"), "--quantize", "int8",
            "--max-steps", 2, "--output-dir", out, "--no-eval-generate", *FAST]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    base, _ = dt.load_base(str(tiny_llama_dir), quantize="int8")
    model = dt.DeltaModel.from_pretrained(base, out / "adapter")
    assert isinstance(model.base_model.model.layers[0].mlp.up_proj, Int8Linear)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # it trained


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_path_matches_cpu(kind):
    _, layer = quantized_layer(kind)
    x = torch.randn(4, 64)
    expected = x @ layer.dequantize().T + layer.bias
    out = layer.cuda()(x.cuda()).float().cpu()
    torch.testing.assert_close(out, expected, atol=0.05, rtol=0.02)


@NEEDS_BNB
def test_nf4_adapter_loads_into_peft_on_a_bitsandbytes_base(tmp_path):
    """The peer a user would pick: transformers' own bitsandbytes 4-bit base with peft on top reads our
    adapter and computes what ours computes (both bases are bitsandbytes NF4 of the same weights)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # Wider than tiny_llama: bitsandbytes' CPU path on AVX-512 machines repacks weights in blocks of 64 inputs.
    wide = lambda: LlamaForCausalLM(LlamaConfig(**{**tiny_llama().config.to_dict(), "hidden_size": 128,  # noqa: E731
                                                   "intermediate_size": 256, "head_dim": 32}))
    torch.manual_seed(0)
    wide().save_pretrained(tmp_path / "base")
    _, logits = trained_adapter("nf4", tmp_path / "adapter", LlamaForCausalLM.from_pretrained(tmp_path / "base"))
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization_config=bnb, device_map="cpu")
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        # bitsandbytes computes in bfloat16 on AVX-512 CPUs (float32 elsewhere): a bfloat16-sized tolerance
        torch.testing.assert_close(theirs(**batch()).logits, logits, atol=1e-2, rtol=0)
        with theirs.disable_adapter():
            assert (theirs(**batch()).logits - logits).abs().max() > 1e-1  # the adapter is what matches


def tied_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_int8_embedding_is_per_row_rounding_and_a_tied_head_shares_its_codes():
    model = tied_llama()
    table = model.get_input_embeddings().weight.detach().clone()
    quantize_base(model, "int8", quantize_embedding=True)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert type(embedding).__name__ == "Int8Embedding" and isinstance(head, Int8Linear)
    assert head.weight_int8 is embedding.weight_int8 and head.weight_scale is embedding.weight_scale
    assert not any(p.is_floating_point() and p.numel() >= table.numel() for p in model.parameters())
    ids = torch.tensor([[0, 5, 299, 5], [17, 3, 2, 1]])
    assert torch.equal(embedding(ids), int8_reference(table)[ids])  # a lookup dequantizes only its rows
    assert torch.equal(head.dequantize(), int8_reference(table))
    assert base_storage(model)[0] < base_storage(tied_llama())[0] / 3


def test_the_loss_fuses_a_quantized_head_with_cross_entropy_and_equals_the_full_logits(monkeypatch):
    """A frozen quantized head runs the fused head + cross-entropy (no tokens x vocabulary logits kept for the
    backward), a block of vocabulary rows dequantized at a time; value and hidden gradient equal the plain loss."""
    from deltatune import loss
    from deltatune.quantization import base

    model = quantize_base(tied_llama(), "int8", quantize_embedding=True, matmul_dtype="float32")
    head = model.get_output_embeddings()
    calls = []
    fused_apply = loss.FusedLinearCrossEntropy.apply
    monkeypatch.setattr(loss.FusedLinearCrossEntropy, "apply", lambda *a: calls.append(1) or fused_apply(*a))
    monkeypatch.setattr(base, "CHUNK_WEIGHTS", 32 * 70)  # several vocabulary blocks
    hidden = torch.randn(40, 32, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    fused = loss._linear_cross_entropy_sum(hidden, head, targets)
    (grad,) = torch.autograd.grad(fused, hidden)
    plain = nn.functional.cross_entropy(hidden @ head.dequantize().T, targets, reduction="sum")
    (expected,) = torch.autograd.grad(plain, hidden)
    assert calls == [1]
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)
