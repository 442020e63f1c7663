"""Sharded training (``deltatune train --fsdp``): the frozen base split across processes with FSDP2.

torch's ``fully_shard`` does the sharding; this module only builds the model so that no process ever
holds the whole base: the architecture is built without weights, the adapter is added (on real,
zero-memory stand-ins of the base weights, so its initialisation draws the same random numbers as a
plain run), every decoder block and then the root are sharded, and each process reads only its rows
of each checkpoint tensor. Frozen and trainable parameters share one shard group per block.

Saves gather whole tensors (``get_model_state_dict`` with ``full_state_dict``) and swap them in for
the sharded ones while the usual writer runs, so adapters and training checkpoints have the same
format as a one-process run's: a run may resume with any number of processes, sharded or not.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from deltatune.config import ConfigError

FSDP_TASKS = ("causal-lm",)
READ_BYTES = 64 << 20  # the most of a checkpoint tensor read at once


def check_supported(task: str, quantize: str | None) -> None:
    """Combinations that cannot be sharded, refused before any weight loads."""
    if quantize is not None:
        raise ConfigError(
            f"--fsdp cannot shard a --quantize {quantize} base (its packed weights are not float tensors FSDP can "
            "split); use --quantize without --fsdp (every process holds the quantized base), or --fsdp alone"
        )
    if task not in FSDP_TASKS:
        raise ConfigError(
            f"--fsdp trains {', '.join(FSDP_TASKS)} models; a {task} model gets a freshly initialised head that is "
            "not in the checkpoint: train it without --fsdp (DDP under torchrun)"
        )


def return_freed_memory() -> None:
    """Make glibc give large freed blocks back to the system at once (mmap threshold fixed at 1 MiB).

    Sharded training gathers and frees a projection at a time; glibc's default raises its mmap threshold
    to 32 MiB after the first such free, so later gathers come from its heap, which keeps them: +~30% peak
    RSS per process measured (bench/distributed.py). Left alone when the user set MALLOC_MMAP_THRESHOLD_.
    """
    import ctypes
    import ctypes.util
    import os

    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None or not ctypes.util.find_library("c"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD (malloc.h)


def mesh() -> Any:
    """A one-dimensional device mesh over every process (gloo on CPU, NCCL on CUDA)."""
    from torch.distributed.device_mesh import init_device_mesh

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(kind, (dist.get_world_size(),))


# --- the base without its weights -----------------------------------------------------------------
def skeleton(directory: Path, task: str) -> tuple[nn.Module, dict[int, list[str]]]:
    """The model of ``directory`` with zero-memory stand-ins (NaN, one element, expanded) as weights,
    and each stand-in's names (a tied weight has several). An adapter init that reads base weights
    yields NaN, which :func:`check_adapter_init` turns into an error."""
    from deltatune.loading.streaming import meta_skeleton

    model = meta_skeleton(directory, task)
    names: dict[int, list[str]] = {}
    standins: dict[int, nn.Parameter] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in standins:
                fill = torch.full((), float("nan"), dtype=param.dtype).expand(param.shape)
                standins[id(param)] = nn.Parameter(fill, requires_grad=False)
            names.setdefault(id(standins[id(param)]), []).append(f"{module_name}.{name}".lstrip("."))
            module._parameters[name] = standins[id(param)]
    return model, names


def check_adapter_init(model: nn.Module, keys: dict[str, list[str]], method: str) -> None:
    """An adapter whose init reads the base weights (DoRA's magnitude, PiSSA, a prompt from vocabulary
    text) cannot be built before the weights load: say what to use instead. Trained copies of base
    modules (modules_to_save) are fine: they load from the checkpoint like the base (``keys``)."""
    bad = [n for n, p in model.named_parameters() if p.requires_grad and n not in keys and not torch.isfinite(p).all()]
    if bad:
        raise ConfigError(
            f"--fsdp: {method}'s initialisation reads the base weights ({bad[0]}{' ...' if len(bad) > 1 else ''}), "
            "which a sharded run builds without loading them: train it without --fsdp (DDP under torchrun), or use "
            "an init that does not read them (e.g. LoRA's default init, random prompt init, no modules_to_save)"
        )


def checkpoint_keys(module: nn.Module, names: dict[int, list[str]]) -> dict[str, list[str]]:
    """For each parameter of ``module`` that starts as base weights (by its name there), its names in the
    base's checkpoint: the frozen base, and the trained copies of base modules (modules_to_save)."""
    params = dict(module.named_parameters())
    keys = {fqn: names[id(p)] for fqn, p in params.items() if id(p) in names}
    for fqn in params:
        copy = _COPY.fullmatch(fqn)
        source = copy and f"{copy['module']}.base_layer.{copy['param']}"
        if source in keys:
            keys[fqn] = keys[source]
    return keys


