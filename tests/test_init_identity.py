"""What each method's freshly initialised adapter does to the base model's output (README, "Methods").

* exact identity (max |Δlogits| ≤ 1e-6; 0 measured): LoRA (B = 0), BitFit (zero bias deltas, zero
  added biases), partial fine-tuning (copies of the blocks), LLaMA-Adapter (zero gate), HyperFormer
  (zero up and norm heads);
* near identity: Houlsby adapters (down and up weights ~ N(0, init_std²), zero biases). A site adds
  z = up(gelu(down(h))) with |gelu(x)| ≤ |x|, so |z| ≤ ‖U‖₂‖D‖₂|h| ≈ init_std²(√m + √d)²|h|:
  second order in init_std (≈2e-4 of |h| at the defaults), measured max |Δlogits| 9e-6 on tiny Llama.
  Exactly zero is not an option: with U = D = 0 neither gets a gradient;
* not the identity: prompt tuning, P-tuning and prefix tuning. Their virtual tokens (prefix) are
  attended from step 0, even a zero prefix (zero keys still take softmax weight). What holds:
  ``disable_adapter`` gives the base model exactly, and on a rotary-position model (Llama) masking
  the virtual tokens out of the attention mask gives the base logits back (only relative positions
  count, so the shift by n positions does not); with absolute positions (GPT-2, BERT) it does not.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_MODELS, batch, output, randomize_adapters

import deltatune as dt
from deltatune.methods.adapter import BottleneckAdapter

N = 4  # virtual tokens
EXACT = [
    ("lora", "llama", lambda: dt.LoraConfig(r=4, target_modules="all-linear")),
    ("lora", "bert", lambda: dt.LoraConfig(r=4, target_modules="all-linear")),
    ("bitfit", "llama", lambda: dt.BitFitConfig(add_missing=True)),  # Llama has no biases: zeros are added
    ("bitfit", "bert", lambda: dt.BitFitConfig()),
    ("partial", "llama", lambda: dt.PartialConfig(train_top_layers=1)),
    ("partial", "bert", lambda: dt.PartialConfig(train_top_layers=1)),
    ("llama_adapter", "llama", lambda: dt.LlamaAdapterConfig(adapter_len=N)),
    ("hyperformer", "llama", lambda: dt.HyperAdapterConfig(tasks=["t"])),
    ("hyperformer", "bert", lambda: dt.HyperAdapterConfig(tasks=["t"])),
]
VIRTUAL = [
    ("prompt_tuning", "llama", lambda: dt.PromptTuningConfig(num_virtual_tokens=N)),
    ("prompt_tuning", "gpt2", lambda: dt.PromptTuningConfig(num_virtual_tokens=N)),
    ("prompt_tuning", "bert", lambda: dt.PromptTuningConfig(num_virtual_tokens=N)),
    ("p_tuning", "llama", lambda: dt.PTuningConfig(num_virtual_tokens=N)),
    ("p_tuning", "bert", lambda: dt.PTuningConfig(num_virtual_tokens=N, encoder="lstm")),
    ("prefix_tuning", "llama", lambda: dt.PrefixTuningConfig(num_virtual_tokens=N)),
    ("prefix_tuning", "gpt2", lambda: dt.PrefixTuningConfig(num_virtual_tokens=N)),
    ("prefix_tuning-zero", "llama", lambda: dt.PrefixTuningConfig(num_virtual_tokens=N, init_weights="zero")),
]


def ids(cases):
    return [f"{method}-{arch}" for method, arch, _ in cases]


def delta(model: torch.nn.Module, arch: str) -> float:
    """max |logits - base logits| on the text positions (virtual tokens' own positions dropped)."""
    base = output(TINY_MODELS[arch](), batch())
    out = output(model, batch())
    return (out[:, out.shape[1] - base.shape[1] :] - base).abs().max().item()


@pytest.mark.parametrize(("method", "arch", "config"), EXACT, ids=ids(EXACT))
def test_exact_identity_at_init(method, arch, config):
    model = dt.wrap(TINY_MODELS[arch](), config())
    assert delta(model, arch) <= 1e-6
    randomize_adapters(model)  # the adapter is live: trained values do change the output
    assert delta(model, arch) > 1e-4


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_houlsby_adapters_start_near_identity(arch):
    sigma = dt.AdapterConfig().init_std
    model = dt.wrap(TINY_MODELS[arch](), dt.AdapterConfig())
    sites = [m for m in model.modules() if isinstance(m, BottleneckAdapter)]
    m, d = sites[0].adapter_down["default"].weight.shape
    bound = sigma**2 * (math.sqrt(m) + math.sqrt(d)) ** 2  # ‖U‖₂‖D‖₂ ≲ σ²(√m+√d)² for Gaussian matrices
    changes = []

    def record(site, inputs, out):
        h = site.base_layer(*inputs)
        changes.append(((out - h).norm(dim=-1) / h.norm(dim=-1)).max().item())
        norms = [torch.linalg.matrix_norm(x["default"].weight, ord=2) for x in (site.adapter_up, site.adapter_down)]
        assert changes[-1] <= (norms[0] * norms[1]).item() * (1 + 1e-4)  # |z| ≤ ‖U‖₂‖D‖₂|h|: |gelu(x)| ≤ |x|

    for site in sites:
        site.register_forward_hook(record)
    near = delta(model, arch)
    assert len(changes) == len(sites) and 0 < max(changes) <= bound
    # Not exact, but second order in init_std; relative logit change within the per-site bound.
    base_scale = output(TINY_MODELS[arch](), batch()).abs().max().item()
    assert 0 < near <= bound * base_scale
    ten_times = delta(dt.wrap(TINY_MODELS[arch](), dt.AdapterConfig(init_std=10 * sigma)), arch)
    if near > 1e-7:  # above float32 rounding of these logits (BERT's are ~1e-2 and change by ~1e-8)
        assert 50 < ten_times / near < 200  # quadratic: 100x for 10x init_std


@pytest.mark.parametrize(("method", "arch", "config"), VIRTUAL, ids=ids(VIRTUAL))
def test_virtual_tokens_are_attended_from_the_start(method, arch, config):
    model = dt.wrap(TINY_MODELS[arch](), config())
    assert delta(model, arch) > 1e-3  # not the identity: the text attends to the virtual tokens / prefix
    with model.disable_adapter():
        assert delta(model, arch) == 0
    with torch.no_grad():  # the same inputs with the virtual tokens (prefix) masked out of attention
        kwargs = model.prepare_inputs(batch())
        kwargs["attention_mask"][:, :N] = 0
        masked = model.base_model(**kwargs).logits
    base = output(TINY_MODELS[arch](), batch())
    masked_delta = (masked[:, masked.shape[1] - base.shape[1] :] - base).abs().max().item()
    if arch == "llama":  # rotary positions: shifting every position by n changes nothing
        assert masked_delta <= 1e-6
    else:  # absolute positions: the text sits n positions later (BERT also pools a virtual token)
        assert masked_delta > 1e-3
