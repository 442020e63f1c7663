"""What a training run needs to know, from a YAML/TOML file and command-line flags (flags win)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib
import yaml

from deltatune.config import ConfigError, _check_known


@dataclass
class TrainConfig:
    """Every option of ``deltatune train``; the defaults run the built-in JSON-extraction demo."""

    base: str = "smollm2-135m"
    task: str | None = None  # causal-lm | classification; the base model's natural task by default
    method: str = "lora"
    method_options: dict[str, Any] = field(default_factory=dict)
    data: str | None = None  # None: the built-in demo task
    eval_data: str | None = None
    eval_fraction: float = 0.1
    max_eval_examples: int = 200
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    prompt_column: str | None = None
    target_column: str | None = None
    num_labels: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 512
    packing: bool = False
    group_by_length: bool = True
    gradient_checkpointing: bool = False
    seed: int = 0
    output_dir: str = "runs/default"
    log_every: int = 5
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    eval_generate: bool = True
    max_new_tokens: int = 48
    threads: int | None = None

    def __post_init__(self) -> None:
        positive = {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_length": self.max_length,
            "log_every": self.log_every,
            "save_every": self.save_every,
            "max_new_tokens": self.max_new_tokens,
        }
        for name, value in positive.items():
            if value is None or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ConfigError(f"max_steps must be positive, got {self.max_steps}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be positive, got {self.epochs}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if self.task not in (None, "causal-lm", "classification"):
            raise ConfigError(f"task must be 'causal-lm' or 'classification', got {self.task!r}")
        for name in ("data", "eval_data"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"--{name.replace('_', '-')} {path}: no such file")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml) or TOML (.toml) file of TrainConfig options; method options may sit flat."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".toml":
        data = tomllib.loads(text)
    elif path.suffix in (".yaml", ".yml", ".json"):
        data = yaml.safe_load(text) if path.suffix != ".json" else json.loads(text)
    else:
        raise ConfigError(f"config file {path}: use .yaml, .yml, .toml or .json")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return {k.replace("-", "_"): v for k, v in data.items()}


# The built-in demo (no --data) runs a short, brisk schedule unless the user says otherwise.
DEMO_DEFAULTS = {"max_steps": 40, "learning_rate": 2e-3, "output_dir": "runs/demo"}


def build_config(values: dict[str, Any], method_fields: set[str]) -> TrainConfig:
    """Split flat values into TrainConfig options and method options, rejecting unknown names."""
    values = dict(values)
    if values.get("data") is None:
        values = {**DEMO_DEFAULTS, **values}
    method_options = dict(values.pop("method_options", None) or {})
    method_options.update({k: values.pop(k) for k in list(values) if k in method_fields})
    _check_known(TrainConfig, values)
    return TrainConfig(**values, method_options=method_options)
