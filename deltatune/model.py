"""DeltaModel: one frozen transformers model plus any number of named adapters.

The wrapped model keeps its own forward and generate; adapters live inside it as
:class:`~deltatune.methods.base.DeltaLayer` wrappers around the modules they adapt, so a
DeltaModel forwards (and trains under ``transformers.Trainer``) exactly like the base model.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune import methods, mixed, routing
from deltatune.checkpoint.adapter import (
    KEY_PREFIX,
    load_tensors,
    load_training_state,
    save_tensors,
    save_training_state,
    split_by_module,
)
from deltatune.config import ConfigError, DeltaConfig
from deltatune.constants import BASE_ADAPTER, valid_name
from deltatune.data.positions import check_prompts
from deltatune.methods import lora_init
from deltatune.methods.base import DeltaLayer, ModulesToSave, wrap_modules
from deltatune.quantization import QuantizedLinear, base_storage, is_quantized
from deltatune.targeting import find_targets, name_matches
from deltatune.wrappers import ForwardsAttributes, replace_module

_TASK_TYPES = {
    "ForSequenceClassification": "SEQ_CLS",
    "ForCausalLM": "CAUSAL_LM",
    "LMHeadModel": "CAUSAL_LM",
    "ForTokenClassification": "TOKEN_CLS",
    "ForQuestionAnswering": "QUESTION_ANS",
}
_CLASSIFIER_HEADS = ("classifier", "score")


def infer_task_type(model: nn.Module) -> str | None:
    cls = type(model).__name__
    return next((task for suffix, task in _TASK_TYPES.items() if cls.endswith(suffix)), None)


def wrap(model: nn.Module, config: DeltaConfig, adapter_name: str = "default") -> DeltaModel:
    """Freeze ``model`` and add adapter ``adapter_name``; the returned DeltaModel trains it."""
    return DeltaModel(model, config, adapter_name)


class DeltaModel(ForwardsAttributes, nn.Module):
    """A transformers model with adapters. ``base_model`` is the (modified in place) model, whose
    attributes (``config``, ``device``...) read through (ForwardsAttributes)."""

    forwards_to = "base_model"

    def __init__(self, base_model: nn.Module, config: DeltaConfig, adapter_name: str = "default") -> None:
        super().__init__()
        if isinstance(base_model, DeltaModel):
            raise TypeError("this model is already a DeltaModel: use add_adapter to add another adapter")
        self.base_model = base_model
        self.peft_config: dict[str, DeltaConfig] = {}
        self.active_adapter: str | None = None
        self.adapters_disabled = False
        for p in base_model.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # --- forwarding -------------------------------------------------------------------------
    def forward(
        self, *args: Any, adapter_names: list[str] | None = None, adapter_name: str | None = None, **kwargs: Any
    ) -> Any:
        """The base model's forward with the active adapter; or with ``adapter_name`` for this call
        only (``"__base__"``: none); or with ``adapter_names``: one adapter per row, all rows in one
        pass (see deltatune.mixed). The per-call forms change nothing on the model, so threads may
        use them at once (see deltatune.routing)."""
        if adapter_names is not None:
            _one_of(adapter_name, adapter_names)
            return mixed.forward(self, adapter_names, self._keywords(args, kwargs))
        with self.call_scope(adapter_name):
            if args and self._method_hook("prepare_inputs", self._running(adapter_name)) is not None:
                args, kwargs = (), self._keywords(args, kwargs)  # input hooks must see input_ids
            return self.base_model(*args, **self.prepare_inputs(kwargs, adapter_name))

    def generate(
        self, *args: Any, adapter_names: list[str] | None = None, adapter_name: str | None = None, **kwargs: Any
    ) -> Any:
        """transformers' generate with the active adapter, ``adapter_name`` for this call, or one
        adapter per row (``adapter_names``). Inputs that would run past the model's positions are
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
        for name, module in self.base_model.named_modules():
            if isinstance(module, DeltaLayer):
                yield name, module

    def add_adapter(self, adapter_name: str, config: DeltaConfig) -> None:
        """Add a new adapter (not made active: call :meth:`set_adapter`)."""
        if not valid_name(adapter_name):
            raise ValueError(f"adapter name {adapter_name!r} must be letters, digits, '_' or '-'")
        if adapter_name == BASE_ADAPTER:
            raise ValueError(f"{BASE_ADAPTER!r} is reserved for 'no adapter'")
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; delete_adapter it first or pick another name")
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
        methods.inject(self.base_model, adapter_name, config)
        for layer in wrap_modules(self.base_model, dict.fromkeys(save_names, ModulesToSave)).values():
            layer.add(adapter_name)
        self.peft_config[adapter_name] = config
        for _, layer in self.delta_layers():  # new parameters follow the current trainable set
            for p in layer.adapter_parameters(adapter_name):
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
            for name in layer.adapter_names:
                for p in layer.adapter_parameters(name):
                    p.requires_grad_(name in names and not self.peft_config[name].inference_mode)

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
        self.check_adapter(adapter_name)
        for name, layer in list(self.delta_layers()):
            layer.delete_adapter(adapter_name)
            if not layer.adapter_names:
                replace_module(self.base_model, name, layer.base_layer)
        del self.peft_config[adapter_name]
        active = [n for n in self.active_adapters if n != adapter_name]
        if self.active_adapter == adapter_name or len(active) < len(self.active_adapters):
            self.active_adapter = (active or [next(iter(self.peft_config), None)])[0]
            if self.active_adapter is not None:
                self.set_adapter(active or self.active_adapter)

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
        size, weights = base_storage(self.base_model)
        kind = is_quantized(self.base_model) or "not quantized"
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
        self.peft_config.clear()
        routing.remove_step_hook(self.base_model)
        return self.base_model

    def unload(self) -> nn.Module:
        """Remove every adapter without merging; return the plain base model."""
        self.unmerge_adapter()
        for name, layer in list(self.delta_layers()):
            replace_module(self.base_model, name, layer.base_layer)
        self.peft_config.clear()
        routing.remove_step_hook(self.base_model)
        return self.base_model

    # --- checkpoints ------------------------------------------------------------------------
    def adapter_state_dict(
        self, adapter_name: str | None = None, training_state: bool = False
    ) -> dict[str, torch.Tensor]:
        """The adapter's tensors under peft's checkpoint keys (``training_state``: the tensors only
        resuming training needs, see :meth:`DeltaLayer.training_state_dict`, under the same keys)."""
        adapter_name = adapter_name or self.active_adapter
        self.check_adapter(adapter_name)
        prefix = self._key_prefix(adapter_name)
        out = {}
        for name, layer in self.delta_layers():
            get = layer.training_state_dict if training_state else layer.adapter_state_dict
            for key, value in get(adapter_name).items():
                out[key if layer.top_level_keys else f"{prefix}{name}.{key}"] = value
        return out

    def _key_prefix(self, adapter_name: str) -> str:
        """peft prefixes module paths with ``base_model.model.``; a config may say otherwise (peft's
        prompt-learning methods, whose model has no tuner layer in between, use ``base_model.``)."""
        return getattr(self.peft_config[adapter_name], "checkpoint_key_prefix", KEY_PREFIX)

    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: list[str] | None = None,
        path_initial_model_for_weight_conversion: str | Path | None = None,
    ) -> None:
        """Write each adapter in peft's layout: ``default`` at the top, others in sub-directories.
        ``path_initial_model_for_weight_conversion``: where a PiSSA/OLoRA adapter was saved right after
        initialisation; it is then written as a plain LoRA for the original base (see lora_init)."""
        for name in selected_adapters or list(self.peft_config):
            self.check_adapter(name)
            directory = Path(save_directory) if name == "default" else Path(save_directory) / name
            config = copy.copy(self.peft_config[name])
            config.inference_mode = True
            if config.task_type == "SEQ_CLS" and not self._trains_head(name):
                # peft's SEQ_CLS model always loads a saved head; its plain PeftModel keeps the base's.
                config.task_type = None
            tensors = self.adapter_state_dict(name)
            if path_initial_model_for_weight_conversion is not None:
                config, tensors = lora_init.converted(config, tensors, path_initial_model_for_weight_conversion)
            save_tensors(directory, tensors, metadata={"format": "pt"})
            save_training_state(directory, self.adapter_state_dict(name, training_state=True))
            config.save(directory)

    def _trains_head(self, adapter_name: str) -> bool:
        """Whether the adapter holds its own copy of a classification head (modules_to_save)."""
        return any(
            isinstance(layer, ModulesToSave)
            and adapter_name in layer.adapter_names
            and name.rsplit(".", 1)[-1] in _CLASSIFIER_HEADS
            for name, layer in self.delta_layers()
        )

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, path: str | Path, adapter_name: str = "default", is_trainable: bool = False
    ) -> DeltaModel:
        """Load an adapter saved by deltatune or peft onto ``base_model``."""
        model = cls(base_model, _saved_config(base_model, path, is_trainable), adapter_name)
        try:
            model.load_adapter_weights(path, adapter_name)
        except Exception:
            model.unload()  # leave the caller's base model as it was
            raise
        return model

    def load_adapter(self, path: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        self.add_adapter(adapter_name, _saved_config(self.base_model, path, is_trainable))
        try:
            self.load_adapter_weights(path, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise

    def load_adapter_weights(self, path: str | Path, adapter_name: str) -> None:
        """Load tensors, requiring every tensor to find its module and every module its tensors."""
        tensors = load_tensors(path) | load_training_state(path)
        layers = {n: layer for n, layer in self.delta_layers() if adapter_name in layer.adapter_names}
        prefix = self._key_prefix(adapter_name)
        top = next((n for n, layer in layers.items() if layer.top_level_keys), None)
        by_module, unmatched = split_by_module(tensors, [n for n in layers if n != top], prefix, top)
        problems = []
        for name, layer in layers.items():
            if name not in by_module:
                problems.append(
                    f"no tensors for {name}, which adapter_config.json lists in modules_to_save (a trained copy)"
                    if isinstance(layer, ModulesToSave)
                    else f"no tensors for adapted module {name} ({type(layer).__name__})"
                )
                continue
            try:
                leftover = layer.load_adapter_state_dict(adapter_name, by_module[name])
            except (KeyError, ValueError) as err:
                problems.append(f"{name}: {err.args[0]}")
                continue
            unmatched += [k if layer.top_level_keys else f"{prefix}{name}.{k}" for k in leftover]
        if unmatched:
            problems.append(
                f"tensors that match no adapted module: {', '.join(sorted(unmatched)[:10])}"
                + (f" (+{len(unmatched) - 10} more)" if len(unmatched) > 10 else "")
            )
        if problems:
            raise ConfigError(f"adapter at {path} does not fit this model:\n  " + "\n  ".join(problems))
        self.set_adapter(self.active_adapters)


def _one_of(adapter_name: str | None, adapter_names: list[str]) -> None:
    if adapter_name is not None:
        raise TypeError("give adapter_name (one adapter for the call) or adapter_names (one per row), not both")


def _saved_config(base_model: nn.Module, path: str | Path, is_trainable: bool) -> DeltaConfig:
    """A saved config, made to fit: peft lists head names for every architecture ("classifier",
    "score"), so absent ones are dropped here; the strict tensor check still catches real misfits.

    Without a task_type peft builds a plain PeftModel, which saves exactly the modules_to_save the
    config lists (none: the base model's own head stays). Such a config keeps its list, even an
    empty one, so that :meth:`DeltaModel.add_adapter` does not add a head the file has no tensors for.
    """
    config = DeltaConfig.load(path)
    config.inference_mode = not is_trainable
    if config.modules_to_save:
        names = [n for n, _ in base_model.named_modules()]
        config.modules_to_save = [e for e in config.modules_to_save if any(name_matches(n, e) for n in names)] or None
    if config.task_type is None and config.modules_to_save is None:
        config.modules_to_save = []
    return config


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
