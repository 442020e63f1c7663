"""Names and values that several floors of deltatune share; this module imports nothing of deltatune."""

from __future__ import annotations

import re

BASE_ADAPTER = "__base__"  # in ``adapter_names``/``adapter_name``: no adapter, the plain base model
ADAPTER_NAME = re.compile(r"[A-Za-z0-9_\-]+")  # what an adapter (or HyperFormer task) may be called
IGNORE_INDEX = -100  # a label position the loss skips (prompts, padding, virtual tokens)


def valid_name(name: object) -> bool:
    """Whether ``name`` is a string of letters, digits, '_' or '-' (an adapter or task name)."""
    return isinstance(name, str) and ADAPTER_NAME.fullmatch(name) is not None
