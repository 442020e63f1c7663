"""``deltatune serve`` through the official openai client, on a tiny Llama with two LoRA adapters."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from conftest import tiny_llama

import deltatune as dt
from deltatune.mixed import BASE_ADAPTER

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
from deltatune.serving import Engine, create_app  # noqa: E402

KEY = "test-key"
ADAPTERS = ("poet", "coder")


def tiny_model(vocab: int):
    model = tiny_llama()
    model.resize_token_embeddings(vocab, mean_resizing=False)
    return model.eval()


@pytest.fixture(scope="module")
def adapters_dir(tmp_path_factory, smol_tokenizer):
    directory = tmp_path_factory.mktemp("adapters")
    model = dt.wrap(tiny_model(len(smol_tokenizer)), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "poet")
    model.add_adapter("coder", dt.LoraConfig(r=2, target_modules=["o_proj", "up_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def server(adapters_dir, smol_tokenizer):
    engine = Engine(
        tiny_model(len(smol_tokenizer)), smol_tokenizer, "tiny", adapters_dir, max_queue=4, arrival_gap_s=0.2
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(engine, api_key=KEY, max_tokens_limit=64), "127.0.0.1", port, log_level="error")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.05)
    yield engine, f"http://127.0.0.1:{port}/v1"
    web.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[1], api_key=KEY, max_retries=0, timeout=60)


def reference(engine: Engine, adapter: str, prompt_ids: list[int], tokens: int) -> str:
    """The adapter's greedy continuation computed directly, one request alone."""
    ids = torch.tensor([prompt_ids])
    settings = dict(max_new_tokens=tokens, do_sample=False, pad_token_id=engine.pad_id)
    with engine.lock, torch.no_grad():
        model = engine.model
        if adapter == BASE_ADAPTER:
            with model.disable_adapter():
                out = model.generate(input_ids=ids, **settings)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=ids, **settings)
    return engine.tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)


def prompt_ids(engine: Engine, prompt: str) -> list[int]:
    return engine.tokenizer(prompt)["input_ids"]


def test_models_lists_base_and_adapters(client):
    assert [m.id for m in client.models.list().data] == ["tiny", *sorted(ADAPTERS)]


@pytest.mark.parametrize("model", ["tiny", "poet", "coder"])
def test_completion_equals_direct_generation(client, server, model):
    engine, _ = server
    prompt = "The weather today is"
    answer = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0)
    adapter = BASE_ADAPTER if model == "tiny" else model
    assert answer.choices[0].text == reference(engine, adapter, prompt_ids(engine, prompt), 6)
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 6
    assert answer.usage.prompt_tokens == len(prompt_ids(engine, prompt))


def test_adapters_change_the_text(client):
    texts = {
        m: client.completions.create(model=m, prompt="Hello", max_tokens=6, temperature=0).choices[0].text
        for m in ("tiny", *ADAPTERS)
    }
    assert len(set(texts.values())) == 3


