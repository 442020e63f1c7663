"""Training data: read a file into :class:`Example` records, tokenize them, pack them, and batch them.

Formats are detected from the file extension and the field names, so a user can point deltatune at an
Alpaca JSON, a chat JSONL, a GLUE TSV or a plain text file without writing a loader. Every problem with the
data raises :class:`~deltatune.config.ConfigError` whose message names the problem and the flag that fixes it.

Batch order is a pure function of ``(seed, epoch)``, so a killed run resumes exactly at ``(epoch, batch index)``.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from deltatune.config import ConfigError

TASKS = ("causal-lm", "classification")
EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".txt")
IGNORE_INDEX = -100

# Causal-LM (prompt field, target field) pairs, tried in order. Alpaca's optional "input" is added to the prompt.
PROMPT_TARGET_FIELDS = (
    ("instruction", "output"),
    ("prompt", "completion"),
    ("prompt", "response"),
    ("input", "output"),
    ("question", "answer"),
    ("mr", "ref"),  # E2E NLG
    ("dialogue", "summary"),  # SAMSum
)
# Classification (text, second text) pairs, tried before single-text fields so that pair tasks keep both texts.
TEXT_PAIR_FIELDS = (
    ("sentence1", "sentence2"),  # RTE, MNLI-style
    ("#1 String", "#2 String"),  # MRPC
    ("premise", "hypothesis"),
    ("question1", "question2"),  # QQP
    ("question", "sentence"),  # QNLI
    ("text", "text_pair"),
)
TEXT_FIELDS = ("sentence", "text")
LABEL_FIELDS = ("label", "labels", "Quality")
# String label sets with a conventional order (GLUE's); any other set of names is numbered in sorted order.
KNOWN_LABEL_ORDERS = (
    ("entailment", "not_entailment"),
    ("entailment", "neutral", "contradiction"),
    ("not_equivalent", "equivalent"),
    ("negative", "positive"),
)

T = TypeVar("T")


@dataclass
class Example:
    """One training or evaluation example after format detection, before tokenization."""

    prompt: str | list[dict] | None  # text prompt, or chat messages (everything before the final assistant turn)
    target: str | None  # response for causal-lm (loss only on its tokens); None for plain LM text
    text: str | None = None  # plain language-modelling text (loss on all tokens), or the classification text
    text_pair: str | None = None  # classification second sentence
    label: int | None = None  # classification label


# --- reading ----------------------------------------------------------------------------------------------------


def read_examples(
    path: str | Path,
    task: str,
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    prompt_column: str | None = None,
    target_column: str | None = None,
    num_labels: int | None = None,
) -> list[Example]:
    """Read ``path`` (.jsonl/.json/.csv/.tsv/.txt) into examples for ``task`` ("causal-lm" or "classification").

    Column arguments override the detected fields: ``text_column``/``text_pair_column``/``label_column`` for
    classification, ``prompt_column``/``target_column`` (or ``text_column`` for plain text) for causal-lm.
    """
    path = Path(path)
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}.")
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist; check the path.")
    if path.suffix.lower() not in EXTENSIONS:
        raise ConfigError(
            f"cannot read {path.name!r}: unknown extension {path.suffix!r}. Convert it to one of "
            f"{', '.join(EXTENSIONS)} (JSON lines, a JSON list, CSV/TSV with a header, or blank-line separated text)."
        )
    if path.suffix.lower() == ".txt":
        examples = _read_text(path, task)
    else:
        records = _read_csv(path) if path.suffix.lower() in (".csv", ".tsv") else _read_json(path)
        if task == "causal-lm":
            if (prompt_column is None) != (target_column is None):
                raise ConfigError("give both --prompt-column and --target-column, or neither.")
            examples = [_lm_example(r, where, path, text_column, prompt_column, target_column) for where, r in records]
        else:
            examples = _classification_examples(records, path, text_column, text_pair_column, label_column, num_labels)
    if not examples:
        raise ConfigError(f"{path} holds no examples; check that it is the right file and not empty.")
    return examples


def _read_text(path: Path, task: str) -> list[Example]:
    if task == "classification":
        raise ConfigError(
            f"{path.name}: a .txt file has no labels; classification needs a .csv/.tsv with text and label columns "
            "or JSON lines with text and label fields."
        )
    blocks = re.split(r"\n\s*\n", path.read_text(encoding="utf-8"))
    return [Example(prompt=None, target=None, text=b.strip()) for b in blocks if b.strip()]


def _read_json(path: Path) -> list[tuple[str, dict]]:
    """A JSON list of records, else JSON lines; each record comes with where it was found, for error messages."""
    content = path.read_text(encoding="utf-8-sig")
    if content.lstrip().startswith("["):
        try:
            records = [(f"record {i}", r) for i, r in enumerate(json.loads(content), 1)]
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path.name} is not valid JSON: {err.msg} at line {err.lineno}.") from None
    else:
        records = list(_json_lines(content, path))
    for where, record in records:
        if not isinstance(record, dict):
            raise ConfigError(f"{where} of {path.name} is a {type(record).__name__}, not an object with named fields.")
    return records


def _json_lines(content: str, path: Path) -> Iterator[tuple[str, Any]]:
    for number, line in enumerate(content.splitlines(), 1):
        if line.strip():
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(
                    f"line {number} of {path.name} is not valid JSON ({err.msg}); the file must be a JSON list or "
                    "hold one JSON object per line."
                ) from None


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    """Rows of a CSV, or of a TSV read without quote handling (GLUE's TSVs hold unbalanced quotes)."""
    tsv = path.suffix.lower() == ".tsv"
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        records = []
        for row in reader:
            where = f"line {reader.line_num}"
            if None in row or None in row.values():  # more or fewer fields than the header
                raise ConfigError(
                    f"{where} of {path.name} does not have the header's {len(reader.fieldnames or [])} fields; "
                    "check the delimiter and quoting of that line."
                )
            records.append((where, row))
    return records


def _lm_example(
    record: dict, where: str, path: Path, text_column: str | None, prompt_column: str | None, target_column: str | None
) -> Example:
    """Detect the causal-lm format of one record: explicit columns, chat messages, a prompt/target pair, or text."""
    if prompt_column is not None and target_column is not None:
        _require(record, (prompt_column, target_column), where, path, "--prompt-column/--target-column")
        return Example(_field(record, prompt_column, where), _field(record, target_column, where))
    if text_column is not None:
        _require(record, (text_column,), where, path, "--text-column")
        return Example(None, None, text=_field(record, text_column, where))
    if "messages" in record:
        return _chat_example(record["messages"], where, path)
    for prompt_key, target_key in PROMPT_TARGET_FIELDS:
        if prompt_key in record and target_key in record:
            prompt = _field(record, prompt_key, where)
            extra = record.get("input") if prompt_key == "instruction" else None
            if extra:
                prompt += "\n\n" + _field(record, "input", where)
            return Example(prompt, _field(record, target_key, where))
    if "text" in record:
        return Example(None, None, text=_field(record, "text", where))
    accepted = ["messages", *(f"{p}+{t}" for p, t in PROMPT_TARGET_FIELDS), "text"]
    raise ConfigError(
        f"{where} of {path.name} has fields {sorted(record)}, none of the accepted causal-lm formats: "
        f"{', '.join(accepted)}. Name the fields with --prompt-column and --target-column (or --text-column)."
    )


def _chat_example(messages: Any, where: str, path: Path) -> Example:
    valid = (
        isinstance(messages, list)
        and messages
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
    )
    if not valid:
        raise ConfigError(
            f'{where} of {path.name}: \'messages\' must be a non-empty list of {{"role": ..., "content": ...}} '
            "objects with text content."
        )
    if messages[-1]["role"] != "assistant":
        raise ConfigError(
            f"{where} of {path.name}: the last message is from {messages[-1]['role']!r}, but chat data must end with "
            "the 'assistant' reply to train on; drop the trailing messages or add the assistant's answer."
        )
    if len(messages) < 2:
        raise ConfigError(f"{where} of {path.name}: the assistant reply needs a message before it to answer.")
    return Example(prompt=[dict(m) for m in messages[:-1]], target=messages[-1]["content"])


def _require(record: dict, keys: Sequence[str], where: str, path: Path, flag: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise ConfigError(
            f"{where} of {path.name} has no column {missing[0]!r}; the columns are {sorted(record)}. Set {flag}."
        )


def _field(record: dict, key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str):
        raise ConfigError(f"{where}: field {key!r} is a {type(value).__name__}, not text; convert it to a string.")
    return value


def _classification_examples(
    records: list[tuple[str, dict]],
    path: Path,
    text_column: str | None,
    text_pair_column: str | None,
    label_column: str | None,
    num_labels: int | None,
) -> list[Example]:
    examples, raw_labels = [], []
    for where, record in records:
        text_key, pair_key, label_key = _classification_columns(
            record, where, path, text_column, text_pair_column, label_column
        )
        raw = record[label_key]
        if raw is None or raw == "":
            raise ConfigError(f"{where} of {path.name} has no label in column {label_key!r}; add it or drop the row.")
        pair = _field(record, pair_key, where) if pair_key else None
        examples.append(Example(None, None, text=_field(record, text_key, where), text_pair=pair))
        raw_labels.append((where, raw))
    for example, label in zip(examples, _label_values(raw_labels, path, num_labels), strict=True):
        example.label = label
    return examples


def _classification_columns(
    record: dict, where: str, path: Path, text: str | None, pair: str | None, label: str | None
) -> tuple[str, str | None, str]:
    """The (text, second text, label) columns: the ones named by flags, else the first known names present."""
    if text is None:
        found = next((p for p in TEXT_PAIR_FIELDS if p[0] in record and p[1] in record), None)
        if found:
            text, pair = found[0], pair or found[1]
        else:
            text = next((t for t in TEXT_FIELDS if t in record), None)
    label = label or next((name for name in LABEL_FIELDS if name in record), None)
    known_texts = [*TEXT_FIELDS, *(p[0] for p in TEXT_PAIR_FIELDS)]
    for role, column, flag, known in (
        ("text", text, "--text-column", known_texts),
        ("label", label, "--label-column", LABEL_FIELDS),
    ):
        if column is None:
            raise ConfigError(
                f"{where} of {path.name} has no {role} column: the columns are {sorted(record)} (known {role} columns: "
                f"{', '.join(known)}). Name it with {flag}."
            )
    for flag, column in (("--text-column", text), ("--text-pair-column", pair), ("--label-column", label)):
        if column is not None:
            _require(record, (column,), where, path, flag)
    return text, pair, label


def _label_values(raw_labels: list[tuple[str, Any]], path: Path, num_labels: int | None) -> list[int]:
    """Integers stay as they are; string names are numbered by :func:`label_ids`. All must be < ``num_labels``."""
    if all(_is_int_label(raw) for _, raw in raw_labels):
        values = [int(raw) for _, raw in raw_labels]
    else:
        ids = label_ids(str(raw) for _, raw in raw_labels)
        values = [ids[str(raw)] for _, raw in raw_labels]
    for (where, raw), value in zip(raw_labels, values, strict=True):
        if value < 0:
            raise ConfigError(f"{where} of {path.name}: label {raw!r} is negative; number the classes from 0.")
        if num_labels is not None and value >= num_labels:
            raise ConfigError(
                f"{where} of {path.name}: label {raw!r} (class {value}) does not fit num_labels={num_labels}, which "
                f"allows classes 0..{num_labels - 1}; the data has {len(set(values))} distinct labels, the largest "
                f"class being {max(values)}. Set --num-labels {max(values) + 1}."
            )
    return values


def _is_int_label(raw: Any) -> bool:
    return (isinstance(raw, int) and not isinstance(raw, bool)) or (
        isinstance(raw, str) and re.fullmatch(r"-?\d+", raw.strip()) is not None
    )


def label_ids(names: Iterable[str]) -> dict[str, int]:
    """Number string labels: a known set (e.g. entailment=0, not_entailment=1) keeps GLUE's order, others sort."""
    unique = set(names)
    for order in KNOWN_LABEL_ORDERS:
        if unique <= set(order):
            return {name: order.index(name) for name in unique}
    return {name: i for i, name in enumerate(sorted(unique))}


def split_train_eval(examples: Sequence[T], eval_fraction: float, seed: int) -> tuple[list[T], list[T]]:
    """A seeded random split keeping the file order inside each part; eval and train get at least one example."""
    if not 0 < eval_fraction < 1:
        raise ConfigError(f"eval fraction {eval_fraction} must be between 0 and 1 (exclusive).")
    if len(examples) < 2:
        raise ConfigError(f"cannot split {len(examples)} example(s) into train and eval; give an eval file instead.")
    n_eval = min(max(1, round(len(examples) * eval_fraction)), len(examples) - 1)
    eval_idx = set(np.random.default_rng(seed).permutation(len(examples))[:n_eval].tolist())
    train = [e for i, e in enumerate(examples) if i not in eval_idx]
    return train, [e for i, e in enumerate(examples) if i in eval_idx]


# --- tokenization ------------------------------------------------------------------------------------------------


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


# --- packing and batching ----------------------------------------------------------------------------------------


class _FirstFit:
    """Rows of fixed capacity; finds the first row with enough room in O(log rows) with a max segment tree."""

    def __init__(self, capacity: int, max_rows: int) -> None:
        self.capacity, self.size, self.rows = capacity, 1 << max(max_rows - 1, 0).bit_length(), 0
        self.tree = [0] * (2 * self.size)  # free room per row; rows not yet opened have none

    def place(self, length: int) -> int:
        """Index of the first row with ``length`` free (a new row if none), with ``length`` taken from it."""
        if self.tree[1] >= length:
            node = 1
            while node < self.size:
                node = 2 * node if self.tree[2 * node] >= length else 2 * node + 1
            row = node - self.size
        else:
            row, self.rows = self.rows, self.rows + 1
            self._set(row, self.capacity)
        self._set(row, self.tree[self.size + row] - length)
        return row

    def _set(self, row: int, free: int) -> None:
        node = self.size + row
        self.tree[node] = free
        while node > 1:
            node //= 2
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])


