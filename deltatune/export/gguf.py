"""llama.cpp's GGUF: a LoRA adapter as llama.cpp's adapter file (``llama-cli -m base.gguf --lora adapter.gguf``),
or a merged model as a whole GGUF model.

The layout is the one llama.cpp's own ``convert_lora_to_gguf.py`` writes: ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``; per adapted weight ``<gguf name>.lora_a`` (r × in) and
``.lora_b`` (out × r), named by gguf-py's tensor map; for the ``llama`` architecture the query and key rows
are permuted the way llama.cpp's converter permutes them for its rotary embedding (on ``lora_b`` only: the
permutation acts on output rows). llama.cpp scales by ``alpha / rank``; any other scaling (rsLoRA, per-module
``alpha_pattern``) is folded into ``lora_b`` so the product is unchanged.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deltatune.config import ConfigError

# transformers' model_type -> (gguf-py architecture name, whether q/k rows are permuted as llama.cpp's converter does)
ARCHITECTURES = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
OUTTYPES = ("f32", "f16", "q8_0")
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


def _gguf():
    import gguf

    return gguf


def base_config(base: str) -> dict[str, Any]:
    """The base model's config.json (a built-in's dense copy), read without loading weights."""
    from deltatune.loading.base_models import _dense_smollm2, resolve_model_dir

    directory, spec = resolve_model_dir(base)
    if spec is not None and spec.gguf_file:
        directory = _dense_smollm2(directory, spec)
    return json.loads((Path(directory) / "config.json").read_text())


def base_gguf(base: str) -> Path | None:
    """The GGUF file a built-in base ships as (llama.cpp runs it as it is), else None."""
    from deltatune.loading.base_models import resolve_model_dir

    directory, spec = resolve_model_dir(base)
    return Path(directory) / spec.gguf_file if spec is not None and spec.gguf_file else None


def architecture(config: dict[str, Any]) -> tuple[str, bool]:
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise ConfigError(
            f"GGUF export knows the model types {', '.join(ARCHITECTURES)}, not {model_type!r}; merge the adapter "
            "(deltatune merge) and convert that folder with llama.cpp's convert_hf_to_gguf.py"
        )
    return ARCHITECTURES[model_type]


class NameMap:
    """Hugging Face parameter names to GGUF tensor names, and llama.cpp's q/k row permutation."""

    def __init__(self, config: dict[str, Any]):
        gguf = _gguf()
        arch, self.permutes = architecture(config)
        self.arch = arch
        arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
        self.map = gguf.get_tensor_name_map(arch_id, config["num_hidden_layers"])
        self.heads = config["num_attention_heads"]
        self.kv_heads = config.get("num_key_value_heads") or self.heads

    def name(self, hf_name: str) -> str | None:
        return self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def rows(self, hf_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` with its rows (output features) in llama.cpp's order for ``hf_name``'s weight."""
        if not self.permutes or not re.search(r"[qk]_proj\.(weight|bias)$", hf_name):
            return tensor
        heads = self.heads if ".q_proj." in hf_name else self.kv_heads
        shape = tensor.shape
        return tensor.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# --- LoRA adapter ------------------------------------------------------------------------------------
def lora_tensors(adapter: str | Path, config: dict[str, Any]) -> tuple[dict[str, np.ndarray], float]:
    """The adapter's tensors under llama.cpp's names (float32) and the alpha to record."""
    from safetensors.torch import load_file

    from deltatune.checkpoint.adapter import check_adapter_dir

    adapter_config = check_adapter_dir(str(adapter))
    settings = json.loads((Path(adapter) / "adapter_config.json").read_text())
    _check_plain_lora(adapter_config, settings)
    weights = load_file(str(Path(adapter) / "adapter_model.safetensors"))
    names = NameMap(config)
    alpha = float(settings["lora_alpha"])
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        match = LORA_KEY.match(key)
        if match is None:
            raise ConfigError(f"{adapter}: tensor {key} is not a LoRA A/B matrix; llama.cpp adapters hold only those")
        pairs.setdefault(match["module"], {})[match["part"]] = value.float()
    out: dict[str, np.ndarray] = {}
    for module, pair in pairs.items():
        target = names.name(module + ".weight")
        if target is None:
            raise ConfigError(f"{adapter}: no llama.cpp tensor for {module} (architecture {names.arch})")
        a, b = pair["A"], pair["B"]
        rank = a.shape[0]
        scale = _module_alpha(module, settings) / (math.sqrt(rank) if settings.get("use_rslora") else rank)
        b = names.rows(module + ".weight", b * (scale * rank / alpha))  # llama.cpp multiplies by alpha / rank
        out[f"{target}.lora_a"] = a.contiguous().numpy()
        out[f"{target}.lora_b"] = b.contiguous().numpy()
    return out, alpha


def _check_plain_lora(adapter_config: Any, settings: dict[str, Any]) -> None:
    """llama.cpp holds an A and a B per weight: a method whose record reads such factors (LoRA), without DoRA."""
    from deltatune.methods import method_for

    if method_for(adapter_config).low_rank_factors is None:
        raise ConfigError(
            f"llama.cpp adapters are LoRA only, this is {settings.get('peft_type')}: export the merged model instead "
            "(--merged)"
        )
    if settings.get("use_dora"):
        raise ConfigError("llama.cpp has no DoRA: export the merged model instead (--merged)")


def _module_alpha(module: str, settings: dict[str, Any]) -> float:
    """peft's per-module alpha: the ``alpha_pattern`` key matching the module's name, else ``lora_alpha``."""
    for key, value in (settings.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return float(value)
    return float(settings["lora_alpha"])


def export_lora(base: str, adapter: str | Path, output: str | Path, outtype: str = "f32") -> Path:
    """Write ``adapter`` (a LoRA of ``base``) as llama.cpp's adapter GGUF."""
    gguf = _gguf()
    _check_outtype(outtype, allowed=("f32", "f16"))
    _check_output(output)
    config = base_config(base)
    tensors, alpha = lora_tensors(adapter, config)
    arch, _ = architecture(config)

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        writer.add_file_type(_file_type(outtype))
        for name, value in tensors.items():
            writer.add_tensor(name, value.astype(np.float16 if outtype == "f16" else np.float32))
        _finish(writer)

    return _atomic(output, write)


# --- merged model ------------------------------------------------------------------------------------
def export_merged(
    base: str, adapter: str | Path | None, output: str | Path, outtype: str = "f16", template: str | Path | None = None
) -> Path:
    """Write ``base`` with ``adapter`` merged into it as a GGUF model. Hyper-parameters and the tokenizer come
    from ``template`` (a GGUF of the base; a built-in base's own by default), the weights from the merge."""
    gguf = _gguf()
    _check_outtype(outtype)
    _check_output(output)
    template = Path(template) if template else base_gguf(base)
    if template is None or not template.is_file():
        missing = "" if template is None else f" ({template} does not exist)"
        raise ConfigError(
            f"a merged GGUF takes its tokenizer and hyper-parameters from a GGUF of the base: give --base-gguf FILE"
            f"{missing}, or convert `deltatune merge`'s folder with llama.cpp's convert_hf_to_gguf.py"
        )
    if adapter is not None:
        from deltatune.checkpoint.adapter import check_adapter_dir

        check_adapter_dir(str(adapter))
    config = base_config(base)
    names = NameMap(config)
    weights = _merged_state(base, adapter)
    reader = gguf.GGUFReader(str(template))

    def write(path: Path) -> None:
        writer = gguf.GGUFWriter(str(path), names.arch)
        _copy_fields(reader, writer, outtype)
        mapped = {names.name(k): names.rows(k, v) for k, v in weights.items() if names.name(k)}
        for tensor in reader.tensors:
            if tensor.name in mapped:
                _add(writer, tensor.name, mapped[tensor.name].float().numpy(), outtype)
            else:  # what the merge does not touch and has no Hugging Face twin (rope_freqs...)
                writer.add_tensor(tensor.name, tensor.data, raw_shape=None, raw_dtype=tensor.tensor_type)
        _finish(writer)

    return _atomic(output, write)


def _merged_state(base: str, adapter: str | Path | None) -> dict[str, torch.Tensor]:
    from deltatune.loading import load_base
    from deltatune.model import DeltaModel

    model, _ = load_base(base, task="causal-lm")
    if adapter is not None:
        model = DeltaModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach() for k, v in model.state_dict().items()}


def _copy_fields(reader, writer, outtype: str) -> None:
    """The template's metadata but its file type (and the header fields the writer writes itself)."""
    gguf = _gguf()
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.file_type"):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), main, sub)
    writer.add_file_type(_file_type(outtype))


def _add(writer, name: str, value: np.ndarray, outtype: str) -> None:
    """1-D tensors (norms, biases) stay float32, as llama.cpp's converter keeps them."""
    gguf = _gguf()
    if value.ndim == 1 or outtype == "f32":
        writer.add_tensor(name, value.astype(np.float32))
    elif outtype == "f16":
        writer.add_tensor(name, value.astype(np.float16))
    else:
        kind = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(value.astype(np.float32), kind), raw_dtype=kind)


def _file_type(outtype: str) -> int:
    kinds = _gguf().LlamaFileType
    return {"f32": kinds.ALL_F32, "f16": kinds.MOSTLY_F16, "q8_0": kinds.MOSTLY_Q8_0}[outtype]


def _check_outtype(outtype: str, allowed: tuple[str, ...] = OUTTYPES) -> None:
    if outtype not in allowed:
        raise ConfigError(f"--outtype {outtype!r}: choose one of {', '.join(allowed)}")


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _check_output(output: str | Path) -> None:
    if Path(output).suffix != ".gguf":
        raise ConfigError(f"--output {output}: name the file *.gguf")


def _atomic(output: str | Path, write) -> Path:
    from deltatune.atomic import atomic_write

    return atomic_write(output, write)
