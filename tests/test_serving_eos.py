"""A serving row stops at its tokenizer's end-of-sequence token, as transformers' ``generate`` does:
the EOS token ends the row with ``finish_reason="stop"``, counts as a generated token, adds no text,
and a row sharing the batch goes on to its own end unchanged.

The tiny random model never produces SmolLM2's real EOS, so the tokenizer's EOS is set to a token the
model's greedy continuation reaches at a known step; the reference is ``generate`` with that EOS."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from conftest import tiny_llama

from deltatune.mixed import BASE_ADAPTER
from deltatune.serving import Engine
from deltatune.serving.rows import Request

STOPPING, OTHER = "Once upon a time", "Hello"
EOS_STEP = 3  # the stopping prompt's 4th greedy token becomes the EOS


def _model(vocab: int):
    model = tiny_llama()
    model.resize_token_embeddings(vocab, mean_resizing=False)
    return model.eval()


def _greedy(model, ids: list[int], tokens: int, eos: int | None = None) -> list[int]:
    """transformers' greedy continuation, stopping at ``eos`` when given (included, as generate does)."""
    settings = {"max_new_tokens": tokens, "do_sample": False, "pad_token_id": 0}
    if eos is not None:
        settings["eos_token_id"] = eos
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), **settings)
    new = out[0, len(ids) :].tolist()
    assert eos is not None or len(new) == tokens, "the free continuation stopped early"
    return new


@pytest.fixture(scope="module")
def setup(smol_tokenizer):
    model = _model(len(smol_tokenizer))
    stopping_ids = smol_tokenizer(STOPPING)["input_ids"]
    free = _greedy(model, stopping_ids, 10)
    eos = free[EOS_STEP]
    assert eos not in free[:EOS_STEP], "the chosen EOS must first appear at EOS_STEP"
    tokenizer = copy.deepcopy(smol_tokenizer)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    assert tokenizer.eos_token_id == eos
    return model, tokenizer, eos


class Events:
    """A request's emitted events, and a wait for its ``done`` (or ``error``)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []
        self.finished = threading.Event()

    def __call__(self, event: tuple) -> None:
        self.events.append(event)
        if event[0] in ("done", "error"):
            self.finished.set()

    def result(self) -> tuple[str, str, int]:
        """(text, finish_reason, tokens) once the request has finished."""
        assert self.finished.wait(120), f"the request did not finish: {self.events}"
        assert self.events[-1][0] == "done", self.events[-1]
        text = "".join(e[1] for e in self.events if e[0] == "text")
        return text, self.events[-1][1], self.events[-1][2]


def _run(setup, prompts: list[str], max_tokens: int) -> list[tuple[str, str, int]]:
    """Each prompt's (text, finish_reason, tokens) from an engine, all submitted into one batch."""
    _, tokenizer, _ = setup
    engine = Engine(_model(len(tokenizer)), tokenizer, "tiny", max_batch=4)
    sinks = [Events() for _ in prompts]
    try:
        with engine.lock:  # the worker waits: every request joins the same first step
            for prompt, sink in zip(prompts, sinks, strict=True):
                engine.submit(Request(BASE_ADAPTER, tokenizer(prompt)["input_ids"], max_tokens, sink))
            time.sleep(0.05)
        return [sink.result() for sink in sinks]
    finally:
        engine.close()


def test_a_row_stops_at_eos_as_generate_does(setup, smol_tokenizer):
    model, tokenizer, eos = setup
    ids = tokenizer(STOPPING)["input_ids"]
    expected = _greedy(model, ids, 10, eos=eos)
    assert expected[-1] == eos and len(expected) == EOS_STEP + 1  # generate stops there too
    [(text, reason, tokens)] = _run(setup, [STOPPING], max_tokens=10)
    assert (reason, tokens) == ("stop", EOS_STEP + 1)
    assert text == smol_tokenizer.decode(expected[:-1], skip_special_tokens=True)


def test_a_row_at_eos_leaves_while_its_batch_mate_goes_on(setup, smol_tokenizer):
    model, tokenizer, eos = setup
    other_ids = tokenizer(OTHER)["input_ids"]
    other = _greedy(model, other_ids, 8)
    assert eos not in other, "the other prompt must not reach the EOS"
    stopped, going_on = _run(setup, [STOPPING, OTHER], max_tokens=8)
    assert stopped[1:] == ("stop", EOS_STEP + 1)
    assert going_on == (smol_tokenizer.decode(other, skip_special_tokens=True), "length", 8)
