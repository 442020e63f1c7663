"""vLLM-compatible adapter endpoints (``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``,
``/v1/models`` with ``parent``/``root``), with the request bodies vLLM's docs and clients send."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from test_server import KEY, adapters_dir, running, tiny_model  # noqa: F401 (adapters_dir: a fixture)

pytest.importorskip("uvicorn")
from deltatune.serving import Engine


def call(url: str, path: str, body: dict | None = None) -> tuple[int, str, str]:
    """One request: the status, the content type and the raw body."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    request = urllib.request.Request(
        f"{url}{path}", data=data, headers=headers, method="GET" if body is None else "POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.headers.get("content-type", ""), answer.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read().decode()


def vllm_error(answer: tuple[int, str, str], status: int, kind: str, message: str) -> None:
    """vLLM's error body: {"error": {"message", "type", "param", "code"}}, code the HTTP status."""
    assert answer[0] == status, answer
    error = json.loads(answer[2])["error"]
    assert error["type"] == kind and error["code"] == status and message in error["message"], error


@pytest.fixture(scope="module")
def server(adapters_dir, smol_tokenizer):  # noqa: F811
    engine = Engine(tiny_model(len(smol_tokenizer)), smol_tokenizer, "tiny", adapters_dir)
    with running(engine) as url:
        yield engine, url, adapters_dir


