"""The vocabulary tables split by rows across 2 gloo processes (``--fsdp``): each rank holds half the rows,
and lookups, logits, the fused loss and its gradient equal the whole tables' on each rank's own batch
(ranks hold batches of different lengths, as in data-parallel training)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from deltatune.loss import _linear_cross_entropy_sum


def model(tied: bool, device: str = "cpu") -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,  # odd: the ranks' pieces differ in size (51 and 50 rows)
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        tie_word_embeddings=tied,
    )
    with torch.device(device):
        return LlamaForCausalLM(config).requires_grad_(False)


def check(rank: int, port: int, tied: bool) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from deltatune.vocab_split import split_vocabulary

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        whole = model(tied)
        split = model(tied, "meta")
        split_vocabulary(split, init_device_mesh("cpu", (2,)))
        embedding, head = split.get_input_embeddings(), split.get_output_embeddings()
        assert (head.weight is embedding.weight) == tied
        split.to_empty(device="cpu")  # memory for this rank's rows (as the trainer's materialize gives)
        if tied:
            head.weight = embedding.weight
        for module, reference in ((embedding, whole.get_input_embeddings()), (head, whole.get_output_embeddings())):
            assert module.weight.to_local().shape[0] == (51, 50)[rank]  # half the rows, not the table
            module.weight.to_local().copy_(reference.weight[(0, 51)[rank] :][: (51, 50)[rank]])
        generator = torch.Generator().manual_seed(rank)
        ids = torch.randint(0, 101, (2, 3 + 4 * rank), generator=generator)  # other lengths on each rank
        torch.testing.assert_close(embedding(ids), whole.get_input_embeddings()(ids), rtol=0, atol=0)
        hidden = torch.randn(5 + 3 * rank, 16, generator=generator, requires_grad=True)
        torch.testing.assert_close(head(hidden), whole.get_output_embeddings()(hidden), rtol=1e-6, atol=1e-6)
        targets = torch.randint(0, 101, (len(hidden),), generator=generator)
        expected_hidden = hidden.detach().clone().requires_grad_(True)
        expected = torch.nn.functional.cross_entropy(
            whole.get_output_embeddings()(expected_hidden), targets, reduction="sum"
        )
        expected.backward()
        loss = _linear_cross_entropy_sum(hidden, head, targets)  # the split loss, as the trainer calls it
        loss.backward()
        torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(hidden.grad, expected_hidden.grad, rtol=1e-5, atol=1e-6)
        wrapped = model(tied, "meta")  # an adapter on the head (here a container) keeps its tied partner whole
        wrapped.lm_head = nn.Sequential(wrapped.lm_head)
        split_vocabulary(wrapped, init_device_mesh("cpu", (2,)))
        assert hasattr(wrapped.get_input_embeddings().weight, "to_local") != tied
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("tied", [True, False])
def test_split_tables_compute_what_whole_ones_do(tied):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(check, args=(port, tied), nprocs=2, join=True, start_method="spawn")
