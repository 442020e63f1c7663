"""The one mechanism every method uses to find the modules it adapts, and to swap them in place.

Matching follows Hugging Face peft so that configs mean the same thing in both libraries, with
one deliberate difference: an entry that matches nothing is an error that lists the module names
that do exist, instead of being silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from deltatune.config import ConfigError
from deltatune.wrappers import base_of, is_wrapper
from deltatune.wrappers import replace_module as replace_module  # its old home

ALL_LINEAR = "all-linear"
LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, Conv1D)
# Path components that hold the numbered transformer blocks in common architectures.
DEFAULT_LAYER_CONTAINERS = ("layers", "layer", "h", "blocks", "block")


def name_matches(name: str, pattern: str) -> bool:
    """peft's rule for one list entry: the exact module name or a dotted suffix of it."""
    return name == pattern or name.endswith("." + pattern)


def layer_index(name: str, layers_pattern: Sequence[str] | str | None = None) -> int | None:
    """The transformer block index in a module name (``model.layers.3.mlp`` -> 3), if any."""
    containers = [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern
    parts = name.split(".")
    for i in range(len(parts) - 1):
        if parts[i] in (containers or DEFAULT_LAYER_CONTAINERS) and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


HEAD_NAMES = {"lm_head", "classifier", "score"}


def output_head_names(model: nn.Module) -> set[str]:
    """Full names of the output head(s), which ``all-linear`` leaves alone."""
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    return {n for n, m in model.named_modules() if (out is not None and m is out) or n.rsplit(".", 1)[-1] in HEAD_NAMES}


def _excluded(name: str, exclude: list[str] | str | None) -> bool:
    if exclude is None:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(name_matches(name, e) for e in exclude)


def _describe(names: Iterable[str]) -> str:
    """Leaf names with counts, short enough for an error message: ``q_proj (30), k_proj (30)``."""
    counts: dict[str, int] = {}
    for n in names:
        leaf = n.rsplit(".", 1)[-1]
        counts[leaf] = counts.get(leaf, 0) + 1
    return ", ".join(f"{leaf} ({c})" if c > 1 else leaf for leaf, c in counts.items())


def find_targets(
    model: nn.Module,
    target_modules: list[str] | str | None,
    *,
    allowed_types: tuple[type[nn.Module], ...] = LINEAR_TYPES,
    exclude_modules: list[str] | str | None = None,
    layers_to_transform: Sequence[int] | None = None,
    layers_pattern: Sequence[str] | str | None = None,
    skip: Callable[[str, nn.Module], bool] | None = None,
) -> list[str]:
    """Full names of the modules of ``allowed_types`` that the config selects, in model order.

    Raises :class:`ConfigError` when a list entry (or the whole regex) matches no module of an
    allowed type, naming the entry and the module names that exist.
    """
    if target_modules is None or target_modules == [] or target_modules == "":
        raise ConfigError(
            "target_modules is empty: name the modules to adapt, e.g. ['q_proj', 'v_proj'], or "
            f"'all-linear'. This model's adaptable modules: {_describe(_candidates(model, allowed_types))}"
        )
    candidates = _candidates(model, allowed_types)
    if skip is not None:
        candidates = {n: m for n, m in candidates.items() if not skip(n, m)}
    selected = _selected(model, candidates, target_modules, allowed_types)
    selected = [n for n in selected if not _excluded(n, exclude_modules)]
    if layers_to_transform is not None:
        wanted = set(layers_to_transform)
        found = {layer_index(n, layers_pattern) for n in selected} - {None}
        if not wanted & found:
            raise ConfigError(
                f"layers_to_transform={sorted(wanted)} selects nothing: the targeted modules sit in "
                f"layers {sorted(found) or 'none (set layers_pattern)'}"
            )
        selected = [n for n in selected if layer_index(n, layers_pattern) in wanted]
    if not selected:
        raise ConfigError(f"The config selects no module after exclude_modules={exclude_modules!r}: nothing to adapt.")
    return selected


def _selected(
    model: nn.Module, candidates: dict[str, nn.Module], target_modules: list[str] | str, allowed_types: tuple
) -> list[str]:
    """The candidates ``target_modules`` names ("all-linear", a whole-name regex, or names and suffixes),
    in model order; an entry that names none is an error listing the names there are."""
    if target_modules == ALL_LINEAR or target_modules == [ALL_LINEAR]:
        heads = output_head_names(model)
        return [n for n, m in candidates.items() if isinstance(m, LINEAR_TYPES) and n not in heads]
    if isinstance(target_modules, str):
        selected = [n for n in candidates if re.fullmatch(target_modules, n)]
        if not selected:
            raise ConfigError(
                f"target_modules regex {target_modules!r} matches no module (it must match the whole "
                f"name). Adaptable modules: {_describe(candidates)}; e.g. {next(iter(candidates), '')!r}"
            )
        return selected
    selected = []
    for entry in target_modules:
        hits = [n for n in candidates if name_matches(n, entry)]
        if not hits:
            raise ConfigError(
                f"target module {entry!r} matches no adaptable module of this model "
                f"({', '.join(t.__name__ for t in allowed_types)}). "
                f"Module names that exist: {_describe(candidates)}"
            )
        selected += hits
    return [n for n in candidates if n in set(selected)]


def base_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The base model's modules by full name, however many adapters the model already carries.

    A wrapper stands for the module it wraps, and the walk goes on only through that module
    (``<name>.base_layer.<child>``): an adapter's own layers (``lora_A``, bottlenecks, hypernetworks,
    trained copies) are never seen, so no pattern can put an adapter inside another adapter.
    """
    seen: set[int] = set()

    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            if id(child) in seen:
                continue
            seen.add(id(child))
            name = prefix + child_name
            if is_wrapper(child):
                yield name, base_of(child)
                yield from walk(base_of(child), f"{name}.base_layer.")
            else:
                yield name, child
                yield from walk(child, name + ".")

    return walk(model, "")


def _candidates(model: nn.Module, allowed_types: tuple[type[nn.Module], ...]) -> dict[str, nn.Module]:
    return {name: module for name, module in base_modules(model) if isinstance(module, allowed_types)}
