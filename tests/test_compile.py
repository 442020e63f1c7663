"""torch.compile of a DeltaModel and ``deltatune train --compile``: no graph break in the adapter path, compiled
steps equal eager ones, no recompilation across steps (same or varying lengths, packed), with gradient
checkpointing, --packing, --resume and DDP, and a method that cannot be compiled says so and trains uncompiled.

Compiles are counted by a backend of our own (it counts, then hands the graph to aot_eager, which runs the same
ATen ops as eager, so its steps match eager to float rounding: atol 1e-6, rtol 1e-5). One test runs inductor
(generated C++ kernels reorder float sums: atol 1e-5, rtol 1e-4).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import batch, randomize_adapters, tiny_llama
from test_train import FAST, ROOT, adapter_tensors, alpaca_file, run_cli
from torch._dynamo.backends.registry import lookup_backend, register_backend

import deltatune as dt
from deltatune.config import ConfigError
from deltatune.loss import LossModule
from deltatune.methods.contract import Method
from deltatune.training.compiling import compile_for_training
from deltatune.training.config import TrainConfig

COUNTING = "deltatune_test_counting"
TIGHT = {"atol": 1e-6, "rtol": 1e-5}
COMPILE = ("--compile", "--compile-backend", COUNTING)


class CountingBackend:
    """Counts the graphs compiled (first compiles, recompiles and graph-break pieces alike), runs aot_eager."""

    def __init__(self) -> None:
        self.compiles = 0

    def __call__(self, graph, example_inputs):
        self.compiles += 1
        return lookup_backend("aot_eager")(graph, example_inputs)


COUNTER = CountingBackend()
register_backend(COUNTER, name=COUNTING)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    COUNTER.compiles = 0
    yield
    torch._dynamo.reset()


def lora_model(dropout: float = 0.0, seed: int = 0) -> dt.DeltaModel:
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=dropout))
    randomize_adapters(model, seed=seed)  # B != 0, so the adapters' gradients all flow
    return model.train()


def labelled(rows: int = 2, length: int = 9, packed: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    inputs = batch(seed=seed, rows=rows, length=length)
    out = {"input_ids": inputs["input_ids"], "labels": inputs["input_ids"].clone()}
    if packed:  # restarting positions, no mask (Batcher.collate's packed rows)
        out["position_ids"] = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)]).repeat(rows, 1)
    else:
        out["attention_mask"] = inputs["attention_mask"]
    return out


def step(model: dt.DeltaModel, inputs: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One summed-loss forward and backward through the trainer's loss; (loss, gradients)."""
    model.zero_grad(set_to_none=True)
    loss, _ = LossModule(model, "causal-lm")(dict(inputs))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def compiled(model: dt.DeltaModel, backend: str = COUNTING, **cfg) -> dt.DeltaModel:
    assert compile_for_training(model, TrainConfig(compile=True, compile_backend=backend, **cfg), say=False)
    return model


def assert_same_step(eager: dt.DeltaModel, other: dt.DeltaModel, inputs: dict, tolerance: dict) -> None:
    loss, grads = step(eager, inputs)
    other_loss, other_grads = step(other, inputs)
    torch.testing.assert_close(other_loss, loss, **tolerance)
    assert other_grads.keys() == grads.keys() and len(grads) == 8  # 2 layers x q, v x A, B
    for name in grads:
        torch.testing.assert_close(other_grads[name], grads[name], **tolerance, msg=name)


# --- the adapter path traces whole ---------------------------------------------------------------------
def test_delta_model_compiles_to_one_graph_with_no_break():
    model = lora_model(dropout=0.1)
    explained = torch._dynamo.explain(model)(**batch())
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    body = torch._dynamo.explain(model.compiled_part())(**batch(), use_cache=False)
    assert (body.graph_count, body.graph_break_count) == (1, 0), body.break_reasons


