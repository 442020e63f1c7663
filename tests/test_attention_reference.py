"""Attention patterns against references written here from each paper's definition, independent of the
kernels' code (no ``rule()``, ``allowed()`` or index tables of deltatune's): an explicit mask built
position by position, and softmax attention computed by hand. Causal and bidirectional, odd lengths,
three batch rows (none, left and right padding), grouped-query heads."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import batch, tiny_bert

from deltatune.attention import blockwise, linformer, lsh, s2, set_attention, sliding_window
from deltatune.attention.registry import Call

TOL = 1e-5
HEADS, KV_HEADS = 4, 2


def _qkv(n: int, seed: int = 0, rows: int = 3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, h, n, 8, generator=g) for h in (HEADS, KV_HEADS, KV_HEADS)]


def _padding(n: int) -> torch.Tensor:
    """Key mask (3, 1, 1, n): row 0 whole, row 1 left-padded by 5, row 2 right-padded by 7."""
    keys = torch.ones(3, 1, 1, n, dtype=torch.bool)
    keys[1, ..., :5] = False
    keys[2, ..., n - 7 :] = False
    return keys


def _reference(q, k, v, allowed: torch.Tensor, keys: torch.Tensor | None):
    """Softmax attention by hand: allowed (h, n, n) per head, or (b, h, n, n) per row and head, keys
    (b, 1, 1, n). Returns the output
    (b, h, n, d) and which queries have any key (the others are undefined on both sides)."""
    b, h, _, d = q.shape
    kv_of = [head * k.shape[1] // h for head in range(h)]  # grouped-query: consecutive heads share
    ok = (allowed[None].expand(b, *allowed.shape) if allowed.dim() == 3 else allowed).clone()
    if keys is not None:
        ok &= keys[:, :, 0, None, :]
    out = torch.zeros_like(q)
    for head in range(h):
        scores = q[:, head] @ k[:, kv_of[head]].transpose(-1, -2) / math.sqrt(d)
        weights = torch.softmax(scores.masked_fill(~ok[:, head], float("-inf")), dim=-1).nan_to_num(0.0)
        out[:, head] = weights @ v[:, kv_of[head]]
    return out, ok.any(-1)


# (kernel, padded): the CPU block tables with and without padding, and the CUDA path (FlexAttention from
# the pattern's rule) run here through FlexAttention's eager reference, forward only, with padding.
KERNELS = pytest.mark.parametrize(
    ("kernel", "padded"), [("blocks", False), ("blocks", True), ("flex", True)], indirect=["kernel"]
)


@pytest.fixture
def kernel(request, monkeypatch) -> str:
    if request.param == "flex":
        from deltatune.attention import blocks

        def through_flex(q, k, v, q_idx, k_idx, rule, causal, scale, mask=None, dropout=0.0):
            return blocks.flex_sdpa(q, k, v, rule, causal, scale, mask, compiled=False)

        for module in (sliding_window, blockwise, s2):
            monkeypatch.setattr(module, "block_sdpa", through_flex)
    return request.param


def _check(module, options, allowed_of_head, n: int, causal: bool, padded: bool) -> None:
    q, k, v = _qkv(n)
    keys = _padding(n) if padded else None
    with torch.no_grad():
        out = module.forward(Call(torch.nn.Module().train(), q, k, v, keys, causal, None, 0.0, options))
    allowed = torch.stack([allowed_of_head(head) for head in range(HEADS)])
    if allowed.dim() == 4:  # (h, b, n, n): a mask per row
        allowed = allowed.transpose(0, 1)
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    ref, defined = _reference(q, k, v, allowed, keys)
    assert defined.float().mean() > 0.6
    assert (out[defined] - ref[defined]).abs().max() <= TOL


# --- Longformer: sliding window, dilated, global -------------------------------------------------
def longformer_mask(n: int, window: int, dilation: int, global_tokens: int, causal: bool) -> torch.Tensor:
    """Causal: itself and window-1 keys before, dilation apart (transformers' convention). Encoder:
    window // 2 keys on each side, dilation apart (the paper's 1/2 w). Global tokens see all and are
    seen by all."""
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        steps = range(-(window - 1), 1) if causal else range(-(window // 2), window // 2 + 1)
        for t in steps:
            if 0 <= i + t * dilation < n:
                m[i, i + t * dilation] = True
        for g in range(min(global_tokens, n)):
            m[i, g] = True
            if not causal:
                m[g, i] = True
    return m


@KERNELS
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("n", "window", "dilations", "global_tokens"),
    [(37, 5, [1], 0), (37, 4, [1, 3], 0), (29, 3, [2, 1, 1, 4], 2), (23, 6, [1, 2], 3), (31, 1, [1], 0)],
)
def test_sliding_window_equals_longformer(n, window, dilations, global_tokens, causal, padded, kernel):
    options = sliding_window.SlidingWindowOptions(window=window, dilation=dilations, global_tokens=global_tokens)

    def of_head(head: int) -> torch.Tensor:
        return longformer_mask(n, window, dilations[head * len(dilations) // HEADS], global_tokens, causal)

    _check(sliding_window, options, of_head, n, causal, padded)


# --- BlockBERT: blockwise --------------------------------------------------------------------------
def blockwise_mask(n: int, block: int, shift: int, causal: bool) -> torch.Tensor:
    """Encoder (Qiu et al.): query block i sees key block (i + shift) mod m, the permutation of its head
    group. Causal (ours): its own block up to itself, and with shift > 0 all of block i - shift."""
    blocks = -(-n // block)
    m = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        qb = i // block
        if not causal:
            kb = (qb + shift) % blocks
            m[i, kb * block : min((kb + 1) * block, n)] = True
            continue
        m[i, qb * block : i + 1] = True
        if shift > 0 and qb - shift >= 0:
            m[i, (qb - shift) * block : (qb - shift + 1) * block] = True
    return m


def on_real_tokens(mask: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """A (len, len) mask over a row's real tokens placed at their positions in the padded (n, n) one."""
    positions = real.nonzero().squeeze(1)
    placed = torch.zeros(len(real), len(real), dtype=torch.bool)
    placed[positions[:, None], positions[None, :]] = mask
    return placed


@KERNELS
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    ("n", "block", "shifts"), [(37, 8, [0, 1]), (37, 5, [2, 1, 0, 3]), (33, 11, [1]), (41, 6, [2, 2])]
)
def test_blockwise_equals_blockbert(n, block, shifts, causal, padded, kernel):
    """Encoders: the paper's blocks over each row's own tokens (a padded row is its real tokens, as
    alone). Causal (ours): blocks counted from position 0 of the padded row."""
    options = blockwise.BlockwiseOptions(block_size=block, block_shifts=shifts)

    def of_head(head: int) -> torch.Tensor:
        shift = shifts[head * len(shifts) // HEADS]
        if causal or not padded:
            return blockwise_mask(n, block, shift, causal)
        return torch.stack(
            [on_real_tokens(blockwise_mask(int(row.sum()), block, shift, False), row) for row in _padding(n)[:, 0, 0]]
        )

    _check(blockwise, options, of_head, n, causal, padded)


# --- LongLoRA: S2-Attn -----------------------------------------------------------------------------
def s2_mask(n: int, group: int, shifted: bool) -> torch.Tensor:
    """LongLoRA: tokens cut into groups of ``group``; the shifted heads first roll the sequence by
    -group/2 (``roll(-group // 2)``), so the last group holds the last and the first tokens. A length
    that is no multiple of the group is padded at the end before rolling. (Causality: by true position.)"""
    padded = -(-n // group) * group
    order = list(range(padded))
    if shifted:
        order = order[group // 2 :] + order[: group // 2]
    m = torch.zeros(n, n, dtype=torch.bool)
    for start in range(0, padded, group):
        members = [p for p in order[start : start + group] if p < n]
        for i in members:
            m[i, members] = True
    return m


@KERNELS
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("n", "group"), [(32, 8), (37, 6), (36, None), (27, 5)])
def test_s2_equals_longlora_shift(n, group, causal, padded, kernel):
    """Heads 0..h/2-1 plain groups, heads h/2..h-1 shifted by half a group (LongLoRA shifts the second
    half of the heads); the default group is n // 4 (LongLoRA's ratio)."""
    g = group or n // 4

    def of_head(head: int) -> torch.Tensor:
        return s2_mask(n, g, shifted=head >= HEADS // 2)

    _check(s2, s2.S2Options(group_size=group), of_head, n, causal, padded)


def test_s2_shift_moves_information_between_groups():
    """The point of the shift: a shifted head lets group 0's last tokens see group 1's first ones."""
    plain, shifted = s2_mask(16, 8, False), s2_mask(16, 8, True)
    assert not plain[7, 8] and shifted[7, 8] and shifted[4, 11] and not shifted[3, 4]


# --- Reformer: LSH ---------------------------------------------------------------------------------
def angular_buckets(x: torch.Tensor, n_buckets: int, rounds: int, seed: int) -> torch.Tensor:
    """Reformer's angular LSH: h(x) = argmax([xR; -xR]) with R random (d, buckets/2), one R per round,
    drawn from ``torch.Generator().manual_seed(hash_seed)`` as documented."""
    if n_buckets == 1:
        return torch.zeros(rounds, *x.shape[:3], dtype=torch.long)
    n_buckets += n_buckets % 2
    rotations = torch.randn(rounds, x.shape[-1], n_buckets // 2, generator=torch.Generator().manual_seed(seed))
    proj = torch.einsum("bhnd,rdk->rbhnk", torch.nn.functional.normalize(x, dim=-1), rotations)
    return torch.cat([proj, -proj], dim=-1).argmax(-1)


def lsh_mask(q, k, bucket_size: int, rounds: int, seed: int) -> torch.Tensor:
    """(b, h, n, n): per round, queries and keys each sorted by (bucket, position) and cut into chunks
    of bucket_size; query i meets key j when j's chunk is i's chunk or the one before; union over the
    rounds, plus each query's own key. Each key counts once however many rounds meet it."""
    b, h, n, _ = q.shape
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    count = max(1, n // bucket_size)
    bq, bk = angular_buckets(q, count, rounds, seed), angular_buckets(k, count, rounds, seed)
    m = torch.eye(n, dtype=torch.bool).repeat(b, h, 1, 1)
    for r in range(rounds):
        for row in range(b):
            for head in range(h):
                q_order = sorted(range(n), key=lambda p: (int(bq[r, row, head, p]), p))
                k_order = sorted(range(n), key=lambda p: (int(bk[r, row, head, p]), p))
                q_chunk = {p: rank // bucket_size for rank, p in enumerate(q_order)}
                k_chunk = {p: rank // bucket_size for rank, p in enumerate(k_order)}
                for i in range(n):
                    for j in range(n):
                        if k_chunk[j] in (q_chunk[i], q_chunk[i] - 1):
                            m[row, head, i, j] = True
    return m


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("n", "bucket_size", "rounds"), [(30, 4, 1), (29, 7, 1), (30, 4, 3), (27, 5, 2)])
def test_lsh_equals_reformer_union(n, bucket_size, rounds, causal, padded):
    """Several rounds are exactly softmax attention over the union of the keys met (Reformer's
    duplicate correction): a key found in two rounds is not counted twice."""
    q, k, v = _qkv(n, seed=3)
    keys = _padding(n) if padded else None
    options = lsh.LshOptions(bucket_size=bucket_size, n_hashes=rounds, hash_seed=1)
    with torch.no_grad():
        out = lsh.forward(Call(torch.nn.Module().train(), q, k, v, keys, causal, None, 0.0, options))
    allowed = lsh_mask(q, k, bucket_size, rounds, 1)
    assert not allowed.all()  # sparse: several buckets
    if causal:
        allowed &= torch.ones(n, n, dtype=torch.bool).tril()
    b, h = allowed.shape[:2]
    ref = torch.zeros_like(q)
    defined = torch.zeros(b, h, n, dtype=torch.bool)
    for row in range(b):  # the mask differs per row: one reference call per row
        r, d = _reference(
            q[row : row + 1],
            k[row : row + 1],
            v[row : row + 1],
            allowed[row],
            None if keys is None else keys[row : row + 1],
        )
        ref[row], defined[row] = r[0], d[0]
    assert (out[defined] - ref[defined]).abs().max() <= TOL


# --- Linformer ---------------------------------------------------------------------------------------
def stretched(weight: torch.Tensor, n: int) -> torch.Tensor:
    """E (k, max_len) for an input of n positions: grid column u holds input position u * n // max_len."""
    out = torch.zeros(weight.shape[0], n)
    for u in range(weight.shape[1]):
        out[:, u * n // weight.shape[1]] += weight[:, u]
    return out


@pytest.mark.parametrize("n", [37, 64, 100, 128])
def test_linformer_k_equals_n_is_full_attention_at_every_length(n):
    """With the initial (pooling) projections and k = n, Linformer is full attention whatever n is
    (max_len is 128 here), padding included."""
    model, inputs = tiny_bert(), batch(rows=3, length=n)
    inputs["attention_mask"][1, n - 9 :] = 0
    with torch.no_grad():  # the last hidden states: a tiny classifier's logits hardly move
        reference = model(**inputs, output_hidden_states=True).hidden_states[-1]
        set_attention(model, "linformer", k=n)
        assert (model(**inputs, output_hidden_states=True).hidden_states[-1] - reference).abs().max() <= TOL
        set_attention(model, "linformer", k=n - 1)
        assert (model(**inputs, output_hidden_states=True).hidden_states[-1] - reference).abs().max() > 1e-4


@pytest.mark.parametrize("n", [20, 37, 128])
def test_linformer_equals_projected_attention(n):
    """Trained (random) E and F on a shorter input: softmax(Q (E_n K)^T) F_n V, E_n = E stretched to n,
    rows that cover no real position masked; every one of the k rows covers part of the input."""
    k_rows, max_len = 8, 128
    proj = linformer.LinformerProjection(k_rows, max_len)
    with torch.no_grad():
        proj.E.add_(0.02 * torch.randn(k_rows, max_len))
        proj.F.add_(0.02 * torch.randn(k_rows, max_len))
    module = torch.nn.Module()
    module.linformer = proj
    q, k, v = _qkv(n)
    keys = _padding(n)
    with torch.no_grad():
        out = linformer.forward(Call(module, q, k, v, keys, False, None, 0.0, linformer.LinformerOptions(k=k_rows)))
    e, f = stretched(proj.E.detach(), n), stretched(proj.F.detach(), n)
    assert (linformer.pooling(k_rows, max_len) @ torch.ones(max_len)).allclose(torch.ones(k_rows))
    real = keys[:, 0, 0].float()  # (b, n)
    kr = torch.einsum("kn,bhnd->bhkd", e, k * real[:, None, :, None])
    vr = torch.einsum("kn,bhnd->bhkd", f, v * real[:, None, :, None])
    covered = (e.abs() @ real.T).T > 0  # (b, k)
    assert covered[0].all()  # an unpadded input feeds all k rows, whatever n
    rows = torch.ones(HEADS, n, k_rows, dtype=torch.bool)
    ref = torch.stack(
        [_reference(q[i : i + 1], kr[i : i + 1], vr[i : i + 1], rows & covered[i], None)[0][0] for i in range(3)]
    )
    assert (out - ref).abs().max() <= TOL


# --- Perceiver ---------------------------------------------------------------------------------------
def test_perceiver_latents_are_cross_attention_over_the_tokens():
    """The states the layer after ``from_layer`` receives are [CLS] as is and, for each learned query
    q_l, softmax(q_l H^T) H over the real tokens' hidden states H (written here by hand); and the
    latents change when tokens change."""
    model, inputs = tiny_bert(), batch(rows=3, length=30)
    inputs["attention_mask"][1, 21:] = 0
    set_attention(model, "perceiver", num_latents=6, from_layer=1)
    layer = model.bert.encoder.layer[1]
    seen = {}

    def grab(module, args, kwargs, output):
        seen["latents"] = args[0] if args else kwargs["hidden_states"]

    layer.register_forward_hook(grab, with_kwargs=True)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    hidden, queries = out.hidden_states[1], layer.perceiver_latents.queries.detach()
    for row in range(3):
        real = inputs["attention_mask"][row].bool()
        h = hidden[row, real]
        weights = torch.softmax(queries @ h.T / math.sqrt(h.shape[-1]), dim=-1)
        expected = torch.cat([hidden[row, :1], weights @ h])
        assert (seen["latents"][row] - expected).abs().max() <= TOL
    before = seen["latents"][0, 1:].clone()
    changed = {k: v.clone() for k, v in inputs.items()}
    changed["input_ids"][0, 10:20] = (changed["input_ids"][0, 10:20] + 7) % 100 + 3
    with torch.no_grad():
        model(**changed)
    assert (seen["latents"][0, 1:] - before).abs().max() > 1e-3  # the latents read the tokens
