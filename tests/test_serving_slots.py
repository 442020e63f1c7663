"""Adapter slots (serving/slots.py): loads write a slot, evictions reset it, and a batch of rows
gathered from the slots computes what each adapter computes alone."""

from __future__ import annotations

import time

import pytest
import torch
from test_server import adapters_dir, tiny_model  # noqa: F401 (adapters_dir: a fixture)

from deltatune import routing
from deltatune.constants import BASE_ADAPTER
from deltatune.serving.adapters import Adapters
from deltatune.serving.slots import SlotTable, plain


def lora_layers(model):
    return [layer for _, layer in model.delta_layers() if plain(layer)]


def test_a_load_writes_its_slot_and_an_eviction_resets_it(adapters_dir, smol_tokenizer):  # noqa: F811
    store = Adapters(tiny_model(len(smol_tokenizer)), "tiny", adapters_dir, 1, SlotTable(slots=1, max_rank=8))
    table = store.slots
    assert store.ensure("poet", set())
    slot = table.slot_of["poet"]
    assert slot == 1 and len(table.tables) == len(lora_layers(store.model))
    for layer in lora_layers(store.model):
        _, a, b, _ = table.tables[id(layer)]
        assert a.shape[:2] == b.shape[:2] == (2, 8)
        assert torch.equal(a[slot, :4], layer.lora_A["poet"].weight) and not a[slot, 4:].any()
        assert torch.equal(b[slot, :4], (layer.lora_B["poet"].weight * layer.scaling["poet"]).T)
        assert not b[slot, 4:].any() and not a[0].any() and not b[0].any()
    assert store.ensure("coder", set())  # evicts poet: its slot is coder's now
    assert table.slot_of == {"coder": 1} and store.evictions == 1
    for layer in lora_layers(store.model):  # coder's layers only (poet's were unwrapped)
        _, a, b, _ = table.tables[id(layer)]
        assert torch.equal(a[1, :2], layer.lora_A["coder"].weight) and not a[1, 2:].any()
    store.unload("coder")
    assert table.slot_of == {} and not table.tables


