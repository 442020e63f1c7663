"""A real ``deltatune serve`` process (tiny Llama, four LoRA adapters, at most two loaded) driven by
the official openai client: continuous batching is exact, adapters load on demand, SIGTERM drains."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import deltatune as dt
from deltatune.model import DeltaModel

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

KEY = "serve-key"
ADAPTERS = ("a0", "a1", "a2", "a3")


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_llama_dir):
    adapters = tmp_path_factory.mktemp("many")
    model = dt.wrap(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), dt.LoraConfig(r=4), ADAPTERS[0])
    for name in ADAPTERS[1:]:
        model.add_adapter(name, dt.LoraConfig(r=2 + len(name), target_modules=["q_proj", "v_proj", "up_proj"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(adapters)
    command = ["--base", str(tiny_llama_dir), "--adapters", str(adapters), "--max-loaded-adapters", "2"]
    yield from spawn([*command, "--drain-timeout", "60"], tmp_path_factory, tiny_llama_dir.name)


def spawn(arguments: list[str], tmp_path_factory, base: str):
    """``deltatune serve ARGUMENTS`` on a free port; yields (process, url, base name, log file)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "deltatune", "serve", *arguments, "--port", str(port), "--api-key", KEY]
    log = (tmp_path_factory.mktemp("log") / "stderr.txt").open("w+")
    process = subprocess.Popen(
        command, env=os.environ | {"OMP_NUM_THREADS": "1"}, stderr=log, stdout=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}/v1"
    deadline, ready = time.monotonic() + 300, False  # a busy shared machine may take minutes to import torch
    while not ready and time.monotonic() < deadline and process.poll() is None:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{url}/models", headers={"Authorization": f"Bearer {KEY}"}))
            ready = True
        except OSError:
            time.sleep(0.2)
    assert ready, log.seek(0) or log.read()
    yield process, url, base, log
    if process.poll() is None:
        process.kill()
    process.wait()
    log.close()


@pytest.fixture
def client(served):
    return openai.OpenAI(base_url=served[1], api_key=KEY, max_retries=0, timeout=120)


def ask(client, model: str, prompt: str, tokens: int) -> str:
    return client.completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0).choices[0].text


def test_models_lists_every_adapter_on_disk(client, served):
    assert [m.id for m in client.models.list().data] == [served[2], *ADAPTERS]


def test_rows_joining_early_late_or_alone_get_the_tokens_they_get_alone(client, served):
    base = served[2]
    long_job, early, late = ("a0", "Once upon a time", 200), (base, "The weather is", 12), ("a1", "def main():", 6)
    alone = {job: ask(client, *job) for job in (long_job, early, late)}
    finished: dict[str, float] = {}

    def run(job, label):
        text = ask(client, *job)
        finished[label] = time.monotonic()
        return text

    with ThreadPoolExecutor(3) as pool:
        stream = client.completions.create(
            model=long_job[0], prompt=long_job[1], max_tokens=long_job[2], temperature=0, stream=True
        )
        chunks = iter(stream)
        pieces = [next(chunks).choices[0].text]  # the long row is decoding now
        early_answer = pool.submit(run, early, "early")
        pieces += [next(chunks).choices[0].text for _ in range(3)]
        late_answer = pool.submit(run, late, "late")  # joins a batch that has run for a while
        pieces += [c.choices[0].text for c in chunks]
        finished["long"] = time.monotonic()
    assert "".join(pieces) == alone[long_job]
    assert early_answer.result() == alone[early] and late_answer.result() == alone[late]
    assert finished["late"] < finished["long"] and finished["early"] < finished["long"]  # no wait for the batch


def test_adapters_load_on_demand_and_stay_exact(client):
    """Four adapters, two slots: requests spread over all of them evict and reload, all exactly."""
    jobs = [(ADAPTERS[i % 4], f"Item {i}:", 5 + i % 3) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda job: ask(client, *job), jobs))
    for job, answer in zip(jobs, answers, strict=True):
        assert answer == ask(client, *job)


