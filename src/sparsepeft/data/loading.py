"""Reading task data: local GLUE folders, the hub's GLUE, and the user's own CSV/TSV/JSON files.

Every reader returns :class:`TaskData` — plain lists of text tuples and label ids — so the rest of the
library does not care where the data came from. Errors name the file, the line and the column.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .tasks import LabelSpace, TaskSpec, glue_task

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class DataError(ValueError):
    """Missing or malformed task data; the message names the file and what to fix."""


@dataclass
class Split:
    texts: list[tuple[str, ...]]
    labels: list[float] | list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int | None, seed: int = 0) -> "Split":
        """A random subset of ``n`` rows (all of them if ``n`` is None or too large)."""
        if n is None or n >= len(self):
            return self
        import random

        rows = sorted(random.Random(seed).sample(range(len(self)), n))
        return Split([self.texts[i] for i in rows], [self.labels[i] for i in rows])


@dataclass
class TaskData(LabelSpace):
    name: str
    train: Split
    evaluation: dict[str, Split]
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    source: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- GLUE
def load_glue(task: str, data_dir: str | os.PathLike | None = None) -> TaskData:
    """A GLUE task from a local folder in the GLUE layout, or from the hub when ``data_dir`` is None."""
    spec = glue_task(task)
    if data_dir is None:
        return _load_glue_from_hub(spec)
    folder = _task_folder(Path(data_dir), spec)
    train = _read_glue_tsv(folder / "train.tsv", spec)
    evaluation = {split: _read_glue_tsv(folder / name, spec) for split, name in spec.eval_files.items()}
    return TaskData(spec.name, train, evaluation, spec.label_names, spec.metrics, source=str(folder))


def _task_folder(data_dir: Path, spec: TaskSpec) -> Path:
    """Accept the GLUE root (``glue/``) or the task folder itself (``glue/RTE``)."""
    for candidate in (data_dir / spec.folder, data_dir):
        if (candidate / "train.tsv").is_file():
            return candidate
    if not data_dir.exists():
        raise DataError(f"Data folder {data_dir} does not exist.")
    raise DataError(
        f"No {spec.folder}/train.tsv under {data_dir}. Expected the GLUE layout ({data_dir}/{spec.folder}/train.tsv "
        f"and {', '.join(spec.eval_files.values())}), or point --data-dir at the task folder itself."
    )


def _read_glue_tsv(path: Path, spec: TaskSpec) -> Split:
    if not path.is_file():
        raise DataError(f"Missing GLUE file {path} (task {spec.name} needs train.tsv and "
                        f"{', '.join(spec.eval_files.values())}).")
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}). "
                        "Save it as UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8.") from None
    if spec.header:
        if not rows:
            raise DataError(f"{path} is empty.")
        header, body, first_line = rows[0], rows[1:], 2
        positions = {name: i for i, name in enumerate(header)}
    else:
        body, first_line, positions = rows, 1, dict(spec.positions or {})
    needed = [*spec.text_columns, spec.label_column]
    missing = [c for c in needed if c not in positions]
    if missing:
        raise DataError(f"{path} has no column {missing} (found {list(positions)}); is this the {spec.folder} file?")
    text_at = [positions[c] for c in spec.text_columns]
    label_at = positions[spec.label_column]
    width = max(text_at + [label_at]) + 1
    texts, labels = [], []
    for line, row in enumerate(body, start=first_line):
        if not row:
            continue
        if len(row) < width:
            raise DataError(f"{path}, line {line}: {len(row)} fields, expected at least {width}. The file is malformed.")
        texts.append(tuple(row[i] for i in text_at))
        labels.append(_label_id(row[label_at], spec, f"{path}, line {line}, column {spec.label_column!r}"))
    if not labels:
        raise DataError(f"{path} has no data rows.")
    return Split(texts, labels)


def _label_id(value: str, spec: TaskSpec, where: str):
    value = value.strip()
    if spec.is_regression:
        try:
            return float(value)
        except ValueError:
            raise DataError(f"{where}: score {value!r} is not a number.") from None
    if value in spec.local_label_values:
        return spec.local_label_values.index(value)
    raise DataError(f"{where}: label {value!r} is not one of {list(spec.local_label_values)}.")


def _load_glue_from_hub(spec: TaskSpec) -> TaskData:
    try:
        from datasets import load_dataset

        dataset = load_dataset("nyu-mll/glue", spec.name)
    except Exception as error:  # offline, no cache, hub down: all end the same way for the user
        raise DataError(
            f"Could not load GLUE {spec.name} from the hub ({type(error).__name__}: {error}). Offline? Pass "
            "--data-dir pointing at a local GLUE folder (TASK/train.tsv, TASK/dev.tsv)."
        ) from error

    def split(name: str) -> Split:
        part = dataset[name]
        columns = [part[c] for c in spec.hub_text_columns]
        return Split(list(zip(*columns)), list(part["label"]))

    return TaskData(spec.name, split("train"), {s: split(s) for s in spec.hub_eval_splits}, spec.label_names,
                    spec.metrics, source="hub:nyu-mll/glue")


# ---------------------------------------------------------------------------------------------- files
def load_files(
    train_file: str | os.PathLike,
    validation_file: str | os.PathLike,
    text_columns: Sequence[str],
    label_column: str = "label",
    task_type: str = "auto",
) -> TaskData:
    """The user's own data: CSV, TSV, JSON (a list of objects) or JSON lines, one row per example.

    ``task_type`` is ``classification``, ``regression`` or ``auto`` (regression when every label is a
    number and some are not integers).
    """
    if not text_columns:
        raise DataError("Name the text column(s) with --text-columns (e.g. 'sentence' or 'sentence1,sentence2').")
    columns = [*text_columns, label_column]
    train_rows = _checked_rows(Path(train_file), columns, label_column)
    eval_rows = _checked_rows(Path(validation_file), columns, label_column)
    raw_labels = [str(row[label_column]).strip() for _, row in train_rows]  # the label set is the training file's
    regression = _is_regression(raw_labels) if task_type == "auto" else task_type == "regression"
    label_names = None if regression else tuple(sorted(set(raw_labels), key=_natural_key))

    def split(path, rows) -> Split:
        texts, labels = [], []
        for line, row in rows:
            value = str(row[label_column]).strip()
            if regression:
                try:
                    labels.append(float(value))
                except ValueError:
                    raise DataError(f"{path}, {line}: label {value!r} is not a number (a regression task).") from None
            elif value in label_names:
                labels.append(label_names.index(value))
            else:
                raise DataError(f"{path}, {line}: label {value!r} does not occur in the training file "
                                f"{train_file} (its labels: {list(label_names)[:10]}). Fix the row, or add "
                                "examples of that label to the training file.")
            texts.append(tuple(str(row[c]) for c in text_columns))
        return Split(texts, labels)

    metrics = ("pearson", "spearmanr") if regression else ("accuracy", "f1") if len(label_names) == 2 else ("accuracy",)
    return TaskData(Path(train_file).stem, split(train_file, train_rows), {"validation": split(validation_file, eval_rows)},
                    label_names, metrics, source=str(train_file))


def _checked_rows(path: Path, columns: list[str], label_column: str) -> list[tuple[str, dict]]:
    """Every row, with where it is in the file; a row with missing or extra fields, or without a label, is an
    error naming the file, the row and the fix (instead of a label such as "None" or "")."""
    rows = _read_rows(path)
    first = rows[0][1]
    missing = [c for c in columns if c not in first]
    if missing:
        raise DataError(f"{path} has no column {missing} (found {[k for k in first if k is not None]}). Set "
                        "--text-columns/--label-column.")
    for where, row in rows:
        if None in row:  # csv: more fields than the header
            raise DataError(f"{path}, {where}: {len(row) - 1 + len(row[None])} fields, the header has {len(row) - 1}. "
                            "Quote fields that contain the delimiter, or remove the extra fields.")
        absent = [c for c in columns if c not in row or row[c] is None]
        if absent:
            raise DataError(f"{path}, {where}: no value for {absent} (a truncated or short row). Complete or remove "
                            "the row.")
        if str(row[label_column]).strip() == "":
            raise DataError(f"{path}, {where}: the label column {label_column!r} is empty. Give every row a label, "
                            "or remove the row.")
    return rows


def _read_rows(path: Path) -> list[tuple[str, dict]]:
    """(where, row) pairs: ``line N`` for CSV/TSV/JSON lines, ``item N`` for a JSON list."""
    if not path.is_file():
        raise DataError(f"Data file {path} does not exist.")
    suffix = path.suffix.lower()
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            if suffix in (".csv", ".tsv"):
                reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
                rows = []
                for row in reader:
                    rows.append((f"line {reader.line_num}", row))
            elif suffix == ".jsonl":
                rows = [(f"line {i}", _json_line(line, path, i)) for i, line in enumerate(handle, start=1)
                        if line.strip()]
            elif suffix == ".json":
                try:
                    items = json.load(handle)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path} is not valid JSON: {error}.") from None
                if isinstance(items, dict) and "data" in items:
                    items = items["data"]
                rows = [(f"item {i}", item) for i, item in enumerate(items, start=1)] if isinstance(items, list) else None
            else:
                raise DataError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv, .json or .jsonl.")
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset {error.start}). "
                        "Save it as UTF-8, e.g. iconv -f latin1 -t utf-8 FILE > FILE.utf8.") from None
    if not rows:
        raise DataError(f"{path} holds no rows (expected a header and rows, or a list of JSON objects).")
    not_objects = [where for where, row in rows if not isinstance(row, dict)]
    if not_objects:
        raise DataError(f"{path}, {not_objects[0]}: not an object with named fields (each row must be like "
                        '{"sentence": "...", "label": "..."}).')
    return rows


def _json_line(line: str, path: Path, number: int) -> dict:
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}, line {number}: not valid JSON ({error}).") from None


def _is_regression(labels: list[str]) -> bool:
    try:
        values = [float(v) for v in labels]
    except ValueError:
        return False
    return any(v != int(v) for v in values)


def _natural_key(value: str):
    try:
        return (0, float(value), value)
    except ValueError:
        return (1, 0.0, value)
