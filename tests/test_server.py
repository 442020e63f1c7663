"""``deltatune serve`` through the official openai client, on a tiny Llama with two LoRA adapters."""

from __future__ import annotations

import contextlib
import http.client
import json
import shutil
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


@contextlib.contextmanager
def running(engine: Engine, **app_options):
    """``engine`` behind a uvicorn server on a free port, in this process; yields the base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app_options = {"api_key": KEY, "max_tokens_limit": 64} | app_options
    config = uvicorn.Config(create_app(engine, **app_options), "127.0.0.1", port, log_level="error")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    while not web.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        web.should_exit = True
        thread.join(timeout=10)
        engine.close()


@pytest.fixture(scope="module")
def server(adapters_dir, smol_tokenizer):
    engine = Engine(tiny_model(len(smol_tokenizer)), smol_tokenizer, "tiny", adapters_dir, max_queue=4)
    with running(engine) as url:
        yield engine, url


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
    pieces = list(
        client.completions.create(
            model="coder",
            prompt="Once",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(p.choices[0].text for p in pieces if p.choices) == reference(
        engine, "coder", prompt_ids(engine, "Once"), 5
    )
    assert pieces[-1].usage.completion_tokens == 5 and not pieces[-1].choices


def test_two_adapters_in_flight_share_a_batch_and_match_alone(client, server):
    engine, _ = server
    jobs = [("poet", "A quiet morning", 7), ("coder", "def main():", 4), ("tiny", "Numbers:", 5)]
    engine.steps.clear()
    with ThreadPoolExecutor(len(jobs)) as pool:
        with engine.lock:  # the worker waits until all three are queued: they join one step, however busy the CPU
            futures = [
                pool.submit(client.completions.create, model=m, prompt=p, max_tokens=n, temperature=0)
                for m, p, n in jobs
            ]
            deadline = time.monotonic() + 60
            while len(engine.waiting) < len(jobs) and time.monotonic() < deadline:
                time.sleep(0.01)
        answers = [f.result() for f in futures]
    steps = list(engine.steps)
    assert any({"poet", "coder"} <= set(step) for step in steps), steps
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
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    request = urllib.request.Request(f"{url}{path}", data=data, headers=headers)
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

    monkeypatch.setattr(engine.base_model, "forward", broken)
    with pytest.raises(openai.InternalServerError, match="boom"):
        client.completions.create(model="poet", prompt="x", max_tokens=2)
    monkeypatch.undo()
    assert client.completions.create(model="poet", prompt="x", max_tokens=2).choices[0].text is not None


def test_full_queue_answers_429(client, server):
    engine, _ = server
    with ThreadPoolExecutor(8) as pool:
        with engine.lock:  # the worker takes one batch and waits for the lock; the queue fills behind it
            first = pool.submit(client.completions.create, model="tiny", prompt="a", max_tokens=1)
            held = [pool.submit(client.completions.create, model="tiny", prompt="b", max_tokens=1) for _ in range(3)]
            while engine.queued < 4:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError, match="retry later"):
                client.completions.create(model="tiny", prompt="c", max_tokens=1)
        assert all(f.result().choices for f in [first, *held])


# --- defects found by probing a running server ------------------------------------------------------
def call_raw(url: str, path: str, data: bytes | None = None, method: str = "POST", **headers: str) -> tuple[int, dict]:
    """One HTTP request; the status and the JSON body (every answer of this server is JSON)."""
    sent = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"} | headers
    request = urllib.request.Request(f"{url}{path}", data=data, headers=sent, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def openai_error(status: int, body: dict, expected: int, param: str | None = None) -> dict:
    """Assert an OpenAI-style error body with the expected status; return the error."""
    assert status == expected, (status, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if expected < 500 else "server_error")
    if param is not None:
        assert error["param"] == param, error
    return error


def completion(model: str, prompt: str, tokens: int, **extra) -> bytes:
    return json.dumps({"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0} | extra).encode()


def test_tiny_temperature_and_huge_seed_do_not_poison_a_batch(client, server):
    engine, url = server
    jobs = [
        ("poet", "The weather today is", {}),
        ("tiny", "Numbers:", {}),
        ("coder", "def main():", {"temperature": 1e-45}),  # as good as greedy: no inf/nan
        ("poet", "Hello", {"temperature": 1.0, "seed": 1e23}),  # a float, and past 64 bits: refused
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: call_raw(url, "/completions", completion(j[0], j[1], 6, **j[2])), jobs))
    for (model, prompt, extra), (status, body) in zip(jobs[:3], answers[:3], strict=True):
        assert status == 200, body
        adapter = BASE_ADAPTER if model == "tiny" else model
        assert body["choices"][0]["text"] == reference(engine, adapter, prompt_ids(engine, prompt), 6), extra
    openai_error(*answers[3], 400, "seed")
    status, body = call_raw(url, "/completions", completion("poet", "Hello", 6, temperature=1.0, seed=2**63))
    openai_error(status, body, 400, "seed")


def test_a_row_that_fails_fails_alone(client, server, monkeypatch):
    """A forward that raises whenever a poisoned prompt is in it: the batch is retried row by row,
    the poisoned row gets 500 and every other row its exact answer; a step that raises once for
    the whole batch is retried row by row and every row still gets its exact answer."""
    engine, url = server
    poison = prompt_ids(engine, "zebra quagga")
    forward = engine.base_model.forward
    failures = {"steps": 0}

    def flaky(*args, **kwargs):
        ids = kwargs["input_ids"]
        if any(row[-len(poison) :].tolist() == poison for row in ids):
            raise RuntimeError("poisoned row")
        if ids.shape[0] > 1 and ids.shape[1] == 1 and failures["steps"] < 2:  # a decoding step of several rows
            failures["steps"] += 1
            raise RuntimeError("transient failure")
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.base_model, "forward", flaky)
    jobs = [("poet", "A quiet morning", 8), ("coder", "zebra quagga", 8), ("tiny", "Numbers:", 7), ("coder", "Once", 5)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        with engine.lock:  # all four join the batch at the same step
            futures = [pool.submit(call_raw, url, "/completions", completion(*job)) for job in jobs]
            while engine.queued < len(jobs):
                time.sleep(0.01)
        answers = [f.result() for f in futures]
    monkeypatch.undo()
    assert failures["steps"] == 2
    error = openai_error(*answers[1], 500)
    assert "poisoned row" in error["message"]
    for (model, prompt, tokens), (status, body) in zip(jobs, answers, strict=True):
        if prompt != "zebra quagga":
            adapter = BASE_ADAPTER if model == "tiny" else model
            assert status == 200 and body["choices"][0]["text"] == reference(
                engine, adapter, prompt_ids(engine, prompt), tokens
            )


def test_a_failing_sampler_fails_only_its_row(client, server, monkeypatch):
    engine, url = server
    from deltatune.serving import engine as engine_module

    real = engine_module.pick

    def broken(request, logits):
        if request.seed == 13:
            raise ValueError("sampler exploded")
        return real(request, logits)

    monkeypatch.setattr(engine_module, "pick", broken)
    jobs = [completion("poet", "Hi", 5, temperature=0.7, seed=13), completion("poet", "Hi", 5)]
    with ThreadPoolExecutor(2) as pool:
        with engine.lock:
            futures = [pool.submit(call_raw, url, "/completions", job) for job in jobs]
            while engine.queued < 2:
                time.sleep(0.01)
        bad, good = [f.result() for f in futures]
    assert "sampler exploded" in openai_error(*bad, 500)["message"]
    assert good[1]["choices"][0]["text"] == reference(engine, "poet", prompt_ids(engine, "Hi"), 5)


def test_a_closed_stream_frees_its_row(client, server, monkeypatch):
    engine, _ = server
    forward = engine.base_model.forward

    def slow(*args, **kwargs):  # 20 ms a step: the stream cannot finish before it is closed
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.base_model, "forward", slow)
    stream = client.completions.create(model="poet", prompt="Once upon", max_tokens=60, temperature=0, stream=True)
    chunks = iter(stream)
    next(chunks), next(chunks)
    row = engine.batch.rows[0]
    stream.close()
    deadline = time.monotonic() + 5
    while engine.batch.rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.batch.rows and row.cancelled and row.tokens < 40, row.tokens
    monkeypatch.undo()
    started = time.monotonic()
    client.completions.create(model="poet", prompt="x", max_tokens=1)
    assert time.monotonic() - started < 2


def test_a_non_streaming_client_that_disconnects_frees_its_row(server, monkeypatch):
    """No write fails for a client that waits for a whole answer: the server must watch the
    connection itself, or the row generates to max_tokens for nobody."""
    engine, url = server
    forward = engine.base_model.forward

    def slow(*args, **kwargs):  # 20 ms a step: 60 tokens take over a second
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.base_model, "forward", slow)
    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/completions", completion("poet", "Once upon", 60), headers)
    while not engine.batch.rows:
        time.sleep(0.005)
    row = engine.batch.rows[0]
    connection.close()  # the client gives up before the answer
    deadline = time.monotonic() + 5
    while engine.batch.rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not engine.batch.rows and row.cancelled and row.tokens < 40, row.tokens
    monkeypatch.undo()
    assert call_raw(url, "/completions", completion("poet", "x", 2))[0] == 200


def test_request_bodies_that_break_parsers_get_openai_errors(server):
    _, url = server
    deep = b"[" * 200_000 + b"]" * 200_000
    openai_error(*call_raw(url, "/completions", deep), 400)
    host, port = url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)  # a 2 MiB body announced, none sent
    connection.putrequest("POST", "/v1/completions")
    for name, value in {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}.items():
        connection.putheader(name, value)
    connection.putheader("Content-Length", str(2 << 20))
    connection.endheaders()
    answer = connection.getresponse()
    openai_error(answer.status, json.loads(answer.read()), 413)
    connection.close()
    openai_error(*call_raw(url, "/completions", completion("tiny", "x", 2), **{"Content-Type": "text/plain"}), 415)
    openai_error(*call_raw(url, "/completions", b"[1, 2]"), 400)


def test_unknown_routes_and_methods_get_openai_errors(server):
    _, url = server
    openai_error(*call_raw(url, "/nowhere", None, method="GET"), 404)
    openai_error(*call_raw(url, "/completions", None, method="GET"), 405)
    openai_error(*call_raw(url, "/models", b"{}", method="POST"), 405)


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"max_tokens": 5.0}, "max_tokens"),
        ({"stream": "yes"}, "stream"),
        ({"temperature": "0.5"}, "temperature"),
        ({"logprobs": 2}, "logprobs"),
        ({"logprobs": True}, "logprobs"),
        ({"frequency_penalty": 0.5}, "frequency_penalty"),
        ({"n": 2}, "n"),
        ({"stop": [f"s{i}" for i in range(17)]}, "stop"),
        ({"stop": "x" * 300}, "stop"),
        ({"model": "__base__"}, "model"),
        ({"prompt": ["a", "b"]}, "prompt"),
    ],
)
def test_fields_are_checked_strictly(server, extra, param):
    _, url = server
    body = {"model": "tiny", "prompt": "Hello", "max_tokens": 3} | extra
    status = 404 if param == "model" else 400
    openai_error(*call_raw(url, "/completions", json.dumps(body).encode()), status, param)


def test_an_empty_stop_string_stops_nothing(client, server):
    engine, _ = server
    answer = client.completions.create(model="poet", prompt="Tell me", max_tokens=6, temperature=0, stop="")
    assert answer.choices[0].text == reference(engine, "poet", prompt_ids(engine, "Tell me"), 6) != ""


def test_adapter_names_are_checked_clearly(client):
    for name, reason in (("keys", "reserved"), ("tiny", "base model"), ("__base__", "base model"), ("a/b", "letters")):
        with pytest.raises(openai.BadRequestError, match=reason):
            client.post("/adapters", body={"name": name, "path": "poet"}, cast_to=object)


def test_a_queued_request_whose_adapter_is_deleted_gets_404(client, server):
    engine, url = server
    client.post("/adapters", body={"name": "poet3", "path": "poet"}, cast_to=object)
    with ThreadPoolExecutor(2) as pool:
        with engine.lock:  # the worker is held: the request waits, then the delete runs before any step
            waiting = pool.submit(call_raw, url, "/completions", completion("poet3", "Hi", 4))
            while engine.queued < 1:
                time.sleep(0.01)
            deleting = pool.submit(call_raw, url, "/adapters/poet3", None, "DELETE")
            while not engine.commands:
                time.sleep(0.01)
        assert deleting.result()[0] == 200
        assert openai_error(*waiting.result(), 404)["code"] == "model_not_found"
    assert "poet3" not in engine.adapters and "poet3" not in engine.store.loaded


def test_per_step_state_stays_bounded(client, server):
    engine, _ = server
    for _ in range(6):
        client.completions.create(model="poet", prompt="Count", max_tokens=60, temperature=0)
    assert engine.steps.maxlen is not None and len(engine.steps) <= engine.steps.maxlen
    with engine.lock:  # the worker has finished its step
        assert not engine.batch.rows and engine.batch.cache is None and engine.partial is None and not engine.queued


def small_engine(tokenizer, directory, **options) -> Engine:
    return Engine(tiny_model(len(tokenizer)), tokenizer, "tiny", directory, **options)


def test_adapters_load_after_the_last_one_is_deleted(adapters_dir, smol_tokenizer, tmp_path):
    shutil.copytree(adapters_dir / "poet", tmp_path / "only")
    engine = small_engine(smol_tokenizer, tmp_path)
    with running(engine) as url:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        model = engine.model  # one DeltaModel for the server's life, with no adapter before the first load
        client.delete("/adapters/only", cast_to=object)
        assert engine.model is model and model.peft_config == {} and engine.adapters == []
        base = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0).choices[0].text
        assert base == reference(engine, BASE_ADAPTER, prompt_ids(engine, "Hello"), 5)
        client.post("/adapters", body={"name": "again", "path": "only"}, cast_to=object)
        text = client.completions.create(model="again", prompt="Hello", max_tokens=5, temperature=0).choices[0].text
        assert text == reference(engine, "again", prompt_ids(engine, "Hello"), 5) and engine.model is model


def test_close_stops_the_worker_and_answers_open_requests(adapters_dir, smol_tokenizer):
    engine = small_engine(smol_tokenizer, adapters_dir)
    events = []
    from deltatune.serving.rows import Request as Job

    with engine.lock:
        engine.submit(Job("poet", [5, 6, 7], 4, events.append))
        engine.close(timeout=0.2)
    engine.worker.join(5)
    assert not engine.worker.is_alive()
    assert events and events[-1][0] == "error" and events[-1][2] == 503


def test_an_adapter_many_requests_ask_for_loads_once(adapters_dir, smol_tokenizer, monkeypatch):
    engine = small_engine(smol_tokenizer, adapters_dir, max_loaded=1)
    loads = []
    real = engine.store._load
    monkeypatch.setattr(engine.store, "_load", lambda name, *rest: (loads.append(name), real(name, *rest)))
    with running(engine) as url:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["tiny", "coder", "poet"] and engine.store.loaded == []
        with ThreadPoolExecutor(12) as pool:
            texts = list(pool.map(lambda _: ask_text(client, "poet", "Hi", 4), range(12)))
        assert loads == ["poet"] and len(set(texts)) == 1
        assert ask_text(client, "coder", "Hi", 4) and engine.store.loaded == ["coder"]  # the idle one was evicted
        assert ask_text(client, "poet", "Hi", 4) == texts[0] and loads == ["poet", "coder", "poet"]


def ask_text(client, model: str, prompt: str, tokens: int) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0).choices[0].text


def test_prompt_and_stream_limits(adapters_dir, smol_tokenizer):
    from deltatune.serving import Limits

    engine = small_engine(smol_tokenizer, adapters_dir)
    limits = Limits(max_tokens=64, max_prompt_tokens=8, max_streams_per_key=1)
    with running(engine, limits=limits) as url:
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="at most 8"):
            client.completions.create(model="tiny", prompt="word " * 20, max_tokens=2)
        with engine.lock:  # the first stream is held open
            first = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, stream=True)
            with pytest.raises(openai.RateLimitError, match="streams at once"):
                client.completions.create(model="tiny", prompt="Hi", max_tokens=3, stream=True)
        assert list(first)[-1].choices[0].finish_reason == "length"
        again = client.completions.create(model="tiny", prompt="Hi", max_tokens=3, stream=True)
        assert list(again)[-1].choices[0].finish_reason == "length"


def test_a_long_prompt_is_prefilled_in_chunks_while_other_rows_decode(adapters_dir, smol_tokenizer):
    from deltatune.serving.rows import Request as Job

    engine = small_engine(smol_tokenizer, adapters_dir, prefill_chunk=8)
    try:
        short, long = prompt_ids(engine, "Hi"), prompt_ids(engine, "word " * 60)
        events: dict[str, list] = {"short": [], "long": []}
        with engine.lock:
            engine.submit(Job("poet", short, 30, events["short"].append))
            engine.submit(Job("coder", long, 5, events["long"].append))
        while not all(e and e[-1][0] == "done" for e in events.values()):
            time.sleep(0.01)
        steps = list(engine.steps)
        joined = next(i for i, step in enumerate(steps) if "coder" in step)
        assert joined >= len(long) // 8 - 1 and all(step == ("poet",) for step in steps[:joined])  # poet kept going
        for name, adapter, ids, tokens in (("short", "poet", short, 30), ("long", "coder", long, 5)):
            text = "".join(e[1] for e in events[name] if e[0] == "text")
            assert text == reference(engine, adapter, ids, tokens)
    finally:
        engine.close()


def test_short_requests_join_and_finish_while_a_long_prompt_is_prefilled(adapters_dir, smol_tokenizer, monkeypatch):
    """Chunked prefill interleaves with admission: a short request that arrives during a long
    prefill is prefilled and decoded at the next steps, not after the long prompt has joined."""
    from deltatune.serving.rows import Request as Job

    engine = small_engine(smol_tokenizer, adapters_dir, prefill_chunk=4)
    forward = engine.base_model.forward

    def slow(*args, **kwargs):  # 10 ms a step: the long prefill (30 chunks) outlasts the test's own steps
        time.sleep(0.01)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.base_model, "forward", slow)
    try:
        long, short = prompt_ids(engine, "word " * 120)[:120], prompt_ids(engine, "Hi there")
        events: dict[str, list] = {"short": [], "long": [], "short_done_during_prefill": []}

        def short_sink(event: tuple) -> None:
            events["short"].append(event)
            if event[0] == "done":
                events["short_done_during_prefill"].append(engine.partial is not None)

        engine.submit(Job("coder", long, 3, events["long"].append))
        while engine.partial is None:
            time.sleep(0.001)
        with engine.lock:  # between two chunks of the long prompt
            chunks_done = engine.partial[2]
            engine.submit(Job("poet", short, 3, short_sink))
        while not all(e and e[-1][0] == "done" for e in (events["short"], events["long"])):
            time.sleep(0.01)
        assert chunks_done < len(long) - 3 * 4  # the long prefill still had chunks to go
        assert events["short_done_during_prefill"] == [True]
        monkeypatch.undo()
        for name, adapter, ids in (("short", "poet", short), ("long", "coder", long)):
            text = "".join(e[1] for e in events[name] if e[0] == "text")
            assert text == reference(engine, adapter, ids, 3)
    finally:
        engine.close()


@pytest.mark.parametrize(
    "config",
    [lambda: dt.PromptTuningConfig(num_virtual_tokens=3), lambda: dt.PrefixTuningConfig(num_virtual_tokens=2)],
    ids=["prompt", "prefix"],
)
def test_prompt_learning_rows_join_a_lora_batch_exactly(adapters_dir, smol_tokenizer, tmp_path, config):
    """Virtual tokens and prefixes go in at the row's own prefill; its steps then share the batch."""
    from deltatune.serving.rows import Request as Job

    model = dt.wrap(tiny_model(len(smol_tokenizer)), config(), "virtual")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))
    model.save_pretrained(tmp_path)
    shutil.copytree(adapters_dir / "poet", tmp_path / "poet")
    engine = small_engine(smol_tokenizer, tmp_path)
    try:
        jobs = [("poet", "A quiet morning", 6), ("virtual", "Once", 6), (BASE_ADAPTER, "Numbers:", 4)]
        events = [[] for _ in jobs]
        with engine.lock:
            for (adapter, prompt, tokens), sink in zip(jobs, events, strict=True):
                engine.submit(Job(adapter, prompt_ids(engine, prompt), tokens, sink.append))
        while not all(e and e[-1][0] in ("done", "error") for e in events):
            time.sleep(0.01)
        assert any(len(step) == 3 for step in engine.steps), (list(engine.steps)[:3], [e[-1] for e in events])
        for (adapter, prompt, tokens), sink in zip(jobs, events, strict=True):
            text = "".join(e[1] for e in sink if e[0] == "text")
            assert text == reference(engine, adapter, prompt_ids(engine, prompt), tokens), (adapter, sink[-1])
    finally:
        engine.close()
