"""Partial fine-tuning: the top transformer blocks train in full, the rest stay frozen.

        embeddings          frozen
        block 0             frozen ┐ freeze_bottom_layers=2
        block 1             frozen ┘
        block 2   ──► trained copy ┐ train_top_layers=2 (the LoRA paper's FTTop2)
        block 3   ──► trained copy ┘
        head                trained for classification (modules_to_save)

Lee et al. (2019) find that fine-tuning a fourth of the layers gets 90% of full fine-tuning's
quality. Each selected block is wrapped in :class:`~deltatune.methods.base.ModulesToSave`,
which trains a copy per adapter: the base model stays intact, adapters switch like any other,
the checkpoint holds only the trained blocks, and ``merge_and_unload`` swaps the copies in.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn

from deltatune.config import ConfigError, DeltaConfig, method_config
from deltatune.methods.base import DeltaLayer, ModulesToSave, wrap_modules
from deltatune.methods.contract import Method, register
from deltatune.quantization.base import QuantizedLinear
from deltatune.targeting import DEFAULT_LAYER_CONTAINERS, layer_index
from deltatune.wrappers import base_of


@method_config
class PartialConfig(DeltaConfig):
    """Set exactly one: ``train_top_layers=k`` trains the last k blocks, ``freeze_bottom_layers=k``
    all but the first k. ``layers_pattern`` names the block container if it is not one of the
    usual ones (``layers``, ``h``, ``layer``, ...). Module-level options (``target_modules``, ...)
    are refused: whole blocks train.
    """

    peft_type = "PARTIAL"
    cli_hidden: ClassVar[frozenset[str]] = DeltaConfig.cli_hidden | {
        "target_modules",
        "layers_to_transform",
        "exclude_modules",
    }
    train_top_layers: int | None = None
    """train the last k blocks (set this or --freeze-bottom-layers, not both)"""
    freeze_bottom_layers: int | None = None
    """train all blocks but the first k (set this or --train-top-layers, not both)"""

    def validate(self) -> None:
        if (self.train_top_layers is None) == (self.freeze_bottom_layers is None):
            raise ConfigError(
                "PartialConfig needs exactly one of train_top_layers (e.g. 2: the LoRA paper's FTTop2) or "
                f"freeze_bottom_layers; got train_top_layers={self.train_top_layers}, "
                f"freeze_bottom_layers={self.freeze_bottom_layers}"
            )
        key, k = self.choice()
        minimum = 1 if key == "train_top_layers" else 0
        if isinstance(k, bool) or not isinstance(k, int) or k < minimum:
            raise ConfigError(f"{key} must be an integer >= {minimum}, got {k!r}")
        for unused in ("target_modules", "layers_to_transform", "exclude_modules"):
            if getattr(self, unused) is not None:
                raise ConfigError(f"PartialConfig selects whole layers with {key}; {unused} is not supported")

    def choice(self) -> tuple[str, int]:
        """The option that is set, and its value."""
        if self.train_top_layers is not None:
            return "train_top_layers", self.train_top_layers
        return "freeze_bottom_layers", self.freeze_bottom_layers

    def selected(self, indices: list[int]) -> list[int]:
        """The trained ones of a model's (sorted) block indices."""
        key, k = self.choice()
        return indices[len(indices) - k :] if key == "train_top_layers" else indices[k:]


def find_blocks(model: nn.Module, layers_pattern: list[str] | str | None = None) -> dict[int, str]:
    """The numbered transformer blocks, ``{index: module name}``; one stack, not nested ones."""
    containers = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern or DEFAULT_LAYER_CONTAINERS
    stacks: dict[str, dict[int, str]] = {}
    for name, _ in model.named_modules():
        parent, _, index = name.rpartition(".")
        if index.isdigit() and parent.rpartition(".")[2] in containers and layer_index(parent, containers) is None:
            stacks.setdefault(parent, {})[int(index)] = name
    if not stacks:
        raise ConfigError(
            f"found no numbered transformer layers in {type(model).__name__} (looked for names like "
            f"model.layers.N under {', '.join(containers)}); set layers_pattern to the container's name"
        )
    if len(stacks) > 1:
        raise ConfigError(
            f"{type(model).__name__} has several stacks of layers ({', '.join(stacks)}); partial "
            "fine-tuning needs one: set layers_pattern to the container name of the one to train"
        )
    return dict(sorted(next(iter(stacks.values())).items()))


def select(model: nn.Module, config: PartialConfig) -> list[str]:
    """Names of the blocks that train; raises ConfigError before anything is changed."""
    blocks = find_blocks(model, config.layers_pattern)
    indices = list(blocks)
    key, k = config.choice()
    most = len(indices) if key == "train_top_layers" else len(indices) - 1  # leave something to train
    if k > most:
        raise ConfigError(
            f"{key}={k}, but {type(model).__name__} has {len(indices)} layers "
            f"({blocks[indices[0]]} to {blocks[indices[-1]]}): use at most {most}"
        )
    names = [blocks[i] for i in config.selected(indices)]
    for name in names:
        block = base_of(model.get_submodule(name))
        inner = next((n for n, m in block.named_modules() if isinstance(m, DeltaLayer)), None)
        if inner is not None:
            raise ConfigError(f"{name}.{inner} already carries an adapter; partial fine-tuning cannot copy it")
        quantized = next((n for n, m in block.named_modules() if isinstance(m, QuantizedLinear)), None)
        if quantized is not None:
            raise ConfigError(
                f"partial fine-tuning trains the base weights themselves, but {name}.{quantized} is quantized "
                f"({block.get_submodule(quantized).kind}): load the base without quantize, or train a method that "
                "leaves the base frozen (lora, adapter, bitfit, prompt/prefix tuning)"
            )
    return names


def inject(model: nn.Module, adapter_name: str, config: PartialConfig) -> list[str]:
    """Give adapter ``adapter_name`` a trainable copy of each selected block; return their names."""
    names = select(model, config)
    for layer in wrap_modules(model, dict.fromkeys(names, ModulesToSave)).values():
        layer.add(adapter_name)
    return names


# A block sees the whole batch's KV cache: its rows cannot run apart, so partial adapters do not mix.
register(Method("partial", PartialConfig, inject, (ModulesToSave,), merges=True))
