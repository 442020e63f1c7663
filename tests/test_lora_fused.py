"""Fused LoRA matmuls (deltatune.methods.lora_fused, LoraLinear.forward_active) against textbook LoRA.

Fused: the A matmuls of q/k/v (and gate/up) run as one matmul on their shared input, and each B matmul adds
into the base output inside the GEMM (addmm). The reference is independent of both: each target replaced by
``base(x) + s·(x·Aᵀ)·Bᵀ`` written out here. Tolerance: float32, atol 1e-5 / rtol 1e-4 (the same sums in
another order: the stacked A, the addmm's accumulation). The output-and-gradient test runs in float64 (atol 1e-10),
so its verdict does not hang on float32 rounding across a deep sum on a given CPU.
"""

import collections
import copy
import threading

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import deltatune as dt
from deltatune.constants import BASE_ADAPTER
from deltatune.methods import lora_fused
from deltatune.wrappers import replace_module

TOL = {"atol": 1e-5, "rtol": 1e-4}
TOL64 = {"atol": 1e-10, "rtol": 1e-9}
QKV_GATE_UP = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]


class TextbookLora(nn.Module):
    """base(x) + Σ s·(x·Aᵀ)·Bᵀ over the given adapters' factors."""

    def __init__(self, base: nn.Linear, factors: list[tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        super().__init__()
        self.base, self.scales = base, [s for _, _, s in factors]
        self.a = nn.ParameterList([a.detach().clone() for a, _, _ in factors])
        self.b = nn.ParameterList([b.detach().clone() for _, b, _ in factors])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + sum((x @ a.T) @ b.T * s for a, b, s in zip(self.a, self.b, self.scales, strict=True))


def wrapped(targets, adapters=("default",), **options) -> dt.DeltaModel:
    model = dt.wrap(tiny_llama(), dt.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **options))
    for name in adapters[1:]:
        model.add_adapter(name, dt.LoraConfig(r=2, lora_alpha=6, target_modules=targets, **options))
    torch.manual_seed(5)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_()
    return model.train()


def textbook(model: dt.DeltaModel, *adapters: str) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """A plain copy of the base with each adapted linear as TextbookLora of ``adapters`` (default: "default");
    {our parameter name: its twin}."""
    plain, adapters = copy.deepcopy(model).unload(), adapters or ("default",)
    twins = {}
    for name, layer in model.delta_layers():
        factors = [(layer.lora_A[n].weight, layer.lora_B[n].weight, layer.scaling[n]) for n in adapters]
        module = TextbookLora(plain.get_submodule(name), factors)
        replace_module(plain, name, module)
        for i, n in enumerate(adapters):
            twins[f"base_model.{name}.lora_A.{n}.weight"] = module.a[i]
            twins[f"base_model.{name}.lora_B.{n}.weight"] = module.b[i]
    return plain.train(), twins


def count_shared(monkeypatch) -> list[int]:
    """Record how many members each shared A matmul served."""
    counts: list[int] = []
    parts = lora_fused.SharedInput._parts
    monkeypatch.setattr(lora_fused.SharedInput, "_parts", lambda *a: counts.append(len(r := parts(*a))) or r)
    return counts


@pytest.mark.parametrize(
    ("targets", "shared"),  # members served by each shared A matmul, per decoder layer: q/k/v, then gate/up
    [(["q_proj", "v_proj"], [2]), (QKV_GATE_UP, [3, 2]), ("all-linear", [3, 2])],
)
def test_fused_equals_textbook_lora_outputs_and_gradients(targets, shared, monkeypatch):
    counts = count_shared(monkeypatch)
    model = wrapped(targets).double()
    reference, twins = textbook(model)
    ids = torch.randint(3, 100, (3, 11))
    weights = torch.randn(3, 11, 128, dtype=torch.float64)
    ours = model(input_ids=ids).logits
    (ours * weights).sum().backward()
    expected = reference(input_ids=ids).logits
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours, expected, **TOL64)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, twins[name].grad, **TOL64)
    assert counts == shared * 2


