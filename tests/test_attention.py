"""Efficient attention patterns (deltatune.attention): each pattern's blocked computation equals dense
SDPA under the pattern's own ``allowed`` mask; degenerate settings equal full attention on real
(tiny) transformers models; KV-cache generation, backward, saving and errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import batch, tiny_bert, tiny_llama

import deltatune as dt
from deltatune.attention import blockwise, linformer, lsh, pattern_of, s2, set_attention, sliding_window
from deltatune.attention.blocks import repeat_kv
from deltatune.attention.registry import Call
from deltatune.config import ConfigError

TOL = 1e-5


def _qkv(n: int, heads: int = 4, kv_heads: int = 2, seed: int = 0, grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, n, 8, generator=g) for h in (heads, kv_heads, kv_heads))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _dense(q, k, v, allowed):
    h = q.shape[1]
    return F.scaled_dot_product_attention(q, repeat_kv(k, h), repeat_kv(v, h), attn_mask=allowed)


def _train_module() -> torch.nn.Module:
    return torch.nn.Module().train()


CASES = [
    (sliding_window, sliding_window.SlidingWindowOptions(window=5)),
    (sliding_window, sliding_window.SlidingWindowOptions(window=4, dilation=[1, 3])),
    (sliding_window, sliding_window.SlidingWindowOptions(window=3, dilation=[2, 1, 1, 4], global_tokens=2)),
    (blockwise, blockwise.BlockwiseOptions(block_size=8, block_shifts=[0, 1])),
    (blockwise, blockwise.BlockwiseOptions(block_size=5, block_shifts=[2, 1, 0, 3])),
    (s2, s2.S2Options(group_size=6)),
    (s2, s2.S2Options()),
]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("module", "options"), CASES)
def test_blocked_equals_dense_under_allowed(module, options, causal):
    n = 37  # not a multiple of any block: the padding of the last block is exercised
    q, k, v = _qkv(n)
    out = module.forward(Call(_train_module(), q, k, v, None, causal, None, 0.0, options))
    allowed = torch.stack([module.allowed(n, options, causal, h, 4) for h in range(4)])
    assert allowed.any(-1).all()
    assert (out - _dense(q, k, v, allowed)).abs().max() <= TOL


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("module", "options"), [CASES[2], CASES[4], CASES[5]])
def test_flex_path_equals_dense_under_allowed(module, options, causal, monkeypatch):
    """The CUDA path (FlexAttention, a BlockMask from the pattern's rule) run here through its eager
    reference: the same outputs as dense SDPA under the pattern's mask, padding included."""
    from deltatune.attention import blocks

    def through_flex(q, k, v, q_idx, k_idx, rule, causal, scale, mask=None, dropout=0.0):
        return blocks.flex_sdpa(q, k, v, rule, causal, scale, mask, compiled=False)

    monkeypatch.setattr(module, "block_sdpa", through_flex)
    n = 37
    q, k, v = _qkv(n)
    mask = torch.ones(2, 1, 1, n, dtype=torch.bool)
    mask[1, ..., :5] = False  # row 1 is left-padded by 5
    with torch.no_grad():
        out = module.forward(Call(_train_module(), q, k, v, mask, causal, None, 0.0, options))
    allowed = torch.stack([module.allowed(n, options, causal, h, 4) for h in range(4)]) & mask
    if module is blockwise and not causal:  # encoder blocks are counted over the row's own tokens
        allowed[1] = False
        allowed[1, :, 5:, 5:] = torch.stack([module.allowed(n - 5, options, causal, h, 4) for h in range(4)])
    ref = _dense(q, k, v, allowed | ~allowed.any(-1, keepdim=True))
    defined = allowed.any(-1)  # a query whose keys are all padding has no defined output on either side
    assert defined[1].sum() > 0.8 * defined[0].sum()
    assert (out[defined] - ref[defined]).abs().max() <= TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("pattern", "options"), [("sliding_window", {"window": 8}), ("blockwise", {"block_size": 8})])
def test_cuda_flex_training_equals_cpu(pattern, options):
    """On CUDA the patterns run through compiled FlexAttention: loss and LoRA gradients as on CPU."""
    results = []
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        set_attention(model, pattern, **options)
        model.to(device).train()
        inputs = {k: v.to(device) for k, v in batch(length=40).items()}
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        grads = [p.grad.cpu() for p in model.parameters() if p.requires_grad]
        results.append((loss.item(), grads))
    assert abs(results[0][0] - results[1][0]) <= 1e-4
    for cpu, cuda in zip(results[0][1], results[1][1], strict=True):
        assert (cpu - cuda).abs().max() <= 1e-3


