"""Labeled text for fine-tuning: a local CSV, TSV or JSONL file, or a GLUE task.

A file holds one example per row, with a text column and an integer label column (``text`` and
``label`` unless named otherwise; GLUE's own ``.tsv`` files work with ``--text-column sentence``).
Every row is checked before any model loads: a missing column, an empty text or a label that is
not an integer ends the command with one line naming the file and line. The label values become
class indices in sorted order (labels 3 and 7 -> classes 0 and 1); the model's ``id2label`` keeps
the original values.
"""

from __future__ import annotations

import csv
import json
import os
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatie.errors import ConfigError, DataError

if TYPE_CHECKING:  # the settings of `megatie finetune`; only their fields are read here
    from megatie.config import FinetuneConfig

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
# GLUE tasks with one integer label: the text columns joined (pairs with a space), and the split
# to hold out (GLUE's test labels are hidden).
GLUE_TASKS: dict[str, tuple[tuple[str, ...], str]] = {
    "cola": (("sentence",), "validation"), "sst2": (("sentence",), "validation"),
    "mrpc": (("sentence1", "sentence2"), "validation"), "qqp": (("question1", "question2"), "validation"),
    "qnli": (("question", "sentence"), "validation"), "rte": (("sentence1", "sentence2"), "validation"),
    "wnli": (("sentence1", "sentence2"), "validation"), "mnli": (("premise", "hypothesis"), "validation_matched"),
}


@dataclass
class Examples:
    texts: list[str]
    labels: list[int]  # the file's label values, not yet class indices

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> "Examples":
        return Examples([self.texts[i] for i in indices], [self.labels[i] for i in indices])


def read_examples(path: str, text_column: str = "text", label_column: str = "label") -> Examples:
    """Every row of a labeled file, checked; one clear ``DataError`` for the first bad row."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ConfigError(f"{path}: labeled data must be .csv, .tsv or .jsonl (got {ext or 'no extension'!r})")
    if not os.path.isfile(path):
        raise ConfigError(f"labeled file not found: {path}")
    rows = _jsonl_rows(path) if ext == ".jsonl" else _delimited_rows(path, FORMATS[ext])
    texts, labels = [], []
    for line, row in rows:
        for column in (text_column, label_column):
            if column not in row:
                fields = ", ".join(map(str, row)) or "none"
                raise DataError(f"{path} line {line}: no {column!r} field (it has: {fields})")
        text = row[text_column]
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} line {line}: the {text_column!r} field is empty or not text")
        texts.append(text)
        labels.append(_integer_label(row[label_column], path, line))
    if not texts:
        raise DataError(f"{path} holds no examples")
    return Examples(texts, labels)


def _delimited_rows(path: str, delimiter: str):
    with open(path, newline="", encoding="utf-8") as f:
        quoting = csv.QUOTE_MINIMAL if delimiter == "," else csv.QUOTE_NONE  # GLUE's .tsv files quote nothing
        reader = csv.DictReader(f, delimiter=delimiter, quoting=quoting)
        if not reader.fieldnames:
            raise DataError(f"{path} is empty (a header row with the column names is needed)")
        for row in reader:
            if None in row or any(v is None for v in row.values()):
                raise DataError(f"{path} line {reader.line_num}: {len(row)} fields where the header has "
                                f"{len(reader.fieldnames)}")
            yield reader.line_num, row


def _jsonl_rows(path: str):
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(f"{path} line {line_no}: not valid JSON") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {line_no}: a JSON object with text and label is needed")
            yield line_no, row


def _integer_label(value, path: str, line: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise DataError(f"{path} line {line}: label {value!r} is not an integer")
    if isinstance(value, int):
        return value
    try:
        return int(value.strip())
    except ValueError:
        shown = "missing" if not value.strip() else f"{value!r} is not an integer"
        raise DataError(f"{path} line {line}: label {shown}") from None


def check_classes(train: Examples, held_out: Examples) -> list[int]:
    """The label values, sorted; at least two, and none in the held-out set that training lacks."""
    classes = sorted(set(train.labels))
    if len(classes) < 2:
        raise DataError(f"the training examples have a single label ({classes[0]}); nothing to classify")
    unseen = sorted(set(held_out.labels) - set(classes))
    if unseen:
        raise DataError(f"held-out labels {unseen} never occur in the training examples")
    return classes


def split_held_out(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """A seeded random split: ``fraction`` of the examples held out (at least one on each side)."""
    if len(examples) < 2:
        raise DataError("at least two labeled examples are needed (one to train on, one to hold out)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_held = min(max(1, round(len(order) * fraction)), len(order) - 1)
    return examples.subset(sorted(order[n_held:])), examples.subset(sorted(order[:n_held]))


def load_examples(cfg: FinetuneConfig) -> tuple[Examples, Examples]:
    """``(train, held_out)``: a GLUE task's train/validation, or the file split (or ``--valid-file``)."""
    if cfg.glue:
        return load_glue(cfg.glue)
    examples = read_examples(cfg.train_file, cfg.text_column, cfg.label_column)
    if cfg.valid_file:
        return examples, read_examples(cfg.valid_file, cfg.text_column, cfg.label_column)
    return split_held_out(examples, cfg.held_out, cfg.seed)


def load_glue(task: str) -> tuple[Examples, Examples]:
    """``(train, validation)`` of a GLUE task through the ``datasets`` library (needs the Hugging Face
    hub or its local cache)."""
    if task not in GLUE_TASKS:
        raise ConfigError(f"unknown GLUE task {task!r}; choose one of {', '.join(GLUE_TASKS)} (stsb is a regression)")
    columns, held_split = GLUE_TASKS[task]
    try:
        from datasets import load_dataset

        data = load_dataset("nyu-mll/glue", task)
    except Exception as e:  # offline, no cache, hub errors: all end the same way for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load GLUE task {task!r} ({first}); give a local labeled file instead") from None

    def examples(split: str) -> Examples:
        part = data[split]
        texts = [" ".join(parts) for parts in zip(*(part[c] for c in columns))]
        return Examples(texts, [int(v) for v in part["label"]])

    return examples("train"), examples(held_split)