def pack(features: Sequence[dict], max_length: int) -> list[dict]:
    """Pack causal-lm features into rows of at most ``max_length`` tokens, first-fit in order, never splitting one.

    Each row has ``input_ids``, ``labels``, ``position_ids`` restarting at 0 per example, and ``seq_lens``. The first
    label of each packed example is set to -100: it would otherwise be predicted from the previous example's end
    (unpacked, a sequence's first token is never a target either, so the loss covers the same tokens).
    """
    fit = _FirstFit(max_length, len(features))
    rows: list[dict] = []
    for i, feature in enumerate(features):
        length = len(feature["input_ids"])
        if length > max_length:
            raise ConfigError(f"feature {i} has {length} tokens, more than the packing length {max_length}.")
        row = fit.place(length)
        if row == len(rows):
            rows.append({"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []})
        rows[row]["input_ids"] += feature["input_ids"]
        rows[row]["labels"] += [IGNORE_INDEX, *feature["labels"][1:]]
        rows[row]["position_ids"] += range(length)
        rows[row]["seq_lens"].append(length)
    return rows


class Batcher:
    """Batches of feature indices, deterministic per ``(seed, epoch)``, and their padded tensors.

    With ``group_by_length`` the shuffled order is cut into mega-chunks of 50 batches, each sorted by length, so a
    batch holds examples of similar length (less padding) while the epoch stays random; the batch holding the
    longest example comes first, so running out of memory happens at once rather than hours in.
    """

    MEGA_CHUNK_BATCHES = 50

    def __init__(
        self,
        features: Sequence[dict],
        batch_size: int,
        *,
        pad_token_id: int,
        seed: int,
        shuffle: bool = True,
        group_by_length: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch size must be at least 1, not {batch_size}.")
        self.features, self.batch_size, self.pad_token_id = features, batch_size, pad_token_id
        self.seed, self.shuffle, self.group_by_length = seed, shuffle, group_by_length
        self.lengths = np.array([len(f["input_ids"]) for f in features])

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.features) // self.batch_size)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """Feature indices per batch for ``epoch``; the same ``(seed, epoch)`` always gives the same batches."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.features)) if self.shuffle else np.arange(len(self.features))
        if self.group_by_length:
            order = self._sort_chunks(order)
        batches = [order[s : s + self.batch_size].tolist() for s in range(0, len(order), self.batch_size)]
        if self.group_by_length and self.shuffle and batches:
            batches = [batches[i] for i in rng.permutation(len(batches))]
            longest = max(range(len(batches)), key=lambda b: self.lengths[batches[b]].max())
            batches.insert(0, batches.pop(longest))
        return batches

    def _sort_chunks(self, order: np.ndarray) -> np.ndarray:
        """``order`` with each mega-chunk sorted longest first (stable, so ties keep the shuffled order)."""
        chunk = self.MEGA_CHUNK_BATCHES * self.batch_size
        sorted_order = order.copy()
        for start in range(0, len(order), chunk):
            part = order[start : start + chunk]
            sorted_order[start : start + chunk] = part[np.argsort(-self.lengths[part], kind="stable")]
        return sorted_order

    def collate(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Right-padded tensors: ``input_ids`` with the pad id, ``labels`` with -100, the rest with 0."""
        features = [self.features[i] for i in indices]
        width = max(len(f["input_ids"]) for f in features)
        batch = {
            "input_ids": _pad([f["input_ids"] for f in features], width, self.pad_token_id),
            "attention_mask": _pad([[1] * len(f["input_ids"]) for f in features], width, 0),
        }
        if isinstance(features[0]["labels"], int):
            batch["labels"] = torch.tensor([f["labels"] for f in features], dtype=torch.long)
        else:
            batch["labels"] = _pad([f["labels"] for f in features], width, IGNORE_INDEX)
        for key in ("position_ids", "token_type_ids"):
            if key in features[0]:
                batch[key] = _pad([f[key] for f in features], width, 0)
        return batch


def _pad(rows: list[list[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=torch.long)
