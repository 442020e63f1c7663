"""Serving many adapters on one base model: the batching engine and the OpenAI-compatible API."""

from deltatune.serving.app import create_app
from deltatune.serving.batcher import Engine

__all__ = ["Engine", "create_app"]
