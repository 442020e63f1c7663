"""What a method is, written down: one :class:`Method` record per method, registered by the
method's own file with one ``register(Method(...))`` line, and the interfaces the record names.

    Method(name, config_class, inject, layer_classes, merges, mixes,
           prepare_inputs, generate, finalize_merged, input_keys,
           task_option, packable, rank_option, low_rank_factors, hotswap, layer_types,
           convert_saved, learning_rates, compilable, not_compilable_because)

* ``inject(model, adapter_name, config) -> list[str]`` adds the adapter to the modules it selects
  (through deltatune.targeting and :func:`~deltatune.methods.base.wrap_modules`) and returns their names.
* ``layer_classes``: the :class:`~deltatune.methods.base.DeltaLayer` types it puts in the model;
  ``layer_types``: (module type, layer class) pairs, which layer wraps which kind of module, read by
  :meth:`Method.layer_for`. :func:`register_layer` adds a pair for a module type of the user's own
  (peft's dispatchers), checked against the method's claims and tried before the built-in ones.
* ``merges``: whether the adapter folds into the base weights (``merge_adapter``, ``merge_and_unload``);
  each layer class must then say how (``delta_weight`` or its own ``merge``).
* ``mixes``: how rows with different adapters share one batch (``adapter_names``), or None:
  ``"weights"`` each row gathers its own weights, ``"rows"`` each adapter's rows run through the
  layer apart (both: every layer class must be :class:`MixesRows`, checked here at registration);
  ``"virtual_tokens"``/``"prefix"`` the adapter changes the inputs, and deltatune.mixed pads each
  row's virtual tokens or prefix to the longest.
* ``prepare_inputs(host, adapter_name, kwargs, generating=False) -> kwargs`` and
  ``generate(host, adapter_name, *args, **kwargs)``: for methods that change a forward's inputs
  (virtual tokens, prefix caches, task ids); ``input_keys``: forward arguments only this method
  understands, dropped while adapters are disabled. ``finalize_merged(model)`` runs on the plain
  model that ``merge_and_unload`` returns.
* Capabilities the rest of deltatune asks about (so that no module outside deltatune.methods names a
  method's config class or tensors): ``task_option``, the config option listing the tasks whose ids
  the forward takes per row (HyperFormer's ``tasks``); ``packable``, whether packed examples (restarted
  positions, no mask) stay apart under it (not so for virtual tokens); ``rank_option``, the option that
  sets a rank (``r``); ``low_rank_factors(tensors) -> {module: A}``, the A (r×in) factors in a saved
  adapter's tensors, for subspace analysis; ``hotswap``, how its weights are swapped in place under
  ``torch.compile`` (:class:`HotSwap`); ``convert_saved(config, tensors, initial_dir) -> (config,
  tensors)``, how ``save_pretrained(path_initial_model_for_weight_conversion=...)`` rewrites an adapter
  (LoRA: PiSSA/OLoRA as a plain LoRA). ``mergeable`` and ``mixable`` read ``merges`` and ``mixes``.
* ``learning_rates``: (task, rate) pairs, the learning rate ``deltatune train`` uses for the method on that task
  (``causal-lm``, ``classification``) when none is given, chosen by measurement (docs/defaults.md);
  ``learning_rate_for(task)`` reads it (None: the trainer's general default).
* ``compilable``: whether ``torch.compile`` traces its layers with no graph break (``deltatune train
  --compile``, ``DeltaModel.compile``); if not, ``not_compilable_because`` says why in one clause, and
  the model trains uncompiled with that said.

Hooks see the model through :class:`AdapterHost`, the few things of a DeltaModel they may use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
from torch import nn

from deltatune.config import ConfigError, DeltaConfig, register_config
from deltatune.constants import valid_name
from deltatune.methods.base import DeltaLayer
from deltatune.routing import RowAdapters
from deltatune.wrappers import base_of

Mixes = Literal["weights", "rows", "virtual_tokens", "prefix"]
ROW_WISE: tuple[Mixes, ...] = ("weights", "rows")  # mixed by the layers themselves
INPUT_WISE: tuple[Mixes, ...] = ("virtual_tokens", "prefix")  # mixed by padding the inputs
TASKS = ("causal-lm", "classification")  # the tasks a method's default learning rates are given for


class AdapterHost(Protocol):
    """What a method's hooks may use of the model that holds the adapters (a DeltaModel)."""

    base_model: nn.Module
    peft_config: dict[str, DeltaConfig]
    active_adapter: str | None

    def delta_layers(self) -> Iterator[tuple[str, DeltaLayer]]: ...

    def check_adapter(self, adapter_name: str) -> None: ...