def completion(url: str, model: str) -> str:
    answer = call(url, "/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 5, "temperature": 0})
    assert answer[0] == 200, answer
    return json.loads(answer[2])["choices"][0]["text"]


def test_load_and_unload_as_vllm_answers(server):
    engine, url, directory = server
    root = url.removesuffix("/v1")
    answer = call(root, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": str(directory / "poet")})
    assert answer[:1] == (200,) and answer[2] == "Success: LoRA adapter 'sql' added successfully.", answer
    assert completion(root, "sql") == completion(root, "poet")
    vllm_error(
        call(root, "/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "poet"}),
        400,
        "InvalidUserInput",
        "The lora adapter 'sql' has already been loaded.",
    )
    answer = call(root, "/v1/unload_lora_adapter", {"lora_name": "sql"})
    assert answer[:1] == (200,) and answer[2] == "Success: LoRA adapter 'sql' removed successfully.", answer
    assert "sql" not in engine.adapters
    vllm_error(
        call(root, "/v1/unload_lora_adapter", {"lora_name": "sql"}),
        404,
        "NotFoundError",
        "The lora adapter 'sql' cannot be found.",
    )
    status, _, body = call(root, "/v1/completions", {"model": "sql", "prompt": "Hi", "max_tokens": 2})
    assert status == 404, body


def test_load_errors_use_vllm_codes(server):
    _, url, directory = server
    root = url.removesuffix("/v1")
    vllm_error(
        call(root, "/v1/load_lora_adapter", {"lora_name": "x"}),
        400,
        "InvalidUserInput",
        "Both 'lora_name' and 'lora_path' must be provided.",
    )
    (directory / "empty").mkdir(exist_ok=True)
    vllm_error(
        call(root, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "empty"}),
        404,
        "NotFoundError",
        "No adapter found",
    )
    vllm_error(
        call(root, "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}), 400, "BadRequestError", "leaves"
    )
    vllm_error(call(root, "/v1/unload_lora_adapter", {}), 400, "InvalidUserInput", "needs to be provided")


def test_models_list_parent_and_root_as_vllm(server):
    engine, url, directory = server
    cards = {card["id"]: card for card in json.loads(call(url, "/models")[2])["data"]}
    base = cards.pop("tiny")
    assert base["parent"] is None and base["root"] == "tiny" and base["max_model_len"] == engine.context_length
    assert set(cards) >= {"poet", "coder"}
    for name in ("poet", "coder"):
        assert cards[name]["parent"] == "tiny" and cards[name]["root"] == str((directory / name).resolve())


def test_the_openai_client_drives_the_vllm_routes(server):
    """Where the openai client applies: its generic post for the two routes (the plain-text answers, vLLM's
    error body as the client parses it), models.list with parent and root, a completion of the added adapter."""
    openai = pytest.importorskip("openai")
    _, url, directory = server
    client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
    added = client.post("/load_lora_adapter", body={"lora_name": "verse", "lora_path": "poet"}, cast_to=str)
    assert added == "Success: LoRA adapter 'verse' added successfully."
    card = next(m for m in client.models.list().data if m.id == "verse")
    assert card.model_extra == {"parent": "tiny", "root": str((directory / "poet").resolve())}
    text = client.completions.create(model="verse", prompt="Hello", max_tokens=5, temperature=0).choices[0].text
    assert text == completion(url.removesuffix("/v1"), "poet")
    removed = client.post("/unload_lora_adapter", body={"lora_name": "verse"}, cast_to=str)
    assert removed == "Success: LoRA adapter 'verse' removed successfully."
    with pytest.raises(openai.NotFoundError) as raised:
        client.post("/unload_lora_adapter", body={"lora_name": "verse"}, cast_to=str)
    assert raised.value.body == {
        "message": "The lora adapter 'verse' cannot be found.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    with pytest.raises(openai.BadRequestError) as raised:
        client.post("/load_lora_adapter", body={"lora_name": "verse"}, cast_to=str)
    assert raised.value.type == "InvalidUserInput" and raised.value.body["code"] == 400


# --- GET /metrics ------------------------------------------------------------------------------------
def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics (no API key, as Prometheus scrapes), parsed by prometheus_client."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as answer:
        assert answer.headers["content-type"].startswith("text/plain")
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_metrics_move_as_requests_run(adapters_dir, smol_tokenizer):  # noqa: F811
    pytest.importorskip("prometheus_client")
    engine = Engine(tiny_model(len(smol_tokenizer)), smol_tokenizer, "tiny", adapters_dir, max_loaded=1)
    with running(engine) as url:
        root = url.removesuffix("/v1")
        before = scrape(root)
        assert value(before, "vllm:num_requests_running") == 0 and value(before, "vllm:generation_tokens_total") == 0
        prompt = len(smol_tokenizer("Hello")["input_ids"])
        body = {"prompt": "Hello", "max_tokens": 5, "temperature": 0}
        for model in ("poet", "coder", "poet"):
            answer = json.loads(call(url, "/completions", {"model": model, **body})[2])
            assert answer["usage"]["completion_tokens"] == 5
        after = scrape(root)
        assert value(after, "vllm:generation_tokens_total") == 15
        assert value(after, "vllm:prompt_tokens_total") == 3 * prompt
        assert value(after, "vllm:time_to_first_token_seconds_count") == 3
        assert value(after, "vllm:inter_token_latency_seconds_count") == 12  # 4 gaps per request
        assert value(after, "vllm:e2e_request_latency_seconds_count") == 3
        assert value(after, "vllm:request_success_total", finished_reason="length") == 3
        assert (
            value(after, "deltatune:adapter_loads_total") == 3
            and value(after, "deltatune:adapter_evictions_total") == 2
        )
        assert value(after, "deltatune:adapters_loaded") == 1
        with engine.lock:  # the worker paused: a request waits, and shows in the gauges
            status = {}
            thread = threading.Thread(
                target=lambda: status.update(a=call(url, "/completions", {"model": "coder", **body}))
            )
            thread.start()
            for _ in range(200):
                paused = scrape(root)
                if value(paused, "vllm:num_requests_waiting") == 1:
                    break
                time.sleep(0.05)
            assert value(paused, "vllm:num_requests_waiting") == 1
            assert value(paused, "vllm:lora_requests_info", waiting_lora_adapters="coder", max_lora="1") > 0
        thread.join(60)
        assert status["a"][0] == 200


# --- per-request mixes (LoRAX's merged_adapters) --------------------------------------------------------
def mixed_reference(directory, vocab: int, tokenizer, prompt: str, tokens: int, **options) -> str:
    """The mix computed by the library itself (add_weighted_adapter), greedy, alone."""
    return library_mix(directory, {"poet": 0.7, "coder": -0.4}, vocab, tokenizer, prompt, tokens, **options)


def library_mix(directory, parts: dict[str, float], vocab: int, tokenizer, prompt: str, tokens: int, **options) -> str:
    """``parts`` (adapter: weight, folders in ``directory``) combined by the library's add_weighted_adapter,
    greedy, alone."""
    import torch

    import deltatune as dt

    model = dt.DeltaModel(tiny_model(vocab))
    for name in parts:
        model.load_adapter(directory / name, name)
    model.add_weighted_adapter(list(parts), list(parts.values()), "mix", **options)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, adapter_name="mix", max_new_tokens=tokens, do_sample=False, pad_token_id=0)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("strategy", ["linear", "svd"])
def test_a_mix_equals_the_library_combination(server, smol_tokenizer, strategy):
    engine, url, directory = server
    mix = {"ids": ["poet", "coder"], "weights": [0.7, -0.4], "merge_strategy": strategy}
    body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 8, "temperature": 0, "merged_adapters": mix}
    status, _, text = call(url, "/completions", body)
    assert status == 200, text
    got = json.loads(text)["choices"][0]["text"]
    expected = mixed_reference(
        directory, len(smol_tokenizer), smol_tokenizer, "Once upon", 8, combination_type=strategy
    )
    assert got == expected
    plain = json.loads(call(url, "/completions", {k: v for k, v in body.items() if k != "merged_adapters"})[2])
    assert got != plain["choices"][0]["text"]  # the mix changes the base's text
    loads = engine.store.loads
    assert json.loads(call(url, "/completions", body)[2])["choices"][0]["text"] == got
    assert engine.store.loads == loads  # computed once, then cached as a loaded adapter


@pytest.fixture(scope="module")
def same_layers(smol_tokenizer, tmp_path_factory):
    """A server of two LoRA adapters of one rank on the same layers, so that every strategy combines them
    differently (poet and coder share no layer: there, svd and linear give one result)."""
    import torch

    import deltatune as dt

    directory = tmp_path_factory.mktemp("same-layers")
    lora = dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = dt.wrap(tiny_model(len(smol_tokenizer)), lora, "left")
    model.add_adapter("right", lora)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    model.save_pretrained(directory)
    with running(Engine(tiny_model(len(smol_tokenizer)), smol_tokenizer, "tiny", directory)) as url:
        yield url, directory


def test_each_strategy_equals_the_library_combination(same_layers, smol_tokenizer):
    url, directory = same_layers
    weights, expected = {"left": 0.8, "right": 0.6}, {}
    for strategy in ("linear", "cat", "svd", "ties", "magnitude_prune"):
        options = {"combination_type": strategy}
        mix = {"ids": list(weights), "weights": list(weights.values()), "merge_strategy": strategy}
        if strategy in ("ties", "magnitude_prune"):  # what serving/mixes.build passes these
            mix["density"] = 0.5
            options |= {"density": 0.5, "majority_sign_method": "total"}
        body = {"model": "tiny", "prompt": "Once upon", "max_tokens": 12, "temperature": 0, "merged_adapters": mix}
        status, _, text = call(url, "/completions", body)
        assert status == 200, text
        expected[strategy] = library_mix(
            directory, weights, len(smol_tokenizer), smol_tokenizer, "Once upon", 12, **options
        )
        assert json.loads(text)["choices"][0]["text"] == expected[strategy], strategy
    # a server that ran another strategy than asked would fail above: these give four texts (cat and linear
    # coincide here, both exact sums of the two deltas)
    assert len({expected[s] for s in ("linear", "svd", "ties", "magnitude_prune")}) == 4, expected


def test_mix_requests_are_checked(server):
    _, url, _ = server
    base = {"prompt": "Hi", "max_tokens": 2}
    cases = [
        ({"model": "poet", "merged_adapters": {"ids": ["poet"]}}, 400, "base model's name"),
        ({"model": "tiny", "merged_adapters": {"ids": ["nope"]}}, 404, "'nope' does not exist"),
        ({"model": "tiny", "merged_adapters": {"ids": ["poet"], "merge_strategy": "avg"}}, 400, "merge_strategy"),
        ({"model": "tiny", "merged_adapters": {"ids": ["poet", "coder"], "weights": [1.0]}}, 400, "one weight per id"),
        # ties mixes A and B entry by entry: poet (r=4) and coder (r=2) cannot (the library's own check)
        ({"model": "tiny", "merged_adapters": {"ids": ["poet", "coder"], "merge_strategy": "ties"}}, 400, "same r"),
    ]
    for body, status, message in cases:
        answer = call(url, "/completions", base | body)
        assert answer[0] == status and message in json.loads(answer[2])["error"]["message"], answer