@pytest.mark.parametrize("causal", [True, False])
def test_blocked_with_padding_mask_and_backward(causal):
    n, options = 29, sliding_window.SlidingWindowOptions(window=4, dilation=[1, 2])
    q, k, v = _qkv(n, grad=True)
    mask = torch.ones(2, 1, n, n, dtype=torch.bool)
    mask[1, :, :, :5] = False  # row 1 is left-padded by 5
    if causal:
        mask &= torch.ones(n, n, dtype=torch.bool).tril()
    out = sliding_window.forward(Call(_train_module(), q, k, v, mask, causal, None, 0.0, options))
    allowed = torch.stack([sliding_window.allowed(n, options, causal, h, 4) for h in range(4)]) & mask
    ref = _dense(q, k, v, allowed | ~allowed.any(-1, keepdim=True))
    real = slice(5, None)  # the padded positions' outputs are not defined by either side
    assert (out[1, :, real] - ref[1, :, real]).abs().max() <= TOL
    assert (out[0] - ref[0]).abs().max() <= TOL
    grads = torch.autograd.grad(out[:, :, real].sum(), (q, k, v))
    ref_grads = torch.autograd.grad(ref[:, :, real].sum(), (q, k, v))
    for ours, theirs in zip(grads, ref_grads, strict=True):
        assert ours.isfinite().all() and (ours - theirs).abs().max() <= 1e-4


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("bucket_size", [4, 7])
def test_lsh_equals_dense_under_its_chunks(causal, bucket_size):
    n, options = 30, lsh.LshOptions(bucket_size=bucket_size, hash_seed=1)
    q, k, v = _qkv(n)
    out = lsh.forward(Call(_train_module(), q, k, v, None, causal, None, 0.0, options))
    allowed = lsh.allowed(q, k, options, causal)
    assert not allowed.all()  # sparse: several buckets
    assert (out - _dense(q, k, v, allowed)).abs().max() <= TOL
    keys = torch.ones(2, 1, 1, n, dtype=torch.bool)
    keys[1, ..., 20:] = False  # row 1 is right-padded
    out = lsh.forward(Call(_train_module(), q, k, v, keys, causal, None, 0.0, options))
    masked = allowed & keys
    ref = _dense(q, k, v, masked | ~masked.any(-1, keepdim=True))
    assert (out[:, :, :20] - ref[:, :, :20]).abs().max() <= TOL


def test_lsh_rounds_combine_and_train():
    q, k, v = _qkv(24, grad=True)
    out = lsh.forward(Call(_train_module(), q, k, v, None, True, None, 0.0, lsh.LshOptions(bucket_size=4, n_hashes=3)))
    out.sum().backward()
    assert all(t.grad is not None and t.grad.isfinite().all() for t in (q, k, v))
    one = lsh.forward(Call(_train_module(), q, k, v, None, True, None, 0.0, lsh.LshOptions(bucket_size=4)))
    assert (out - one).abs().max() > 1e-4  # more rounds see more keys


def _logits(model, inputs):
    """A causal model's logits; an encoder's last hidden states (a tiny random classifier's logits hardly
    move, so they would hide a wrong attention)."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    return out.logits if out.logits.ndim == 3 else out.hidden_states[-1]


@pytest.mark.parametrize(
    ("pattern", "options"),
    [
        ("sliding_window", {"window": 80}),  # encoders: window // 2 on each side
        ("sliding_window", {"window": 79, "dilation": [1, 1]}),
        ("blockwise", {"block_size": 64}),
        ("lsh", {"bucket_size": 64, "n_hashes": 1}),
        ("s2", {}),  # eval mode: full attention
    ],
)
@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_degenerate_patterns_equal_full_attention(pattern, options, arch):
    model = tiny_llama() if arch == "llama" else tiny_bert()
    inputs = batch(length=40)
    reference = _logits(model, inputs)
    assert set_attention(model, pattern, **options) is model and pattern_of(model) == pattern
    assert (_logits(model, inputs) - reference).abs().max() <= TOL
    set_attention(model, "sdpa")
    assert model.config._attn_implementation == "sdpa"


def test_linformer_identity_equals_full_attention_with_padding():
    model, inputs = tiny_bert(), batch(length=128)
    inputs["attention_mask"][1, 100:] = 0
    reference = _logits(model, inputs)
    set_attention(model, "linformer", k=128)  # initial projections at k = n: the identity
    assert (_logits(model, inputs) - reference).abs().max() <= TOL
    set_attention(model, "linformer", k=16)
    assert (_logits(model, inputs) - reference).abs().max() > 0


def test_causal_window_equals_explicit_banded_mask():
    """transformers' convention: query i sees itself and the w - 1 keys before it."""
    model, inputs, w = tiny_llama(), batch(length=24), 5
    n = inputs["input_ids"].shape[1]
    band = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        band[i, max(0, i - w + 1) : i + 1] = True
    explicit = _logits(model, {"input_ids": inputs["input_ids"], "attention_mask": band.expand(2, 1, n, n)})
    set_attention(model, "sliding_window", window=w)
    assert (_logits(model, inputs) - explicit).abs().max() <= TOL
    set_attention(model, "sdpa")
    assert (_logits(model, inputs) - explicit).abs().max() > 1e-3  # the band matters