@runtime_checkable
class MixesRows(Protocol):
    """A layer that serves a mixed batch in one forward: each row with the adapter ``rows`` names.
    Its ``forward`` hands over to ``forward_mixed`` while ``deltatune.routing.rows()`` is set."""

    def forward_mixed(self, rows: RowAdapters, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor: ...


class Inject(Protocol):
    def __call__(self, model: nn.Module, adapter_name: str, config: Any, /) -> list[str]: ...


class PrepareInputs(Protocol):
    def __call__(
        self, host: AdapterHost, adapter_name: str, kwargs: dict[str, Any], /, generating: bool = False
    ) -> dict[str, Any]: ...


class Generate(Protocol):
    def __call__(self, host: AdapterHost, adapter_name: str, /, *args: Any, **kwargs: Any) -> Any: ...


FinalizeMerged = Callable[[nn.Module], object]
# Saved tensors (keys without the ``base_model.model.`` prefix) -> {module name: A factor, r x in}.
LowRankFactors = Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
ConvertSaved = Callable[[Any, dict[str, torch.Tensor], Any], tuple[Any, dict[str, torch.Tensor]]]


class HotSwap(Protocol):
    """In-place weight swaps that keep a ``torch.compile``d graph (deltatune.hotswap)."""

    def prepare(self, host: AdapterHost, adapter_name: str, target_rank: int | None) -> None: ...

    def swap(self, host: AdapterHost, adapter_name: str, path: Any, new_config: DeltaConfig) -> None: ...


@dataclasses.dataclass(frozen=True)
class Method:
    """One method: its name on the command line, its config, what it injects and what it can do."""

    name: str
    config_class: type[DeltaConfig]
    inject: Inject
    layer_classes: tuple[type[DeltaLayer], ...]
    merges: bool = False
    mixes: Mixes | None = None
    prepare_inputs: PrepareInputs | None = None
    generate: Generate | None = None
    finalize_merged: FinalizeMerged | None = None
    input_keys: tuple[str, ...] = ()
    task_option: str | None = None
    packable: bool = True
    rank_option: str | None = None
    low_rank_factors: LowRankFactors | None = None
    hotswap: HotSwap | None = None
    layer_types: tuple[tuple[type[nn.Module], type[DeltaLayer]], ...] = ()
    convert_saved: ConvertSaved | None = None
    learning_rates: tuple[tuple[str, float], ...] = ()
    compilable: bool = True
    not_compilable_because: str | None = None

    @property
    def peft_type(self) -> str:
        return self.config_class.peft_type

    @property
    def mergeable(self) -> bool:
        return self.merges

    @property
    def mixable(self) -> bool:
        return self.mixes is not None

    @property
    def takes_task_ids(self) -> bool:
        return self.task_option is not None

    def tasks_of(self, config: DeltaConfig) -> list[str]:
        """The task names whose ids ``config``'s adapter takes per row ([] for a one-task method)."""
        if self.task_option is None:
            return []
        tasks = getattr(config, self.task_option) or []
        return [tasks] if isinstance(tasks, str) else list(tasks)

    def learning_rate_for(self, task: str) -> float | None:
        """The measured default learning rate of this method on ``task`` (None where none was measured)."""
        return dict(self.learning_rates).get(task)

    def rank_of(self, config: DeltaConfig) -> int | None:
        """``config``'s rank (None for a method without one)."""
        return None if self.rank_option is None else getattr(config, self.rank_option)

    def _dispatch(self) -> tuple[tuple[type[nn.Module], type[DeltaLayer]], ...]:
        return (*_USER_LAYERS.get(self.name, ()), *self.layer_types)

    @property
    def module_types(self) -> tuple[type[nn.Module], ...]:
        """The module types this method can wrap (deltatune.targeting's ``allowed_types``)."""
        return tuple(dict.fromkeys(module_type for module_type, _ in self._dispatch()))

    def layer_for(self, module: nn.Module) -> type[DeltaLayer] | None:
        """The layer class that wraps ``module`` (or the module an existing wrapper holds): the first
        registered pair whose module type it is, the user's before the built-in ones; None if none."""
        inner = base_of(module)
        return next((layer for module_type, layer in self._dispatch() if isinstance(inner, module_type)), None)

    def layers_for(self, model: nn.Module, names: list[str]) -> dict[str, type[DeltaLayer]]:
        """``{name: layer class}`` for the named modules of ``model``; a module no pair covers is refused."""
        kinds = {}
        for name in names:
            module = model.get_submodule(name)
            kind = self.layer_for(module)
            if kind is None:
                raise ConfigError(
                    f"{self.name} has no layer for {name} ({type(base_of(module)).__name__}); it wraps "
                    f"{', '.join(t.__name__ for t in self.module_types)}: register one with "
                    "deltatune.methods.register_layer"
                )
            kinds[name] = kind
        return kinds

    def __post_init__(self) -> None:
        what = f"method {self.name!r}"
        if not valid_name(self.name):
            raise ConfigError(f"{what}: a method name is letters, digits, '_' or '-'")
        if not (isinstance(self.config_class, type) and issubclass(self.config_class, DeltaConfig)):
            raise TypeError(f"{what}: config_class must be a DeltaConfig subclass, got {self.config_class!r}")
        if not self.layer_classes or not all(
            isinstance(c, type) and issubclass(c, DeltaLayer) for c in self.layer_classes
        ):
            raise TypeError(f"{what}: layer_classes must name the DeltaLayer types it injects")
        if self.mixes is not None and self.mixes not in get_args(Mixes):
            raise ConfigError(f"{what}: mixes must be one of {', '.join(get_args(Mixes))} or None, got {self.mixes!r}")
        for layer_class in self.layer_classes:
            check_layer(self, layer_class, what)
        if self.mixes in INPUT_WISE and self.prepare_inputs is None:
            raise TypeError(f"{what} mixes by its inputs ({self.mixes!r}) but has no prepare_inputs hook")
        if self.compilable == (self.not_compilable_because is not None):
            raise ConfigError(f"{what}: give not_compilable_because exactly when compilable is False")
        stray = [layer.__name__ for _, layer in self.layer_types if layer not in self.layer_classes]
        if stray:
            raise TypeError(f"{what}: layer_types name {', '.join(stray)}, which layer_classes lacks")
        for task, rate in self.learning_rates:
            if task not in TASKS or not (isinstance(rate, float) and rate > 0):
                raise ConfigError(f"{what}: learning_rates pairs are (task, rate > 0), task one of {TASKS}")
        options = {f.name for f in dataclasses.fields(self.config_class)}
        for role, option in (("task_option", self.task_option), ("rank_option", self.rank_option)):
            if option is not None and option not in options:
                raise ConfigError(f"{what}: {role} {option!r} is no option of {self.config_class.__name__}")


def check_layer(method: Method, layer_class: type[DeltaLayer], what: str) -> None:
    """Refuse a layer class that could not keep the method's claims (mixing rows, merging)."""
    if not (isinstance(layer_class, type) and issubclass(layer_class, DeltaLayer)):
        raise TypeError(f"{what}: {layer_class!r} is no DeltaLayer subclass")
    if method.mixes in ROW_WISE and not issubclass(layer_class, MixesRows):
        raise TypeError(
            f"{what} says it mixes rows ({method.mixes!r}) but {layer_class.__name__} has no "
            "forward_mixed(rows, x, ...): its rows would silently run as the base model"
        )
    if method.merges and not _can_merge(layer_class):
        raise TypeError(f"{what} says it merges but {layer_class.__name__} defines no delta_weight or merge")


def _can_merge(layer_class: type[DeltaLayer]) -> bool:
    return layer_class.delta_weight is not DeltaLayer.delta_weight or layer_class.merge is not DeltaLayer.merge


# --- the registry -------------------------------------------------------------------------------
_METHODS: dict[str, Method] = {}
# Method name -> (module type, layer class) pairs the user added, newest first: see register_layer.
_USER_LAYERS: dict[str, list[tuple[type[nn.Module], type[DeltaLayer]]]] = {}


def register_layer(method_name: str, module_type: type[nn.Module], layer_class: type[DeltaLayer]) -> None:
    """Make method ``method_name`` wrap modules of ``module_type`` (a type of your own) in ``layer_class``.

    Tried before the method's built-in pairs, so it may also replace the layer of a built-in module type.
    The layer class must keep the method's claims: mix rows if the method does, merge if it merges."""
    method = method_named(method_name)
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_layer: module_type must be an nn.Module subclass, got {module_type!r}")
    check_layer(method, layer_class, f"method {method.name!r}")
    pairs = _USER_LAYERS.setdefault(method.name, [])
    pairs[:] = [(module_type, layer_class), *(p for p in pairs if p[0] is not module_type)]


def unregister_layer(method_name: str, module_type: type[nn.Module]) -> None:
    """Undo :func:`register_layer` for ``module_type``."""
    pairs = _USER_LAYERS.get(method_name, [])
    pairs[:] = [p for p in pairs if p[0] is not module_type]


def register(method: Method) -> Method:
    """Add ``method`` (its name and peft_type must be new); ``DeltaConfig.from_dict`` learns its config."""
    taken = _METHODS.get(method.name)
    if taken is not None and taken != method:
        raise ConfigError(f"a method named {method.name!r} is already registered ({taken.config_class.__name__})")
    clash = next((m for m in _METHODS.values() if m.peft_type == method.peft_type and m.name != method.name), None)
    if clash is not None:
        raise ConfigError(f"peft_type {method.peft_type!r} is already the method {clash.name!r}'s")
    register_config(method.config_class)
    _METHODS[method.name] = method
    return method


def registered() -> tuple[Method, ...]:
    """Every registered method, in registration order."""
    return tuple(_METHODS.values())


def method_named(name: str) -> Method:
    """The method called ``name`` on the command line; the error lists the registered ones."""
    if name not in _METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of: {', '.join(_METHODS)}")
    return _METHODS[name]


def method_for(config: DeltaConfig) -> Method:
    """The method whose config ``config`` is."""
    for method in _METHODS.values():
        if type(config) is method.config_class:
            return method
    for method in _METHODS.values():  # a subclass of a method's config
        if isinstance(config, method.config_class) and config.peft_type == method.peft_type:
            return method
    raise ConfigError(
        f"{type(config).__name__} is no registered method's config; registered: "
        f"{', '.join(f'{m.name} ({m.config_class.__name__})' for m in _METHODS.values())}"
    )


def describe(methods: tuple[Method, ...] | list[Method]) -> str:
    """``lora (LORA), bitfit (BITFIT)``: registered methods for an error message."""
    return ", ".join(f"{m.name} ({m.peft_type})" for m in methods)


class ConfigClasses(Mapping[str, type[DeltaConfig]]):
    """A live view: method name -> config class, over the registry."""

    def __getitem__(self, name: str) -> type[DeltaConfig]:
        if name not in _METHODS:
            raise KeyError(name)
        return _METHODS[name].config_class

    def __iter__(self) -> Iterator[str]:
        return iter(list(_METHODS))

    def __len__(self) -> int:
        return len(_METHODS)

    def __repr__(self) -> str:
        return f"CONFIGS({dict(self)!r})"
