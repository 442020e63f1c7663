"""``deltatune train --compile``: the training steps run the model's transformer body through ``torch.compile``.

What is compiled is :meth:`DeltaModel.compile`'s part, the body that holds the adapters (decoder blocks with
their LoRA layers, norms, rotary, attention, activations), compiled in place so that module names, state-dict
keys, checkpoints and ``--resume`` are unchanged. The output head and the loss stay eager (deltatune.loss fuses
them). Evaluation, before and after training, runs eagerly (its no-grad forwards and generation's growing KV
cache would be graphs of their own, compiled for a handful of calls).

Shapes: torch.compile's automatic dynamic shapes. The first step compiles for its shape; the first step with
another sequence length compiles once more with that length symbolic, and later lengths reuse it (measured in
tests/test_compile.py: no recompilation across steps of varying lengths, with and without --packing). A batch
of one row is a shape torch specialises on, so an epoch's last batch of one row compiles once more.

A method whose layers torch.compile cannot trace (its record's ``compilable``) is said in one line, and the run
trains uncompiled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from deltatune.model import DeltaModel
from deltatune.training.config import TrainConfig


def compile_for_training(model: DeltaModel, cfg: TrainConfig, say: bool = True) -> bool:
    """With ``cfg.compile``: compile ``model``'s body for training (returns True), or say in one line why its
    method cannot be and leave it eager (False). Without ``cfg.compile``: nothing (False)."""
    if not cfg.compile:
        return False
    reason = model.not_compilable()
    if reason is not None:
        if say:
            print(f"--compile: {reason}; training uncompiled")
        return False
    drop_hook = getattr(model.base_model, "disable_input_require_grads", None)
    if cfg.gradient_checkpointing and drop_hook is not None:
        # transformers adds a hook making the embeddings' output require grad, which only reentrant
        # checkpointing needs (the trainer's is not); the hook is a graph break.
        drop_hook()
    model.compile(backend=cfg.compile_backend)
    if say:
        print(
            f"--compile: torch.compile ({cfg.compile_backend}) of the model's body; the first steps include "
            "compiling it (and the first step with another sequence length, once)"
        )
    return True


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Run the block with every torch.compile'd module eagerly (evaluation, generation)."""
    with torch.compiler.set_stance("force_eager"):
        yield
