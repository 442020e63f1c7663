"""The small breaks scripts/mutate.py applies, one at a time, each with the test files that should catch it.

A mutation is (area, file, edits, description, tests): ``edits`` are (old snippet, new snippet) pairs
applied to ``file`` together (each old snippet must occur exactly once); ``tests`` the test files run.
"""

from __future__ import annotations

from typing import NamedTuple


class Mutation(NamedTuple):
    area: str
    file: str
    edits: tuple[tuple[str, str], ...]
    description: str
    tests: tuple[str, ...]


LORA = ("tests/test_lora.py",)
ATTENTION = ("tests/test_attention_reference.py", "tests/test_attention.py")
QUANT = ("tests/test_quantized.py",)
EVICTION = ("tests/test_serving_eviction.py", "tests/test_server.py::test_an_adapter_many_requests_ask_for_loads_once")
GENERATION = (
    "tests/test_server.py::test_completion_equals_direct_generation",
    "tests/test_server.py::test_two_adapters_in_flight_share_a_batch_and_match_alone",
)


def m(area: str, file: str, old: str | tuple, new: str | tuple, description: str, tests: tuple[str, ...]) -> Mutation:
    olds, news = (old, new) if isinstance(old, tuple) else ((old,), (new,))
    return Mutation(area, f"deltatune/{file}", tuple(zip(olds, news, strict=True)), description, tests)


