"""Task records: read a task's data from .jsonl, .csv or .parquet, check every record, and name the bad one.

Each task has one record shape (the same columns in every format):

    classify   {"text": str, "label": str}            an integer label is read as its string, "3"
    sft        {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}
    translate  {"source": str, "target": str}
    qa         {"context": str, "question": str, "answers": [str, ...]}
    choice     {"context": str, "choices": [str, ...], "label": int}   label indexes choices

In a CSV file a list column (messages, answers, choices) holds JSON text. Other keys are allowed and kept
(the built-in tasks add "play"). Every text a task reads (texts, prompts, labels, choices, answers, message
contents) is refused, by file and line, if it holds a control character other than tab, newline and carriage
return: NUL and its kin are never meant as text, and they break what shows them (a report's plots, a terminal).
A data argument is a file, or a directory holding `train`, `val` and `test` files in any of the formats
(`split_files`, `data_file`).

What each task's records mean, and every other per-task rule, is its kind's (lmforge/tasks/kinds.py).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from typing import Any

from lmforge.errors import UserError
from lmforge.tasks.kinds import check_sft_messages, task_kind

SPLITS = ("train", "val", "test")
FORMATS = (".jsonl", ".csv", ".parquet")

LIST_FIELDS = ("messages", "answers", "choices")
# Control characters (C0, DEL, C1) other than the whitespace of ordinary text: tab, newline, carriage return.
CONTROL_CHARACTER = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


class Record(dict):
    """A checked record, and where it was read (`where`: "FILE line N", or "row N" for Parquet), so that a
    later check (its characters, its label) names the file and line too."""

    def __init__(self, fields: dict, where: str):
        super().__init__(fields)
        self.where = where


def split_files(data_dir: str | Path) -> dict[str, Path]:
    """The split files of a task data directory: {"train": .../train.jsonl, "val": ..., "test": ...}, for the
    splits present (at least one)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"task data directory not found: {data_dir}")
    found: dict[str, Path] = {}
    for split in SPLITS:
        candidates = [data_dir / f"{split}{suffix}" for suffix in FORMATS if (data_dir / f"{split}{suffix}").is_file()]
        if len(candidates) > 1:
            raise UserError(f"{data_dir} has {' and '.join(p.name for p in candidates)}; keep one file per split")
        if candidates:
            found[split] = candidates[0]
    if not found:
        raise UserError(f"{data_dir} holds no {'/'.join(SPLITS)} file ({', '.join(FORMATS)})")
    return found


def data_file(data: str | Path, split: str) -> Path:
    """The file to read for `split`: `data` itself when it is a file, else that split's file in the directory."""
    data = Path(data)
    if data.is_file():
        return data
    files = split_files(data)
    if split not in files:
        raise UserError(f"{data} has no {split} file (it has {', '.join(files)})")
    return files[split]


def read_records(path: str | Path, task: str) -> list[Record]:
    """Every record of a task file, checked against the task's shape; a bad one is a UserError naming the file
    and its line (row, for Parquet)."""
    task_kind(task)
    path = Path(path)
    if path.is_dir():
        names = ", ".join(file.name for file in split_files(path).values())
        raise UserError(f"{path} is a directory; name one of its files ({names})")
    if not path.is_file():
        raise UserError(f"task data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise UserError(f"{path}: unknown format '{suffix}'; task data is {', '.join(FORMATS)}")
    reader = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}[suffix]
    records = []
    try:
        for where, row in reader(path):
            try:
                records.append(Record(check_record(row, task), f"{path} {where}"))
            except UserError as err:
                raise UserError(f"{path} {where}: {err}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text (at record {len(records) + 1})") from None
    if not records:
        raise UserError(f"{path} holds no records")
    return records


def check_record(row: Any, task: str) -> dict:
    """The record with its fields checked (and a label as its kind reads it), or a UserError saying why not."""
    kind = task_kind(task)
    if not isinstance(row, dict):
        raise UserError(f"a {task} record must be an object, not {type(row).__name__}")
    record = dict(row)
    if kind.accepts_messages and "messages" in record:
        check_sft_messages(record)
        return record
    missing = [name for name in kind.fields if name not in record]
    if missing:
        raise UserError(f"missing field {', '.join(repr(m) for m in missing)} ({task} records have {kind.shape()})")
    for name in kind.fields:
        value = record[name]
        if name in LIST_FIELDS:
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise UserError(f"'{name}' must be a non-empty list of strings")
        elif name == "label":
            record["label"] = value = kind.check_label(value)
        elif not isinstance(value, str):
            raise UserError(f"'{name}' must be a string, not {type(value).__name__}")
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                check_text(text, f"'{name}'")
    kind.check_record(record)
    return record


def check_text(text: str, what: str) -> None:
    """A UserError naming the first control character of a task text (see the module's docstring)."""
    found = CONTROL_CHARACTER.search(text)
    if found:
        raise UserError(f"{what} holds the control character {found.group()!r} at character {found.start() + 1}; "
                        "remove it (task texts may hold tabs and line breaks, no other control characters)")


def _jsonl_rows(path: Path):
    with _open_text(path) as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as err:
                raise UserError(f"{path} line {number}: not valid JSON ({err})") from None
            except RecursionError:  # the parser refuses nesting deeper than the interpreter's recursion limit
                raise UserError(f"{path} line {number}: JSON nested too deeply") from None
            yield f"line {number}", row


def _csv_rows(path: Path):
    with _open_text(path, newline="") as handle:
        reader = csv.DictReader(handle)
        try:
            if reader.fieldnames is None:
                return
            for row in reader:
                where = f"line {reader.line_num}"
                if None in row:
                    raise UserError(f"{path} {where}: more cells than the header's {len(reader.fieldnames)} columns")
                yield where, {key: _csv_cell(key, value, path, where) for key, value in row.items()}
        except csv.Error as err:
            raise UserError(f"{path} line {reader.line_num}: not valid CSV ({err})") from None


def _csv_cell(key: str, value: str | None, path: Path, where: str) -> Any:
    """A CSV cell as its record value: list columns hold JSON text."""
    if value is None:
        raise UserError(f"{path} {where}: no value for '{key}' (fewer cells than columns)")
    if key in LIST_FIELDS:
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            raise UserError(f"{path} {where}: '{key}' must hold a JSON list, not {value[:40]!r}") from None
    return value


def _parquet_rows(path: Path):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types (ArrowInvalid, OSError) for a corrupt file
        raise UserError(f"{path} is not a readable Parquet file ({err})") from None
    for number, row in enumerate(table.to_pylist(), start=1):
        yield f"row {number}", row


def _open_text(path: Path, newline: str | None = None):
    try:
        return open(path, encoding="utf-8-sig", newline=newline)  # a byte-order mark (Excel's CSV) is not data
    except OSError as err:
        raise UserError(f"cannot read {path}: {err}") from None
