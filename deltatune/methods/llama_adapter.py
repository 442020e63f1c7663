"""LLaMA-Adapter (Zhang et al., 2023): learned adaption prompts in the top L layers, zero-gated.

  tokens x (hidden states of one layer)               adaption prompt P (K×C, learned per layer)
        │                                                      │
        ├──────────────────────────┐                ┌──────────┴──────────┐
 ┌──────┴──────┐                   │ q_proj, RoPE   │ k_proj, v_proj      │  the layer's own,
 │ attention   │  frozen,          │                │ (no RoPE; KV heads  │  frozen
 │ over x      │  KV cache         │                │  repeated for GQA)  │
 └──────┬──────┘                   │                └──────────┬──────────┘
        │                          └──── softmax(q·kᵀ/√d) ─────┘  float32, over the K prompts only
        │                                        │ × gate    one scalar per layer, zero init
        │                                        │ · v, then o_proj (its weight, not its bias)
        └────────────────── + ───────────────────┘
                            │  the attention output, before the block's residual

Every real token also attends, through its own softmax, to K prompt tokens whose keys and
values come from the frozen projections of the learned prompt. The gate starts at zero, so
training starts from the base model exactly and the prompts cannot inject noise early on. The
semantics (and checkpoint keys ``...self_attn.adaption_prompt``/``adaption_gate``) are those of
Hugging Face peft's ``adaption_prompt``, so checkpoints load in both directions with the same
logits. Nothing is cached: the prompt keys are recomputed each step, which keeps generation
with a KV cache equal to generation without one. A second attention branch cannot fold into
the weights: ``merge`` raises.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half

from deltatune.config import ConfigError, DeltaConfig, method_config
from deltatune.methods.base import DeltaLayer, wrap_modules
from deltatune.methods.contract import Method, register
from deltatune.targeting import find_targets
from deltatune.wrappers import ForwardsAttributes, base_of

# Model types whose attention is Llama's: q/k/v/o projections, RoPE from position_embeddings.
SUPPORTED_MODEL_TYPES = ("llama", "mistral")
TARGET = "self_attn"
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
# DeltaConfig options that mean nothing here: adapter_layers picks the layers.
_UNUSED_OPTIONS = ("exclude_modules", "layers_to_transform", "layers_pattern")


@method_config
class LlamaAdapterConfig(DeltaConfig):
    """``adapter_len`` prompt tokens in each of the top ``adapter_layers`` layers (None: all of
    them, recorded as a number when the adapter is added). Names and JSON follow peft."""

    peft_type = "ADAPTION_PROMPT"
    cli_hidden: ClassVar[frozenset[str]] = DeltaConfig.cli_hidden | {
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
    }
    adapter_len: int = 10
    """learned prompt tokens in each adapted layer"""
    adapter_layers: int | None = None
    """how many of the top layers get the prompt (none: all of them, recorded as a number when the adapter is
    added)"""

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, list) and len(self.target_modules) == 1:
            self.target_modules = self.target_modules[0]  # the CLI's `--target-modules self_attn`
        super().__post_init__()

    def validate(self) -> None:
        if not isinstance(self.adapter_len, int) or self.adapter_len <= 0:
            raise ConfigError(f"adapter_len must be a positive integer, got {self.adapter_len!r}")
        if self.adapter_layers is not None and (not isinstance(self.adapter_layers, int) or self.adapter_layers <= 0):
            raise ConfigError(
                f"adapter_layers must be a positive integer (or None for all), got {self.adapter_layers!r}"
            )
        if self.target_modules is not None and not isinstance(self.target_modules, str):
            raise ConfigError(
                f"LLaMA-Adapter target_modules is the name of the attention modules (peft: 'self_attn'), "
                f"got {self.target_modules!r}"
            )
        used = [k for k in _UNUSED_OPTIONS if getattr(self, k) is not None]
        if used:
            raise ConfigError(f"LLaMA-Adapter does not use {', '.join(used)}: adapter_layers=L adapts the top L layers")

    def to_dict(self) -> dict[str, Any]:
        """peft's AdaptionPromptConfig fields only, so that peft loads it without warnings."""
        data = super().to_dict()
        for key in _UNUSED_OPTIONS:
            data.pop(key)
        if data["modules_to_save"] is None:
            data.pop("modules_to_save")
        return data