def test_chat_and_streaming_agree(client, server):
    engine, _ = server
    messages = [{"role": "user", "content": "Say something."}]
    whole = client.chat.completions.create(model="poet", messages=messages, max_tokens=8, temperature=0)
    rendered = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = engine.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert whole.choices[0].message.content == reference(engine, "poet", ids, 8)
    chunks = list(
        client.chat.completions.create(model="poet", messages=messages, max_tokens=8, temperature=0, stream=True)
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    pieces = list(client.completions.create(model="coder", prompt="Once", max_tokens=5, temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == reference(engine, "coder", prompt_ids(engine, "Once"), 5)


def test_two_adapters_in_flight_share_a_batch_and_match_alone(client, server):
    engine, _ = server
    jobs = [("poet", "A quiet morning", 7), ("coder", "def main():", 4), ("tiny", "Numbers:", 5)]
    before = len(engine.batches)
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(
            pool.map(lambda j: client.completions.create(model=j[0], prompt=j[1], max_tokens=j[2], temperature=0), jobs)
        )
    new_batches = engine.batches[before:]
    assert any({"poet", "coder"} <= set(batch) for batch in new_batches), new_batches
    for (model, prompt, tokens), answer in zip(jobs, answers, strict=True):
        adapter = BASE_ADAPTER if model == "tiny" else model
        assert answer.choices[0].text == reference(engine, adapter, prompt_ids(engine, prompt), tokens)
        assert answer.usage.completion_tokens == tokens  # each row stopped at its own max_tokens


def test_stop_sequence_cuts_the_text(client, server):
    engine, _ = server
    full = reference(engine, "poet", prompt_ids(engine, "Tell me"), 12)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    answer = client.completions.create(model="poet", prompt="Tell me", max_tokens=12, temperature=0, stop=[stop])
    assert answer.choices[0].text == full[: full.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_sampling_rows_follow_their_seed(client):
    def ask():
        return (
            client.completions.create(model="poet", prompt="Hi", max_tokens=8, temperature=1.0, seed=7).choices[0].text
        )

    greedy = client.completions.create(model="poet", prompt="Hi", max_tokens=8, temperature=0).choices[0].text
    assert ask() == ask() != greedy


def test_load_and_unload_adapters_at_run_time(client):
    post = client.post("/adapters", body={"name": "poet2", "path": "poet"}, cast_to=object)
    assert post["loaded"]
    assert "poet2" in [m.id for m in client.models.list().data]
    copy = client.completions.create(model="poet2", prompt="Hello", max_tokens=5, temperature=0).choices[0].text
    assert copy == client.completions.create(model="poet", prompt="Hello", max_tokens=5, temperature=0).choices[0].text
    client.delete("/adapters/poet2", cast_to=object)
    with pytest.raises(openai.NotFoundError, match=r"does not exist"):
        client.completions.create(model="poet2", prompt="Hello", max_tokens=5)
    with pytest.raises(openai.ConflictError):
        client.post("/adapters", body={"name": "poet", "path": "poet"}, cast_to=object)


def test_adapters_that_cannot_mix_are_refused(client, adapters_dir, smol_tokenizer):
    model = dt.wrap(tiny_model(len(smol_tokenizer)), dt.LlamaAdapterConfig(adapter_len=2, adapter_layers=1))
    model.save_pretrained(adapters_dir / "gated")
    with pytest.raises(openai.BadRequestError, match="ADAPTION_PROMPT adapter cannot share batches"):
        client.post("/adapters", body={"name": "gated", "path": "gated"}, cast_to=object)


def test_adapter_paths_cannot_leave_the_directory(client, adapters_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    (outside).mkdir()
    (adapters_dir / "escape").symlink_to(outside)
    for path in ("../x", "/etc", str(adapters_dir / ".." / "x"), "escape"):
        with pytest.raises(openai.BadRequestError, match="leaves the adapters directory"):
            client.post("/adapters", body={"name": "bad", "path": path}, cast_to=object)
    with pytest.raises(openai.BadRequestError, match="letters, digits"):
        client.post("/adapters", body={"name": "../poet", "path": "poet"}, cast_to=object)


def test_api_key_is_required(server):
    _, url = server
    for key in ("wrong", ""):
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key=key or "none", max_retries=0).models.list()
    request = urllib.request.Request(f"{url}/models")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(request)
    assert err.value.code == 401
    assert json.loads(err.value.read())["error"]["code"] == "invalid_api_key"


def post_raw(url: str, path: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}{path}", data=data, headers={"Authorization": f"Bearer {KEY}"})
    try:
        with urllib.request.urlopen(request) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_bad_requests_get_openai_style_4xx(client, server):
    _, url = server
    status, body = post_raw(url, "/completions", b"{not json")
    assert (
        status == 400
        and "not valid JSON" in body["error"]["message"]
        and body["error"]["type"] == "invalid_request_error"
    )
    status, body = post_raw(url, "/completions", json.dumps({"model": "tiny"}).encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found"
    for tokens in (0, 65):
        with pytest.raises(openai.BadRequestError, match="max_tokens must be between 1 and 64"):
            client.completions.create(model="tiny", prompt="x", max_tokens=tokens)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="tiny", prompt="word " * 200, max_tokens=8)  # tiny_llama: 128 positions


def test_a_failing_generation_answers_500_and_the_server_goes_on(client, server, monkeypatch):
    engine, _ = server

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(engine.model, "generate", broken)
    with pytest.raises(openai.InternalServerError, match="boom"):
        client.completions.create(model="poet", prompt="x", max_tokens=2)
    monkeypatch.undo()
    assert client.completions.create(model="poet", prompt="x", max_tokens=2).choices[0].text is not None


def test_full_queue_answers_429(client, server):
    engine, _ = server
    with ThreadPoolExecutor(8) as pool:
        with engine.lock:  # the worker takes one batch and waits for the lock; the queue fills behind it
            first = pool.submit(client.completions.create, model="tiny", prompt="a", max_tokens=1)
            while engine.waiting.qsize() or not engine.worker.is_alive():
                time.sleep(0.01)
            time.sleep(0.3)  # the batch window has closed: the worker holds the first request
            held = [pool.submit(client.completions.create, model="tiny", prompt="b", max_tokens=1) for _ in range(4)]
            while engine.waiting.qsize() < 4:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="retry later"):
                client.completions.create(model="tiny", prompt="c", max_tokens=1)
        assert all(f.result().choices for f in [first, *held])
