"""What a training run needs to know, from a YAML/TOML file and command-line flags (flags win)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import tomllib
import yaml

from deltatune.config import ConfigError, _check_known


@dataclass
class TrainConfig:
    """Every option of ``deltatune train``; the defaults run the built-in JSON-extraction demo.

    Each field's help text (``deltatune train --help``) is the string right after it (an attribute
    docstring); :data:`FLAG_GROUPS` sorts the flags into the groups ``--help`` shows.
    """

    cli_hidden: ClassVar[frozenset[str]] = frozenset({"attention_options"})  # its entries are flags of their own

    base: str = "smollm2-135m"
    """base model: a built-in name (smollm2-135m, ...) or a local transformers model directory"""
    task: str | None = None
    """causal-lm or classification; by default the base model's natural task (a *ForSequenceClassification
    model classifies)"""
    method: str = "lora"
    """the PEFT method (see the method list below)"""
    quantize: str | None = None
    """store the frozen base quantized to save memory: int8 (per-channel weights), nf4 (4-bit QLoRA format, needs
    bitsandbytes) or gguf (a GGUF file's own blocks); methods that change base weights are refused"""
    matmul_dtype: str = "auto"
    """with --quantize, the dtype the frozen base's products multiply in: auto (bfloat16 where the CPU or GPU
    multiplies it in hardware, else float32), float32 or bfloat16"""
    method_options: dict[str, Any] = field(default_factory=dict)
    """the method's options as one mapping (config files); each is also a flag of its own"""
    attention: str = "sdpa"
    """attention pattern for long inputs: sdpa (full attention) or one of deltatune.attention's (sliding_window,
    blockwise, lsh, linformer, perceiver, s2); its options are flags of their own (--window 512 ...)"""
    attention_options: dict[str, Any] = field(default_factory=dict)
    """the attention pattern's options as one mapping (config files); each is also a flag of its own"""
    data: str | list[str] | dict[str, str] | None = None
    """training data file (.jsonl/.json/.csv/.tsv/.txt); several tasks as NAME=PATH entries (sst2=train.tsv
    rte=rte.tsv): HyperFormer learns them together with a task id per row, other methods train one adapter on
    the union. None: the built-in demo task"""
    eval_data: str | list[str] | dict[str, str] | None = None
    """evaluation data file (NAME=PATH entries for several tasks; a task without one is split from its training
    data); by default --eval-fraction of the training data"""
    eval_fraction: float = 0.1
    """share of the training data held out for evaluation when there is no --eval-data"""
    max_eval_examples: int = 200
    """most evaluation examples (per task in multi-task training)"""
    task_column: str | None = None
    """multi-task data in one file: the column (field) naming each row's task"""
    text_column: str | None = None
    """column of the text (classification) or of plain language-modelling text; detected by default"""
    text_pair_column: str | None = None
    """classification: column of the second text of a pair (e.g. sentence2); detected by default"""
    label_column: str | None = None
    """classification: column of the label; detected by default (label, labels, Quality)"""
    prompt_column: str | None = None
    """causal-lm: column of the prompt (with --target-column); detected by default"""
    target_column: str | None = None
    """causal-lm: column of the response the loss is computed on (with --prompt-column)"""
    num_labels: int | None = None
    """classification: number of classes; by default the largest label + 1"""
    epochs: float = 1.0
    """passes over the training data (fractions allowed); --max-steps wins"""
    max_steps: int | None = None
    """optimizer steps to train, overriding --epochs"""
    learning_rate: float | None = None
    """peak learning rate of AdamW; by default the method's measured rate for the task (lora: 2e-4 on causal-lm,
    1e-3 on classification; see docs/defaults.md), printed as the run starts"""
    lr_scheduler: str = "cosine"
    """learning-rate schedule after warm-up, a transformers scheduler name: linear, cosine, constant,
    constant_with_warmup, polynomial, ..."""
    warmup_steps: int = 0
    """steps of linear warm-up (wins over --warmup-ratio)"""
    warmup_ratio: float = 0.0
    """share of the steps spent warming up"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    loraplus_lr_ratio: float | None = None
    """LoRA+: train LoRA's B factors (and 1-D tensors) at this multiple of the learning rate (paper: ~16)"""
    max_grad_norm: float | None = 1.0
    """clip the gradient norm to this (0 or none: no clipping)"""
    batch_size: int = 8
    """examples per micro-batch (per process under torchrun)"""
    grad_accum: int = 1
    """micro-batches per optimizer step (gradient accumulation)"""
    max_length: int = 512
    """most tokens per example (longer responses are cut; plain text is split into windows)"""
    packing: bool = False
    """causal-lm: pack several examples into each row of --max-length tokens instead of padding"""
    group_by_length: bool = True
    """batch examples of similar length together (less padding)"""
    gradient_checkpointing: bool = False
    """recompute activations in the backward pass: less memory, more time"""
    compile: bool = False
    """torch.compile the model's body (decoder blocks with their adapters) for the training steps: faster steps
    after the first ones, which include compiling (see docs/training.md); a method that cannot be compiled
    says so and trains uncompiled"""
    compile_backend: str = "inductor"
    """torch.compile backend for --compile: inductor (generated kernels, CPU and CUDA); aot_eager compiles
    without generating code (checks tracing quickly)"""
    fsdp: bool = False
    """under torchrun: shard the frozen base and the adapter across processes (FSDP2) instead of a whole copy
    per process (DDP); for a base that does not fit one process's memory (see docs/distributed.md)"""
    seed: int = 0
    """random seed of the data order, the eval split and the adapter's initialisation"""
    output_dir: str = "runs/default"
    """directory for the adapter, checkpoints, metrics.jsonl, summary.json and loss.png"""
    log_every: int = 5
    """write a metrics.jsonl line every this many steps"""
    save_every: int = 50
    """save a checkpoint every this many steps"""
    keep_checkpoints: int = 2
    """how many of the newest checkpoints to keep"""
    resume: bool = False
    """continue the run in --output-dir from its newest intact checkpoint"""
    eval_generate: bool = True
    """causal-lm: evaluate greedy generations (BLEU, ROUGE-L) besides loss and perplexity"""
    max_new_tokens: int = 48
    """most tokens generated per evaluation example"""
    threads: int | None = None
    """CPU threads for torch (default: torch's choice)"""

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
        if self.learning_rate is not None and self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be between 0 and 1, got {self.eval_fraction}")
        if self.task not in (None, "causal-lm", "classification"):
            raise ConfigError(f"task must be 'causal-lm' or 'classification', got {self.task!r}")
        if self.attention != "sdpa":
            from deltatune.attention import options_for

            options_for(self.attention, **self.attention_options)  # an unknown pattern or option: a clear error
        elif self.attention_options:
            raise ConfigError(f"attention options {sorted(self.attention_options)} need --attention PATTERN")
        if self.quantize not in (None, "int8", "nf4", "gguf"):
            raise ConfigError(
                f"quantize must be 'int8', 'nf4' or 'gguf' (or unset for a float base), got {self.quantize!r}"
            )
        if self.matmul_dtype not in FLAG_CHOICES["matmul_dtype"]:
            raise ConfigError(f"matmul_dtype must be 'auto', 'float32' or 'bfloat16', got {self.matmul_dtype!r}")
        if self.matmul_dtype != "auto" and self.quantize is None:
            raise ConfigError(f"matmul_dtype={self.matmul_dtype!r} applies to a quantized base: add --quantize")
        for name in ("data", "eval_data"):
            setattr(self, name, _data_files(getattr(self, name), name))
        if isinstance(self.eval_data, dict):
            if not isinstance(self.data, dict):
                raise ConfigError("--eval-data NAME=PATH entries need --data NAME=PATH entries with the same names")
            unknown = set(self.eval_data) - set(self.data)
            if unknown:
                raise ConfigError(f"--eval-data names tasks {sorted(unknown)} that --data lacks: {list(self.data)}")
        elif self.eval_data is not None and isinstance(self.data, dict):
            raise ConfigError("with several --data tasks, give --eval-data as NAME=PATH entries too")
        if self.compile and self.fsdp:
            raise ConfigError("--compile is not supported with --fsdp (sharded bodies are untested compiled); drop one")
        if self.task_column is not None and isinstance(self.data, dict):
            raise ConfigError("use --task-column with one --data file, or NAME=PATH data files, not both")

    def data_files(self) -> dict[str | None, str]:
        """Training data files by task name; one file without a name is ``{None: path}``, no data ``{}``."""
        if self.data is None:
            return {}
        return dict(self.data) if isinstance(self.data, dict) else {None: self.data}

    @property
    def multi_task(self) -> bool:
        """Whether examples carry task names (several data files, or a task column)."""
        return isinstance(self.data, dict) or self.task_column is not None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_TASK_NAME = re.compile(r"[A-Za-z0-9_\-]+")


def _data_files(value: Any, name: str) -> str | dict[str, str] | None:
    """``--data``'s value: one path, or task name -> path from NAME=PATH entries (or a mapping in a config file).
    Every file must exist."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, (list, tuple)):
        if len(value) == 1 and not _named_entry(value[0]):
            value = value[0]
        else:
            entries = {}
            for entry in value:
                if not _named_entry(entry):
                    raise ConfigError(
                        f"{flag} {entry!r}: several data files need a task name each, as NAME=PATH "
                        "(e.g. sst2=train.tsv rte=rte.tsv)"
                    )
                task, path = entry.split("=", 1)
                if task in entries:
                    raise ConfigError(f"{flag}: task {task!r} is given twice")
                entries[task] = path
            value = entries
    elif isinstance(value, str) and _named_entry(value):
        value = dict([value.split("=", 1)])
    if isinstance(value, dict):
        for task, path in value.items():
            if not isinstance(task, str) or not _TASK_NAME.fullmatch(task):
                raise ConfigError(f"{flag}: task name {task!r} must be letters, digits, '_' or '-'")
            if not Path(str(path)).is_file():
                raise ConfigError(f"{flag} {task}={path}: no such file")
        return {task: str(path) for task, path in value.items()}
    if value is not None and not Path(value).is_file():
        raise ConfigError(f"{flag} {value}: no such file")
    return value


def _named_entry(entry: Any) -> bool:
    """Whether ``entry`` reads as NAME=PATH (and is not itself an existing file whose name holds '=')."""
    if not isinstance(entry, str) or "=" not in entry or Path(entry).is_file():
        return False
    return bool(_TASK_NAME.fullmatch(entry.split("=", 1)[0]))


# The options that say how to read a data file (columns, labels, tasks): passed on to ``read_examples``.
READ_OPTIONS = (
    "text_column",
    "text_pair_column",
    "label_column",
    "prompt_column",
    "target_column",
    "num_labels",
    "task_column",
)

# How ``deltatune train --help`` groups TrainConfig's flags; the method's own options get a group of their own.
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    "data": (
        "data",
        "eval_data",
        "eval_fraction",
        "max_eval_examples",
        "task",
        *READ_OPTIONS,
        "max_length",
        "packing",
        "group_by_length",
    ),
    "training": (
        "base",
        "method",
        "quantize",
        "matmul_dtype",
        "attention",
        "epochs",
        "max_steps",
        "learning_rate",
        "lr_scheduler",
        "warmup_steps",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "batch_size",
        "grad_accum",
        "gradient_checkpointing",
        "compile",
        "compile_backend",
        "fsdp",
        "seed",
        "threads",
    ),
    "output/run": (
        "output_dir",
        "log_every",
        "save_every",
        "keep_checkpoints",
        "resume",
        "eval_generate",
        "max_new_tokens",
    ),
}
# Flags with a fixed set of values (argparse checks them); --method's come from deltatune.methods.CONFIGS.
FLAG_CHOICES: dict[str, tuple[str, ...]] = {
    "task": ("causal-lm", "classification"),
    "quantize": ("int8", "nf4", "gguf"),
    "matmul_dtype": ("auto", "float32", "bfloat16"),
}


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
# (Its learning rate is deltatune.training.defaults.DEMO_LEARNING_RATE, printed as the run starts.)
DEMO_DEFAULTS = {"max_steps": 40, "output_dir": "runs/demo"}


def build_config(
    values: dict[str, Any], method_fields: set[str], attention_fields: set[str] = frozenset()
) -> TrainConfig:
    """Split flat values into TrainConfig options, method options and attention options, rejecting unknown names."""
    values = dict(values)
    if values.get("data") is None:
        values = {**DEMO_DEFAULTS, **values}
    method_options = dict(values.pop("method_options", None) or {})
    method_options.update({k: values.pop(k) for k in list(values) if k in method_fields})
    attention_options = dict(values.pop("attention_options", None) or {})
    attention_options.update({k: values.pop(k) for k in list(values) if k in attention_fields})
    if attention_options:
        values["attention_options"] = attention_options
    _check_known(TrainConfig, values)
    return TrainConfig(**values, method_options=method_options)
