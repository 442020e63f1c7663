"""The defaults ``deltatune train`` picks per method and task when the user gives none: the learning rate.

A method's record holds the rates measured for it (``Method.learning_rates``, see docs/defaults.md and
``bench/defaults.py``); a method or task without one gets :data:`DEFAULT_LEARNING_RATE`, and the built-in demo (no
``--data``) its own brisk rate. The rate chosen is printed as the run starts, with where it came from.
"""

from __future__ import annotations

import dataclasses

from deltatune import methods
from deltatune.training.config import TrainConfig

DEFAULT_LEARNING_RATE = 2e-4  # LoRA on a causal LM (full-size LoRA's usual rate); methods/tasks not measured
DEMO_LEARNING_RATE = 2e-3  # the built-in demo's 40 steps


def format_rate(rate: float) -> str:
    """A rate as people write it: ``1e-3``, ``2e-4``, ``2.5e-4``, ``0.3`` -> ``3e-1``."""
    mantissa, exponent = f"{rate:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def default_learning_rate(method: str, task: str, demo: bool = False) -> tuple[float, str]:
    """The rate ``deltatune train`` uses for ``method`` on ``task`` without --learning-rate, and why."""
    if demo:
        return DEMO_LEARNING_RATE, "default for the built-in demo"
    measured = methods.method_named(method).learning_rate_for(task)
    if measured is not None:
        return measured, f"default for {method} on {task}"
    return DEFAULT_LEARNING_RATE, f"general default; none measured for {method} on {task}"


def with_defaults(cfg: TrainConfig, task: str, say: bool = True) -> TrainConfig:
    """``cfg`` with its learning rate filled in for ``task`` (an explicit one is kept); ``say`` prints one line:
    ``learning rate 1e-3 (default for lora on classification)``."""
    if cfg.learning_rate is not None:
        rate, why = cfg.learning_rate, "given"
    else:
        rate, why = default_learning_rate(cfg.method, task, demo=cfg.data is None)
    if say:
        print(f"learning rate {format_rate(rate)} ({why})", flush=True)
    return dataclasses.replace(cfg, learning_rate=rate)
