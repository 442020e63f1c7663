"""The vocabulary tables of a sharded run (``--fsdp``), split by rows across the processes and used there.

The input embedding and the output head (tied or not) are as large as a few decoder blocks. Sharded by
FSDP they would be gathered whole for their use and, since the lookup and the head are the first and the
last thing a step does, held whole through most of it. Instead each process keeps 1/N of the rows (a
DTensor, ``Shard(0)``, which the loader and the savers already handle) and works on them: the processes
exchange their token ids or hidden states (activation-sized), each computes with its rows for every
process's tokens, and a sum over the processes gives each its own result. Ranks hold different batches
(data parallel), so every exchange pads to the longest rank's tokens.
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def split_vocabulary(base: nn.Module, device_mesh: Any) -> None:
    """Split the frozen embedding and output head of ``base`` (meta tensors, before loading) by rows, a tie
    kept. A table with an adapter or trainable tensors, or of another class, is left as it is (whole, under
    FSDP's root), and so is its tied partner."""
    from torch.distributed.tensor import Shard, distribute_tensor

    embedding, head = base.get_input_embeddings(), base.get_output_embeddings()
    plain_embedding = type(embedding) is nn.Embedding and embedding.max_norm is None
    plain_head = type(head) is nn.Linear and head.bias is None
    plans = [(embedding, plain_embedding, _embedding_forward), (head, plain_head, _head_forward)]
    plans = [(m, ok and not any(p.requires_grad for p in m.parameters()), f) for m, ok, f in plans]
    # Tied when they share a tensor, wrapped or not (LoRA on lm_head keeps the tied weight as its base_layer's).
    tied = head is not None and bool({id(p) for p in embedding.parameters()} & {id(p) for p in head.parameters()})
    if tied and not all(ok for _, ok, _ in plans):  # half a tie cannot be split alone
        return
    split: dict[int, nn.Parameter] = {}
    for module, ok, forward in plans:
        if ok:
            weight = module.weight
            if id(weight) not in split:  # meta tensors: each rank takes its rows' shape, nothing is sent
                rows = distribute_tensor(weight, device_mesh, [Shard(0)], src_data_rank=None)
                split[id(weight)] = nn.Parameter(rows, requires_grad=False)
            module._parameters["weight"] = split[id(weight)]
            module.forward = types.MethodType(forward, module)


def first_row(rows: int, group: Any = None) -> int:
    """This rank's first row of a tensor split along dim 0 as FSDP and DTensor split (torch.chunk's
    ceil-sized pieces)."""
    return min(dist.get_rank(group) * -(-rows // dist.get_world_size(group)), rows)


def _group_and_rows(weight: Any) -> tuple[Any, torch.Tensor, int]:
    """(process group, this rank's rows, the index of its first row)."""
    group = weight.device_mesh.get_group()
    return group, weight.to_local(), first_row(weight.shape[0], group)


def _gather_rows(x: torch.Tensor, group: Any) -> tuple[torch.Tensor, int, int]:
    """Every rank's ``x`` (rows of any number) stacked, padded with zeros to the longest: (N * longest rows,
    longest, this rank's own count). Differentiable (torch.distributed.nn): the gradient returns to its rank."""
    from torch.distributed.nn.functional import all_gather

    count = torch.tensor([len(x)], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size(group))]
    dist.all_gather(counts, count, group=group)
    longest = int(max(counts))
    padded = F.pad(x, (0, 0) * (x.dim() - 1) + (0, longest - len(x)))
    gathered = all_gather(padded, group=group) if x.requires_grad else _plain_all_gather(padded, group)
    return torch.cat(gathered), longest, len(x)


def _plain_all_gather(x: torch.Tensor, group: Any) -> list[torch.Tensor]:
    out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, x.contiguous(), group=group)
    return out


def _embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """Every rank's ids looked up in this rank's rows (zeros for the others'), summed over the ranks."""
    group, rows, first = _group_and_rows(self.weight)
    every, longest, own = _gather_rows(ids.reshape(-1), group)
    local = every - first
    mine = (local >= 0) & (local < len(rows))
    vectors = F.embedding(local.clamp(0, len(rows) - 1), rows) * mine[:, None].to(rows.dtype)
    dist.all_reduce(vectors, group=group)
    start = dist.get_rank(group) * longest
    return vectors[start : start + own].reshape(*ids.shape, rows.shape[1])


def _head_forward(self: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """Whole logits of this rank's positions: every rank's columns for every rank's hidden states, gathered.
    Holds N times this rank's logits for a moment: for evaluation and generation; the training loss uses
    :func:`split_cross_entropy_sum`, which never joins them."""
    from torch.distributed.nn.functional import all_gather

    group, rows, _ = _group_and_rows(self.weight)
    every, longest, own = _gather_rows(hidden.reshape(-1, hidden.shape[-1]), group)
    per_rank = -(-self.weight.shape[0] // dist.get_world_size(group))
    logits = F.pad(every @ rows.T, (0, per_rank - len(rows)))  # equal pieces for the gather
    pieces = all_gather(logits, group=group) if logits.requires_grad else _plain_all_gather(logits, group)
    start = dist.get_rank(group) * longest
    whole = torch.cat([p[start : start + own] for p in pieces], dim=-1)[:, : self.weight.shape[0]]
    return whole.reshape(*hidden.shape[:-1], self.weight.shape[0])


def split_cross_entropy_sum(hidden: torch.Tensor, weight: Any, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum(cross_entropy(hidden @ weight.T, targets)) over this rank's positions, for a frozen head ``weight``
    split by rows (a DTensor); its gradient for ``hidden`` is computed here, as the one-process fused loss
    does. Every rank must call it, the same number of times."""
    group, rows, first = _group_and_rows(weight)
    every, longest, own = _gather_rows(hidden.detach(), group)
    every_targets = _gather_rows(targets, group)[0]
    start = dist.get_rank(group) * longest
    return _SplitCrossEntropy.apply(hidden, every, rows, every_targets - first, chunk, (group, start, own))


class _SplitCrossEntropy(torch.autograd.Function):
    """Chunk by chunk over every rank's positions: this rank's logits, the log-normaliser over every rank's
    columns (all-reduced max, then sum of exponentials), the target's logit from the rank holding its row,
    and the gradient for the hidden states (softmax - onehot times this rank's rows, summed over ranks)."""

    @staticmethod
    def forward(ctx, hidden, every, rows, targets, chunk, where):
        group, start, own = where
        losses = torch.empty(len(every), dtype=torch.float32, device=every.device)
        grad = torch.empty_like(every) if hidden.requires_grad else None
        for begin in range(0, len(every), chunk):
            logits = (every[begin : begin + chunk] @ rows.T).float()
            target = targets[begin : begin + chunk]
            mine = (target >= 0) & (target < len(rows))
            top = logits.max(dim=-1).values
            dist.all_reduce(top, dist.ReduceOp.MAX, group=group)
            picked = logits.gather(1, target.clamp(0, len(rows) - 1)[:, None]).squeeze(1) * mine
            sums = torch.stack([(logits - top[:, None]).exp().sum(dim=-1), picked])
            dist.all_reduce(sums, group=group)
            log_norm = top + sums[0].log()
            losses[begin : begin + chunk] = log_norm - sums[1]
            if grad is not None:
                probs = logits.sub_(log_norm[:, None]).exp_()
                probs[torch.arange(len(target), device=target.device)[mine], target[mine]] -= 1
                part = probs.to(rows.dtype) @ rows
                dist.all_reduce(part, group=group)
                grad[begin : begin + chunk] = part.to(grad.dtype)
        ctx.save_for_backward(None if grad is None else grad[start : start + own].to(hidden.dtype))
        return losses[start : start + own].sum()

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None, None, None
