"""The OpenAI-compatible HTTP API of ``deltatune serve`` (FastAPI), over :class:`Engine`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``"stream": true`` for
server-sent events), ``GET /v1/models``, ``GET /metrics`` (Prometheus, serving/metrics.py), vLLM's
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` (serving/vllm_api.py), and ``POST /v1/adapters`` / ``DELETE
/v1/adapters/{name}`` to add and remove adapters at run time (a deleted adapter stays deleted,
even with its folder still in ``--adapters``, until it is added again by ``POST``; a restart
scans the folder afresh). The ``model`` field picks the adapter; the base model's own name
means no adapter. Every error, unknown routes included, uses
OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, so OpenAI clients show them
as they are. Fields are checked strictly (``"5"`` is not a number) and options the server does
not act on (``logprobs``, penalties...) are refused rather than ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from deltatune.constants import BASE_ADAPTER
from deltatune.serving.adapters import locate, name_problem
from deltatune.serving.bodies import UNSUPPORTED, AdapterBody, ChatBody, CompletionBody, Sampling
from deltatune.serving.engine import Engine
from deltatune.serving.errors import ApiError
from deltatune.serving.metrics import CONTENT_TYPE
from deltatune.serving.mixes import mix_name
from deltatune.serving.reply import Reply
from deltatune.serving.rows import QueueFull, asyncio_sink
from deltatune.serving.rows import Request as Job
from deltatune.serving.vllm_api import model_cards, vllm_routes

log = logging.getLogger("deltatune.serve")


@dataclass
class Limits:
    """What one request may ask for (``None``: no limit beyond the model's context)."""

    max_tokens: int = 4096
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    max_streams_per_key: int | None = None
    max_stop: int = 16  # stop strings per request
    max_stop_chars: int = 256  # characters per stop string


def create_app(
    engine: Engine, api_key: str | None = None, max_tokens_limit: int = 4096, limits: Limits | None = None
) -> FastAPI:
    """The OpenAI-compatible app over ``engine``: the key/drain gate, errors in OpenAI's shape, the completion,
    model, adapter and metrics routes, and vLLM's adapter routes."""
    limits = limits or Limits(max_tokens=max_tokens_limit)
    app = FastAPI(title="deltatune", docs_url=None, redoc_url=None)
    app.state.draining = False
    _gate(app, api_key)
    _error_handlers(app)
    _completion_routes(app, engine, limits)
    _adapter_routes(app, engine, limits)
    vllm_routes(app, engine, lambda request, model: parse(request, model, limits))
    return app


def _gate(app: FastAPI, api_key: str | None) -> None:
    """While draining, every request gets 503; with a key, every request but a metrics scrape needs it."""

    @app.middleware("http")
    async def gate(request: Request, call_next: Any) -> Any:
        if app.state.draining:
            return ApiError(
                503, "the server is shutting down; retry shortly", code="shutting_down", headers={"Retry-After": "5"}
            ).response()
        given = request.headers.get("authorization", "")
        scrape = request.url.path == "/metrics"  # Prometheus scrapes without a key, as from vLLM
        if api_key and not scrape and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return ApiError(
                401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"
            ).response()
        return await call_next(request)


def _error_handlers(app: FastAPI) -> None:
    """Every error as OpenAI's ``{"error": {...}}`` body, never FastAPI's own shape or a stack trace."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
        return ApiError(err.status_code, message.get(err.status_code, str(err.detail)), headers=err.headers).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return ApiError(400, f"invalid request: {err.errors()[0].get('msg', err)}").response()

    @app.exception_handler(Exception)
    async def any_error(_: Request, err: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(err).__name__}", code="internal_error").response()


def _completion_routes(app: FastAPI, engine: Engine, limits: Limits) -> None:
    """/v1/models, /metrics, /v1/completions and /v1/chat/completions."""
    streams: dict[str, int] = {}  # open streams per API key, for --max-streams-per-key

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": model_cards(engine)}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await parse(request, CompletionBody, limits)
        return await respond(request, engine, body, body.prompt, False, limits, streams)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await parse(request, ChatBody, limits)
        messages = [m.model_dump() for m in body.messages]
        try:
            prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # no template, or one that refuses these roles
            raise ApiError(400, f"the chat template cannot render these messages: {err}", "messages") from err
        return await respond(request, engine, body, prompt, True, limits, streams)


def _adapter_routes(app: FastAPI, engine: Engine, limits: Limits) -> None:
    """POST /v1/adapters loads an adapter between steps; DELETE /v1/adapters/NAME unloads one."""

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> dict[str, Any]:
        body = await parse(request, AdapterBody, limits)
        problem = name_problem(body.name, engine.base_name)
        if problem:
            raise ApiError(400, problem, "name")
        if body.name in engine.adapters:
            raise ApiError(409, f"adapter {body.name!r} is loaded already; DELETE it first", "name", "adapter_exists")
        path = inside(engine.adapters_dir, body.path)
        try:
            await asyncio.wrap_future(engine.load_adapter(body.name, path))
        except Exception as err:
            raise ApiError(400, f"cannot load adapter from {body.path!r}: {err}", "path") from err
        return {"id": body.name, "object": "model", "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str) -> dict[str, Any]:
        if name not in engine.adapters:
            raise ApiError(404, f"no adapter named {name!r}", "name", "model_not_found")
        await asyncio.wrap_future(engine.delete_adapter(name))
        return {"id": name, "object": "model", "deleted": True}


async def read_body(request: Request, cap: int) -> bytes:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise ApiError(415, f"send the body as JSON with 'Content-Type: application/json', not {kind or 'none'!r}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > cap:
        raise ApiError(413, f"the body has {declared} bytes; this server takes at most {cap}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > cap:
            raise ApiError(413, f"the body is larger than this server's limit of {cap} bytes", code="body_too_large")
    return bytes(body)


async def parse(request: Request, model: type[BaseModel], limits: Limits) -> Any:
    raw = await read_body(request, limits.max_body_bytes)
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:
        reason = "it is nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise ApiError(400, f"the body is not valid JSON: {reason}") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    for name, harmless in UNSUPPORTED.items():
        if name in data and data[name] not in harmless:
            raise ApiError(400, f"{name} is not supported by this server; leave it out", name, "unsupported_parameter")
    try:
        return model.model_validate(data)
    except (ValidationError, RecursionError) as err:
        first = err.errors()[0] if isinstance(err, ValidationError) else {"loc": (), "msg": "nested too deeply"}
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param) from None


def inside(root: Path | None, relative: str) -> Path:
    """``relative`` under ``root``, refusing anything that leaves it (``..``, absolute paths,
    symlinks), by the rule the start-up scan and on-demand loads use too (adapters.locate)."""
    if root is None:
        raise ApiError(400, "the server was started without --adapters, so it has no directory to load from", "path")
    try:
        return locate(root, relative)
    except ValueError as err:
        raise ApiError(400, str(err), "path") from None


def stop_strings(stop: str | list[str] | None, limits: Limits) -> list[str]:
    """The non-empty stop strings ('' stops nothing, in the string form as in the list form)."""
    given = [stop] if isinstance(stop, str) else list(stop or [])
    if len(given) > limits.max_stop:
        raise ApiError(400, f"stop has {len(given)} strings; at most {limits.max_stop} are allowed", "stop")
    if any(len(s) > limits.max_stop_chars for s in given):
        raise ApiError(400, f"a stop string is longer than {limits.max_stop_chars} characters", "stop")
    return [s for s in given if s]


def checked(engine: Engine, body: Sampling, prompt: str, chat: bool, limits: Limits) -> Job:
    """The request as the engine takes it, after every check that needs no model run."""
    adapter, mix = BASE_ADAPTER if body.model == engine.base_name else body.model, None
    if body.merged_adapters is not None:
        adapter, mix = checked_mix(engine, body)
    elif body.model != engine.base_name and not engine.servable(body.model):  # '__base__' is no model name
        names = ", ".join([engine.base_name, *engine.adapters][:20])
        raise ApiError(
            404, f"the model {body.model!r} does not exist; this server has: {names}", "model", "model_not_found"
        )
    given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = given if given is not None else min(256 if chat else 16, limits.max_tokens)  # OpenAI's: 16
    if not 1 <= max_tokens <= limits.max_tokens:
        raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}", "max_tokens")
    stop = stop_strings(body.stop, limits)
    ids = engine.tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
    param = "messages" if chat else "prompt"
    if not ids:
        raise ApiError(400, "the prompt is empty", param)
    if limits.max_prompt_tokens is not None and len(ids) > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {len(ids)} tokens; at most {limits.max_prompt_tokens} are allowed", param)
    if len(ids) + max_tokens > engine.context_length:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: more than the model's context of "
            f"{engine.context_length} tokens",
            param,
            "context_length_exceeded",
        )
    job = Job(adapter, ids, max_tokens, lambda _: None, stop, body.temperature, body.top_p, body.seed)
    job.mix = mix
    return job


def checked_mix(engine: Engine, body: Sampling) -> tuple[str, dict[str, Any]]:
    """The name and spec of the request's mix; it goes with the base model's name, of served adapters."""
    given = body.merged_adapters
    if body.model != engine.base_name:
        raise ApiError(400, f"merged_adapters goes with the base model's name {engine.base_name!r} as model", "model")
    problem = given.problem()
    if problem:
        raise ApiError(400, *problem)
    for name in given.ids:
        if not engine.servable(name):
            raise ApiError(404, f"the adapter {name!r} does not exist", "merged_adapters.ids", "model_not_found")
    spec = given.spec()
    return mix_name(spec), spec


async def respond(
    request: Request, engine: Engine, body: Sampling, prompt: str, chat: bool, limits: Limits, streams: dict[str, int]
) -> Any:
    job = checked(engine, body, prompt, chat, limits)
    events: asyncio.Queue = asyncio.Queue()
    job.emit = asyncio_sink(asyncio.get_running_loop(), events)
    key = request.headers.get("authorization") or (request.client.host if request.client else "")
    if body.stream and limits.max_streams_per_key is not None and streams.get(key, 0) >= limits.max_streams_per_key:
        raise ApiError(
            429, f"at most {limits.max_streams_per_key} streams at once per API key", code="too_many_streams"
        )
    try:
        engine.submit(job)
    except QueueFull as err:
        raise ApiError(429, str(err), code="queue_full", headers={"Retry-After": "1"}) from err
    reply = Reply(body.model, chat, len(job.prompt_ids))
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        streams[key] = streams.get(key, 0) + 1
        return StreamingResponse(
            counted(reply.stream(events, job, usage), streams, key), media_type="text/event-stream"
        )
    gone = asyncio.create_task(disconnected(request))
    whole = asyncio.create_task(collect(events, reply))
    try:
        await asyncio.wait({gone, whole}, return_when=asyncio.FIRST_COMPLETED)
        if not whole.done():  # the client went away: nobody reads an answer
            log.info("a client went away before its answer: its request stops (%d tokens generated)", job.tokens)
            return Response(status_code=499)
        return whole.result()
    finally:
        job.cancel()  # a client gone before the end frees its row at the next step
        gone.cancel()
        whole.cancel()


async def disconnected(request: Request) -> None:
    """Return when the client closes its connection. A non-streaming request has no write that
    would fail, so this watches the connection itself (as Starlette does for streams)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(events: asyncio.Queue, reply: Reply) -> dict[str, Any]:
    """The whole answer once the row has finished; its error as an :class:`ApiError`."""
    text = ""
    while True:
        event = await events.get()
        if event[0] == "text":
            text += event[1]
        elif event[0] == "error":
            raise ApiError(event[2], event[1], code=event[3])
        else:
            return reply.whole(text, event[1], event[2])


async def counted(chunks: AsyncIterator[str], streams: dict[str, int], key: str) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        streams[key] -= 1
        if not streams[key]:
            with contextlib.suppress(KeyError):
                del streams[key]