_COPY = re.compile(r"(?P<module>.+)\.modules_to_save\.[^.]+\.(?P<param>.+)")


def standins_to_meta(module: nn.Module, names: dict[int, list[str]]) -> None:
    """Put meta tensors back in the stand-ins' places (FSDP shards contiguous tensors only), ties kept."""
    meta: dict[int, nn.Parameter] = {}
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and id(param) in names:
                if id(param) not in meta:
                    meta[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
                sub._parameters[name] = meta[id(param)]


def _all_modules(root: nn.Module) -> list[nn.Module]:
    return [module for _, module in root.named_modules(remove_duplicate=False)]


def materialize(root: nn.Module) -> None:
    """Give the sharded meta parameters memory (``to_empty``: this rank's shard only), keeping the values
    of everything already real (the adapter's shards, the buffers)."""

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    real = {n: local(t).clone() for n, t in [*root.named_parameters(), *root.named_buffers()] if not t.is_meta}
    places: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in _all_modules(root):
        for name, param in module._parameters.items():
            if param is not None:
                places.setdefault(id(param), []).append((module, name))
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    root.to_empty(device=device)
    for (first, first_name), *others in places.values():  # to_empty gives each use of a tied weight its own
        for module, name in others:
            module._parameters[name] = first._parameters[first_name]
    with torch.no_grad():
        for name, tensor in [*root.named_parameters(), *root.named_buffers()]:
            if name in real:
                local(tensor).copy_(real[name])


# --- sharding and loading -----------------------------------------------------------------------
def _weight_modules(block: nn.Module) -> list[nn.Module]:
    """The outermost modules of ``block`` that hold exactly one frozen matrix (a projection, with its
    adapter if it has one): sharded on their own, the gathered tensors at any time are one projection's."""

    def matrices(module: nn.Module) -> int:
        return sum(1 for p in module.parameters() if p.dim() == 2 and not p.requires_grad)

    found: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            count = matrices(child)
            if count == 1:
                found.append(child)
            elif count > 1:
                visit(child)

    visit(block)
    return found


def shard(root: nn.Module, base: nn.Module) -> None:
    """``fully_shard`` each projection of each decoder block (with its adapter), each block (the classes
    transformers keeps whole: ``_no_split_modules``), then ``root``, which gets the other trainable
    parameters (prompt encoders, trained head copies). Frozen and trainable tensors share their group.

    The frozen vocabulary tables (input embedding, output head: tied or not) are split by rows and used
    where they lie (:mod:`deltatune.vocab_split`), never gathered. The other frozen
    parameters outside the blocks (final norm) are left whole on every rank."""
    from torch.distributed.fsdp import fully_shard

    from deltatune.vocab_split import split_vocabulary

    blocks = set(getattr(base, "_no_split_modules", None) or ())
    device_mesh = mesh()
    layers = [m for m in base.modules() if type(m).__name__ in blocks]
    if not layers:
        raise ConfigError(f"--fsdp: {type(base).__name__} names no decoder block class (_no_split_modules)")
    split_vocabulary(base, device_mesh)
    for layer in layers:
        for module in _weight_modules(layer):
            fully_shard(module, mesh=device_mesh)
        fully_shard(layer, mesh=device_mesh)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    replicated = {p for p in root.parameters() if not p.requires_grad and id(p) not in in_layers}
    fully_shard(root, mesh=device_mesh, ignored_params=replicated)


def _checkpoint_files(directory: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> its safetensors file (one file, or shards listed by an index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {key: directory / file for key, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        raise ConfigError(f"--fsdp reads safetensors checkpoints; {directory} has no model.safetensors")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def load_shards(root: nn.Module, keys: dict[str, list[str]], directory: Path) -> None:
    """Fill each parameter that starts as base weights with its rows of the checkpoint (all rows for one
    kept whole), reading one slice at a time; the file is reopened per tensor so that the pages of the
    memory map read so far leave the process (else they would add up to this rank's share of the file)."""
    from safetensors import safe_open

    from deltatune.vocab_split import first_row

    files = _checkpoint_files(directory)
    params = dict(root.named_parameters())
    missing = [fqn for fqn in keys if not any(k in files for k in keys[fqn])]
    if missing:
        raise ConfigError(f"--fsdp: {directory} lacks {', '.join(keys[m][0] for m in missing[:5])}")
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for fqn, aliases in keys.items():
        key = next(k for k in aliases if k in files)
        by_file.setdefault(files[key], []).append((fqn, key))
    for file, entries in by_file.items():
        for fqn, key in entries:
            sharded = hasattr(params[fqn], "to_local")
            local = params[fqn].to_local() if sharded else params[fqn]
            if local.dim() == 0:
                with safe_open(file, "pt") as f, torch.no_grad():
                    local.copy_(f.get_slice(key)[:])
                continue
            with safe_open(file, "pt") as f:
                rows = f.get_slice(key).get_shape()[0]
            first = first_row(rows) if sharded else 0
            step = max(1, READ_BYTES // max(1, local[0].numel() * local.element_size()))
            for start in range(0, local.shape[0], step):  # a block of rows per opening of the file
                with safe_open(file, "pt") as f, torch.no_grad():
                    block = f.get_slice(key)[first + start : first + min(start + step, local.shape[0])]
                    local[start : start + len(block)].copy_(block)


# --- whole tensors for saving and loading -------------------------------------------------------------
def trainable_names(module: nn.Module) -> list[str]:
    return [n for n, p in module.named_parameters() if p.requires_grad]


def gather_trainable(root: nn.Module) -> dict[str, torch.Tensor]:
    """Whole trainable tensors on rank 0 (CPU), an empty dict elsewhere; every rank must call it. One tensor
    is gathered at a time and no frozen one ever is (``get_model_state_dict`` would gather the split
    vocabulary table whole, twice when it is tied, before dropping it: +0.75 GB per process on the bench)."""
    whole: dict[str, torch.Tensor] = {}
    for name in trainable_names(root):
        param = root.get_parameter(name)
        tensor = param.full_tensor() if hasattr(param, "full_tensor") else param.detach()
        if dist.get_rank() == 0:
            whole[name] = tensor.detach().to("cpu", copy=True)
    return whole


@contextlib.contextmanager
def whole_trainable(root: nn.Module, tensors: dict[str, torch.Tensor] | None = None) -> Iterator[dict]:
    """Swap plain, whole tensors in for the sharded trainable parameters while the block runs (so the
    adapter writer and reader see ordinary tensors); ``tensors`` gives them, else zeros. The sharded
    parameters are back in place afterwards."""
    whole: dict[str, nn.Parameter] = {}
    saved: list[tuple[nn.Module, str, nn.Parameter]] = []
    for fqn in trainable_names(root):
        owner_name, _, name = fqn.rpartition(".")
        owner = root.get_submodule(owner_name)
        param = owner._parameters[name]
        value = tensors[fqn] if tensors is not None else torch.zeros(param.shape, dtype=param.dtype)
        whole[fqn] = nn.Parameter(value.detach().clone(), requires_grad=True)
        saved.append((owner, name, param))
        owner._parameters[name] = whole[fqn]
    try:
        yield whole
    finally:
        for owner, name, param in saved:
            owner._parameters[name] = param


def load_trainable(root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Shard whole trainable tensors (present on every rank) into the model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(root, {k: v.detach() for k, v in tensors.items()}, options=options)


def optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The whole optimizer state on rank 0 in ``Optimizer.state_dict()``'s layout (parameters numbered in
    order), so that a one-process run can load it; every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_optimizer_state_dict(root, optimizer, options=options)
    order = _group_order(root, optimizer)  # numbered as Optimizer.state_dict() does: group after group
    index = {fqn: i for i, fqn in enumerate(order)}
    groups = [{**g, "params": [index[f] for f in g["params"]]} for g in state.get("param_groups", [])]
    return {"state": {index[f]: v for f, v in state.get("state", {}).items()}, "param_groups": groups}


def _group_order(root: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The optimizer's parameters by name, group after group (LoRA+ puts B factors in groups of their own)."""
    name = {id(p): n for n, p in root.named_parameters()}
    return [name[id(p)] for group in optimizer.param_groups for p in group["params"]]


def load_optimizer_state(root: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a numbered (one-process layout) optimizer state into the sharded optimizer."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _group_order(root, optimizer)
    groups = [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]
    named = {"state": {names[i]: v for i, v in state["state"].items()}, "param_groups": groups}
    set_optimizer_state_dict(root, optimizer, named, options=StateDictOptions(full_state_dict=True))


@contextlib.contextmanager
def unsharded(root: nn.Module) -> Iterator[None]:
    """The root's parameters gathered for calls that bypass its forward (evaluation, generation);
    the blocks gather their own in their forwards. Every rank must run the same calls inside."""
    state = root._get_fsdp_state()
    state._lazy_init()  # the root must be known before any block's forward runs
    root.unshard()
    try:
        yield
    finally:
        root.reshard()


# --- the trainer's entry points --------------------------------------------------------------------
def build(base: str, task: str, method_config: Any, attention: str, attention_options: dict, pad_id: int | None):
    """(DeltaModel, root, checkpoint directory): the adapted model sharded under ``root`` (its loss module),
    base weights loaded shard by shard."""
    from deltatune.attention import set_attention, with_pattern_modules
    from deltatune.loading.base_models import _dense_smollm2, resolve_model_dir
    from deltatune.loss import LossModule
    from deltatune.model import wrap

    return_freed_memory()
    directory, spec = resolve_model_dir(base)
    if spec is not None and spec.gguf_file:
        directory = _dense_smollm2(directory, spec)
    model, names = skeleton(directory, task)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id
    set_attention(model, attention, **attention_options)
    delta = wrap(model, with_pattern_modules(method_config, model, attention))
    root = LossModule(delta, task)
    keys = checkpoint_keys(root, names)
    check_adapter_init(root, keys, type(method_config).__name__)
    standins_to_meta(root, names)
    shard(root, model)
    materialize(root)
    load_shards(root, keys, directory)
    return delta, root


def save_sharded_checkpoint(root, model, optimizer, scheduler, position, config, out: Path, keep: int) -> None:
    """Gather the adapter and optimizer state whole; rank 0 writes an ordinary checkpoint."""
    from deltatune.training.checkpoints import save_checkpoint

    tensors, state = gather_trainable(root), optimizer_state(root, optimizer)
    if dist.get_rank() == 0:
        with whole_trainable(root, tensors):
            save_checkpoint(out, model, optimizer, scheduler, position, config, keep, optimizer_state=state)
    dist.barrier()


def load_sharded_checkpoint(path: Path, root, model, optimizer, scheduler):
    """An ordinary checkpoint (from any number of processes, sharded or not) into the sharded model."""
    from deltatune.training.checkpoints import STATE_NAME, load_checkpoint

    with whole_trainable(root) as whole:
        position, config = load_checkpoint(path, model, None, scheduler)
    load_trainable(root, whole)
    load_optimizer_state(root, optimizer, torch.load(path / STATE_NAME, weights_only=True)["optimizer"])
    return position, config
