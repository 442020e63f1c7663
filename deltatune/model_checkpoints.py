"""DeltaModel's checkpoints: each adapter saved and loaded in Hugging Face peft's layout
(``adapter_config.json`` plus ``adapter_model.safetensors``, keys without the adapter name), strictly:
every tensor must find its module and every adapted module its tensors."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune import methods
from deltatune.checkpoint.adapter import (
    KEY_PREFIX,
    load_tensors,
    load_training_state,
    save_tensors,
    save_training_state,
    split_by_module,
)
from deltatune.config import ConfigError, DeltaConfig
from deltatune.methods.base import ModulesToSave
from deltatune.targeting import name_matches

CLASSIFIER_HEADS = ("classifier", "score")


class AdapterCheckpoints:
    """``save_pretrained``/``from_pretrained``/``load_adapter`` and the state dicts under them, for DeltaModel."""

    base_model: nn.Module
    peft_config: dict[str, DeltaConfig]
    active_adapter: str | None

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
        initialisation; it is then written as a plain LoRA for the original base (the method's ``convert_saved``)."""
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
                convert = _converter(config)
                config, tensors = convert(config, tensors, path_initial_model_for_weight_conversion)
            save_tensors(directory, tensors, metadata={"format": "pt"})
            save_training_state(directory, self.adapter_state_dict(name, training_state=True))
            config.save(directory)

    def _trains_head(self, adapter_name: str) -> bool:
        """Whether the adapter holds its own copy of a classification head (modules_to_save)."""
        return any(
            isinstance(layer, ModulesToSave)
            and adapter_name in layer.adapter_names
            and name.rsplit(".", 1)[-1] in CLASSIFIER_HEADS
            for name, layer in self.delta_layers()
        )

    @classmethod
    def from_pretrained(
        cls, base_model: nn.Module, path: str | Path, adapter_name: str = "default", is_trainable: bool = False
    ) -> Any:
        """Load an adapter saved by deltatune or peft onto ``base_model``."""
        model = cls(base_model)
        try:
            model.load_adapter(path, adapter_name, is_trainable)
        except Exception:
            model.unload()  # leave the caller's base model as it was
            raise
        return model

    def load_adapter(
        self, path: str | Path, adapter_name: str, is_trainable: bool = False, config: DeltaConfig | None = None
    ) -> DeltaConfig:
        """Add adapter ``adapter_name`` from ``path`` (made active if none is); return its config.

        ``config``: the checkpoint's config, when the caller has read it already (a server checks it
        first), so that it is read once; else it is read here."""
        config = fitted_config(self.base_model, config or DeltaConfig.load(path), is_trainable)
        self.add_adapter(adapter_name, config)
        try:
            if self.active_adapter is None:
                self.set_adapter(adapter_name)
            self.load_adapter_weights(path, adapter_name)
        except Exception:
            self.delete_adapter(adapter_name)
            raise
        return self.peft_config[adapter_name]

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


def _converter(config: DeltaConfig) -> methods.contract.ConvertSaved:
    """The method's ``convert_saved`` (for ``path_initial_model_for_weight_conversion``), or a clear refusal."""
    convert = methods.method_for(config).convert_saved
    if convert is None:
        which = methods.describe([m for m in methods.registered() if m.convert_saved is not None])
        raise ConfigError(
            f"path_initial_model_for_weight_conversion converts PiSSA/OLoRA adapters ({which}); this one is "
            f"{config.peft_type}"
        )
    return convert


def fitted_config(base_model: nn.Module, config: DeltaConfig, is_trainable: bool) -> DeltaConfig:
    """A copy of a saved config, made to fit: peft lists head names for every architecture ("classifier",
    "score"), so absent ones are dropped here; the strict tensor check still catches real misfits.

    Without a task_type peft builds a plain PeftModel, which saves exactly the modules_to_save the
    config lists (none: the base model's own head stays). Such a config keeps its list, even an
    empty one, so that :meth:`DeltaModel.add_adapter` does not add a head the file has no tensors for.
    """
    config = copy.deepcopy(config)
    config.inference_mode = not is_trainable
    if config.modules_to_save:
        names = [n for n, _ in base_model.named_modules()]
        config.modules_to_save = [e for e in config.modules_to_save if any(name_matches(n, e) for n in names)] or None
    if config.task_type is None and config.modules_to_save is None:
        config.modules_to_save = []
    return config