def test_rows_over_slots_equal_each_adapter_alone(adapters_dir, smol_tokenizer):  # noqa: F811
    store = Adapters(tiny_model(len(smol_tokenizer)), "tiny", adapters_dir, 4, SlotTable(slots=4, max_rank=8))
    for name in ("poet", "coder"):
        store.ensure(name, set())
    model, names = store.model, ["coder", BASE_ADAPTER, "poet", "coder"]
    ids = torch.randint(0, len(smol_tokenizer), (4, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mixed = model(input_ids=ids, adapter_names=store.slots.rows(names)).logits  # the public per-row call
        for i, name in enumerate(names):
            alone = model(input_ids=ids[i : i + 1], adapter_name=name).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    assert store.slots.rows(names).ids == [2, 0, 1, 2]
    store.unload("poet")  # its slot is reset: zeros in every layer that is left
    assert store.slots.slot_of == {"coder": 2}
    assert all(not a[1].any() and not b[1].any() for _, a, b, _ in store.slots.tables.values())


@pytest.mark.parametrize(
    ("names", "tokens", "sliced", "masked"),
    [
        (["coder", BASE_ADAPTER, "poet", "coder"], 1, True, True),  # a decoding step: slots 1-2 at once, masked
        (["coder", BASE_ADAPTER, "poet", "coder"], 7, False, True),  # a prompt over two slots: rows gather
        (["poet", BASE_ADAPTER, "poet"], 7, True, True),  # one slot and a base row: its mask zeroes that row
        (["poet", "poet"], 7, True, False),  # one slot, every row: no mask
    ],
)
def test_each_form_of_a_step_equals_each_adapter_alone(adapters_dir, smol_tokenizer, names, tokens, sliced, masked):  # noqa: F811
    """The slice (with and without its mask) and the gather, each against the one-adapter forward of
    every row; coder's rows also pass q/v layers where its slot holds zeros, and base rows every layer."""
    store = Adapters(tiny_model(len(smol_tokenizer)), "tiny", adapters_dir, 4, SlotTable(slots=4, max_rank=8))
    for name in ("poet", "coder"):
        store.ensure(name, set())
    rows = store.slots.rows(names)
    assert rows.sliced(tokens) is sliced and (rows._mask(torch.zeros(1, 1)) is not None) is masked
    ids = torch.randint(0, len(smol_tokenizer), (len(names), tokens), generator=torch.Generator().manual_seed(1))
    model = store.model
    with torch.no_grad():
        with routing.scope(adapter=None, rows=rows):
            mixed = model.base_model(input_ids=ids).logits
        for i, name in enumerate(names):
            alone = model(input_ids=ids[i : i + 1], adapter_name=name).logits
            torch.testing.assert_close(mixed[i : i + 1], alone, rtol=1e-5, atol=1e-5)


def test_a_repeated_step_skips_the_check_until_the_adapters_change(adapters_dir, smol_tokenizer, monkeypatch):  # noqa: F811
    """Runner.checked: a decoding step with the last step's adapters reuses its check; an unload runs it again."""
    from deltatune.mixed import check as real_check
    from deltatune.serving import stepping

    store = Adapters(tiny_model(len(smol_tokenizer)), "tiny", adapters_dir, 2, SlotTable(slots=2, max_rank=8))
    store.ensure("poet", set())
    calls = []
    monkeypatch.setattr(stepping, "check", lambda model, names: calls.append(names) or real_check(model, names))
    runner = stepping.Runner(store, store.base_model, 0)
    assert runner.checked(store.model, ["poet", BASE_ADAPTER]) == ["poet", BASE_ADAPTER]
    runner.checked(store.model, [BASE_ADAPTER, "poet"])
    assert len(calls) == 1
    store.ensure("coder", set())
    runner.checked(store.model, ["poet"])
    store.unload("poet")
    with pytest.raises(KeyError, match="poet"):
        runner.checked(store.model, ["poet"])
    assert len(calls) == 3


def test_ranks_past_the_slots_are_refused_clearly(adapters_dir, smol_tokenizer):  # noqa: F811
    store = Adapters(tiny_model(len(smol_tokenizer)), "tiny", adapters_dir, 2, SlotTable(slots=2, max_rank=2))
    store.ensure("coder", set())  # r=2 fits
    try:
        store.ensure("poet", set())
    except ValueError as err:
        assert "rank 4, more than --max-lora-rank 2" in str(err)
    else:
        raise AssertionError("a rank-4 adapter loaded into rank-2 slots")
    assert "poet" not in store.recent and "poet" not in store.slots.slot_of
    assert "poet" not in store.model.peft_config  # the failed load left nothing behind


def test_a_server_with_slots_answers_each_row_as_alone(adapters_dir, smol_tokenizer, monkeypatch):  # noqa: F811
    """Through the engine: rows of two adapters and the base decode together from the slots, every step through
    the model's public per-row call (DeltaModel.forward with adapter_names: the slots' routing)."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from test_server import reference, running
    from test_serving_vllm import call

    from deltatune.model import DeltaModel
    from deltatune.serving import Engine
    from deltatune.serving.slots import SlotRows

    calls, forward = [], DeltaModel.forward

    def recorded(self, *args, adapter_names=None, **kwargs):
        calls.append(adapter_names)
        return forward(self, *args, adapter_names=adapter_names, **kwargs)

    monkeypatch.setattr(DeltaModel, "forward", recorded)
    engine = Engine(
        tiny_model(len(smol_tokenizer)), smol_tokenizer, "tiny", adapters_dir, max_loaded=3, max_lora_rank=4
    )
    with running(engine) as url:
        jobs = [("poet", "Once upon"), ("coder", "def main"), ("tiny", "Hello there"), ("poet", "The sea")]
        body = {"max_tokens": 6, "temperature": 0}
        with ThreadPoolExecutor(4) as pool, engine.lock:  # held: all four join the same first step
            futures = [pool.submit(call, url, "/completions", {"model": m, "prompt": p} | body) for m, p in jobs]
            while engine.queued < 4:
                time.sleep(0.01)
        texts = [json.loads(f.result()[2])["choices"][0]["text"] for f in futures]
        assert set(engine.store.slots.slot_of) == {"poet", "coder"}
        steps = [rows for rows in calls if isinstance(rows, SlotRows)]
        assert len(steps) == len(calls) and {"poet", "coder", BASE_ADAPTER} <= {n for r in steps for n in r.names}
        for (model, prompt), text in zip(jobs, texts, strict=True):
            adapter = BASE_ADAPTER if model == "tiny" else model
            assert text == reference(engine, adapter, smol_tokenizer(prompt)["input_ids"], 6), model
