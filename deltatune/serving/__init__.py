"""Serving many adapters on one base model: the continuous-batching engine and the OpenAI-compatible API."""

from deltatune.serving.app import Limits, create_app
from deltatune.serving.engine import Engine

__all__ = ["Engine", "Limits", "create_app"]