@pytest.mark.parametrize(("pattern", "options"), [("sliding_window", {"window": 4}), ("blockwise", {"block_size": 6})])
def test_kv_cache_generation_equals_no_cache(pattern, options):
    model = set_attention(tiny_llama(), pattern, **options)
    prompt = batch(rows=1, length=7)
    kwargs = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(**prompt, use_cache=True, **kwargs)
    uncached = model.generate(**prompt, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached) and cached.shape[1] == 19


def test_s2_sparse_in_training_full_in_eval():
    model, inputs = tiny_llama(), batch(length=32)
    reference = _logits(model, inputs)
    set_attention(model, "s2", group_size=8)
    assert (_logits(model, inputs) - reference).abs().max() <= TOL
    model.train()
    out = model(**inputs, labels=inputs["input_ids"])
    assert (out.logits.detach() - reference).abs().max() > 1e-4
    out.loss.backward()
    assert all(p.grad.isfinite().all() for p in model.parameters() if p.grad is not None)


def test_lora_training_step_with_a_pattern():
    model = dt.wrap(
        set_attention(tiny_llama(), "sliding_window", window=4), dt.LoraConfig(r=4, target_modules=["q_proj"])
    )
    inputs = batch(length=20)
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.isfinite().all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_linformer_projections_save_and_load_with_the_adapter(tmp_path):
    inputs = batch(length=32)
    base = set_attention(tiny_bert(), "linformer", k=8)
    cfg = dt.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier", "linformer"])
    model = dt.wrap(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "linformer" in name:
                p.add_(0.05 * torch.randn_like(p))
    trained = _logits(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = dt.DeltaModel.from_pretrained(set_attention(tiny_bert(), "linformer", k=8), tmp_path)
    assert (_logits(loaded, inputs) - trained).abs().max() <= TOL
    fresh = set_attention(tiny_bert(), "linformer", k=8)
    assert (_logits(fresh, inputs) - trained).abs().max() > 1e-6  # the saved projections matter


def test_perceiver_runs_on_latents_and_trains():
    model, inputs = tiny_bert(), batch(length=30)
    set_attention(model, "perceiver", num_latents=6, from_layer=1)
    out = model(**inputs, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [30, 30, 6]
    out.logits.sum().backward()
    latents = model.bert.encoder.layer[1].perceiver_latents.queries
    assert latents.grad is not None and latents.grad.abs().sum() > 0
    set_attention(model, "sdpa")
    assert model(**inputs, output_hidden_states=True).hidden_states[-1].shape[1] == 30
    assert not any("perceiver" in n for n, _ in model.named_modules())


def test_two_models_keep_their_own_options():
    a, b, inputs = tiny_llama(), tiny_llama(), batch(length=30)
    set_attention(a, "sliding_window", window=3)
    set_attention(b, "sliding_window", window=30)
    assert a.config._attn_implementation != b.config._attn_implementation
    assert (_logits(b, inputs) - _logits(tiny_llama(), inputs)).abs().max() <= TOL


@pytest.mark.parametrize(
    ("model", "pattern", "options", "message"),
    [
        (tiny_llama, "linformer", {}, "encoders only: Linformer projects"),
        (tiny_llama, "perceiver", {}, "encoders only"),
        (tiny_llama, "nope", {}, "unknown attention pattern 'nope'"),
        (tiny_llama, "sliding_window", {"windw": 3}, "has no option windw"),
        (tiny_llama, "sliding_window", {"window": 0}, "--window must be a positive"),
        (tiny_llama, "sliding_window", {"dilation": [1, 2, 3]}, "do not split 4 attention heads"),
        (tiny_bert, "perceiver", {"from_layer": 5}, "--from-layer 5 but the model has 2 layers"),
        (tiny_llama, "sdpa", {"window": 3}, "takes no options"),
    ],
)
def test_bad_settings_are_clear_errors(model, pattern, options, message):
    with pytest.raises(ConfigError, match=message):
        set_attention(model(), pattern, **options)


def test_linformer_projection_is_pooling():
    assert torch.equal(linformer.pooling(5, 5), torch.eye(5))
    assert torch.allclose(linformer.pooling(2, 6).sum(1), torch.ones(2))


def test_train_flags_become_attention_options():
    from deltatune.cli import train_config
    from deltatune.training.config import TrainConfig

    cfg, _ = train_config(["--attention", "sliding_window", "--window", "512", "--dilation", "1", "2"])
    assert cfg.attention == "sliding_window" and cfg.attention_options == {"window": 512, "dilation": [1, 2]}
    assert train_config([])[0].attention == "sdpa"
    with pytest.raises(ConfigError, match="has no option window"):
        TrainConfig(attention="lsh", attention_options={"window": 3})
    with pytest.raises(SystemExit):  # a pattern's option without the pattern is an unknown flag
        train_config(["--window", "5"])


def test_pattern_modules_join_modules_to_save():
    from deltatune.attention import with_pattern_modules

    cfg = dt.LoraConfig(r=4, target_modules=["query"])
    assert with_pattern_modules(cfg, tiny_bert(), "linformer").modules_to_save == ["classifier", "linformer"]
    assert with_pattern_modules(cfg, tiny_bert(), "sliding_window") is cfg
    assert cfg.modules_to_save is None


@pytest.mark.parametrize(
    ("pattern", "options", "arch"),
    [
        ("sliding_window", {"window": 4, "dilation": [1, 2]}, "llama"),
        ("sliding_window", {"window": 4, "dilation": [1, 2]}, "bert"),
        ("blockwise", {"block_size": 5, "block_shifts": [0, 1]}, "llama"),
        ("blockwise", {"block_size": 5, "block_shifts": [0, 0]}, "bert"),
        ("blockwise", {"block_size": 5, "block_shifts": [0, 1]}, "bert"),  # the permutation over the row's blocks
    ],
)
def test_padded_rows_equal_their_unpadded_selves(pattern, options, arch):
    """Right padding: every row's real positions come out as when the row runs alone; the padding
    reaches the pattern as an O(n) key mask, not a dense n x n one. (Not LSH: its buckets depend on
    every key, padding included.)"""
    model = set_attention(tiny_llama() if arch == "llama" else tiny_bert(), pattern, **options)
    inputs = batch(length=21)
    inputs["attention_mask"][1, 13:] = 0
    padded = _logits(model, inputs)
    alone = _logits(model, {k: v[1:, :13] for k, v in inputs.items()})
    assert (padded[1, :13] - alone[0]).abs().max() <= TOL
    seen = {}
    hook = model.get_submodule("model.layers.0" if arch == "llama" else "bert.encoder.layer.0")
    handle = hook.register_forward_pre_hook(
        lambda m, a, k: seen.update(mask=a[1] if len(a) > 1 else k.get("attention_mask")), with_kwargs=True
    )
    _logits(model, inputs)
    handle.remove()
    assert seen["mask"].shape == (2, 1, 1, 21)


def test_cli_trains_and_evaluates_with_linformer(tiny_bert_dir, tmp_path, capsys):
    from safetensors.torch import load_file

    from deltatune.cli import main

    data = tmp_path / "sst.tsv"
    rows = [f"{'great fun' if i % 2 else 'dull mess'} number {i}\t{i % 2}" for i in range(16)]
    data.write_text("sentence\tlabel\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    args = ["--data", data, "--max-steps", 3, "--output-dir", out, "--batch-size", 4, "--threads", 1]
    assert main([str(a) for a in ["train", "--base", tiny_bert_dir, *args, "--attention", "linformer", "--k", 16]]) == 0
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert sum("linformer" in key for key in saved) == 4  # E and F of both layers
    capsys.readouterr()
    evaluate = ["eval", "--base", tiny_bert_dir, "--adapter", out / "adapter", "--data", data]
    assert main([str(a) for a in [*evaluate, "--attention", "linformer", "--k", 16]]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1
    assert main([str(a) for a in evaluate]) != 0  # the adapter's projections need the pattern
    assert "linformer.E" in capsys.readouterr().err


def test_cli_generate_with_a_window_longer_than_the_text(tiny_llama_dir, capsys):
    from deltatune.cli import main

    base = ["generate", "--base", str(tiny_llama_dir), "--prompt", "Hello there", "--max-new-tokens", "6"]
    assert main(base) == 0
    full = capsys.readouterr().out
    assert main([*base, "--attention", "sliding_window", "--window", "64"]) == 0
    assert capsys.readouterr().out == full
