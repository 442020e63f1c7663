"""vLLM's runtime adapter endpoints, with its request bodies, status codes and answers, so tools
written for a vLLM server (``VLLM_ALLOW_RUNTIME_LORA_UPDATING``) drive this one unchanged:

- ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}``: 200 with the plain text
  ``Success: LoRA adapter 'NAME' added successfully.``; 400 (``InvalidUserInput``) for a missing
  field or a name loaded already, 404 (``NotFoundError``) when the path holds no adapter, 400
  (``BadRequestError``) when it cannot be loaded. ``lora_path`` is relative to ``--adapters`` or
  an absolute path inside it (the one path rule, adapters.locate).
- ``POST /v1/unload_lora_adapter`` ``{"lora_name"}``: 200 with
  ``Success: LoRA adapter 'NAME' removed successfully.``; 404 (``NotFoundError``) for a name not
  served. Unloading is this server's sticky delete (``DELETE /v1/adapters/{name}``).

Errors use vLLM's current body, ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
status as ``code``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict

from deltatune.serving.adapters import locate, name_problem
from deltatune.serving.errors import ApiError


class LoadLoRA(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = ""
    lora_path: str = ""


class UnloadLoRA(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str = ""
    lora_int_id: int | None = None


def vllm_error(status: HTTPStatus, message: str, kind: str) -> ApiError:
    return ApiError(status.value, message, code=status.value, kind=kind)


def vllm_routes(app: FastAPI, engine: Any, parse: Callable[[Request, type[BaseModel]], Awaitable[Any]]) -> None:
    """Add vLLM's two adapter routes to ``app`` (``parse`` reads a body as the other routes do)."""

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request) -> Response:
        body = await parse(request, LoadLoRA)
        name = body.lora_name
        if not name or not body.lora_path:
            raise vllm_error(
                HTTPStatus.BAD_REQUEST, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput"
            )
        if name in engine.adapters:
            raise vllm_error(
                HTTPStatus.BAD_REQUEST, f"The lora adapter '{name}' has already been loaded.", "InvalidUserInput"
            )
        problem = name_problem(name, engine.base_name)
        if problem:
            raise vllm_error(HTTPStatus.BAD_REQUEST, problem, "InvalidUserInput")
        path = adapter_path(engine, body.lora_path)
        try:
            await asyncio.wrap_future(engine.load_adapter(name, path))
        except Exception as err:
            raise vllm_error(
                HTTPStatus.BAD_REQUEST, f"cannot load adapter from {body.lora_path!r}: {err}", "BadRequestError"
            ) from err
        return Response(f"Success: LoRA adapter '{name}' added successfully.", status_code=200)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request) -> Response:
        body = await parse(request, UnloadLoRA)
        if not body.lora_name:
            raise vllm_error(
                HTTPStatus.BAD_REQUEST, "either 'lora_name' and 'lora_int_id' needs to be provided.", "InvalidUserInput"
            )
        if body.lora_name not in engine.adapters:
            raise vllm_error(
                HTTPStatus.NOT_FOUND, f"The lora adapter '{body.lora_name}' cannot be found.", "NotFoundError"
            )
        await asyncio.wrap_future(engine.delete_adapter(body.lora_name))
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.", status_code=200)


def adapter_path(engine: Any, given: str) -> Any:
    """``given`` under the server's adapters directory: 404 when no adapter is there (vLLM's "No
    adapter found"), 400 when the path leaves the directory."""
    if engine.adapters_dir is None:
        raise vllm_error(
            HTTPStatus.BAD_REQUEST,
            "the server was started without --adapters, so it cannot load adapters",
            "BadRequestError",
        )
    try:
        return locate(engine.adapters_dir, given)
    except ValueError as err:
        missing = "no adapter_config.json" in str(err)
        status, kind = (
            (HTTPStatus.NOT_FOUND, "NotFoundError") if missing else (HTTPStatus.BAD_REQUEST, "BadRequestError")
        )
        raise vllm_error(status, f"No adapter found for {given}: {err}" if missing else str(err), kind) from None


def model_cards(engine: Any) -> list[dict[str, Any]]:
    """The base model, then each adapter with ``parent`` (the base) and ``root`` (its folder), as
    vLLM lists them."""
    card = {"object": "model", "created": 0, "owned_by": "deltatune"}
    base = card | {"id": engine.base_name, "root": engine.base_name, "parent": None}
    base["max_model_len"] = engine.context_length
    adapters = [
        card | {"id": n, "root": str(engine.store.paths.get(n, n)), "parent": engine.base_name} for n in engine.adapters
    ]
    return [base, *adapters]