def test_sigterm_drains_then_exits_zero(client, served):
    process, _, base, log = served
    stream = client.completions.create(model="a2", prompt="Count:", max_tokens=480, temperature=0, stream=True)
    chunks = iter(stream)
    first = next(chunks)
    process.send_signal(signal.SIGTERM)
    refused = None
    for _ in range(100):  # no fixed sleep: on a busy machine the long stream may end soon after the signal lands
        try:
            client.completions.create(model=base, prompt="x", max_tokens=2)  # taken: the signal has not landed yet
        except openai.APIStatusError as error:
            refused = error
            break
        time.sleep(0.02)
    assert refused is not None and refused.status_code == 503 and refused.response.headers["retry-after"]
    rest = list(chunks)
    assert rest[-1].choices[0].finish_reason == "length" and first.choices
    done = threading.Event()
    threading.Thread(target=lambda: (process.wait(), done.set()), daemon=True).start()
    assert done.wait(60), "the server did not exit after draining"
    assert process.returncode == 0, log.seek(0) or log.read()


# --- reliability: what a probe of a running server found ---------------------------------------------
@pytest.fixture(scope="module")
def fragile(tmp_path_factory, smol_tokenizer):
    """A server on a tiny Llama with 8,192 positions (long prompts, long answers), 4-token prefill
    chunks, a 1 s drain, a q,v LoRA and an all-linear one, and symlinks in and out of --adapters."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        pad_token_id=smol_tokenizer.pad_token_id,
        eos_token_id=smol_tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    base = tmp_path_factory.mktemp("long-llama")
    LlamaForCausalLM(config).save_pretrained(base)
    smol_tokenizer.save_pretrained(base)
    root = tmp_path_factory.mktemp("fragile")
    adapters, outside = root / "adapters", root / "outside"
    model = dt.wrap(LlamaForCausalLM(config), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]), "qv")
    model.add_adapter("wide", dt.LoraConfig(r=2, target_modules="all-linear"))  # after the q,v one
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(adapters)
    model.save_pretrained(outside)
    (adapters / "escape").symlink_to(outside / "qv")  # present at start-up, leaves the directory
    (adapters / "alias").symlink_to(adapters / "qv")  # stays inside: served
    arguments = ["--base", str(base), "--adapters", str(adapters), "--prefill-chunk", "4", "--drain-timeout", "1"]
    arguments += ["--max-tokens-limit", "8000", "--max-loaded-adapters", "2"]
    for process, url, name, log in spawn(arguments, tmp_path_factory, base.name):
        yield SimpleNamespace(process=process, url=url, base=name, log=log, dir=base, adapters=adapters, root=root)


def call(url: str, path: str, body: dict | None = None, method: str = "POST") -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    request = urllib.request.Request(f"{url}{path}", data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def complete(url: str, model: str, prompt: str, tokens: int) -> tuple[int, dict]:
    return call(url, "/completions", {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0})


def wait_for_log(log, text: str, seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        log.seek(0)
        found = [line for line in log.read().splitlines() if text in line]
        if found:
            return found[-1]
        time.sleep(0.05)
    log.seek(0)
    raise AssertionError(f"no {text!r} in the server's log:\n{log.read()[-3000:]}")


def test_every_way_in_refuses_symlinks_that_leave_the_directory(fragile):
    listed = call(fragile.url, "/models", method="GET")[1]
    assert [m["id"] for m in listed["data"]] == [fragile.base, "alias", "qv", "wide"]  # no 'escape'
    assert (
        "leaves the adapters directory"
        in call(fragile.url, "/adapters", {"name": "e", "path": "escape"})[1]["error"]["message"]
    )
    assert complete(fragile.url, "escape", "Hi", 2)[0] == 404
    (fragile.adapters / "late").symlink_to(fragile.root / "outside" / "wide")  # added after start-up
    assert complete(fragile.url, "late", "Hi", 2)[0] == 404
    assert complete(fragile.url, "alias", "Hi", 2)[0] == 200


def test_a_nul_byte_in_an_adapter_path_is_a_clear_400(fragile):
    status, body = call(fragile.url, "/adapters", {"name": "n", "path": "qv\u0000/x"})
    assert status == 400 and "NUL byte" in body["error"]["message"] and body["error"]["param"] == "path"


def test_a_deleted_adapter_stays_deleted_until_added_again(fragile):
    assert call(fragile.url, "/adapters/alias", method="DELETE")[0] == 200
    assert complete(fragile.url, "alias", "Hi", 2)[0] == 404  # its folder is still there: not loaded again
    assert "alias" not in [m["id"] for m in call(fragile.url, "/models", method="GET")[1]["data"]]
    assert call(fragile.url, "/adapters", {"name": "alias", "path": "qv"})[0] == 200
    assert complete(fragile.url, "alias", "Hi", 2)[0] == 200


def test_an_all_linear_adapter_requested_after_another_is_loaded(fragile, smol_tokenizer):
    prompt = "The weather is"
    assert complete(fragile.url, "qv", prompt, 4)[0] == 200
    status, body = complete(fragile.url, "wide", prompt, 6)
    assert status == 200, body
    model = DeltaModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fragile.dir), fragile.adapters / "wide")
    ids = torch.tensor([smol_tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.eval().generate(input_ids=ids, max_new_tokens=6, do_sample=False)
    assert body["choices"][0]["text"] == smol_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_a_non_streaming_client_that_disconnects_frees_its_row(fragile):
    host, port = fragile.url.split("//")[1].split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    body = {"model": "qv", "prompt": "Count:", "max_tokens": 8000, "temperature": 0}
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/completions", json.dumps(body), headers)
    time.sleep(0.5)
    connection.close()
    line = wait_for_log(fragile.log, "a client went away")
    assert int(re.search(r"\((\d+) tokens", line).group(1)) < 8000
    assert complete(fragile.url, fragile.base, "Hi", 2)[0] == 200


def test_a_short_request_finishes_during_a_long_prefill(fragile):
    """4,000 prompt tokens in 4-token chunks: a 3-token request sent meanwhile is answered before
    the long prompt's first token."""
    finished: dict[str, float] = {}

    def long_stream() -> None:
        body = {"model": "qv", "prompt": "word " * 4000, "max_tokens": 2, "temperature": 0, "stream": True}
        request = urllib.request.Request(
            f"{fragile.url}/completions",
            json.dumps(body).encode(),
            {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=300) as answer:
            answer.readline()  # the first event: the long prompt's first token
            finished["long"] = time.monotonic()
            answer.read()

    thread = threading.Thread(target=long_stream)
    thread.start()
    time.sleep(0.3)  # the long prompt is being prefilled
    status, body = complete(fragile.url, "wide", "Hi", 3)
    finished["short"] = time.monotonic()
    thread.join(300)
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert finished["short"] < finished["long"]


def test_drain_timeout_answers_open_requests_with_the_documented_503(fragile):
    """Last (it stops the server): requests that outlast --drain-timeout get 503 shutting_down,
    as JSON or as an error event then [DONE]; the log counts them all."""
    answers: dict[str, Any] = {}
    body = {"model": "qv", "prompt": "Count:", "max_tokens": 8000, "temperature": 0}
    whole = threading.Thread(target=lambda: answers.update(whole=call(fragile.url, "/completions", body)))
    whole.start()
    request = urllib.request.Request(
        f"{fragile.url}/completions",
        json.dumps(body | {"stream": True}).encode(),
        {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as stream:
        assert stream.readline().startswith(b"data: ")  # decoding: both are open now
        fragile.process.send_signal(signal.SIGTERM)
        events = [line for line in stream.read().decode().splitlines() if line.startswith("data: ")]
    whole.join(60)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "shutting_down"
    status, error = answers["whole"]
    assert status == 503 and error["error"]["code"] == "shutting_down" and error["error"]["type"] == "server_error"
    assert "2 requests still open" in wait_for_log(fragile.log, "drain timeout")
    assert fragile.process.wait(60) == 0
