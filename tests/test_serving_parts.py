"""The engine's parts, each used alone, without the engine or its thread: the scheduler (who joins a step: the
token budget, a long prompt a chunk at a time, adapter loads within a time budget; and another policy handed to the
engine: the bench's dynamic batching) and the runner (one forward for a batch of rows, each row what its adapter
computes alone)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import torch
from test_server import adapters_dir, tiny_model  # noqa: F401 (adapters_dir: a fixture)
from transformers import DynamicCache

from deltatune.constants import BASE_ADAPTER
from deltatune.serving.adapters import Adapters
from deltatune.serving.rows import Request
from deltatune.serving.scheduling import Scheduler
from deltatune.serving.slots import SlotTable
from deltatune.serving.stepping import Runner

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from serve_load import GatheringScheduler  # bench/ is not a package


def job(adapter: str, length: int) -> Request:
    return Request(adapter, list(range(5, 5 + length)), 4, lambda event: None)


def scheduler(store: Adapters, kind: type[Scheduler] = Scheduler, **options) -> Scheduler:
    return kind(store, threading.Condition(), lambda: DynamicCache(), **options)


def test_the_scheduler_admits_within_its_budget_and_a_long_prompt_a_chunk_at_a_time(adapters_dir, smol_tokenizer):  # noqa: F811
    store = Adapters(tiny_model(len(smol_tokenizer)), "tiny", adapters_dir, max_loaded=2)
    plan = scheduler(store, prefill_chunk=10, max_batch=8)
    short, long, other, later = job(BASE_ADAPTER, 4), job(BASE_ADAPTER, 30), job(BASE_ADAPTER, 3), job("poet", 2)
    second = job(BASE_ADAPTER, 20)
    plan.waiting.extend([short, long, second, other, later])
    joining = plan.admit([])
    assert joining.group == [short] and joining.alone == [] and plan.partial is None  # long waits: rows are joining
    assert list(plan.waiting) == [long, second, other, later]
    joining = plan.admit([short])
    assert joining.group == [] and plan.partial is not None and plan.partial[0] is long and plan.partial[2] == 0
    joining = plan.admit([short])  # the long prompt is prefilled meanwhile; short ones keep joining
    assert joining.group == [other, later] and store.loaded == ["poet"]
    assert plan.partial[0] is long and list(plan.waiting) == [second]  # one long prompt at a time


def test_the_scheduler_loads_within_its_time_budget(adapters_dir, smol_tokenizer):  # noqa: F811
    store = Adapters(tiny_model(len(smol_tokenizer)), "tiny", adapters_dir, max_loaded=2)
    plan = scheduler(store, load_budget_s=1e-9)  # less than any load takes: the first of each step only
    poet, coder, base = job("poet", 3), job("coder", 3), job(BASE_ADAPTER, 3)
    plan.waiting.extend([poet, coder, base])
    assert plan.admit([]).group == [poet, base] and store.loaded == ["poet"]  # coder's load waits a step
    assert plan.admit([poet, base]).group == [coder] and store.loaded == ["poet", "coder"]
    store = Adapters(tiny_model(len(smol_tokenizer)), "tiny", adapters_dir, max_loaded=2)
    plan = scheduler(store, load_budget_s=1e-9)
    plan.waiting.append(job("poet", 3))
    plan.admit([])  # loads poet
    again, coder = job("poet", 3), job("coder", 3)
    plan.waiting.extend([again, coder])
    assert plan.admit([]).group == [again, coder]  # a loaded adapter spends nothing: coder's is the step's first load
    store = Adapters(tiny_model(len(smol_tokenizer)), "tiny", adapters_dir, max_loaded=2)
    plan = scheduler(store, load_budget_s=60.0)  # time for both loads in one step
    poet, coder, base = job("poet", 3), job("coder", 3), job(BASE_ADAPTER, 3)
    plan.waiting.extend([poet, coder, base])
    assert plan.admit([]).group == [poet, coder, base] and store.loaded == ["poet", "coder"]


def test_the_benchs_dynamic_policy_admits_only_into_an_empty_batch(adapters_dir, smol_tokenizer, monkeypatch):  # noqa: F811
    store = Adapters(tiny_model(len(smol_tokenizer)), "tiny", adapters_dir, max_loaded=2)
    monkeypatch.setattr(GatheringScheduler, "window_s", 0.0)
    plan = scheduler(store, GatheringScheduler, prefill_chunk=10)
    first, second = job(BASE_ADAPTER, 3), job(BASE_ADAPTER, 300)
    plan.waiting.append(first)
    assert plan.admit([]).group == [first]
    plan.waiting.append(second)
    assert plan.admit([first]) is None and list(plan.waiting) == [second]
    assert plan.admit([]).group == [second] and plan.partial is None  # no budget: a long prompt joins whole


def test_the_engine_runs_the_scheduler_it_is_given(smol_tokenizer):
    """A policy is a Scheduler subclass handed to the engine: its admit decides who joins every step."""
    from deltatune.serving import Engine

    admitted: list[int] = []

    class Counting(Scheduler):
        def admit(self, running):
            joining = super().admit(running)
            admitted.extend(len(r.prompt_ids) for r in joining.group)
            return joining

    engine = Engine(tiny_model(len(smol_tokenizer)), smol_tokenizer, "tiny", scheduler=Counting)
    events, done = [], threading.Event()
    try:
        assert isinstance(engine.scheduler, Counting)
        sink = lambda e: events.append(e) or (e[0] == "done" and done.set())  # noqa: E731
        engine.submit(Request(BASE_ADAPTER, [7, 8, 9], 3, sink))
        assert done.wait(60), events
        assert admitted == [3] and events[-1][0] == "done"
    finally:
        engine.close()


def test_the_runner_computes_each_row_as_its_adapter_alone(adapters_dir, smol_tokenizer):  # noqa: F811
    store = Adapters(tiny_model(len(smol_tokenizer)), "tiny", adapters_dir, 3, SlotTable(slots=3, max_rank=4))
    for name in ("poet", "coder"):
        store.ensure(name, set())
    runner = Runner(store, store.base_model, pad_id=0)
    rows = [job("poet", 6), job(BASE_ADAPTER, 3), job("coder", 5)]
    with torch.no_grad():
        logits, cache, mask = runner.prefill(rows)
        for request, token in zip(rows, logits.argmax(-1).tolist(), strict=True):
            request.generated.append(token)
            request.length = len(request.prompt_ids)
        step = runner.decode(rows, cache, mask)
        model = store.model
        for i, request in enumerate(rows):
            ids = torch.tensor([[*request.prompt_ids, request.generated[0]]])
            alone = model(input_ids=ids, adapter_name=request.adapter).logits[0]
            torch.testing.assert_close(logits[i], alone[-2], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(step[i], alone[-1], rtol=1e-5, atol=1e-5)
