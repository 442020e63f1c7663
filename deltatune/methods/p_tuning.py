"""P-tuning: virtual tokens computed by a small prompt encoder, then prepended like a soft prompt.

    E (n × d) ──► MLP: d→h→h→d  (or bi-LSTM ──► MLP) ──► P (n × d) ──┐
                                                                     cat ──► frozen model
    input_ids ──► embed_tokens (frozen) ─────────────────────────────┘

Liu et al. (2021): routing the virtual tokens through an encoder couples them, which trains
faster and more stably than a free table. Only P is needed at inference, so checkpoints store P
(peft's ``prompt_embeddings``) and a loaded adapter uses it directly; the encoder's weights go to
the training-state file so that a run can resume (see prompt_learning.py).
"""

from __future__ import annotations

import warnings
from typing import ClassVar

import torch
from torch import nn

from deltatune.config import ConfigError, method_config
from deltatune.methods import prompt_learning as pl
from deltatune.methods.contract import Method, register
from deltatune.methods.prompt_learning import PromptEncoder, PromptLearningConfig, PromptLearningLayer

ENCODERS = {"mlp": "MLP", "lstm": "LSTM"}  # ours -> peft's


@method_config
class PTuningConfig(PromptLearningConfig):
    """``encoder``: "mlp" (three linear layers, ReLU between) or "lstm" (a bidirectional LSTM of
    ``encoder_num_layers`` layers, then a two-layer MLP). ``encoder_hidden_size`` defaults to the
    model's width. ``encoder_reparameterization_type`` is peft's name for ``encoder``."""

    peft_type = "P_TUNING"
    peft_spellings: ClassVar[dict[str, str]] = {"encoder": "encoder_reparameterization_type"}
    cli_hidden: ClassVar[frozenset[str]] = pl.PromptLearningConfig.cli_hidden | set(peft_spellings.values())
    encoder: str | None = None
    """the prompt encoder: "mlp" (three linear layers, ReLU between) or "lstm" (a bidirectional LSTM of
    --encoder-num-layers layers, then a two-layer MLP)"""
    encoder_hidden_size: int | None = None
    """the prompt encoder's hidden width (none: the model's width)"""
    encoder_num_layers: int = 2
    """layers of the LSTM encoder (encoder='lstm')"""
    encoder_dropout: float = 0.0
    """dropout between LSTM layers (encoder='lstm', encoder_num_layers > 1), in [0, 1); the MLP has none"""
    encoder_reparameterization_type: str | None = None

    def validate(self) -> None:
        super().validate()
        pl.reconcile_spelling(self, "encoder", "encoder_reparameterization_type", ENCODERS, default="mlp")
        if self.encoder_hidden_size is not None and self.encoder_hidden_size <= 0:
            raise ConfigError(f"encoder_hidden_size must be positive, got {self.encoder_hidden_size}")
        if not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(f"encoder_dropout must be in [0, 1), got {self.encoder_dropout}")


class PTuningEncoder(PromptEncoder):
    """The table E fed through an MLP (or a bi-LSTM and an MLP); peft's module names."""

    reparametrized = True

    def __init__(self, num_tokens: int, dim: int, hidden: int, kind: str, lstm_layers: int, dropout: float) -> None:
        super().__init__(num_tokens, dim)
        self.lstm_head: nn.LSTM | None = None
        if kind == "lstm":
            self.lstm_head = nn.LSTM(
                dim, hidden, num_layers=lstm_layers, dropout=dropout, bidirectional=True, batch_first=True
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(
                nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)
            )

    def forward(self) -> torch.Tensor:
        x = self.embedding.weight.unsqueeze(0)  # one sequence of n tokens: the LSTM reads them in order
        if self.lstm_head is not None:
            x = self.lstm_head(x)[0]
        return self.mlp_head(x)[0]


def inject(model: nn.Module, adapter_name: str, config: PTuningConfig) -> list[str]:
    pl.check_task(config, ("CAUSAL_LM", "SEQ_CLS"))
    _, embedding = pl.input_embeddings(model)
    pl.record_model_dims(config, model)
    pl.record(config, "token_dim", embedding.weight.shape[1])
    if config.encoder_hidden_size is None:
        config.encoder_hidden_size = config.token_dim
    n, dim = config.num_virtual_tokens, config.token_dim
    if config.inference_mode:  # a loaded adapter: the stored tokens, no encoder
        encoder = PromptEncoder(n, dim)
    else:
        if config.encoder == "mlp" and config.encoder_num_layers != 2:
            warnings.warn("encoder_num_layers is ignored for encoder='mlp' (3 linear layers, as in peft)", stacklevel=3)
        encoder = PTuningEncoder(
            n, dim, config.encoder_hidden_size, config.encoder, config.encoder_num_layers, config.encoder_dropout
        )
    return pl.attach(model, adapter_name, encoder)


prepare_inputs = pl.prepend_virtual_tokens
generate = pl.generate_virtual_tokens
register(
    Method(
        "p_tuning",
        PTuningConfig,
        inject,
        (PromptLearningLayer,),
        mixes="virtual_tokens",
        prepare_inputs=prepare_inputs,
        generate=generate,
        packable=False,  # virtual tokens take the positions that keep packed examples apart
    )
)
