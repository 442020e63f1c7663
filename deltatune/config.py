"""The configuration shared by every method, stored as Hugging Face peft's ``adapter_config.json``.

Each method declares its options as a dataclass decorated with :func:`method_config`, which
adds what a user needs from a config: an error naming a misspelt option (with the closest valid
one), validation before anything is changed, and a peft-compatible JSON round trip that warns
about (and ignores) keys written by newer peft versions.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar

CONFIG_NAME = "adapter_config.json"


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to change."""


def check_known(cls: type, kwargs: dict[str, Any]) -> None:
    """Raise :class:`ConfigError` naming the first key of ``kwargs`` that is no init field of the
    dataclass ``cls``, with the closest valid one and the full list."""
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    for key in kwargs:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{cls.__name__} has no option {key!r}.{hint} Valid options: {', '.join(sorted(known))}.")


_check_known = check_known  # the old name, still imported elsewhere


def method_config(cls: type) -> type:
    """Make ``cls`` a dataclass whose constructor rejects unknown options with a helpful error."""
    cls = dataclasses.dataclass(cls)
    dataclass_init = cls.__init__

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_known(cls, kwargs)
        dataclass_init(self, *args, **kwargs)

    __init__.__doc__ = dataclass_init.__doc__
    cls.__init__ = __init__
    return cls


@method_config
class DeltaConfig:
    """Options every method has. Subclasses set ``peft_type`` and add their own options.

    ``target_modules`` follows peft: a list holds module names or name suffixes (``"q_proj"``
    matches ``model.layers.0.self_attn.q_proj``), a string is a regular expression that must match
    the whole module name, and ``"all-linear"`` means every linear layer except the output head.
    """

    peft_type: ClassVar[str] = ""
    # Options the command line does not offer: refused by the method, derived, or peft's aliases.
    cli_hidden: ClassVar[frozenset[str]] = frozenset({"task_type", "base_model_name_or_path", "inference_mode"})
    target_modules: list[str] | str | None = None
    """target_modules follows peft: a list holds module names or name suffixes ("q_proj" matches
    model.layers.0.self_attn.q_proj), a string is a regular expression that must match the whole module name, and
    "all-linear" means every linear layer except the output head"""
    exclude_modules: list[str] | str | None = None
    """modules to leave out of the targets: names/suffixes, or one regular expression"""
    layers_to_transform: list[int] | int | None = None
    """adapt only these layer indices (none: every layer)"""
    layers_pattern: list[str] | str | None = None
    """name of the layer container that --layers-to-transform indexes (e.g. layers, h)"""
    modules_to_save: list[str] | None = None
    """modules trained in full and saved with the adapter (e.g. a classifier head)"""
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` on option values that cannot work. Overridden per method."""

    # --- peft JSON ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["peft_type"] = self.peft_type
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeltaConfig:
        """Build the config of the method named by ``data["peft_type"]``; unknown keys warn."""
        data = dict(data)
        config_cls = config_class_for(data.pop("peft_type", None)) if cls is DeltaConfig else cls
        known = {f.name for f in dataclasses.fields(config_cls) if f.init}
        ignored = {k: v for k, v in data.items() if k not in known}
        # Keys newer peft writes with their "off" value carry no meaning for us; others do.
        meaningful = {k for k, v in ignored.items() if v not in (None, False, {}, [], "")}
        meaningful -= _PEFT_BOOKKEEPING_KEYS
        if meaningful:
            warnings.warn(
                f"{config_cls.__name__}: ignoring adapter_config.json keys deltatune does not know: "
                f"{', '.join(sorted(meaningful))}",
                stacklevel=2,
            )
        return config_cls(**{k: v for k, v in data.items() if k in known})

    def save(self, directory: str | Path) -> Path:
        from deltatune.atomic import atomic_write_text

        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> DeltaConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"No {CONFIG_NAME} in {directory}: point at a directory written by save_pretrained (deltatune or peft)."
            )
        return cls.from_dict(json.loads(path.read_text()))


# peft_type -> config class, filled by deltatune.methods.register as each method's file is imported.
_CONFIG_CLASSES: dict[str, type[DeltaConfig]] = {}


def register_config(config_class: type[DeltaConfig]) -> None:
    """Make ``DeltaConfig.from_dict`` build ``config_class`` for its ``peft_type``."""
    peft_type = config_class.peft_type
    if not peft_type:
        raise ConfigError(f"{config_class.__name__} sets no peft_type")
    known = _CONFIG_CLASSES.get(peft_type)
    if known is not None and known is not config_class:
        raise ConfigError(f"peft_type {peft_type!r} is taken by {known.__name__}, not free for {config_class.__name__}")
    _CONFIG_CLASSES[peft_type] = config_class


def config_class_for(peft_type: str | None) -> type[DeltaConfig]:
    """The registered config class of ``peft_type``; the error lists the registered ones."""
    if peft_type not in _CONFIG_CLASSES:
        raise ConfigError(
            f"adapter method {peft_type!r} is not supported by deltatune; supported: {', '.join(_CONFIG_CLASSES)}"
        )
    return _CONFIG_CLASSES[peft_type]


# Keys peft writes for its own bookkeeping; harmless to ignore, so they do not warn.
_PEFT_BOOKKEEPING_KEYS = {"peft_version", "auto_mapping", "revision", "megatron_core", "qalora_group_size"}
