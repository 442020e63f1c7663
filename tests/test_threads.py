"""One DeltaModel, several threads, different adapters at the same time: each call gets exactly
what it gets alone. The adapter choice travels with the call (deltatune.routing), so nothing on
the shared model is toggled per call; torch releases the GIL inside its ops, so races are real."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from test_mixed import left_padded, many_adapters, texts

from deltatune.model import BASE_ADAPTER

MIXED = [
    ["sql", "chat", BASE_ADAPTER, "houlsby"],
    ["soft", "prefix", "sql", "ptune"],
    [BASE_ADAPTER, "houlsby", "chat", "chat"],
    ["prefix", BASE_ADAPTER, "soft", "sql"],
]
SINGLE = ["sql", "prefix", "chat", BASE_ADAPTER, "houlsby", "soft", "ptune"]


def together(*workers: Callable[[], None]) -> None:
    """Run the workers in threads started at once; re-raise the first error."""
    start, errors = threading.Barrier(len(workers)), []

    def run(work: Callable[[], None]) -> None:
        try:
            start.wait()
            work()
        except BaseException as err:  # reported in the test's thread
            errors.append(err)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def repeat(rounds: int, calls: list[Callable[[], torch.Tensor]], expected: list[torch.Tensor], bad: list) -> Callable:
    def work() -> None:
        for i in range(rounds):
            k = i % len(calls)
            if not torch.equal(calls[k](), expected[k]):
                bad.append((k, i))

    return work


@torch.no_grad()
def test_threads_with_different_adapters_each_get_their_own_result():
    model = many_adapters()
    ids = torch.stack(texts(4, seed=11))
    mixed = [lambda names=names: model(input_ids=ids, adapter_names=names).logits for names in MIXED]
    single = [lambda name=name: model(input_ids=ids, adapter_name=name).logits for name in SINGLE]
    expected_mixed, expected_single = [call() for call in mixed], [call() for call in single]
    assert not torch.equal(expected_single[0], expected_single[1])  # the adapters differ
    bad_mixed, bad_single = [], []
    together(repeat(200, mixed, expected_mixed, bad_mixed), repeat(200, single, expected_single, bad_single))
    assert not bad_mixed and not bad_single, (bad_mixed[:5], bad_single[:5])
    assert model.active_adapter == "sql"  # the per-call forms leave the model's state alone


@torch.no_grad()
def test_threads_generating_with_different_adapters_each_get_their_own_tokens():
    """Prompt learning's decoding steps read their inputs from the call, not a patched model."""
    model = many_adapters()
    ids, mask = left_padded(texts(4, seed=12, lengths=[3, 6, 5, 4]))
    settings = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    mixed = [lambda names=names: model.generate(input_ids=ids, adapter_names=names, **settings) for names in MIXED]
    single = [lambda name=name: model.generate(input_ids=ids, adapter_name=name, **settings) for name in SINGLE]
    expected_mixed, expected_single = [call() for call in mixed], [call() for call in single]
    bad_mixed, bad_single = [], []
    together(repeat(24, mixed, expected_mixed, bad_mixed), repeat(28, single, expected_single, bad_single))
    assert not bad_mixed and not bad_single, (bad_mixed[:5], bad_single[:5])
    assert "prepare_inputs_for_generation" not in vars(model.base_model)  # nothing patched


def test_a_per_call_adapter_is_checked():
    model = many_adapters()
    ids = torch.stack(texts(2))
    with pytest.raises(KeyError, match="typo"):
        model(input_ids=ids, adapter_name="typo")
    with pytest.raises(TypeError, match="not both"):
        model(input_ids=ids, adapter_name="sql", adapter_names=["sql", "chat"])
    model.merge_adapter("sql")
    with pytest.raises(ValueError, match="unmerge_adapter"):
        model(input_ids=ids, adapter_name="chat")
    torch.testing.assert_close(model(input_ids=ids, adapter_name="sql").logits, model(input_ids=ids).logits)


@torch.no_grad()
def test_calls_nest_each_with_its_own_adapters():
    """A call made while another runs (here from a hook inside it) neither sees nor disturbs it."""
    model = many_adapters()
    ids = torch.stack(texts(4, seed=13))
    expected = {name: model(input_ids=ids, adapter_name=name).logits for name in ("sql", "chat")}
    expected_mixed = model(input_ids=ids, adapter_names=MIXED[1]).logits
    expected_active = model(input_ids=ids).logits
    inner, busy = [], []

    def call_inside(module, args):
        if not busy:
            busy.append(True)
            inner.append(model(input_ids=ids, adapter_name="chat").logits)
            inner.append(model(input_ids=ids, adapter_names=MIXED[1]).logits)
            inner.append(model(input_ids=ids).logits)

    handle = model.base_model.model.layers[1].register_forward_pre_hook(call_inside)
    try:
        outer = model(input_ids=ids, adapter_name="sql").logits
        busy.clear()
        outer_mixed = model(input_ids=ids, adapter_names=MIXED[0]).logits
    finally:
        handle.remove()
    assert torch.equal(outer, expected["sql"])
    assert torch.equal(outer_mixed, model(input_ids=ids, adapter_names=MIXED[0]).logits)
    for got, want in zip(inner, [expected["chat"], expected_mixed, expected_active] * 2, strict=True):
        assert torch.equal(got, want)


@torch.no_grad()
def test_threads_with_different_hyperformer_tasks_each_get_their_own_result():
    """HyperFormer's task ids (and generate's weight cache) live in the call's state, not the hypernetwork."""
    from conftest import TINY_MODELS, randomize_adapters

    import deltatune as dt

    model = dt.wrap(TINY_MODELS["llama"](), dt.HyperAdapterConfig(tasks=["a", "b", "c"], bottleneck_size=4))
    randomize_adapters(model, std=0.3)
    ids, mask = left_padded(texts(3, seed=14, lengths=[4, 6, 5]))
    settings = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    forwards = [
        lambda t=t: model(input_ids=ids, attention_mask=mask, task_ids=t).logits
        for t in ("a", "b", torch.tensor([2, 0, 1]))
    ]
    generates = [lambda t=t: model.generate(input_ids=ids, task_ids=t, **settings) for t in ("c", ["b", "a", "c"])]
    expected_forwards, expected_generates = [call() for call in forwards], [call() for call in generates]
    assert not torch.equal(expected_forwards[0], expected_forwards[1])  # the tasks differ
    bad_forwards, bad_generates = [], []
    together(
        repeat(200, forwards, expected_forwards, bad_forwards),
        repeat(200, generates, expected_generates, bad_generates),
    )
    assert not bad_forwards and not bad_generates, (bad_forwards[:5], bad_generates[:5])
    net = next(layer for _, layer in model.delta_layers()).hypernet["default"]
    assert not {"tasks", "rows", "cache"} & set(vars(net))  # nothing per call on the shared module