def test_calls_naming_an_adapter_still_route_under_compile():
    """The compiled graph guards on whether any call scope routes: a call naming an adapter (or one per row)
    gets that adapter, not the graph traced for the active one."""
    model = lora_model().eval()
    model.add_adapter("other", dt.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_adapters(model, seed=5)  # only the active adapter's tensors train, so only they change
    with torch.no_grad():
        model.set_adapter("other")
        randomize_adapters(model, seed=6)
        model.set_adapter("default")
        inputs = batch()
        expected = {name: model(**inputs, adapter_name=name).logits for name in ("default", "other", "__base__")}
        mixed = model(**inputs, adapter_names=["other", "default"]).logits
        fast = torch.compile(model, backend=COUNTING)
        torch.testing.assert_close(fast(**inputs).logits, expected["default"], **TIGHT)
        for name, logits in expected.items():
            torch.testing.assert_close(fast(**inputs, adapter_name=name).logits, logits, **TIGHT, msg=name)
        torch.testing.assert_close(fast(**inputs, adapter_names=["other", "default"]).logits, mixed, **TIGHT)
        torch.testing.assert_close(fast(**inputs).logits, expected["default"], **TIGHT)
    assert not torch.allclose(expected["default"], expected["other"])


# --- compiled steps equal eager steps ------------------------------------------------------------------
def test_compiled_training_equals_eager():
    """Loss and gradients of a step, then the adapter after 3 AdamW steps."""
    eager, fast = lora_model(), compiled(lora_model())
    assert_same_step(eager, fast, labelled(), TIGHT)
    for model in (eager, fast):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for seed in range(3):
            step(model, labelled(seed=seed))
            optimizer.step()
    for (name, p), (_, q) in zip(eager.named_parameters(), fast.named_parameters(), strict=True):
        torch.testing.assert_close(q, p, **TIGHT, msg=name)


def test_inductor_step_equals_eager():
    """The default backend: generated CPU kernels (gcc), loss and gradients as eager's."""
    assert_same_step(lora_model(), compiled(lora_model(), backend="inductor"), labelled(), {"atol": 1e-5, "rtol": 1e-4})


def test_compile_with_gradient_checkpointing_equals_eager_with_no_break():
    eager, fast = lora_model(), lora_model()
    for model in (eager, fast):
        model.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    compiled(fast, gradient_checkpointing=True)
    assert_same_step(eager, fast, labelled(), TIGHT)
    assert COUNTER.compiles == 1  # one graph: transformers' input-grad hook (a graph break) was removed


# --- no recompilation across steps ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "lengths, packed, settled",
    [
        ([12] * 5, False, 1),  # one shape: compiled once
        ([9, 12, 7, 15, 10, 20], False, 2),  # the first new length recompiles once, symbolic; no more after it
        ([16, 10, 16, 22, 8], True, 2),  # packed rows (position ids, no mask) likewise
    ],
)
def test_no_recompilation_across_steps(lengths, packed, settled):
    model = compiled(lora_model(dropout=0.1))
    counts = []
    for i, length in enumerate(lengths):
        step(model, labelled(length=length, packed=packed, seed=i))
        counts.append(COUNTER.compiles)
    assert counts[settled - 1 :] == [counts[settled - 1]] * (len(lengths) - settled + 1), counts
    assert counts[-1] == settled, counts


# --- methods that cannot be compiled -------------------------------------------------------------------
def test_a_method_that_cannot_compile_says_so_and_trains_uncompiled(capsys):
    model = dt.wrap(tiny_llama(), dt.HyperAdapterConfig(tasks=["a"])).train()
    assert not compile_for_training(model, TrainConfig(compile=True, compile_backend=COUNTING))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith("--compile: hyperformer cannot be compiled: its layers read")
    assert lines[0].endswith("training uncompiled"), lines
    with pytest.warns(UserWarning, match="hyperformer cannot be compiled: .*; running uncompiled"):
        assert model.compile(backend=COUNTING) is False
    inputs = {**labelled(), "task_ids": torch.zeros(2, dtype=torch.long)}
    loss, grads = step(model, inputs)
    assert torch.isfinite(loss) and grads and COUNTER.compiles == 0  # trained, and nothing was compiled


def test_the_record_needs_a_reason_exactly_when_not_compilable():
    lora = dt.methods.method_named("lora")
    fields = {"name": "x", "config_class": lora.config_class, "inject": lora.inject}
    with pytest.raises(ConfigError, match="not_compilable_because"):
        Method(**fields, layer_classes=lora.layer_classes, compilable=False)
    with pytest.raises(ConfigError, match="not_compilable_because"):
        Method(**fields, layer_classes=lora.layer_classes, not_compilable_because="reasons")