MUTATIONS = [
    # --- methods ---------------------------------------------------------------------------------------
    m(
        "methods",
        "methods/lora.py",
        "alpha / math.sqrt(r) if rslora else alpha / r",
        "alpha / r",
        "rsLoRA's alpha/sqrt(r) scaling ignored",
        LORA,
    ),
    m(
        "methods",
        "methods/lora.py",
        "lora = F.linear(F.linear(dropped, lora_a), lora_b * self.scaling[name])",
        "lora = F.linear(F.linear(dropped, lora_a), lora_b)",
        "LoRA forward without its scaling",
        LORA,
    ),
    m(
        "methods",
        "methods/lora.py",
        "return self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]",
        "return self.lora_B[name].weight @ self.lora_A[name].weight",
        "merged delta without its scaling",
        LORA,
    ),
    m(
        "methods",
        "methods/lora.py",
        "dropped = self.lora_dropout[name](x) if dropping else x",
        "dropped = F.dropout(x, self.lora_dropout[name].p, True) if name in self.lora_dropout else x",
        "LoRA dropout also in eval mode",
        LORA,
    ),
    m(
        "methods",
        "methods/dora.py",
        "torch.linalg.norm(weight + scaling * lora_weight, dim=1)",
        "torch.linalg.norm(weight + scaling * lora_weight, dim=0)",
        "DoRA norm over the wrong axis",
        ("tests/test_dora.py",),
    ),
    m(
        "methods",
        "methods/adapter.py",
        "return self.adapter_up[name](self.adapter_act[name](down(h.to(down.weight.dtype))))",
        "return self.adapter_up[name](self.adapter_act[name](down(h.to(down.weight.dtype)))) - h",
        "bottleneck adapter without its residual",
        ("tests/test_adapter.py",),
    ),
    m(
        "methods",
        "methods/adapter.py",
        "self.adapter_up[name](self.adapter_act[name](down(h.to(down.weight.dtype))))",
        "self.adapter_up[name](down(h.to(down.weight.dtype)))",
        "bottleneck adapter without its non-linearity",
        ("tests/test_adapter.py",),
    ),
    m(
        "methods",
        "methods/llama_adapter.py",
        "probs = self.adaption_gate[name] * F.softmax(",
        "probs = F.softmax(",
        "LLaMA-Adapter's zero gate ignored",
        ("tests/test_llama_adapter.py",),
    ),
    m(
        "methods",
        "methods/llama_adapter.py",
        "scores = query @ key.transpose(2, 3).to(query.dtype) / math.sqrt(head_dim)",
        "scores = query @ key.transpose(2, 3).to(query.dtype)",
        "LLaMA-Adapter scores not scaled by sqrt(d)",
        ("tests/test_llama_adapter.py",),
    ),
    m(
        "methods",
        "methods/bitfit.py",
        "torch.Tensor) -> torch.Tensor:\n        return self.bias_delta[name]\n",
        "torch.Tensor) -> torch.Tensor:\n        return None\n",
        "BitFit's bias delta not added",
        ("tests/test_bitfit.py",),
    ),
    m(
        "methods",
        "methods/bitfit.py",
        "base.bias -= self.bias_delta[self.merged_adapter].detach().to(base.bias.dtype)",
        "base.bias += self.bias_delta[self.merged_adapter].detach().to(base.bias.dtype)",
        "BitFit unmerge adds the delta again",
        ("tests/test_bitfit.py",),
    ),
    m(
        "methods",
        "methods/ia3.py",
        "return out if outputs is None else (out * outputs).to(out.dtype)",
        "return out",
        "(IA)³ output scales not applied",
        ("tests/test_ia3.py",),
    ),
    m(
        "methods",
        "methods/lokr.py",
        'torch.kron(self._factor(name, "w1"), self._factor(name, "w2"))',
        'torch.kron(self._factor(name, "w2"), self._factor(name, "w1"))',
        "LoKr's Kronecker factors in the wrong order",
        ("tests/test_lokr.py",),
    ),
    # --- attention -------------------------------------------------------------------------------------
    m(
        "attention",
        "attention/blockwise.py",
        ("    blocks = -(-n // block)\n", "    q_idx = chunk_positions(n, block)\n"),
        ("    shift, blocks = 0, -(-n // block)\n", "    shift, q_idx = 0, chunk_positions(n, block)\n"),
        "blockwise ignores its block shifts (rule and tables)",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/blockwise.py",
        "if not call.causal and mask is not None and mask.shape[1:3] == (1, 1) and not call.decoding:",
        "if False:",
        "blockwise encoders count blocks over the padded length, not the row's own tokens",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/s2.py",
        ("(slice(h // 2, h), True)", "head >= heads // 2), n, n, causal)"),
        ("(slice(h // 2, h), False)", "False), n, n, causal)"),
        "S2 shifts no head (kernel and mask)",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/s2.py",
        ("((slice(0, h // 2), False), (slice(h // 2, h), True))", "head >= heads // 2), n, n, causal)"),
        ("((slice(0, h // 2), True), (slice(h // 2, h), False))", "head < heads // 2), n, n, causal)"),
        "S2 shifts the first half of the heads instead of the second",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/s2.py",
        "return idx.roll(-(group // 2) if shifted else 0)",
        "return idx.roll(-(group // 3) if shifted else 0)",
        "S2 shift by a third of a group (tables only)",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/sliding_window.py",
        "span = (options.window - 1 if causal else options.window // 2) * dilation",
        "span = (options.window - 1) * dilation",
        "encoder window w-1 on each side instead of w/2",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/sliding_window.py",
        "if opts.global_tokens and not call.causal:",
        "if False:",
        "global tokens' queries do not see every key (encoder)",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/sliding_window.py",
        "members = torch.arange(r, n, dilation)",
        "members = torch.arange(r, n, 1)",
        "dilated heads run as plain windows (tables only)",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/lsh.py",
        "    if counts is not None:",
        "    if False:",
        "LSH counts a key met in several rounds several times",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/lsh.py",
        "    if call.causal:\n        ok = ok & (kpos <= qpos)\n    self_ok",
        "    self_ok",
        "LSH ignores causality",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/linformer.py",
        "e, f = fitted(self.E, n), fitted(self.F, n)",
        "e, f = self.E[:, :n], self.F[:, :n]",
        "Linformer cuts E/F to the first n columns",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/perceiver.py",
        "latents = F.scaled_dot_product_attention(queries, hidden, hidden, attn_mask=mask)",
        "latents = queries",
        "Perceiver latents never attend to the tokens",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/perceiver.py",
        "mask = None if keep is None else keep[:, None, :]",
        "mask = None",
        "Perceiver cross-attention reads padding",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/masks.py",
        "return None if bool(padding.all()) else padding[:, None, None, :]",
        "return None",
        "the padding mask never reaches the patterns",
        ATTENTION,
    ),
    m(
        "attention",
        "attention/blocks.py",
        "    if causal:\n        allowed = allowed & (kpos <= qpos)\n    allowed = allowed[None",
        "    allowed = allowed[None",
        "blocked kernel ignores causality",
        ATTENTION,
    ),
    # --- quantization ----------------------------------------------------------------------------------
    m(
        "quantization",
        "quantization/int8.py",
        "codes = w.round_().clamp_(-QMAX, QMAX)",
        "codes = w.trunc_().clamp_(-QMAX, QMAX)",
        "int8 codes truncated instead of rounded",
        QUANT,
    ),
    m(
        "quantization",
        "quantization/int8.py",
        "rows = self.weight_int8[start:end].float() * self.weight_scale[start:end, None]",
        "rows = self.weight_int8[start:end].float() * self.weight_scale.mean()",
        "int8 dequantized with one scale for all rows",
        QUANT,
    ),
    m(
        "quantization",
        "quantization/base.py",
        "dx = part if dx is None else dx.add_(part)",
        "dx = part",
        "the input gradient keeps only the last block of rows",
        QUANT,
    ),
    m(
        "quantization",
        "quantization/int8.py",
        "            self.weight_scale.copy_(scale)\n",
        "            pass\n",
        "int8 keeps its stale row scales after a merge",
        QUANT,
    ),
    m(
        "quantization",
        "quantization/gguf.py",
        "torch.cat([codes & 0x0F, codes >> 4], dim=-1)",
        "torch.cat([codes >> 4, codes & 0x0F], dim=-1)",
        "gguf 4-bit blocks read with their nibbles swapped",
        ("tests/test_quantized_gguf.py::test_blocks_dequantize_bit_exactly_as_ggufs_reference",),
    ),
    m(
        "quantization",
        "quantization/__init__.py",
        "skip = set() if quantize_head else _head_names(model)",
        "skip = set()",
        "the output head is quantized although not asked",
        QUANT,
    ),
    m(
        "quantization",
        "quantization/nf4.py",
        'quant_type="nf4"',
        'quant_type="fp4"',
        "NF4 layers quantize to bitsandbytes' fp4",
        QUANT,
    ),
    m(
        "quantization",
        "quantization/base.py",
        "self.layer.requantize_(self.layer.dequantize() - delta.to(self.layer.compute_dtype))",
        "self.layer.requantize_(self.layer.dequantize() + delta.to(self.layer.compute_dtype))",
        "unmerge on a quantized weight adds the delta again",
        QUANT,
    ),
    # --- serving ---------------------------------------------------------------------------------------
    m(
        "serving",
        "serving/adapters.py",
        "idle = next((n for n in self.recent if n not in busy), None)",
        "idle = next((n for n in reversed(self.recent) if n not in busy), None)",
        "evicts the most recently used adapter",
        EVICTION,
    ),
    m(
        "serving",
        "serving/adapters.py",
        "            self.recent.move_to_end(name)\n            return True\n        if not self._make_room",
        "            return True\n        if not self._make_room",
        "a use does not refresh an adapter's recency",
        EVICTION,
    ),
    m(
        "serving",
        "serving/adapters.py",
        "idle = next((n for n in self.recent if n not in busy), None)",
        "idle = next(iter(self.recent), None)",
        "evicts an adapter that is in use",
        EVICTION,
    ),
    m(
        "serving",
        "serving/slots.py",
        "        for _, a, b in self.tables.values():\n            a[slot].zero_()\n            b[slot].zero_()\n",
        "        for _, a, b in self.tables.values():\n            pass\n",
        "an evicted adapter's slot keeps its factors",
        ("tests/test_serving_slot_reset.py", "tests/test_serving_slots.py"),
    ),
    m(
        "serving",
        "serving/slots.py",
        "self.ids = [0 if n == BASE_ADAPTER else table.slot_of.get(n, -1) for n in names]",
        "self.ids = [0 for n in names]",
        "slot rows all read the base's empty slot",
        ("tests/test_serving_slots.py",),
    ),
    m(
        "serving",
        "serving/engine.py",
        "if len(self.waiting) >= self.max_queue:",
        "if len(self.waiting) > self.max_queue:",
        "the queue holds one request more than max_queue",
        ("tests/test_server.py::test_full_queue_answers_429",),
    ),
    m(
        "serving",
        "serving/rows.py",
        "elif len(ids) >= request.max_tokens:",
        "elif len(ids) > request.max_tokens:",
        "one token more than max_tokens",
        GENERATION,
    ),
    m(
        "serving",
        "serving/rows.py",
        "        if token in self.eos:\n",
        "        if False:\n",
        "end-of-sequence token does not stop a row",
        ("tests/test_serving_eos.py", *GENERATION),
    ),
    m(
        "serving",
        "serving/rows.py",
        "outside = ordered.cumsum(-1) - ordered > request.top_p",
        "outside = ordered.cumsum(-1) > request.top_p",
        "top_p drops the token that reaches p",
        ("tests/test_serving_sampling.py", "tests/test_server.py::test_sampling_rows_follow_their_seed"),
    ),
    m(
        "serving",
        "serving/rows.py",
        'request.text, request.finish_reason = request.text[:cut], "stop"',
        'request.finish_reason = "stop"',
        "a stop string is left in the text",
        ("tests/test_server.py::test_stop_sequence_cuts_the_text",),
    ),
]

