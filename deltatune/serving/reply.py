"""OpenAI's response objects for one request: whole, or as server-sent event chunks."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any


class Reply:
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

    async def stream(self, events: asyncio.Queue, job: Any, usage: bool = False) -> AsyncIterator[str]:
        """The chunks as they come (``usage``: and a last one with the token counts, as OpenAI's
        ``stream_options.include_usage``); when the client goes away the job is cancelled."""
        try:
            if self.chat:
                first = self._envelope({"delta": {"role": "assistant", "content": ""}, "finish_reason": None}, True)
                yield f"data: {json.dumps(first)}\n\n"
            while True:
                event = await events.get()
                if event[0] == "text":
                    yield self._chunk(event[1])
                elif event[0] == "error":  # the status line is sent already: report in the stream, as OpenAI does
                    error = {"message": event[1], "type": "server_error", "code": event[3]}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    break
                else:
                    yield self._chunk(None, event[1])
                    if usage:
                        last = self._envelope({}, chunk=True) | {"choices": [], "usage": self._usage(event[2])}
                        yield f"data: {json.dumps(last)}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()
