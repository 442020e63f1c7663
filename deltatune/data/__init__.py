"""Data for training and evaluation: read a file into :class:`Example` records (:mod:`.formats`), tokenize them
(:mod:`.tokenize`), pack them (:mod:`.packing`) and batch them (:mod:`.batching`).

Several tasks at once (multi-task training) are examples with ``task`` set: one file per task
(``read_examples(path, task, task_name="sst2")``) or a task column (``task_column="task"``).
"""

from deltatune.data.batching import Batcher
from deltatune.data.examples import IGNORE_INDEX, TASKS, Example, split_train_eval
from deltatune.data.formats import (
    EXTENSIONS,
    KNOWN_LABEL_ORDERS,
    LABEL_FIELDS,
    PROMPT_TARGET_FIELDS,
    TEXT_FIELDS,
    TEXT_PAIR_FIELDS,
    label_ids,
    read_examples,
)
from deltatune.data.packing import pack
from deltatune.data.tokenize import prompt_ids, prompt_text, tag_tasks, tokenize_examples, tokenize_tasks

__all__ = [
    "EXTENSIONS",
    "IGNORE_INDEX",
    "KNOWN_LABEL_ORDERS",
    "LABEL_FIELDS",
    "PROMPT_TARGET_FIELDS",
    "TASKS",
    "TEXT_FIELDS",
    "TEXT_PAIR_FIELDS",
    "Batcher",
    "Example",
    "label_ids",
    "pack",
    "prompt_ids",
    "prompt_text",
    "read_examples",
    "split_train_eval",
    "tag_tasks",
    "tokenize_examples",
    "tokenize_tasks",
]
