"""Reformer's LSH attention (Kitaev et al., 2020): an adaptive local window. Queries and keys are
hashed with random rotations (angular LSH: similar vectors share a bucket), sorted by bucket, cut
into chunks of ``bucket_size`` (a bucket may be split over two chunks), and each query chunk attends
to its key chunk and the previous one, plus each query's own key. ``n_hashes`` rounds with different
rotations are combined by their softmax normalisers (more rounds, better recall).

A key met in several rounds counts once, as in Reformer: in each round its score is lowered by the log
of the number of rounds that pair it with the query, so the rounds together are exactly softmax
attention over the union of the keys each query meets (its own key included).

Pretrained models have separate query and key projections (Reformer shares them), so queries and
keys are hashed and sorted each on their own with the same rotations. Cost O(n * bucket_size * n_hashes)
(O(n * bucket_size * n_hashes^2) for the duplicate counts when n_hashes > 1).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from deltatune.attention.blocks import dense_sdpa, repeat_kv, with_neighbours
from deltatune.attention.registry import Call, Pattern, positive, register
from deltatune.config import ConfigError


@dataclasses.dataclass
class LshOptions:
    bucket_size: int = 64
    """tokens per chunk after sorting by hash (buckets = sequence length / bucket size)"""
    n_hashes: int = 1
    """hash rounds, each with its own random rotations"""
    hash_seed: int = 0
    """seed of the random rotations (fixed, so a model hashes the same way in every call)"""

    def __post_init__(self) -> None:
        positive(self.bucket_size, "lsh: --bucket-size")
        positive(self.n_hashes, "lsh: --n-hashes")
        if not isinstance(self.hash_seed, int):
            raise ConfigError(f"lsh: --hash-seed must be a whole number, got {self.hash_seed!r}")


def buckets(x: torch.Tensor, options: LshOptions, n: int) -> torch.Tensor:
    """(rounds, b, h, len) bucket ids of vectors x (b, h, len, d): argmax over [xR, -xR]."""
    count = max(1, n // options.bucket_size)
    if count == 1:
        return x.new_zeros((options.n_hashes, *x.shape[:3]), dtype=torch.long)
    count += count % 2
    g = torch.Generator().manual_seed(options.hash_seed)
    rotations = torch.randn(options.n_hashes, x.shape[-1], count // 2, generator=g).to(x)
    proj = torch.einsum("bhnd,rdk->rbhnk", torch.nn.functional.normalize(x.detach(), dim=-1), rotations)
    return torch.cat([proj, -proj], dim=-1).argmax(-1)


def _sorted(bucket: torch.Tensor, c: int) -> torch.Tensor:
    """Positions sorted by (bucket, position), cut into chunks of c: (..., chunks, c), -1 as padding."""
    n = bucket.shape[-1]
    order = torch.argsort(bucket * n + torch.arange(n, device=bucket.device), dim=-1)
    pad = -n % c
    order = torch.cat([order, order.new_full((*order.shape[:-1], pad), -1)], dim=-1)
    return order.view(*order.shape[:-1], -1, c)


def tables(query: torch.Tensor, key: torch.Tensor, options: LshOptions) -> tuple[torch.Tensor, torch.Tensor]:
    """Per round, per row and head: query chunks (r, b, h, m, c) and their keys (r, b, h, m, 2c)."""
    n, c = key.shape[2], min(options.bucket_size, key.shape[2])
    q_idx = _sorted(buckets(query, options, n), c)
    k_chunks = _sorted(buckets(key, options, n), c)
    lead = k_chunks.shape[:-2]
    flat = k_chunks.reshape(-1, *k_chunks.shape[-2:])
    k_idx = torch.stack([with_neighbours(chunks, before=1) for chunks in flat]).view(*lead, -1, 2 * c)
    return q_idx, k_idx


def allowed(query: torch.Tensor, key: torch.Tensor, options: LshOptions, causal: bool) -> torch.Tensor:
    """(b, h, n, n): which keys each query meets in some round (from the same tables as forward)."""
    q_idx, k_idx = tables(query, repeat_kv(key, query.shape[1]), options)
    n = key.shape[2]
    out = torch.eye(n, dtype=torch.bool).expand(*query.shape[:2], n, n).clone()
    qi = q_idx[..., :, None].expand(*q_idx.shape, k_idx.shape[-1])
    ki = k_idx[..., None, :].expand_as(qi)
    ok = (qi >= 0) & (ki >= 0)
    for r in range(q_idx.shape[0]):
        pairs = ok[r].nonzero(as_tuple=True)
        out[pairs[0], pairs[1], qi[r][pairs], ki[r][pairs]] = True
    if causal:
        out &= torch.ones(n, n, dtype=torch.bool).tril()
    return out


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (b, h, n, d) at idx (b, h, m, w) -> (b, h, m, w, d)."""
    b, h, m, w = idx.shape
    flat = idx.clamp(min=0).reshape(b, h, m * w, 1).expand(-1, -1, -1, x.shape[-1])
    return torch.gather(x, 2, flat).view(b, h, m, w, x.shape[-1])


def _chunk_of(idx: torch.Tensor, n: int) -> torch.Tensor:
    """(r, b, h, m, c) sorted chunks -> (r, b, h, n): the chunk each position sits in."""
    chunk = torch.arange(idx.shape[-2], device=idx.device)[:, None].expand(idx.shape[-2:])
    slot = torch.where(idx >= 0, idx, n).flatten(-2)  # padding goes to a spare slot n
    out = torch.full((*idx.shape[:-2], n + 1), -1, dtype=torch.long, device=idx.device)
    return out.scatter_(-1, slot, chunk.expand(idx.shape).flatten(-2))[..., :n]