def test_groups_are_the_siblings_that_read_one_input():
    model = wrapped("all-linear")
    attention, mlp = model.base_model.model.layers[0].self_attn, model.base_model.model.layers[0].mlp
    assert list(attention.q_proj.shared_input.members) == ["q_proj", "k_proj", "v_proj"]
    assert attention.o_proj.shared_input is None and mlp.down_proj.shared_input is None
    assert list(mlp.up_proj.shared_input.members) == ["gate_proj", "up_proj"]
    assert set(model.state_dict()) == set(copy.deepcopy(model).state_dict())  # no keys of its own


@pytest.mark.parametrize("reentrant", [False, True])
def test_fused_under_gradient_checkpointing(reentrant):
    """Recomputation reruns the parent's forward, so it takes the fused path again: same loss and gradients."""
    model = wrapped(QKV_GATE_UP)
    checkpointed = copy.deepcopy(model)
    checkpointed.base_model.activation_checkpointing_enable(
        activation_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    ids = torch.randint(3, 100, (2, 9))
    losses = []
    for m in (model, checkpointed):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    grads = dict(checkpointed.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, **TOL)


class Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


COPIES = ("clone", "copy_", "_to_copy", "contiguous", "native_dropout", "bernoulli", "bernoulli_", "dropout")


def copies(model: dt.DeltaModel, ids: torch.Tensor) -> collections.Counter:
    """The copying (and dropping) ops one forward runs, with the adapter and without."""
    found = collections.Counter()
    for adapter in (None, BASE_ADAPTER):
        ops = Ops()
        with ops:
            model(input_ids=ids, adapter_name=adapter)
        found.update({f"{name} ({'base' if adapter else 'lora'})": 1 for name in ops.names if name in COPIES})
    return found


@pytest.mark.parametrize("fused", [True, False])
def test_dropout_zero_costs_no_copy(fused, monkeypatch):
    """With lora_dropout=0 in training the input tensor itself reaches the A matmul (the stacked one when
    fused), and the forward runs no copying op beyond the base model's own."""
    model = wrapped(QKV_GATE_UP)
    if not fused:
        lora_fused.ungroup(model)
    attention = model.base_model.model.layers[0].self_attn
    seen, a_inputs = [], []
    attention.q_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    a_width = 3 * 4 if fused else 4  # the stacked A of q/k/v, or q's own
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, *b: (len(w) == a_width and a_inputs.append(x)) or linear(x, w, *b))
    ids = torch.randint(3, 100, (2, 7))
    model(input_ids=ids)
    assert a_inputs and a_inputs[0] is seen[0]
    found = copies(model, ids)
    assert {k.split()[0]: n for k, n in found.items() if "lora" in k} == {
        k.split()[0]: n for k, n in found.items() if "base" in k
    }


def test_the_copy_check_sees_dropout_at_work():
    """The same check with dropout 0.1 in training finds more: what the test above rules out is real."""
    found = copies(wrapped(QKV_GATE_UP, lora_dropout=0.1), torch.randint(3, 100, (2, 7)))
    assert sum(n for k, n in found.items() if "lora" in k) > sum(n for k, n in found.items() if "base" in k)


def test_dropout_at_work_is_not_shared(monkeypatch):
    """Each target drops its own copy of x in training: nothing is shared then; in eval the A matmuls are."""
    counts = count_shared(monkeypatch)
    model = wrapped(QKV_GATE_UP, lora_dropout=0.1)
    ids = torch.randint(3, 100, (2, 7))
    model(input_ids=ids)
    assert counts == []
    counts.clear()
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)
    assert counts == [3, 2] * 2


