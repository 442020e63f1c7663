"""Tokenization: prompts rendered as the model sees them, features with the loss on the response only."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deltatune.config import ConfigError
from deltatune.data.examples import IGNORE_INDEX, TASKS, Example


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_text(example: Example, tokenizer: Any) -> str:
    """The exact prompt string the model sees before its response, in training and at generation time.

    With a chat template, chat messages (or a text prompt as one user message) are rendered with the generation
    prompt, so instruct models see their own format; without one, chat falls back to "role: content" lines.
    """
    messages = example.prompt if isinstance(example.prompt, list) else None
    if _has_chat_template(tokenizer):
        messages = messages if messages is not None else [{"role": "user", "content": example.prompt or ""}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if messages is not None:
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
    return example.prompt or ""


def prompt_ids(example: Example, tokenizer: Any) -> list[int]:
    """Token ids of :func:`prompt_text`. A rendered chat template already holds its special tokens, so only a
    template-less prompt gets the tokenizer's own (e.g. Llama's BOS). Use this for generation, too."""
    return _encode_prompts([prompt_text(example, tokenizer)], tokenizer)[0]


def _encode_prompts(prompts: list[str], tokenizer: Any) -> list[list[int]]:
    return tokenizer(prompts, add_special_tokens=not _has_chat_template(tokenizer))["input_ids"]


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, task: str, max_length: int, *, truncate: bool = True
) -> list[dict]:
    """Features for training: ``input_ids`` and ``labels`` (+ ``token_type_ids`` when the tokenizer returns them).

    causal-lm: labels are -100 on prompt tokens, so the loss covers only the response and the EOS after it.
    Plain text is split into ``max_length`` windows (nothing is dropped), whatever ``truncate`` says.
    classification: ``labels`` is the class id.
    """
    if task == "classification":
        return _tokenize_classification(examples, tokenizer, max_length, truncate)
    if task != "causal-lm":
        raise ConfigError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}.")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token, so a causal-lm response cannot be terminated.")
    texts = [(i, e) for i, e in enumerate(examples) if e.target is None]
    pairs = [(i, e) for i, e in enumerate(examples) if e.target is not None]
    features: dict[int, list[dict]] = {}
    if pairs:
        prompts = _encode_prompts([prompt_text(e, tokenizer) for _, e in pairs], tokenizer)
        targets = tokenizer([e.target for _, e in pairs], add_special_tokens=False)["input_ids"]
        for (i, _), prompt, target in zip(pairs, prompts, targets, strict=True):
            features[i] = [_prompt_target_feature(i, prompt, [*target, tokenizer.eos_token_id], max_length, truncate)]
    if texts:
        encoded = tokenizer([e.text or "" for _, e in texts])["input_ids"]
        for (i, _), ids in zip(texts, encoded, strict=True):
            ids = [*ids, tokenizer.eos_token_id]
            features[i] = [{"input_ids": w, "labels": list(w)} for w in _windows(ids, max_length)]
    return [f for i in range(len(examples)) for f in features[i]]


def _prompt_target_feature(index: int, prompt: list[int], target: list[int], max_length: int, truncate: bool) -> dict:
    """Prompt + response with the prompt masked; an over-long response loses its end (only when ``truncate``)."""
    if len(prompt) >= max_length:
        raise ConfigError(
            f"example {index}: its prompt alone is {len(prompt)} tokens, but max_length is {max_length}, which leaves "
            f"no room for the {len(target)}-token response. Raise --max-length to at least {len(prompt) + len(target)} "
            "or shorten the prompt."
        )
    if len(prompt) + len(target) > max_length and not truncate:
        raise ConfigError(
            f"example {index} is {len(prompt) + len(target)} tokens (prompt {len(prompt)} + response {len(target)}) "
            f"but max_length is {max_length}. Raise --max-length to {len(prompt) + len(target)} or allow truncation."
        )
    target = target[: max_length - len(prompt)]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


def _windows(ids: list[int], size: int) -> list[list[int]]:
    return [ids[start : start + size] for start in range(0, len(ids), size)]


def _tokenize_classification(
    examples: Sequence[Example], tokenizer: Any, max_length: int, truncate: bool
) -> list[dict]:
    features = []
    for i, example in enumerate(examples):
        if example.label is None:
            raise ConfigError(f"example {i} has no label; classification data needs a label for every example.")
        encoded = tokenizer(example.text, example.text_pair, truncation=truncate, max_length=max_length)
        if len(encoded["input_ids"]) > max_length:
            raise ConfigError(
                f"example {i} is {len(encoded['input_ids'])} tokens but max_length is {max_length}. "
                f"Raise --max-length to {len(encoded['input_ids'])} or allow truncation."
            )
        feature = {"input_ids": list(encoded["input_ids"]), "labels": example.label}
        if "token_type_ids" in encoded:
            feature["token_type_ids"] = list(encoded["token_type_ids"])
        features.append(feature)
    return features


def tokenize_tasks(
    examples: Sequence[Example], tokenizer: Any, task: str, max_length: int, task_ids: dict[str, int] | None
) -> list[dict]:
    """:func:`tokenize_examples`, with each feature tagged ``task_id`` (``task_ids[example.task]``) when
    ``task_ids`` is given: multi-task training for methods that take a task per row (HyperFormer)."""
    if task_ids is None:
        return tokenize_examples(examples, tokenizer, task, max_length)
    features = []
    for name, index in task_ids.items():
        part = [e for e in examples if e.task == name]
        if part:
            features += tag_tasks(tokenize_examples(part, tokenizer, task, max_length), index)
    return features


def tag_tasks(features: list[dict], task_id: int) -> list[dict]:
    """``features`` with ``task_id`` set on each (a feature of a plain text split into windows keeps its task)."""
    for feature in features:
        feature["task_id"] = task_id
    return features
