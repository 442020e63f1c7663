"""Batched generation with the decoding options papers and users ask for: beams, length penalty, n-gram
blocking, sampling (temperature, top-p, top-k) from a seed, stop strings; and prompts read from a file.

Decoding options travel in one frozen :class:`Decoding` value per call: nothing is stored on the model, so
threads sharing a model never see each other's settings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deltatune.config import ConfigError
from deltatune.data import Example
from deltatune.data.positions import check_prompts
from deltatune.data.tokenize import prompt_ids


@dataclass(frozen=True)
class Decoding:
    """How to decode. ``temperature`` 0 is greedy (or beam search with ``num_beams`` > 1); above 0 samples."""

    max_new_tokens: int = 64
    num_beams: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        checks = {
            "--max-new-tokens must be at least 1": self.max_new_tokens < 1,
            "--num-beams must be at least 1": self.num_beams < 1,
            "--temperature must be 0 (greedy) or more": self.temperature < 0,
            "--top-p must be in (0, 1]": not 0 < self.top_p <= 1,
            "--top-k must be 0 (off) or more": self.top_k < 0,
            "--no-repeat-ngram-size must be 0 (off) or more": self.no_repeat_ngram_size < 0,
            "sampling (--temperature > 0) and beam search (--num-beams > 1) do not mix; pick one": self.temperature > 0
            and self.num_beams > 1,
        }
        for message, bad in checks.items():
            if bad:
                raise ConfigError(message)

    def generate_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams}
        if self.num_beams > 1:
            kwargs["length_penalty"] = self.length_penalty
        if self.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        if self.temperature > 0:
            kwargs |= {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        else:
            kwargs |= {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return kwargs


@dataclass
class Generated:
    texts: list[str]
    new_tokens: int  # tokens generated, without padding or anything after the end of sequence


def encode_prompt(example: Example, tokenizer: Any, raw: bool = False) -> list[int]:
    """The prompt's ids: rendered with the chat template when the tokenizer has one, unless ``raw``."""
    if raw:
        if not isinstance(example.prompt, str):
            raise ConfigError("--raw takes text prompts; chat 'messages' need the chat template (drop --raw)")
        return tokenizer(example.prompt)["input_ids"]
    return prompt_ids(example, tokenizer)


@torch.no_grad()
def generate_batches(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Example],
    decoding: Decoding,
    batch_size: int = 16,
    task_ids: Sequence[int] | None = None,
    raw: bool = False,
    progress: bool = False,
) -> Generated:
    """Completions of each example's prompt, in left-padded batches with the KV cache; ``task_ids`` (one per
    example) go to a method that takes a task per row (HyperFormer). A seed makes sampling reproducible."""
    from tqdm.auto import tqdm

    model.eval()
    if decoding.seed is not None:
        torch.manual_seed(decoding.seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    texts, count = [], 0
    starts = range(0, len(examples), batch_size)
    for start in tqdm(starts, desc="generating", unit="batch", disable=not progress, leave=False):
        chunk = examples[start : start + batch_size]
        ids = None if task_ids is None else task_ids[start : start + batch_size]
        out, n = _generate_one_batch(model, tokenizer, chunk, decoding, pad, ids, raw)
        texts += out
        count += n
    return Generated(texts, count)


def _generate_one_batch(model, tokenizer, chunk, decoding, pad, task_ids, raw) -> tuple[list[str], int]:
    from deltatune.loss import to_model_device

    prompts = [encode_prompt(e, tokenizer, raw) for e in chunk]
    check_prompts(model, prompts, decoding.max_new_tokens)  # transformers would only warn
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    inputs = to_model_device({"input_ids": input_ids, "attention_mask": attention_mask}, model)
    if task_ids is not None:
        inputs["task_ids"] = torch.tensor(list(task_ids), device=inputs["input_ids"].device)
    extra = {"stop_strings": list(decoding.stop), "tokenizer": tokenizer} if decoding.stop else {}
    generated = model.generate(
        **inputs, **decoding.generate_kwargs(), **extra, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id
    )
    new = generated[:, width:]
    texts = [_cut(t, decoding.stop).strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return texts, _count_new_tokens(new, tokenizer.eos_token_id, pad)


def _cut(text: str, stops: Sequence[str]) -> str:
    """``text`` up to its first stop string (generation stops at the token holding it, which may run past)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def _count_new_tokens(new: torch.Tensor, eos: int | list[int] | None, pad: int) -> int:
    """Tokens up to and including each row's first end-of-sequence token."""
    eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos if eos is not None else pad], device=new.device)
    ended = torch.isin(new, eos_ids).int().cumsum(-1)
    return int(((ended == 0) | ((ended == 1) & torch.isin(new, eos_ids))).sum())


# --- prompt files --------------------------------------------------------------------------------
def read_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Records of a prompt file: .txt is one prompt per non-empty line; .jsonl is one JSON object per line
    with ``prompt`` (text) or ``messages`` (chat), or a bare JSON string. Other keys are kept (ids...)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--input {path}: no such file")
    if path.suffix.lower() not in (".txt", ".jsonl"):
        raise ConfigError(f"--input {path.name}: use a .txt (one prompt a line) or .jsonl file")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() == ".txt":
        records = [{"prompt": line} for line in lines if line.strip()]
    else:
        records = [_prompt_record(line, i + 1, path) for i, line in enumerate(lines) if line.strip()]
    if not records:
        raise ConfigError(f"--input {path}: holds no prompts")
    return records


def _prompt_record(line: str, number: int, path: Path) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path.name} line {number}: not JSON ({err.msg})") from None
    if isinstance(value, str):
        return {"prompt": value}
    if not isinstance(value, dict) or not (
        isinstance(value.get("prompt"), str) or isinstance(value.get("messages"), list)
    ):
        raise ConfigError(f"{path.name} line {number}: give a 'prompt' string or a 'messages' list")
    return value


def record_example(record: dict[str, Any]) -> Example:
    return Example(prompt=record["messages"] if "messages" in record else record["prompt"], target=None)


def iter_jsonl(records: Sequence[dict[str, Any]]) -> Iterator[str]:
    for record in records:
        yield json.dumps(record, ensure_ascii=False) + "\n"
