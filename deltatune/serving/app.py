"""The OpenAI-compatible HTTP API of ``deltatune serve`` (FastAPI), over :class:`Engine`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (``"stream": true`` for
server-sent events), ``GET /v1/models``, and ``POST /v1/adapters`` / ``DELETE
/v1/adapters/{name}`` to load and remove adapters at run time. The ``model`` field picks the
adapter; the base model's own name means no adapter. Errors use OpenAI's body,
``{"error": {"message", "type", "param", "code"}}``, so OpenAI clients show them as they are.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from deltatune.constants import ADAPTER_NAME, BASE_ADAPTER
from deltatune.serving.batcher import Engine, QueueFull, asyncio_sink
from deltatune.serving.batcher import Request as Job


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        body = {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI options we do not act on are accepted, as vLLM does
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None


class CompletionBody(Sampling):
    prompt: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)


class AdapterBody(BaseModel):
    name: str
    path: str


def create_app(engine: Engine, api_key: str | None = None, max_tokens_limit: int = 4096) -> FastAPI:
    app = FastAPI(title="deltatune", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def check_key(request: Request, call_next: Any) -> Any:
        given = request.headers.get("authorization", "")
        if api_key and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return ApiError(
                401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key"
            ).response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [engine.base_name, *engine.adapters]
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "deltatune"} for n in names],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await parse(request, CompletionBody)
        return await respond(engine, body, body.prompt, chat=False, limit=max_tokens_limit)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await parse(request, ChatBody)
        messages = [m.model_dump() for m in body.messages]
        try:
            prompt = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # no template, or one that refuses these roles
            raise ApiError(400, f"the chat template cannot render these messages: {err}", "messages") from err
        return await respond(engine, body, prompt, chat=True, limit=max_tokens_limit)

    @app.post("/v1/adapters")
    async def load_adapter(request: Request) -> dict[str, Any]:
        body = await parse(request, AdapterBody)
        if not ADAPTER_NAME.fullmatch(body.name) or body.name in (engine.base_name, BASE_ADAPTER):
            raise ApiError(
                400, f"adapter name {body.name!r} must be letters, digits, '_' or '-' and not the base's", "name"
            )
        if body.name in engine.adapters:
            raise ApiError(409, f"adapter {body.name!r} is loaded already; DELETE it first", "name", "adapter_exists")
        path = inside(engine.adapters_dir, body.path)
        try:
            await asyncio.to_thread(engine.load_adapter, body.name, path)
        except Exception as err:
            raise ApiError(400, f"cannot load adapter from {body.path!r}: {err}", "path") from err
        return {"id": body.name, "object": "model", "loaded": True}

    @app.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str) -> dict[str, Any]:
        if name not in engine.adapters:
            raise ApiError(404, f"no adapter named {name!r}", "name", "model_not_found")
        await asyncio.to_thread(engine.delete_adapter, name)
        return {"id": name, "object": "model", "deleted": True}

    return app


async def parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        data = json.loads(await request.body())
    except ValueError as err:
        raise ApiError(400, f"the body is not valid JSON: {err}") from err
    try:
        return model.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param) from err


def inside(root: Path | None, relative: str) -> Path:
    """``relative`` under ``root``, refusing anything that leaves it (``..``, absolute paths, symlinks)."""
    if root is None:
        raise ApiError(400, "the server was started without --adapters, so it has no directory to load from", "path")
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise ApiError(400, f"path {relative!r} leaves the adapters directory", "path")
    if not (path / "adapter_config.json").is_file():
        raise ApiError(400, f"no adapter_config.json in {relative!r}", "path")
    return path


async def respond(engine: Engine, body: Sampling, prompt: str, chat: bool, limit: int) -> Any:
    adapter = BASE_ADAPTER if body.model == engine.base_name else body.model
    if adapter != BASE_ADAPTER and adapter not in engine.adapters:
        names = ", ".join([engine.base_name, *engine.adapters])
        raise ApiError(
            404, f"the model {body.model!r} does not exist; this server has: {names}", "model", "model_not_found"
        )
    given = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = given if given is not None else 256 if chat else 16  # OpenAI's completions default: 16
    if not 1 <= max_tokens <= limit:
        raise ApiError(400, f"max_tokens must be between 1 and {limit}, got {max_tokens}", "max_tokens")
    ids = engine.tokenizer(prompt, add_special_tokens=not chat)["input_ids"]
    if not ids:
        raise ApiError(400, "the prompt is empty", "prompt")
    if len(ids) + max_tokens > engine.context_length:
        raise ApiError(
            400,
            f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: more than the model's context of "
            f"{engine.context_length} tokens",
            "messages" if chat else "prompt",
            "context_length_exceeded",
        )
    events: asyncio.Queue = asyncio.Queue()
    stop = [body.stop] if isinstance(body.stop, str) else [s for s in body.stop or [] if s]
    job = Job(
        adapter,
        ids,
        max_tokens,
        asyncio_sink(asyncio.get_running_loop(), events),
        stop,
        body.temperature,
        body.top_p,
        body.seed,
    )
    try:
        engine.submit(job)
    except QueueFull as err:
        raise ApiError(429, str(err), code="queue_full") from err
    reply = Reply(body.model, chat, len(ids))
    if body.stream:
        return StreamingResponse(reply.stream(events), media_type="text/event-stream")
    text = ""
    while True:
        event = await events.get()
        if event[0] == "text":
            text += event[1]
        elif event[0] == "error":
            raise ApiError(500, event[1], code="generation_failed")
        else:
            return reply.whole(text, event[1], event[2])


class Reply:
    """OpenAI's response objects for one request, whole or as stream chunks."""

    def __init__(self, model: str, chat: bool, prompt_tokens: int) -> None:
        self.model, self.chat, self.prompt_tokens = model, chat, prompt_tokens
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, choice: dict[str, Any], chunk: bool = False) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind + (".chunk" if chunk and self.chat else ""),
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, **choice}],
        }

    def _usage(self, tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": tokens,
            "total_tokens": self.prompt_tokens + tokens,
        }

    def whole(self, text: str, finish_reason: str, tokens: int) -> dict[str, Any]:
        content = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text, "logprobs": None}
        return self._envelope({**content, "finish_reason": finish_reason}) | {"usage": self._usage(tokens)}

    def _chunk(self, text: str | None, finish_reason: str | None = None) -> str:
        if self.chat:
            choice = {"delta": {"content": text} if text is not None else {}, "finish_reason": finish_reason}
        else:
            choice = {"text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return f"data: {json.dumps(self._envelope(choice, chunk=True))}\n\n"

    async def stream(self, events: asyncio.Queue) -> AsyncIterator[str]:
        if self.chat:
            first = self._envelope({"delta": {"role": "assistant", "content": ""}, "finish_reason": None}, chunk=True)
            yield f"data: {json.dumps(first)}\n\n"
        while True:
            event = await events.get()
            if event[0] == "text":
                yield self._chunk(event[1])
            elif event[0] == "error":  # the status line is sent already: report in the stream, as OpenAI does
                error = {"message": event[1], "type": "server_error", "code": "generation_failed"}
                yield f"data: {json.dumps({'error': error})}\n\n"
                break
            else:
                yield self._chunk(None, event[1])
                break
        yield "data: [DONE]\n\n"
