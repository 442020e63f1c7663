"""DeltaModel: one frozen transformers model plus any number of named adapters.

The wrapped model keeps its own forward and generate; adapters live inside it as
:class:`~deltatune.methods.base.DeltaLayer` wrappers around the modules they adapt, so a
DeltaModel forwards (and trains under ``transformers.Trainer``) exactly like the base model.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from deltatune import methods, mixed, routing
from deltatune.adapter_names import check_name
from deltatune.config import DeltaConfig
from deltatune.constants import BASE_ADAPTER
from deltatune.data.positions import check_prompts
from deltatune.methods.base import DeltaLayer, ModulesToSave, wrap_modules
from deltatune.model_checkpoints import CLASSIFIER_HEADS, AdapterCheckpoints
from deltatune.quantization import QuantizedLinear, base_kind, base_storage
from deltatune.targeting import find_targets
from deltatune.wrappers import ForwardsAttributes, replace_module

__all__ = ["BASE_ADAPTER", "DeltaModel", "infer_task_type", "wrap"]

_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}
_CLASSIFIER_HEADS = CLASSIFIER_HEADS


def infer_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if cls.endswith(suffix)), None)


def wrap(model: nn.Module, config: DeltaConfig, adapter_name: str = "default") -> DeltaModel:
    """Freeze ``model`` and add adapter ``adapter_name``; the returned DeltaModel trains it."""
    return DeltaModel(model, config, adapter_name)


class DeltaModel(AdapterCheckpoints, ForwardsAttributes, nn.Module):
    """A transformers model with adapters. ``base_model`` is the (modified in place) model, whose
    attributes (``config``, ``device``...) read through (ForwardsAttributes).

    ``DeltaModel(base)`` holds no adapter and runs the base; so does a model whose last adapter was
    deleted or unloaded. ``DeltaModel(base, config)`` adds adapter ``adapter_name`` and makes it active."""

    forwards_to = "base_model"

    def __init__(self, base_model: nn.Module, config: DeltaConfig | None = None, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(base_model, DeltaModel):
            raise TypeError("this model is already a DeltaModel: use add_adapter to add another adapter")
        if config is not None:
            check_name(adapter_name)  # before the base model is touched
        self.base_model = base_model
        self.peft_config: dict[str, DeltaConfig] = {}
        self.active_adapter: str | None = None
        self.adapters_disabled = False
        for p in base_model.parameters():
            p.requires_grad_(False)
        if config is not None:
            self.add_adapter(adapter_name, config)
            self.set_adapter(adapter_name)

    # --- forwarding -------------------------------------------------------------------------
    def forward(
        self,
        *args: Any,
        adapter_names: list[str] | routing.RowAdapters | None = None,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """The base model's forward with the active adapter; or with ``adapter_name`` for this call
        only (``"__base__"``: none); or with ``adapter_names``: one adapter per row, all rows in one
        pass (see deltatune.mixed). ``adapter_names`` may also be a :class:`~deltatune.routing.RowAdapters`
        built for the rows by the caller, whose names it has checked (``mixed.check``): ``deltatune serve``
        passes its adapter slots' routing (``SlotTable.rows``) this way, every step. The per-call forms
        change nothing on the model, so threads may use them at once (see deltatune.routing)."""
        if adapter_names is not None:
            _one_of(adapter_name, adapter_names)
            return mixed.forward(self, adapter_names, self._keywords(args, kwargs))
        with self.call_scope(adapter_name):
            if args and self._method_hook("prepare_inputs", self._running(adapter_name)) is not None:
                args, kwargs = (), self._keywords(args, kwargs)  # input hooks must see input_ids
            return self.base_model(*args, **self.prepare_inputs(kwargs, adapter_name))

    def generate(
        self,
        *args: Any,
        adapter_names: list[str] | routing.RowAdapters | None = None,
        adapter_name: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """transformers' generate with the active adapter, ``adapter_name`` for this call, or one
        adapter per row (``adapter_names``, as in :meth:`forward`). Inputs that would run past the model's positions are
        refused (transformers only warns, then computes garbage)."""
        _check_generate_positions(self, args, kwargs)
        if adapter_names is not None:
            _one_of(adapter_name, adapter_names)
            return mixed.generate(self, adapter_names, *args, **kwargs)
        with self.call_scope(adapter_name):
            name = self._running(adapter_name)
            hook = self._method_hook("generate", name)
            if hook is None:
                return self.base_model.generate(
                    *args, **self.prepare_inputs(kwargs, adapter_name) if name is None else kwargs
                )
            return hook(self, name, *args, **kwargs)

    def prepare_inputs(self, kwargs: dict[str, Any], adapter_name: str | None = None) -> dict[str, Any]:
        """The base model's forward arguments with the changes of the adapter the call runs (the
        active one, or ``adapter_name``): virtual tokens, prefix caches, task ids...; most methods
        change weights and leave them as they are."""
        name = self._running(adapter_name)
        if name is None:
            own = {key for config in self.peft_config.values() for key in methods.method_for(config).input_keys}
            return {k: v for k, v in kwargs.items() if k not in own}
        hook = self._method_hook("prepare_inputs", name)
        return kwargs if hook is None else hook(self, name, dict(kwargs))

    def _running(self, adapter_name: str | None = None) -> str | None:
        """The adapter a call runs: ``adapter_name`` if given, else the active one (None: the base)."""
        if adapter_name is None:
            return None if self.adapters_disabled else self.active_adapter
        return None if adapter_name == BASE_ADAPTER else adapter_name

    def call_scope(self, adapter_name: str | None = None) -> contextlib.AbstractContextManager[Any]:
        """The scope of one call (see deltatune.routing): ``adapter_name`` (checked first) or the active
        adapter, with state of its own that nothing outside the call sees. ``forward``/``generate`` open
        one; open it yourself around ``prepare_inputs`` plus the base model's forward (as the trainer's
        loss does). A call nested in another model's scope gets a clean one, so it inherits nothing."""
        if adapter_name is None:
            return routing.scope(**{**routing.EMPTY, "state": {}})
        if adapter_name != BASE_ADAPTER:
            self.check_adapter(adapter_name)
        if self.adapters_disabled and adapter_name != BASE_ADAPTER:
            raise ValueError("adapter_name inside disable_adapter(): name '__base__' for no adapter")
        merged = self.merged_adapter
        if merged is not None and adapter_name != merged:
            raise ValueError(
                f"adapter {merged!r} is merged into the base weights: call unmerge_adapter() before running "
                f"adapter {adapter_name!r}"
            )
        return routing.scope(**{**routing.EMPTY, "adapter": adapter_name, "state": {}})

    def _keywords(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Positional forward arguments by their names in the base model's forward."""
        if not args:
            return kwargs
        names = list(inspect.signature(self.base_model.forward).parameters)[: len(args)]
        return {**dict(zip(names, args, strict=True)), **kwargs}

    def _method_hook(self, name: str, adapter_name: str | None) -> Any:
        """The ``prepare_inputs``/``generate`` hook of ``adapter_name``'s method (None: none, or no adapter)."""
        if adapter_name is None:
            return None
        return getattr(methods.method_for(self.peft_config[adapter_name]), name)

    # --- adapters ---------------------------------------------------------------------------
    def delta_layers(self) -> Iterator[tuple[str, DeltaLayer]]:
        """Every wrapped layer with its path, in ``named_modules`` order (each module once). A walk by hand:
        ``named_modules`` nests a generator per level and visits every adapter's own modules (a server
        holding 16 adapters has thousands), and a server walks the layers at each adapter load."""
        seen: set[int] = set()
        stack: list[tuple[str, nn.Module]] = [("", self.base_model)]
        while stack:
            path, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            if isinstance(module, DeltaLayer):
                yield path, module
            children = [
                (f"{path}.{name}" if path else name, child)
                for name, child in module._modules.items()
                if child is not None and (child._modules or isinstance(child, DeltaLayer))  # a leaf holds none
            ]
            stack.extend(reversed(children))

    def add_adapter(self, adapter_name: str, config: DeltaConfig) -> None:
        """Add a new adapter (not made active: call :meth:`set_adapter`). Everything that can be checked
        (the name, modules_to_save) is checked before a module is wrapped, and a method that fails
        halfway through wrapping is undone, so a refused adapter leaves the model as it was."""
        check_name(adapter_name, taken=self.peft_config)
        if not isinstance(config, DeltaConfig):
            raise TypeError(f"expected a deltatune config such as LoraConfig, got {type(config).__name__}")
        config = copy.deepcopy(config)
        config.task_type = config.task_type or infer_task_type(self.base_model)
        if config.modules_to_save is None and config.task_type == "SEQ_CLS":
            names = {n.rsplit(".", 1)[-1] for n, _ in self.base_model.named_modules()}
            config.modules_to_save = [h for h in _CLASSIFIER_HEADS if h in names] or None
        if config.base_model_name_or_path is None:
            config.base_model_name_or_path = (
                getattr(getattr(self.base_model, "config", None), "name_or_path", None) or None
            )
        # Resolve modules_to_save before injecting so a bad entry changes nothing.
        save_names = self._resolve_modules_to_save(config.modules_to_save)
        try:
            methods.inject(self.base_model, adapter_name, config)
            for layer in wrap_modules(self.base_model, dict.fromkeys(save_names, ModulesToSave)).values():
                layer.add(adapter_name)
        except BaseException:
            self._remove_from_layers(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        for _, layer in self.delta_layers():
            follow_base_mode(layer, adapter_name)
            for p in layer.adapter_parameters(adapter_name):  # new parameters follow the current trainable set
                p.requires_grad_(adapter_name == self.active_adapter)

    def _resolve_modules_to_save(self, entries: list[str] | None) -> list[str]:
        if not entries:
            return []
        return find_targets(
            self.base_model,
            entries,
            allowed_types=(nn.Module,),
            skip=lambda n, m: isinstance(m, DeltaLayer) and not isinstance(m, ModulesToSave),
        )

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` the one that runs and trains; all others are frozen. A list makes
        several active at once (peft's multi-active; LoRA, DoRA, LoKr: their deltas add, (IA)³: scales
        multiply): all of them run and train; ``active_adapter`` is then the first."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names or [""]:
            self.check_adapter(name)
        if len(names) > 1:
            methods.check_several_active(self, names)
        self.active_adapter = names[0]
        for _, layer in self.delta_layers():
            layer.active_adapter = names[0]
            layer.active_adapters = tuple(names) if len(names) > 1 else ()
            for name, params in layer.parameters_by_adapter().items():
                trains = name in names and not self.peft_config[name].inference_mode
                for p in params:
                    p.requires_grad_(trains)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str, **options: Any):
        """Add ``adapter_name``, the LoRA ``adapters`` combined with ``weights`` (peft's options:
        combination_type, svd_rank, density, majority_sign_method, ...; see deltatune.methods.combine)."""
        from deltatune.methods.combine import add_weighted_adapter

        add_weighted_adapter(self, adapters, weights, adapter_name, **options)

    @property
    def active_adapters(self) -> list[str]:
        """The adapters that run (several after ``set_adapter([...])``), as peft names it."""
        layer = next((layer for _, layer in self.delta_layers()), None)
        several = list(layer.active_adapters) if layer is not None else []
        return several or ([self.active_adapter] if self.active_adapter is not None else [])

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter; a module left with no adapter gets its plain base layer back (the last
        adapter gone, the model runs as the base and takes new adapters)."""
        self.check_adapter(adapter_name)
        self._remove_from_layers(adapter_name)
        del self.peft_config[adapter_name]
        active = [n for n in self.active_adapters if n != adapter_name]
        if self.active_adapter == adapter_name or len(active) < len(self.active_adapters):
            self.active_adapter = (active or [next(iter(self.peft_config), None)])[0]
            if self.active_adapter is not None:
                self.set_adapter(active or self.active_adapter)

    def rename_adapter(self, old: str, new: str) -> None:
        """Call adapter ``old`` ``new`` from now on, everywhere (its weights, config, active or merged
        state stay): a server that swaps one adapter's weights for another's in place renames it."""
        self.check_adapter(old)
        check_name(new, taken=self.peft_config)
        for _, layer in self.delta_layers():
            layer.rename_adapter(old, new)
        renamed = {new if n == old else n: c for n, c in self.peft_config.items()}
        self.peft_config.clear()  # the same dict: others may hold it
        self.peft_config.update(renamed)
        if self.active_adapter == old:
            self.active_adapter = new

    def _remove_from_layers(self, adapter_name: str) -> None:
        for name, layer in list(self.delta_layers()):
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                replace_module(self.base_model, name, layer.base_layer)

    def check_adapter(self, adapter_name: str) -> None:
        """Raise KeyError, naming the adapters there are, unless ``adapter_name`` is one of them."""
        if adapter_name not in self.peft_config:
            raise KeyError(
                f"no adapter named {adapter_name!r}; this model has: {', '.join(self.peft_config) or 'none'}"
            )

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Run as the plain base model inside the block (a merged adapter is unmerged meanwhile)."""
        merged = self.merged_adapter
        self.unmerge_adapter()
        layers = [layer for _, layer in self.delta_layers()]
        for layer in layers:
            layer.disabled = True
        self.adapters_disabled = True
        try:
            yield
        finally:
            self.adapters_disabled = False
            for layer in layers:
                layer.disabled = False
            if merged is not None:
                self.merge_adapter(merged)

    # --- torch.compile ----------------------------------------------------------------------
    def not_compilable(self) -> str | None:
        """Why ``torch.compile`` cannot run this model's adapters, as one line naming the method; None if it can."""
        for config in self.peft_config.values():
            method = methods.method_for(config)
            if not method.compilable:
                return f"{method.name} cannot be compiled: {method.not_compilable_because}"
        return None

    def compiled_part(self) -> nn.Module:
        """The part :meth:`compile` compiles: the transformer body that holds the adapters (transformers'
        ``base_model``: ``LlamaForCausalLM.model``), so every path through it (forward, generate, the
        trainer's loss, which runs body and head apart) uses the compiled graph."""
        body = getattr(self.base_model, "base_model", None)
        return body if isinstance(body, nn.Module) else self.base_model

    def compile(self, *args: Any, **kwargs: Any) -> bool:
        """``torch.compile`` (same arguments) the transformer body in place; module names and state-dict keys
        stay as they are. The output head stays eager (the trainer fuses it with the loss). A model whose
        method cannot be compiled warns one line naming it and why, and runs uncompiled. Returns whether
        it compiled. (``torch.compile(model)`` of the whole DeltaModel also works, with no graph break.)"""
        reason = self.not_compilable()
        if reason is not None:
            warnings.warn(f"{reason}; running uncompiled", stacklevel=2)
            return False
        self.compiled_part().compile(*args, **kwargs)
        return True

    # --- parameters -------------------------------------------------------------------------
    def trainable_parameters(self) -> tuple[int, int]:
        """(trainable, total) parameter counts; total includes the frozen base (a quantized weight
        counts its in×out weights, not its packed codes)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        codes = {id(t) for m in self.modules() if isinstance(m, QuantizedLinear) for t in m.quantized_tensors()}
        weights = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, QuantizedLinear))
        return trainable, weights + sum(p.numel() for p in self.parameters() if id(p) not in codes)

    def print_trainable_parameters(self) -> None:
        """peft's line, then the frozen base's size and bytes per weight (int8: ~1, nf4: ~0.5, float32: 4)."""
        trainable, total = self.trainable_parameters()
        print(f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")
        (size, weights), kind = base_storage(self.base_model), base_kind(self.base_model)
        print(f"base: {size / 2**20:,.1f} MiB, {size / max(weights, 1):.2f} bytes per weight ({kind})")

    # --- merging ----------------------------------------------------------------------------
    @property
    def merged_adapter(self) -> str | None:
        return next((layer.merged_adapter for _, layer in self.delta_layers() if layer.merged_adapter), None)

    def merge_adapter(self, adapter_name: str | None = None) -> None:
        """Fold the adapter into the base weights: same outputs, no added latency."""
        adapter_name = adapter_name or self.active_adapter
        self.check_adapter(adapter_name)
        layers = [layer for _, layer in self.delta_layers() if adapter_name in layer.adapter_names]
        method = methods.method_for(self.peft_config[adapter_name])
        if not method.merges:  # refuse before anything is folded in
            kinds = ", ".join(sorted({type(layer).__name__ for layer in layers if type(layer) in method.layer_classes}))
            merging = methods.describe([m for m in methods.registered() if m.merges])
            raise TypeError(
                f"adapter {adapter_name!r} cannot be merged: {method.name} ({kinds}) adds modules that do not fold "
                f"into the base weights (methods that merge: {merging})"
            )
        for layer in layers:
            layer.merge(adapter_name)

    def unmerge_adapter(self) -> None:
        for _, layer in self.delta_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapter and return the plain transformers model, with no deltatune modules."""
        self.merge_adapter()
        for name, layer in list(self.delta_layers()):
            replace_module(self.base_model, name, layer.unwrap())
        methods.finalize_merged(self.peft_config[self.active_adapter], self.base_model)
        self._forget_adapters()
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the plain base model."""
        self.unmerge_adapter()
        for name, layer in list(self.delta_layers()):
            replace_module(self.base_model, name, layer.base_layer)
        self._forget_adapters()
        return self.base_model

    def _forget_adapters(self) -> None:
        """No adapter left (the modules are unwrapped): the model runs as the base and takes new ones."""
        self.peft_config.clear()
        self.active_adapter = None
        routing.remove_step_hook(self.base_model)


def _one_of(adapter_name: str | None, adapter_names: list[str]) -> None:
    if adapter_name is not None:
        raise TypeError("give adapter_name (one adapter for the call) or adapter_names (one per row), not both")


def _check_generate_positions(model: DeltaModel, args: tuple, kwargs: dict[str, Any]) -> None:
    """Each row's tokens (its attention mask's, when given) plus the tokens to generate must fit."""
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        return
    mask = kwargs.get("attention_mask")
    lengths = mask.sum(-1).tolist() if isinstance(mask, torch.Tensor) else [input_ids.shape[-1]] * len(input_ids)
    config = kwargs.get("generation_config") or getattr(model.base_model, "generation_config", None)
    new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if new is None:
        total = kwargs.get("max_length", getattr(config, "max_length", None))
        new = max(0, total - input_ids.shape[-1]) if isinstance(total, int) else 0
    check_prompts(model, [range(int(n)) for n in lengths], int(new))


def follow_base_mode(layer: DeltaLayer, adapter_name: str) -> None:
    """A new wrapper and ``adapter_name``'s modules in it take the mode (train/eval) of the module they adapt,
    so an adapter added to a model in eval mode runs without dropout, with no ``model.eval()`` over every
    module after each load (a server loads one per request)."""
    mode = layer.base_layer.training
    if layer.training != mode:  # a new wrapper (modules start in training mode): all of it
        layer.train(mode)
        return
    for attr in layer.adapter_attrs:
        store = getattr(layer, attr)
        if adapter_name in store and isinstance(store[adapter_name], nn.Module):  # (a ModuleDict has no get)
            store[adapter_name].train(mode)