def duplicates(q_idx: torch.Tensor, k_idx: torch.Tensor, n: int) -> torch.Tensor:
    """(r, b, h, m, c, 2c): in how many rounds each (query, key) pair of each round's chunks meets.
    A pair meets in a round when the key's chunk is the query's chunk or the one before it."""
    qc, kc = _chunk_of(q_idx, n), _chunk_of(k_idx[..., k_idx.shape[-1] // 2 :], n)  # own key chunks
    lead = q_idx.shape[1:-2]
    counts = []
    for r in range(q_idx.shape[0]):
        qpos = q_idx[r].clamp(min=0).reshape(*lead, -1)
        kpos = k_idx[r].clamp(min=0).reshape(*lead, -1)
        at_q = torch.gather(qc, -1, qpos.expand(qc.shape[0], *qpos.shape)).view(-1, *q_idx.shape[1:], 1)
        at_k = torch.gather(kc, -1, kpos.expand(kc.shape[0], *kpos.shape))
        at_k = at_k.view(-1, *k_idx.shape[1:-1], 1, k_idx.shape[-1])
        gap = at_q - at_k
        counts.append(((gap == 0) | (gap == 1)).sum(0))
    return torch.stack(counts)


def _round(call: Call, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx, k_idx, counts=None):
    """One hash round: per-position output (b, h, n, d) and its log normaliser (b, h, n). ``counts``:
    rounds each pair meets in (None: one round), whose log lowers the pair's score."""
    b, h, n, d = q.shape
    scale = call.scale if call.scale is not None else d**-0.5
    qb, kb, vb = _gather(q, q_idx), _gather(k, k_idx), _gather(v, k_idx)
    qpos, kpos = q_idx[..., :, None], k_idx[..., None, :]
    ok = (kpos >= 0) & (kpos != qpos)  # own key comes once, in its own column
    if call.causal:
        ok = ok & (kpos <= qpos)
    self_ok = q_idx >= 0
    if call.mask is not None and call.mask.shape[2] == 1:  # a key (padding) mask
        keys = call.mask[:, :, 0].expand(b, h, n)
        ok = ok & torch.gather(keys, 2, k_idx.clamp(min=0).view(b, h, -1)).view(b, h, -1, 1, k_idx.shape[-1])
        self_ok = self_ok & torch.gather(keys, 2, q_idx.clamp(min=0).view(b, h, -1)).view(q_idx.shape)
    elif call.mask is not None:
        m = call.mask.expand(b, h, n, n).reshape(b, h, n * n)
        at = (q_idx.clamp(min=0)[..., :, None] * n + k_idx.clamp(min=0)[..., None, :]).view(b, h, -1)
        ok = ok & torch.gather(m, 2, at).view(ok.shape)
        self_ok = self_ok & torch.gather(m, 2, (q_idx.clamp(min=0) * (n + 1)).view(b, h, -1)).view(q_idx.shape)
    self_ok = self_ok | ~ok.any(-1)  # a query with nothing else to see (padding) sees itself: finite
    scores = torch.einsum("bhmcd,bhmwd->bhmcw", qb, kb) * scale
    own = (qb * _gather(k, q_idx)).sum(-1, keepdim=True) * scale
    if counts is not None:  # Reformer's duplicate correction: a key met in several rounds counts once
        scores = scores - counts.clamp(min=1).to(scores.dtype).log()
        own = own - math.log(call.options.n_hashes)  # the own key is in every round
    scores = torch.cat([own, scores], dim=-1).masked_fill(~torch.cat([self_ok[..., None], ok], dim=-1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.exp(scores - lse)
    if call.dropout and call.module.training:
        probs = torch.nn.functional.dropout(probs, call.dropout)
    out = probs[..., :1] * _gather(v, q_idx) + probs[..., 1:] @ vb
    inverse = torch.argsort(q_idx.reshape(b, h, -1), dim=-1)[..., -n:]  # -1 padding sorts first
    out = torch.gather(out.reshape(b, h, -1, d), 2, inverse[..., None].expand(-1, -1, -1, d))
    return out, torch.gather(lse.reshape(b, h, -1), 2, inverse)


def forward(call: Call) -> torch.Tensor:
    opts: LshOptions = call.options
    q = call.query
    k, v = repeat_kv(call.key, q.shape[1]), repeat_kv(call.value, q.shape[1])
    if call.decoding:  # new queries see the cached keys that share a bucket with them in some round
        n = k.shape[2]
        bq, bk = buckets(q, opts, n), buckets(k, opts, n)
        same = (bq[..., :, None] == bk[..., None, :]).any(0)
        qpos = torch.arange(n - q.shape[2], n, device=q.device)[:, None]
        kpos = torch.arange(n, device=q.device)[None, :]
        same = (same | (qpos == kpos)) & (kpos <= qpos if call.causal else True)
        return dense_sdpa(q, k, v, same, call.mask, call.scale, call.dropout)
    q_idx, k_idx = tables(q, k, opts)
    if opts.n_hashes == 1:
        return _round(call, q, k, v, q_idx[0], k_idx[0])[0]
    counts = duplicates(q_idx, k_idx, k.shape[2])
    rounds = [_round(call, q, k, v, q_idx[r], k_idx[r], counts[r]) for r in range(opts.n_hashes)]
    lse = torch.stack([r[1] for r in rounds])
    weights = torch.softmax(lse, dim=0).nan_to_num(0.0)
    return sum(w[..., None] * r[0] for w, r in zip(weights, rounds, strict=True))


register(
    Pattern(
        name="lsh",
        options_class=LshOptions,
        forward=forward,
        allowed=None,
        summary="Reformer: sort by LSH bucket, chunk, attend to own and previous chunk; O(n*c) per round",
    )
)