def test_several_adapters_mixed_batches_and_merging():
    model = wrapped(QKV_GATE_UP, adapters=("default", "other")).eval()
    ids = torch.randint(3, 100, (2, 9))
    with torch.no_grad():
        alone = {n: model(input_ids=ids, adapter_name=n).logits for n in ("default", "other")}
        for name in alone:  # against the textbook LoRA of each adapter
            torch.testing.assert_close(alone[name], textbook(model, name)[0](input_ids=ids).logits, **TOL)
        mixed = model(input_ids=ids, adapter_names=["default", "other"]).logits
        torch.testing.assert_close(mixed, torch.stack([alone["default"][0], alone["other"][1]]), **TOL)
        model.set_adapter(["default", "other"])
        both = textbook(model, "default", "other")[0](input_ids=ids).logits
        torch.testing.assert_close(model(input_ids=ids).logits, both, **TOL)
        model.set_adapter("other")
        model.merge_adapter()
        torch.testing.assert_close(model(input_ids=ids).logits, alone["other"], **TOL)
        model.unmerge_adapter()
        torch.testing.assert_close(model(input_ids=ids, adapter_name="default").logits, alone["default"], **TOL)


@pytest.mark.parametrize("second_adapter", ["default", "other"])
def test_two_threads_interleaved_inside_one_attention(second_adapter, monkeypatch):
    """Thread 1 stops inside layer 0's attention after q ran (its shared product made), thread 2 runs a whole
    forward with another input (same shape; the same adapter or another) meanwhile; each gets what it gets alone."""
    counts = count_shared(monkeypatch)
    model = wrapped(QKV_GATE_UP, adapters=("default", "other")).eval()
    calls = {
        "first": ("default", torch.randint(3, 100, (2, 9))),
        "second": (second_adapter, torch.randint(3, 100, (2, 9))),
    }
    reference = copy.deepcopy(model)  # separate A matmuls, and nothing run on the model before the threads
    lora_fused.ungroup(reference)
    with torch.no_grad():
        expected = {t: reference(input_ids=ids, adapter_name=n).logits for t, (n, ids) in calls.items()}
    inside, second_done, results = threading.Event(), threading.Event(), {}

    def pause(_module, _args):
        if threading.current_thread().name == "first" and not inside.is_set():
            inside.set()
            assert second_done.wait(timeout=60)

    model.base_model.model.layers[0].self_attn.k_proj.register_forward_pre_hook(pause)

    def run(thread):
        if thread == "second":
            assert inside.wait(timeout=60)
        adapter, ids = calls[thread]
        with torch.no_grad():
            results[thread] = model(input_ids=ids, adapter_name=adapter).logits
        if thread == "second":
            second_done.set()

    threads = [threading.Thread(target=run, args=(t,), name=t) for t in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    for thread in calls:
        torch.testing.assert_close(results[thread], expected[thread], **TOL)
    assert sorted(counts) == sorted([3, 2] * 4)  # both calls took the shared path in both layers
    assert lora_fused._SCOPE.get() is None


def test_sharing_ends_with_the_layers_it_joined():
    """unload puts the base layers back; the parent's hooks go at its next forward, and a deep copy has its own."""
    model = wrapped(QKV_GATE_UP)
    copied = copy.deepcopy(model)
    attention = copied.base_model.model.layers[0].self_attn
    assert attention.q_proj.shared_input.parent is attention
    plain = model.unload()
    plain(input_ids=torch.randint(3, 100, (1, 4)))
    assert not plain.model.layers[0].self_attn._forward_pre_hooks
    assert not plain.model.layers[0].self_attn._forward_hooks
    assert len(attention._forward_pre_hooks) == 1 and len(attention._forward_hooks) == 1
    assert lora_fused.ungroup(copied) == 4 and not attention._forward_pre_hooks


def test_compiles_in_one_graph_with_the_plain_path(monkeypatch):
    """Under torch.compile (fullgraph: a graph break fails) the parent's hooks open no scope and each layer
    takes its own A product; outputs and gradients equal the eager fused run."""
    counts = count_shared(monkeypatch)
    model = wrapped(QKV_GATE_UP)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model.base_model, fullgraph=True, backend="eager")
    ids = torch.randint(3, 100, (2, 9))
    model(input_ids=ids, labels=ids).loss.backward()
    eager_counts = list(counts)
    compiled(input_ids=ids, labels=ids).loss.backward()
    assert eager_counts == [3, 2] * 2 and counts == eager_counts  # nothing shared inside the compiled graph
    grads = dict(compiled_model.named_parameters())
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[name].grad, **TOL)
