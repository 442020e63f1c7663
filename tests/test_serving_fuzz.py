"""Fuzzing the server's API with hypothesis: whatever the body, headers or route, no 5xx, no crash,
and every refusal an OpenAI-style error body."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_server import KEY, adapters_dir, running, tiny_model  # noqa: E402, F401  (adapters_dir: a fixture)

from deltatune.serving import Engine  # noqa: E402

FIELDS = ["model", "max_tokens", "prompt", "messages", "max_completion_tokens", "temperature", "top_p", "n"]
FIELDS += ["stop", "stream", "seed", "logprobs", "echo", "stream_options", "user", "frequency_penalty", "unknown_x"]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([0, 1, 2, 5, 64, 65, 1e-45, 1e23, 0.5, -1, 2**63]),
    st.text(max_size=40),
    st.sampled_from(["tiny", "poet", "__base__", "keys", "", "\u202e\U0001f600", "x" * 5000]),
)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner), max_leaves=8
)
messages = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot", 3]), "content": st.text(max_size=30)}),
    max_size=3,
)
bodies = st.fixed_dictionaries(
    {"model": st.sampled_from(["tiny", "poet", "nope"]), "max_tokens": st.integers(0, 70)},
    optional={name: values for name in FIELDS[2:]} | {"messages": messages, "prompt": st.text(max_size=200)},
)
headers = st.fixed_dictionaries(
    {},
    optional={
        "Authorization": st.sampled_from([f"Bearer {KEY}", "Bearer wrong", "", "Basic abc", f"bearer {KEY}"]),
        "Content-Type": st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8", ""]),
    },
)


@pytest.fixture(scope="module")
def url(adapters_dir, smol_tokenizer, tmp_path_factory):  # noqa: F811
    outside = tmp_path_factory.mktemp("outside")
    (outside / "poet").symlink_to(adapters_dir / "poet")
    (adapters_dir / "escape").symlink_to(outside)  # leaves the directory
    (adapters_dir / "inner").symlink_to(adapters_dir / "coder")  # stays inside
    engine = Engine(tiny_model(len(smol_tokenizer)), smol_tokenizer, "tiny", adapters_dir, max_queue=64)
    with running(engine, max_tokens_limit=8) as base:
        yield base


def send(url: str, path: str, method: str, body: bytes | None, sent: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(f"{url}{path}", data=body, headers=sent, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def check(status: int, raw: bytes, streamed: bool) -> None:
    assert status < 500, raw[:500]
    if status == 200:
        if streamed:
            assert raw.rstrip().endswith(b"data: [DONE]"), raw[-200:]
        else:
            assert json.loads(raw)["choices"]
        return
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, sent=headers, chat=st.booleans())
def test_fuzzed_requests_get_answers_or_openai_errors(url, body, sent, chat):
    path = "/chat/completions" if chat else "/completions"
    default = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, raw = send(url, path, "POST", json.dumps(body).encode(), default | sent)
    check(status, raw, streamed=body.get("stream") is True)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.sampled_from(["/completions", "/models", "/adapters", "/adapters/poet2", "/x", "/../etc", "/%00"]),
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "OPTIONS"]),
    raw=st.one_of(st.none(), st.binary(max_size=300), st.just(b"[" * 50_000 + b"]" * 50_000)),
)
def test_fuzzed_routes_methods_and_raw_bodies(url, path, method, raw):
    sent = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    status, answer = send(url, path, method, raw if method != "GET" else None, sent)
    if status == 200:  # GET /models, or a body that happens to be a valid request
        assert json.loads(answer)
    else:
        check(status, answer, streamed=False)


def expected_inside(root: Path, path: str) -> bool:
    """The reference rule, computed with os.path: the path, symlinks followed, stays under root
    and holds an adapter (a NUL byte is no path at all)."""
    if "\x00" in path:
        return False
    real = os.path.realpath(os.path.join(root, path))
    return os.path.commonpath([real, os.path.realpath(root)]) == os.path.realpath(root) and os.path.isfile(
        os.path.join(real, "adapter_config.json")
    )


names = iter(f"fz{i}" for i in range(10**6))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.one_of(
        st.text(max_size=30),
        st.sampled_from(["poet", "./coder", "poet/../coder", "../poet", "/etc", "poet\x00", "\x00", "escape", "inner"]),
        st.lists(st.sampled_from(["poet", "..", ".", "escape", "inner", "coder", "\x00"]), max_size=4).map("/".join),
    )
)
def test_fuzzed_adapter_paths_load_only_inside_the_directory(url, adapters_dir, path):  # noqa: F811
    sent = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    name = next(names)
    status, answer = send(url, "/adapters", "POST", json.dumps({"name": name, "path": path}).encode(), sent)
    if status != 200:
        check(status, answer, streamed=False)
    assert (status == 200) == expected_inside(adapters_dir, path), (path, answer)
    if status == 200:  # and a deletion sticks: the name is no model any more
        assert send(url, f"/adapters/{name}", "DELETE", None, sent)[0] == 200
        body = json.dumps({"model": name, "prompt": "x", "max_tokens": 1}).encode()
        assert send(url, "/completions", "POST", body, sent)[0] == 404
