"""LoRA's A matmuls shared by the targets that read one input (q/k/v; gate/up).

q_proj, k_proj and v_proj each compute x·Aᵀ with their own A from the same x; so do gate_proj and
up_proj. Stacked, the A factors give every one of them its product in one matmul,

    h = x·[A_q; A_k; A_v]ᵀ,   h_q, h_k, h_v = h.split(r_q, r_k, r_v),   delta_q = s·h_q·B_qᵀ, ...

which reads x once, and whose backward gives x's gradient in one matmul (h's gradient ·[A_q; A_k; A_v])
where separate branches give three, added one by one. Each layer's B and output are its own.

Which targets share: siblings (children of one module) named as one of :data:`SHARED_INPUTS` (the
projections that transformers' models feed one tensor: q/k/v, gate/up and their other names). Others,
o_proj or down_proj, read inputs of their own; a group of them would compute products nobody uses.

How, without state on the shared modules: ``inject`` makes each such set a :class:`SharedInput` and
puts two hooks on their parent, which open a scope for the parent's forward in a ContextVar, so it
belongs to the thread (or asyncio task) running that forward. Within it the first member called with x
computes the product for every member that can use it and keeps it there with x; a member called with
that same tensor (same object, unchanged since) takes its slice; one called with another input (a
cross-attention's k/v read the encoder's states) computes its own. The scope ends with the parent's
forward, so nothing outlives the call, and gradient checkpointing, which reruns the parent's forward,
takes the same path.

Not shared: an adapter with dropout at work (each layer drops its own copy of x), a mixed batch
(each row gathers its own factors), a merged or disabled adapter, siblings whose A is no plain tensor
(``--fsdp`` shards each projection apart, so only the called one's A is whole then). Under ``torch.compile`` each layer
runs its own product: no scope is opened or read, so the compiled graph has no break.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# Sibling names that transformers' models call on one input tensor (Llama/Mistral/Qwen/Gemma/OPT/Phi, BERT,
# T5, Mixtral's experts, T5 v1.1's gated MLP).
SHARED_INPUTS = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("q", "k", "v"),
    ("w1", "w3"),
    ("wi_0", "wi_1"),
)

# The open scopes of this thread, innermost first: (the store, the scope below, the group that opened it).
_SCOPE: ContextVar[tuple[dict[str, Any], Any, SharedInput] | None] = ContextVar("deltatune_lora_shared", default=None)


class SharedInput:
    """The LoRA layers under one ``parent`` module, whose A products for one input run as one matmul.

    A plain object (no ``nn.Module``): it adds no state-dict keys, and its layers keep theirs."""

    def __init__(self, parent: nn.Module, members: dict[str, nn.Module]) -> None:
        self.parent = parent
        self.members = members  # child name -> LoRA layer, in the parent's order
        self.hook_ids: tuple[int, int] = (
            parent.register_forward_pre_hook(self.open).id,
            parent.register_forward_hook(self.close, always_call=True).id,
        )
        for layer in members.values():
            layer.shared_input = self

    def attached(self) -> bool:
        """Whether every member is still the parent's child (delete_adapter and unload put base layers back)."""
        children = self.parent._modules
        return all(children.get(name) is layer for name, layer in self.members.items())

    def detach(self) -> None:
        """Remove the parent's hooks and the members' link (by hook id, so a deep copy detaches its own)."""
        pre_id, post_id = self.hook_ids
        self.parent._forward_pre_hooks.pop(pre_id, None)
        self.parent._forward_hooks.pop(post_id, None)
        self.parent._forward_hooks_always_called.pop(post_id, None)
        for layer in self.members.values():
            if layer.shared_input is self:
                layer.shared_input = None

    def open(self, parent: nn.Module, args: Any) -> None:
        """Before the parent's forward: a fresh scope for this call (or detach, when the members are gone)."""
        if torch.compiler.is_compiling():
            return
        if not self.attached():
            self.detach()
            return
        _SCOPE.set(({}, _SCOPE.get(), self))

    def close(self, parent: nn.Module, args: Any, output: Any) -> None:
        """After the parent's forward (also when it raised): its scope ends."""
        if torch.compiler.is_compiling():
            return
        scope = _SCOPE.get()
        if scope is not None and scope[2] is self:
            _SCOPE.set(scope[1])

    def product(self, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """``layer``'s x·Aᵀ for adapter ``name``, a slice of one matmul for all members that read ``x``;
        None outside the parent's forward or for another input (the layer computes its own)."""
        scope = _SCOPE.get()
        while scope is not None and scope[2] is not self:  # another group of the same parent opened after
            scope = scope[1]
        if scope is None:
            return None
        store = scope[0]
        entry = store.get(name)
        if entry is None:
            entry = store[name] = (x, x._version, self._parts(layer, name, x))
        elif entry[0] is not x or entry[1] != x._version:
            return None
        return entry[2].get(id(layer))

    def _parts(self, layer: nn.Module, name: str, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """{id(member): its slice of x·[A_1; A_2; ...]ᵀ} for the members that can share it with ``layer``."""
        a = layer.lora_A[name].weight
        users = [m for m in self.members.values() if shares(m, name, a)]
        if len(users) < 2:
            return {}
        factors = [m.lora_A[name].weight for m in users]
        h = F.linear(x.to(a.dtype), torch.cat(factors))
        return {id(m): part for m, part in zip(users, h.split([f.shape[0] for f in factors], dim=-1), strict=True)}


def shares(layer: nn.Module, name: str, like: torch.Tensor) -> bool:
    """Whether ``layer`` runs adapter ``name`` on its input as it comes, with an A stackable with ``like``."""
    if name not in layer.lora_A or layer.disabled or name == layer.merged_adapter:
        return False
    if layer.training and name in layer.lora_dropout:
        return False
    a = layer.lora_A[name].weight
    # Another tensor type is no A to stack: under --fsdp each projection is its own shard group, so only
    # the called one's A is whole (a plain tensor); its siblings' are still split across the processes.
    return type(a) is type(like) and a.shape[1] == like.shape[1] and a.dtype == like.dtype and a.device == like.device


def shared_product(layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor | None:
    """``layer``'s x·Aᵀ from its siblings' shared matmul, or None (no group, compiling, not shared)."""
    if torch.compiler.is_compiling() or layer.shared_input is None:
        return None
    return layer.shared_input.product(layer, name, x)


def group_siblings(model: nn.Module, names: list[str], layer_type: type[nn.Module]) -> None:
    """Make the ``layer_type`` children of each parent of ``names`` that one of :data:`SHARED_INPUTS` names
    (two or more) a :class:`SharedInput`, replacing the parent's earlier groups."""
    for parent_name in dict.fromkeys(name.rpartition(".")[0] for name in names):
        parent = model.get_submodule(parent_name)
        children = {n: m for n, m in parent.named_children() if isinstance(m, layer_type)}
        for old in {id(m.shared_input): m.shared_input for m in children.values() if m.shared_input}.values():
            old.detach()
        for shared in SHARED_INPUTS:
            members = {n: children[n] for n in shared if n in children}
            if len(members) > 1:
                SharedInput(parent, members)


def ungroup(model: nn.Module) -> int:
    """Undo the sharing in ``model``: every LoRA layer computes its own product again (tests, benchmarks).
    Returns the number of groups removed."""
    groups = {id(g): g for m in model.modules() if (g := getattr(m, "shared_input", None)) is not None}
    for group in groups.values():
        group.detach()
    return len(groups)