# Left out of the default pass for time on a shared 2-core machine (``--all`` runs them too).
EXTRA = {
    "merged delta without its scaling",
    "bottleneck adapter without its non-linearity",
    "LLaMA-Adapter scores not scaled by sqrt(d)",
    "BitFit unmerge adds the delta again",
    "S2 shift by a third of a group (tables only)",
    "global tokens' queries do not see every key (encoder)",
    "dilated heads run as plain windows (tables only)",
    "LSH ignores causality",
    "Perceiver cross-attention reads padding",
    "the padding mask never reaches the patterns",
    "blocked kernel ignores causality",
    "unmerge on a quantized weight adds the delta again",
    "top_p drops the token that reaches p",
}

# Said beside a row of the report (docs/mutation.md): why a break is caught the way it is, or why one that
# survives is an equivalent mutant (no behaviour can show it).
NOTES = {
    "an evicted adapter's slot keeps its factors": "no output can see it (a step reads only loaded adapters' "
    "slots, a load zeroes its slot before writing): survived the first pass; tests/test_serving_slot_reset.py "
    "now reads the table itself and pins the documented reset",
    "top_p drops the token that reaches p": "survived the first pass (the server test samples without top_p); "
    "tests/test_serving_sampling.py now holds pick() to nucleus sampling written by hand",
    "end-of-sequence token does not stop a row": "survived the pass at 84b57f3; tests/test_serving_eos.py",
    "LoRA dropout also in eval mode": "survived the pass at 84b57f3; test_lora.py's dropout test since 1a94010",
}