def test_compile_with_fsdp_is_refused():
    with pytest.raises(ConfigError, match="--compile is not supported with --fsdp"):
        TrainConfig(compile=True, fsdp=True)


# --- deltatune train --compile -------------------------------------------------------------------------
def train_args(tiny_llama_dir, data, out, *extra):
    args = ["train", "--base", tiny_llama_dir, "--data", data, "--output-dir", out, "--r", 4]
    return [*args, "--lora-dropout", "0.1", "--no-eval-generate", *FAST, *extra]


def test_train_compile_resume_equals_eager_run(tiny_llama_dir, tmp_path, capsys):
    """--compile trains as eager does; killed after step 3 of 6 and resumed (compiled again), the same adapter."""
    data = alpaca_file(tmp_path / "train.jsonl")
    steps = ["--max-steps", 6, "--save-every", 3]
    assert run_cli(*train_args(tiny_llama_dir, data, tmp_path / "eager", *steps)) == 0
    compiled_run = train_args(
        tiny_llama_dir, data, tmp_path / "fast", *steps, "--compile", "--compile-backend", COUNTING
    )
    assert run_cli(*compiled_run) == 0
    assert "--compile: torch.compile" in capsys.readouterr().out
    eager, fast = adapter_tensors(tmp_path / "eager" / "adapter"), adapter_tensors(tmp_path / "fast" / "adapter")
    assert fast.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(fast[name], eager[name], atol=1e-5, rtol=1e-4, msg=name)
    checkpoints = tmp_path / "fast" / "checkpoints"
    for spoiled in (checkpoints / "step-00000006", tmp_path / "fast" / "adapter"):
        for f in spoiled.iterdir():
            f.unlink()
        spoiled.rmdir()
    assert run_cli(*compiled_run, "--resume") == 0
    resumed = adapter_tensors(tmp_path / "fast" / "adapter")
    assert all(torch.equal(resumed[k], fast[k]) for k in fast)
    steps_logged = [json.loads(line)["step"] for line in (tmp_path / "fast" / "metrics.jsonl").read_text().splitlines()]
    assert steps_logged[-3:] == [4, 5, 6]


def test_train_compile_with_packing_and_checkpointing(tiny_llama_dir, tmp_path):
    """--compile --packing --gradient-checkpointing: the eager run's adapter, in at most 2 graphs over 6 steps
    of rows of varying lengths (no graph break, no per-step recompilation)."""
    data = alpaca_file(tmp_path / "train.jsonl", count=60)
    flags = ["--max-steps", 6, "--packing", "--max-length", 48, "--gradient-checkpointing"]
    assert run_cli(*train_args(tiny_llama_dir, data, tmp_path / "eager", *flags)) == 0
    COUNTER.compiles = 0
    fast = train_args(tiny_llama_dir, data, tmp_path / "fast", *flags, *COMPILE)
    assert run_cli(*fast) == 0
    assert 1 <= COUNTER.compiles <= 2
    eager, compiled_adapter = (
        adapter_tensors(tmp_path / "eager" / "adapter"),
        adapter_tensors(tmp_path / "fast" / "adapter"),
    )
    for name in eager:
        torch.testing.assert_close(compiled_adapter[name], eager[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.slow
def test_train_compile_under_two_process_ddp_equals_one_eager_process(tiny_llama_dir, tmp_path):
    data = alpaca_file(tmp_path / "train.jsonl", count=32)
    common = ["train", "--base", tiny_llama_dir, "--data", data, "--max-steps", 5, "--no-eval-generate"]
    common += ["--learning-rate", "1e-2", "--threads", 1, "--eval-fraction", "0.25"]

    def launch(out, batch, *prefix) -> str:
        argv = [str(a) for a in (*common, "--batch-size", batch, "--output-dir", out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([*prefix, *argv], cwd=ROOT, capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    launch(tmp_path / "single", 4, sys.executable, "-m", "deltatune")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537"]
    common += ["--compile", "--compile-backend", "aot_eager"]
    assert "--compile: torch.compile (aot_eager)" in launch(tmp_path / "ddp", 2, *torchrun, "-m", "deltatune")
    expected, got = adapter_tensors(tmp_path / "single" / "adapter"), adapter_tensors(tmp_path / "ddp" / "adapter")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=1e-4, msg=key)
