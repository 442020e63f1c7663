"""The JSON bodies the HTTP API accepts, checked strictly by pydantic (``"5"`` is not a number), and the OpenAI
options it refuses rather than ignores."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from deltatune.serving.mixes import MergedAdapters
from deltatune.serving.rows import SEED_LIMIT

UNSUPPORTED = {  # OpenAI options this server does not act on, and the values that ask nothing
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)
    model: str = Field(max_length=256)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: Literal[1] = 1
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=0, lt=SEED_LIMIT)
    user: str | None = None
    merged_adapters: MergedAdapters | None = None  # LoRAX's per-request mix (serving/mixes.py)


class CompletionBody(Sampling):
    prompt: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True)
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class ChatBody(Sampling):
    messages: list[Message] = Field(min_length=1)


class AdapterBody(BaseModel):
    model_config = ConfigDict(strict=True)
    name: str = Field(max_length=128)
    path: str = Field(max_length=4096)