class LlamaAdapterAttention(ForwardsAttributes, DeltaLayer):
    """A frozen Llama attention plus, per adapter, a gated attention over learned prompt tokens.
    transformers may read attributes of the attention module (layer_idx, config...) through it."""

    adapter_attrs = ("adaption_prompt", "adaption_gate")  # peft's parameter names -> its keys

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adaption_prompt = nn.ParameterDict()
        self.adaption_gate = nn.ParameterDict()

    def add(self, name: str, adapter_len: int) -> None:
        """Standard-normal prompts (as the paper's nn.Embedding, and peft) and a zero gate."""
        weight = base_of(self.base_layer.q_proj).weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32  # quantized bases
        hidden = self.base_layer.config.hidden_size
        self.adaption_prompt[name] = nn.Parameter(
            torch.empty(1, adapter_len, hidden, device=weight.device, dtype=dtype).normal_()
        )
        self.adaption_gate[name] = nn.Parameter(torch.zeros(1, device=weight.device, dtype=dtype))

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, ...]:
        output, *rest = self.base_layer(hidden_states, position_embeddings, *args, **kwargs)
        name = self.adapter_active()
        if name is None:
            return (output, *rest)
        if position_embeddings is None:
            raise RuntimeError("LLaMA-Adapter needs the rotary position_embeddings (cos, sin) the decoder layer passes")
        adapter_output = self.prompt_attention(name, hidden_states, position_embeddings)
        return (output + adapter_output.to(output.dtype), *rest)

    def prompt_attention(
        self, name: str, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """gate · softmax(q·kᵀ/√d)·v over the prompt, projected by o_proj: (batch, tokens, hidden)."""
        attn, cfg = self.base_layer, self.base_layer.config
        batch, length, _ = hidden_states.shape
        heads, head_dim = cfg.num_attention_heads, attn.head_dim
        query = attn.q_proj(hidden_states).view(batch, length, heads, head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)
        query = query * cos + rotate_half(query) * sin
        key, value = self.prompt_keys_values(name)
        scores = query @ key.transpose(2, 3).to(query.dtype) / math.sqrt(head_dim)
        probs = self.adaption_gate[name] * F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        out = (probs @ value).transpose(1, 2).reshape(batch, length, -1)
        return self._o_proj_without_bias(out)

    def prompt_keys_values(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt through k_proj/v_proj, without RoPE: (1, heads, adapter_len, head_dim) each,
        the key/value heads repeated for grouped-query attention."""
        attn, cfg = self.base_layer, self.base_layer.config
        prompt = self.adaption_prompt[name]
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        groups = cfg.num_attention_heads // kv_heads

        def heads_first(x: torch.Tensor) -> torch.Tensor:
            x = x.view(1, prompt.shape[1], kv_heads, attn.head_dim).transpose(1, 2)
            return x.repeat_interleave(groups, dim=1)

        return heads_first(attn.k_proj(prompt)), heads_first(attn.v_proj(prompt))

    def _o_proj_without_bias(self, x: torch.Tensor) -> torch.Tensor:
        # A zero gate must give a zero branch; peft adds o_proj's bias here a second time.
        o_proj = self.base_layer.o_proj
        out = o_proj(x)
        bias = base_of(o_proj).bias
        return out if bias is None else out - bias


def _check_architecture(model: nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"LLaMA-Adapter needs a Llama-style attention with q_proj/k_proj/v_proj/o_proj and rotary "
            f"position embeddings (model types {', '.join(SUPPORTED_MODEL_TYPES)}); this {type(model).__name__} "
            f"is model type {model_type!r}"
        )


def select(model: nn.Module, config: LlamaAdapterConfig) -> list[str]:
    """The attention modules of the top ``adapter_layers`` layers; raises before changing anything."""
    _check_architecture(model)
    names = find_targets(model, [config.target_modules or TARGET], allowed_types=(nn.Module,))
    layers = config.adapter_layers or len(names)
    if layers > len(names):
        raise ConfigError(
            f"adapter_layers={layers} exceeds the number of layers: {type(model).__name__} has {len(names)} "
            f"attention modules ({config.target_modules or TARGET})"
        )
    names = names[-layers:]
    for name in names:
        module = base_of(model.get_submodule(name))
        missing = [p for p in _PROJECTIONS if not hasattr(module, p)]
        if missing:
            raise ConfigError(
                f"{name} ({type(module).__name__}) is not a Llama-style attention: it lacks {', '.join(missing)}"
            )
    return names


def inject(model: nn.Module, adapter_name: str, config: LlamaAdapterConfig) -> list[str]:
    """Add adaption prompts ``adapter_name`` to the top ``adapter_layers`` attention modules."""
    names = select(model, config)
    config.target_modules = config.target_modules or TARGET  # recorded, as peft does
    config.adapter_layers = len(names)
    if getattr(model.config, "attention_bias", False):
        warnings.warn(
            "this model's o_proj has a bias, which peft's adaption_prompt adds a second time (so its output "
            "differs from the base model's at init); deltatune does not, so logits differ from peft's here",
            stacklevel=2,
        )
    for layer in wrap_modules(model, dict.fromkeys(names, LlamaAdapterAttention), who="LLaMA-Adapter").values():
        layer.add(adapter_name, config.adapter_len)
    return names


# Its prompt attention sees the whole batch: rows cannot mix; a second attention branch cannot merge.
register(Method("llama_adapter", LlamaAdapterConfig, inject, (LlamaAdapterAttention,)))
