"""Data: read labelled text from CSV / TSV / JSON Lines, tokenize once, batch with dynamic padding.

Tasks:
    classification  single sentence or sentence pair, labels are class names or integers
    regression      one float target per row (e.g. STS-B similarity)
    causal-lm       one text column; the model learns to continue it

Bad input fails early with the file, the row and what to do.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from decimal import Decimal
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

logger = logging.getLogger(__name__)

TASKS = ("classification", "regression", "causal-lm")

# Datasets that ship inside the package (no hub, no shared folder needed).
BUILTIN_DATASETS: dict[str, dict[str, Any]] = {
    # GLUE SST-2 subset: single-sentence sentiment classification
    "sst2": {"task": "classification", "text_column": "sentence", "text_pair_column": None, "label_column": "label"},
    # ChatterBot question/answer pairs: does the answer belong to the question (sentence-pair)
    "qa-match": {"task": "classification", "text_column": "question", "text_pair_column": "answer",
                 "label_column": "label"},
    # Pattern's hand-tagged lexicon: (word, WordNet gloss) → polarity in [-1, 1] (sentence-pair regression)
    "adjective-polarity": {"task": "regression", "text_column": "word", "text_pair_column": "gloss",
                           "label_column": "polarity"},
}


class DataError(InputError):
    """Input data that cannot be used, with the reason and the fix in the message."""


SPLITS = ("train", "validation", "test")


def builtin_split_file(name: str, split: str) -> Path:
    """A split of a built-in dataset: train, validation (choose settings on it) or test (report only)."""
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; built-in datasets have {SPLITS}.")
    return Path(str(resources.files("lora2") / "datasets" / name / f"{split}.tsv"))


def builtin_dataset_files(name: str) -> tuple[Path, Path]:
    """(train, validation) files of a built-in dataset."""
    return builtin_split_file(name, "train"), builtin_split_file(name, "validation")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a .csv / .tsv (header line) or .jsonl / .json (one object per line) file.

    Strict, so that a malformed row is an error and never a silent wrong example: every CSV / TSV row
    has exactly the header's number of fields (a tab inside TSV text would otherwise shift the label),
    header names are unique, CSV fields may be quoted (and then hold commas and newlines), TSV has no
    quoting. Only "\n" / "\r\n" / "\r" end a line: U+2028, NEL or a form feed are text like any other.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".tsv"):
        raise DataError(f"{path}: unsupported extension {suffix!r}; use .csv, .tsv or .jsonl.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 (bad byte at line {line}); re-encode it, e.g. "
                        f"`iconv -f latin1 -t utf-8 {path.name} > fixed{path.suffix}`.") from e
    if not text.strip():
        raise DataError(f"{path} is empty; it needs a header line and at least one row.")
    rows = _read_json_lines(path, text) if suffix in (".jsonl", ".json") else _read_delimited(path, text, suffix)
    if not rows:
        raise DataError(f"{path} has a header but no rows.")
    return rows


def _read_json_lines(path: Path, text: str) -> list[dict[str, Any]]:
    rows = []
    for i, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 / NEL are valid inside JSON
        line = line.rstrip("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {i} is not valid JSON ({e.msg}); JSON Lines needs one object per line.") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path} line {i} is not a JSON object.")
        rows.append(obj)
    return rows


def _read_delimited(path: Path, text: str, suffix: str) -> list[dict[str, Any]]:
    tsv = suffix == ".tsv"
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if tsv else ",",
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL, strict=True)
    try:
        header = next(reader)
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if duplicated:
            raise DataError(f"{path}: the header names {duplicated} more than once; which copy is meant is "
                            "ambiguous. Rename or drop the duplicate columns.")
        rows = []
        for fields in reader:
            if not fields or fields == [""]:  # a blank line
                continue
            if len(fields) != len(header):
                hint = ("a tab inside the text? TSV has no quoting: replace tabs in the text, or use CSV with "
                        "quoted fields" if tsv else "quote fields that hold commas")
                raise DataError(f"{path} line {reader.line_num} has {len(fields)} fields, the header has "
                                f"{len(header)} ({hint}).")
            rows.append(dict(zip(header, fields)))
    except csv.Error as e:
        raise DataError(f"{path} line {reader.line_num} is not valid {'TSV' if tsv else 'CSV'} ({e}).") from e
    return rows


@dataclass
class TextDataset:
    """Tokenized examples plus what the model head needs to know (labels, number of labels)."""

    examples: list[dict[str, list[int] | int | float]]
    task: str
    label_names: list[str] = field(default_factory=list)
    truncated: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_labels(self) -> int:
        return 1 if self.task == "regression" else len(self.label_names)


def _column(rows: list[dict[str, Any]], name: str | None, path: str | Path, role: str) -> list[Any]:
    if name is None:
        return []
    if name not in rows[0]:
        raise DataError(f"{path} has no {role} column {name!r}; its columns are {list(rows[0])}. "
                        f"Pass --{role.replace(' ', '-')}-column with one of them.")
    values = [row.get(name) for row in rows]
    missing = [i + 2 for i, v in enumerate(values) if v is None or (isinstance(v, str) and v == "" and role == "label")]
    if missing:
        raise DataError(f"{path}: {len(missing)} rows have no {role} (first at line {missing[0]}); fix or drop them.")
    return values


def build_dataset(
    path: str | Path, tokenizer: Any, task: str, text_column: str, label_column: str | None = "label",
    text_pair_column: str | None = None, max_length: int = 128, label_names: list[str] | None = None,
    max_samples: int | None = None,
) -> TextDataset:
    """Tokenize ``path`` for ``task``. Pass the training set's ``label_names`` for eval sets so
    both agree on the label ids; an unseen label is an error."""
    if task not in TASKS:
        raise DataError(f"unknown task {task!r}; choose one of {TASKS}.")
    rows = read_rows(path)
    if max_samples is not None:
        rows = rows[:max_samples]
    texts = [str(t) for t in _column(rows, text_column, path, "text")]
    pairs = [str(t) for t in _column(rows, text_pair_column, path, "text pair")] or None
    # One pass without truncation counts the long rows; only those are encoded a second time.
    encoded = {k: list(v) for k, v in tokenizer(texts, pairs, truncation=False, verbose=False).items()}
    long_rows = [i for i, ids in enumerate(encoded["input_ids"]) if len(ids) > max_length]
    if long_rows:
        fixed = tokenizer([texts[i] for i in long_rows], [pairs[i] for i in long_rows] if pairs else None,
                          truncation=True, max_length=max_length)
        for key, values in encoded.items():
            for j, i in enumerate(long_rows):
                values[i] = fixed[key][j]
        logger.warning("%s: %d of %d rows were longer than max_length=%d tokens and were truncated.",
                       path, len(long_rows), len(rows), max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    examples: list[dict[str, Any]] = [{k: encoded[k][i] for k in keys} for i in range(len(rows))]
    names: list[str] = []
    if task == "classification":
        raw = [normalise_label(v, path, i + 1) for i, v in enumerate(_column(rows, label_column, path, "label"))]
        if label_names is not None:  # the training set's (or a saved adapter's, maybe from before normalising)
            names = [normalise_label(n, "the known labels", i + 1) for i, n in enumerate(label_names)]
            if len(set(names)) != len(names):
                raise DataError(f"the known labels {list(label_names)} name one class twice once numbers are "
                                f"normalised ({names}); retrain with distinct labels.")
        else:
            names = _sorted_labels(set(raw))
            _refuse_a_numeric_target_as_classes(names, path)
        index = {n: i for i, n in enumerate(names)}
        unknown = sorted(set(raw) - set(index))
        if unknown:
            raise DataError(f"{path} has labels {unknown[:5]} that the training set does not have "
                            f"(known: {names}); fix the labels or the label column.")
        if len(names) < 2:
            raise DataError(f"{path} has a single label value {names}; classification needs at least two.")
        for ex, label in zip(examples, raw):
            ex["labels"] = index[label]
    elif task == "regression":
        for i, (ex, value) in enumerate(zip(examples, _column(rows, label_column, path, "label"))):
            try:
                target = float(value)
            except (TypeError, ValueError):
                raise DataError(f"{path} line {i + 2}: label {value!r} is not a number; regression needs "
                                "numeric targets.") from None
            if not math.isfinite(target):
                raise DataError(f"{path} line {i + 2}: label {value!r} is not finite.")
            ex["labels"] = target
    return TextDataset(examples=examples, task=task, label_names=names, truncated=len(long_rows))


_DECIMAL = re.compile(r"[+-]?(0|[1-9][0-9]*)(\.[0-9]+)?")  # ASCII digits, no leading zeros: "007" stays a name
_NOT_A_NUMBER = {"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity", "-infinity"}


def normalise_label(value: Any, path: str | Path, row: int) -> str:
    """A classification label as its class name. A number names the same class however it is written
    (JSON 1 and 1.0, text "1.0" and " +1" are class "1"; "1.50" is "1.5"); NaN and infinities are no
    class; any other text is a name, only stripped ("007", "1_0" and "٣" stay as they are)."""
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DataError(f"{path} row {row}: label {value!r} is not a class (not a finite number); fix or drop "
                            "the row.")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    text = str(value).strip()
    if text.lower() in _NOT_A_NUMBER:
        raise DataError(f"{path} row {row}: label {value!r} is not a class (a missing or invalid number); fix or "
                        "drop the row.")
    if _DECIMAL.fullmatch(text):
        number = Decimal(text)  # exact: no float rounding of long integers
        return str(int(number)) if number == number.to_integral_value() else format(number.normalize(), "f")
    return text


# More distinct labels than this, mostly fractional numbers: a regression target, not classes
MAX_FRACTIONAL_CLASSES = 10


def _refuse_a_numeric_target_as_classes(names: list[str], path: str | Path) -> None:
    """Labels such as 0.37, 2.5, 4.1 under --task classification each became a class of their own (40 classes,
    accuracy 0.025, exit 0). Many distinct numbers, mostly fractional, are a regression target: refused,
    naming the flag. A few fractional class names (0.5 / 1.0 / 1.5) are kept as classes, with a warning."""
    if not names or not all(_DECIMAL.fullmatch(n) for n in names):
        return
    fractional = [n for n in names if "." in n]
    if not fractional:
        return
    if len(names) > MAX_FRACTIONAL_CLASSES and len(fractional) * 2 > len(names):
        raise DataError(f"{path}: its labels are {len(names)} distinct numbers, {len(fractional)} of them fractional "
                        f"(e.g. {', '.join(fractional[:3])}): that is a numeric target, not classes. Pass --task "
                        "regression, or give class labels.")
    logger.warning("%s: the labels %s are numbers, some fractional; they are taken as %d class names (pass --task "
                   "regression for a numeric target)", path, names[:6], len(names))


def _sorted_labels(values: set[str]) -> list[str]:
    try:
        return [str(v) for v in sorted(values, key=float)]
    except ValueError:
        return sorted(values)


class Collator:
    """Pads a list of examples into tensors; causal-LM labels are the inputs, pads ignored."""

    def __init__(self, pad_token_id: int, task: str) -> None:
        self.pad_token_id = pad_token_id
        self.task = task

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(ex["input_ids"]) for ex in examples)
        batch: dict[str, torch.Tensor] = {}
        for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("token_type_ids", 0)):
            if key in examples[0]:
                batch[key] = torch.tensor([ex[key] + [pad] * (length - len(ex[key])) for ex in examples])
        if self.task == "causal-lm":
            labels = batch["input_ids"].clone()
            labels[batch["attention_mask"] == 0] = -100
            batch["labels"] = labels
        elif self.task == "regression":
            batch["labels"] = torch.tensor([float(ex["labels"]) for ex in examples])
        else:
            batch["labels"] = torch.tensor([int(ex["labels"]) for ex in examples])
        return batch


def batches_per_epoch(examples: int, batch_size: int, world_size: int = 1) -> int:
    """Global batches of an epoch. A last batch with fewer examples than processes is dropped on every
    rank (some ranks would get none, and ranks that run different numbers of steps hang in DDP)."""
    full, rest = divmod(examples, batch_size)
    return full + (1 if rest >= world_size else 0)


def batches(dataset: TextDataset, batch_size: int, collate: Collator, generator: torch.Generator | None = None,
            skip: int = 0, shard: tuple[int, int] = (0, 1)):
    """Yield batches; shuffled by ``generator`` when given. ``skip`` drops the first batches (resume).

    ``shard=(rank, world_size)``: every process draws the same global batch and keeps every
    world_size-th example of it, so N processes together see exactly the 1-process batches. Every
    rank yields `batches_per_epoch` batches: a last global batch too small to give each rank an
    example is dropped on all of them.
    """
    rank, world_size = shard
    order = (torch.randperm(len(dataset), generator=generator).tolist() if generator is not None
             else list(range(len(dataset))))
    for index in range(skip, batches_per_epoch(len(order), batch_size, world_size)):
        part = order[index * batch_size:(index + 1) * batch_size][rank::world_size]
        yield collate([dataset.examples[i] for i in part])
