"""A request cancelled while its prompt is being prefilled (its client went away mid-prefill) never joins
the decoding batch: it gets no token and no error, no step fails over its missing token, the next decode
steps run without its row, and the request that shared its prefill goes on exactly as it would alone."""

from __future__ import annotations

import time

import torch
from conftest import tiny_llama
from test_serving_eos import Events

from deltatune.mixed import BASE_ADAPTER
from deltatune.serving import Engine
from deltatune.serving.rows import Request

GONE, STAYS = "Once upon a time", "Hello"


def _model(vocab: int):
    model = tiny_llama()
    model.resize_token_embeddings(vocab, mean_resizing=False)
    return model.eval()


def test_a_request_cancelled_during_prefill_never_joins_the_batch(smol_tokenizer, caplog):
    tokenizer = smol_tokenizer
    model = _model(len(tokenizer))
    stays_ids = tokenizer(STAYS)["input_ids"]
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([stays_ids]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    alone = tokenizer.decode(out[0, len(stays_ids) :].tolist(), skip_special_tokens=True)

    gone_sink, stays_sink = Events(), Events()
    gone = Request(BASE_ADAPTER, tokenizer(GONE)["input_ids"], 6, gone_sink)
    stays = Request(BASE_ADAPTER, stays_ids, 6, stays_sink)
    rows_per_forward: list[int] = []

    def cancel_during_the_first_forward(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows_per_forward.append(ids.shape[0])
        if len(rows_per_forward) == 1:
            gone.cancel()  # the client hangs up while both prompts are being prefilled

    engine = Engine(model, tokenizer, "tiny", max_batch=4)
    model.register_forward_pre_hook(cancel_during_the_first_forward, with_kwargs=True)
    try:
        with engine.lock:  # both requests join the same first step, so they are prefilled together
            engine.submit(gone)
            engine.submit(stays)
            time.sleep(0.05)
        text, reason, tokens = stays_sink.result()
    finally:
        engine.close()
    assert rows_per_forward[0] == 2, "the two prompts were meant to be prefilled together"
    assert rows_per_forward[1:] and all(n == 1 for n in rows_per_forward[1:]), rows_per_forward
    assert not [e for e in gone_sink.events if e[0] in ("text", "error")], gone_sink.events  # no token, no failure
    assert not [r for r in caplog.records if "failed" in r.getMessage()], "a step failed around the cancelled row"
    assert (text, reason, tokens) == (alone, "length", 6)
