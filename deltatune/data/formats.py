"""Reading data files into :class:`~deltatune.data.examples.Example` records, detecting their format.

Formats are detected from the file extension and the field names, so a user can point deltatune at an
Alpaca JSON, a chat JSONL, a GLUE TSV or a plain text file without writing a loader. Every problem with the
data raises :class:`~deltatune.config.ConfigError` whose message names the problem and the flag that fixes it.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from deltatune.config import ConfigError
from deltatune.data.examples import TASKS, Example

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".txt")

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
    task_column: str | None = None,
    task_name: str | None = None,
) -> list[Example]:
    """Read ``path`` (.jsonl/.json/.csv/.tsv/.txt) into examples for ``task`` ("causal-lm" or "classification").

    Column arguments override the detected fields: ``text_column``/``text_pair_column``/``label_column`` for
    classification, ``prompt_column``/``target_column`` (or ``text_column`` for plain text) for causal-lm.
    Multi-task data: ``task_column`` names the column holding each row's task (string labels are then numbered
    per task), or ``task_name`` is the task of every example of the file.
    """
    path = _checked_path(Path(path), task)
    if path.suffix.lower() == ".txt":
        if task_column is not None:
            raise ConfigError(f"{path.name}: a .txt file has no columns, so --task-column cannot be used with it.")
        examples = _read_text(path, task)
    else:
        records = _read_csv(path) if path.suffix.lower() in (".csv", ".tsv") else _read_json(path)
        columns = {
            "text_column": text_column,
            "text_pair_column": text_pair_column,
            "label_column": label_column,
            "prompt_column": prompt_column,
            "target_column": target_column,
            "num_labels": num_labels,
        }
        if task_column is not None:
            return _read_task_column(records, path, task, task_column, columns=columns)
        examples = _records_examples(records, path, task, **columns)
    if not examples:
        raise ConfigError(f"{path} holds no examples; check that it is the right file and not empty.")
    for example in examples:
        example.task = task_name
    return examples


def _checked_path(path: Path, task: str) -> Path:
    """``path`` if it is a readable data file for a known task, else an error that says what to change."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of: {', '.join(TASKS)}.")
    if not path.is_file():
        raise ConfigError(f"data file {str(path)!r} does not exist; check the path.")
    if path.suffix.lower() not in EXTENSIONS:
        raise ConfigError(
            f"cannot read {path.name!r}: unknown extension {path.suffix!r}. Convert it to one of "
            f"{', '.join(EXTENSIONS)} (JSON lines, a JSON list, CSV/TSV with a header, or blank-line separated text)."
        )
    return path


def _records_examples(
    records: list[tuple[str, dict]],
    path: Path,
    task: str,
    text_column: str | None,
    text_pair_column: str | None,
    label_column: str | None,
    prompt_column: str | None,
    target_column: str | None,
    num_labels: int | None,
) -> list[Example]:
    """One task's records (from a JSON/CSV file) as examples, with the given columns or the detected ones."""
    if task == "causal-lm":
        if (prompt_column is None) != (target_column is None):
            raise ConfigError("give both --prompt-column and --target-column, or neither.")
        return [_lm_example(r, where, path, text_column, prompt_column, target_column) for where, r in records]
    return _classification_examples(records, path, text_column, text_pair_column, label_column, num_labels)


def _read_task_column(
    records: list[tuple[str, dict]], path: Path, task: str, task_column: str, columns: dict[str, Any]
) -> list[Example]:
    """Examples of a file whose ``task_column`` names each row's task, in file order; each task's rows are
    read as a file of their own (so string labels are numbered per task), without the task column."""
    by_task: dict[str, list[tuple[int, str, dict]]] = {}
    for i, (where, record) in enumerate(records):
        _require(record, (task_column,), where, path, "--task-column")
        name = record[task_column]
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"{where} of {path.name}: the task column {task_column!r} is empty; name the row's task.")
        rest = {k: v for k, v in record.items() if k != task_column}
        by_task.setdefault(name.strip(), []).append((i, where, rest))
    if not by_task:
        raise ConfigError(f"{path} holds no examples; check that it is the right file and not empty.")
    placed: dict[int, Example] = {}
    for name, rows in by_task.items():
        part = [(where, record) for _, where, record in rows]
        examples = _records_examples(part, path, task, **columns)
        for (i, _, _), example in zip(rows, examples, strict=True):
            example.task = name
            placed[i] = example
    return [placed[i] for i in sorted(placed)]


def _read_utf8(path: Path) -> str:
    """The file's text (a UTF-8 byte-order mark dropped). UTF-16, Latin-1 or binary content is a one-line error naming
    the file and the fix, not a UnicodeDecodeError traceback, nor NUL characters quietly read as text."""
    data = path.read_bytes()
    source = "UTF-16"
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        reason = "it starts with a UTF-16 byte-order mark"
    elif b"\x00" in data:
        reason = "it holds NUL bytes, as UTF-16 text or a binary file does"
    else:
        try:
            return data.decode("utf-8-sig")
        except UnicodeDecodeError as err:
            reason, source = f"byte {data[err.start]:#04x} at offset {err.start} is not valid UTF-8", "LATIN1"
    raise ConfigError(
        f"{path} is not UTF-8 text ({reason}). Save it as UTF-8, e.g. `iconv -f {source} -t UTF-8 {path.name} > "
        f"{path.stem}.utf8{path.suffix}`, and use that file; export a spreadsheet or other binary file as CSV first."
    )


def _read_text(path: Path, task: str) -> list[Example]:
    if task == "classification":
        raise ConfigError(
            f"{path.name}: a .txt file has no labels; classification needs a .csv/.tsv with text and label columns "
            "or JSON lines with text and label fields."
        )
    blocks = re.split(r"\n\s*\n", _read_utf8(path))
    return [Example(prompt=None, target=None, text=b.strip()) for b in blocks if b.strip()]


def _read_json(path: Path) -> list[tuple[str, dict]]:
    """A JSON list of records, else JSON lines; each record comes with where it was found, for error messages."""
    content = _read_utf8(path)
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
    with io.StringIO(_read_utf8(path), newline="") as f:
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
