"""A run's log.jsonl: one typed record per kind (start, train, eval, sample, end), the writer that appends
them a flushed line at a time, and the reader that parses them back (and trims them when a run resumes).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from lmforge.errors import UserError
from lmforge.files import write_atomic, writing
from lmforge.run.directory import LOG_FILE


# ----- the log: one typed record per kind -----
# Each record is one JSON object per line of log.jsonl with its fields under these names, in this order, plus
# "kind". A field with a default may be missing from older logs; one without must be there with its type.
@dataclass(kw_only=True)
class StartRecord:
    """A launch (the first, or a resume): the model's size, where it runs and on what data."""

    kind: ClassVar[str] = "start"
    time: float = 0.0
    params: int
    params_non_embedding: int
    flops_per_token: int
    train_tokens: int | None = None
    val_tokens: int | None = None
    tokens_per_step: int | None = None
    iters_per_epoch: float | None = None
    device: str
    precision: str
    engine: str | None = None
    world_size: int | None = None
    parallel: str | None = None
    resumed_from_step: int
    data_order: str | None = None
    recurrent_state: str | None = None
    arch: str = "gpt"
    data: str | None = None
    task: str | None = None  # fine-tuning runs: the task, the method and how many parameters train
    method: str | None = None
    trainable_params: int | None = None


@dataclass(kw_only=True)
class TrainRecord:
    """One logged optimizer step; loss and gradient norm are those of that step's global batch."""

    kind: ClassVar[str] = "train"
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    tokens_per_s: float
    epoch: float | None = None
    mfu: float | None = None
    elapsed: float


@dataclass(kw_only=True)
class EvalRecord:
    """A validation: on the first train.eval_tokens of the split during training, the whole split if final."""

    kind: ClassVar[str] = "eval"
    step: int
    tokens: int
    val_loss: float
    val_ppl: float
    val_bpb: float | None = None  # None on data without byte counts
    elapsed: float
    final: bool = False
    val_accuracy: float | None = None  # fine-tuning runs for classify: the task's metrics
    val_macro_f1: float | None = None


@dataclass(kw_only=True)
class SampleRecord:
    kind: ClassVar[str] = "sample"
    step: int
    prompt: str = ""
    text: str


@dataclass(kw_only=True)
class EndRecord:
    """Why and where a launch stopped (a limit, a signal, a non-finite loss, a pruned trial)."""

    kind: ClassVar[str] = "end"
    step: int
    tokens: int
    elapsed: float
    reason: str
    best_step: int | None = None  # fine-tuning runs: the step of the best checkpoint by the task's metric


Record = StartRecord | TrainRecord | EvalRecord | SampleRecord | EndRecord
RECORD_TYPES: dict[str, type[Record]] = {t.kind: t for t in (StartRecord, TrainRecord, EvalRecord, SampleRecord,
                                                             EndRecord)}


def record_json(record: Record) -> str:
    """One line of log.jsonl: the kind first, then the fields in their declared order."""
    return json.dumps({"kind": record.kind, **{f.name: getattr(record, f.name) for f in dataclasses.fields(record)}})


class LogWriter:
    """Appends records to RUN/log.jsonl, one flushed line each, so a reader sees every finished step. A line
    that cannot be written (disk full) is a WriteError; the part of it written is an unfinished last line,
    which `read_log` skips and a resume trims."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOG_FILE
        with writing(self.path):
            self.file = open(self.path, "a")

    def write(self, record: Record) -> None:
        with writing(self.path):
            self.file.write(record_json(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        with suppress(OSError):  # what the disk refused was reported when it was written
            self.file.close()


@dataclass
class RunLog:
    """The records of one log.jsonl, by kind, in file order."""

    starts: list[StartRecord] = dataclasses.field(default_factory=list)
    train: list[TrainRecord] = dataclasses.field(default_factory=list)
    evals: list[EvalRecord] = dataclasses.field(default_factory=list)
    samples: list[SampleRecord] = dataclasses.field(default_factory=list)
    end: EndRecord | None = None  # the latest launch's end record; None while it runs or after a hard kill


def read_log(path: str | Path) -> RunLog:
    """Parse log.jsonl; a line that is not a complete record raises UserError naming its line number.

    An unfinished last line (no newline yet) is skipped: the trainer may be writing it right now. Records of a
    kind this version does not know are skipped too.
    """
    path = Path(path)
    log = RunLog()
    lists = {"start": log.starts, "train": log.train, "eval": log.evals, "sample": log.samples}
    with open(path, "rb") as file:  # bytes, so that invalid UTF-8 is reported with its line like bad JSON
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                record = parse_record(line, f"{path}, line {number}")
            except UserError:
                if line.endswith(b"\n"):
                    raise
                break
            if isinstance(record, StartRecord):
                log.end = None  # a new launch: the end of an earlier one no longer describes the run
            if isinstance(record, EndRecord):
                log.end = record
            elif record is not None:
                lists[record.kind].append(record)
    return log


def parse_record(line: bytes | str, where: str) -> Record | None:
    """One line of the log as its typed record (None for an unknown kind), or a UserError saying what is wrong."""
    fix = "repair or delete that line and run the command again"
    try:
        values = json.loads(line)
    except UnicodeDecodeError:
        raise UserError(f"{where} of the log is not UTF-8 text; {fix}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{where} of the log is not valid JSON ({err.msg}); {fix}") from None
    if not isinstance(values, dict) or not isinstance(values.get("kind"), str):
        raise UserError(f"{where} of the log is not a record (a JSON object with a 'kind'); {fix}")
    kind = values["kind"]
    record_type = RECORD_TYPES.get(kind)
    if record_type is None:
        return None
    types = typing.get_type_hints(record_type)
    present, bad = {}, []
    for field in dataclasses.fields(record_type):
        if field.name in values:
            if _has_type(values[field.name], types[field.name]):
                present[field.name] = values[field.name]
            else:
                bad.append(field.name)
        elif field.default is dataclasses.MISSING:
            bad.append(field.name)
    if bad:
        raise UserError(f"{where} of the log: the {kind} record lacks {', '.join(bad)} "
                        f"(or has the wrong type); {fix}")
    return record_type(**present)


def _has_type(value: object, annotation: object) -> bool:
    """Whether a JSON value fits a record field's type; any number fits int and float (JSON does not keep the
    difference, and a log written by hand may write 1 for 1.0)."""
    allowed = typing.get_args(annotation) or (annotation,)
    if value is None:
        return type(None) in allowed
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int | float):
        return int in allowed or float in allowed
    return any(isinstance(value, kind) for kind in allowed if isinstance(kind, type))


def last_per_step(records: list) -> list:
    """One record per step, the last one logged, in step order.

    A run interrupted after logging steps that no checkpoint holds logs those steps again when resumed from
    its earlier checkpoint; the later records are the ones the run went on from.
    """
    by_step = {record.step: record for record in records}
    return [by_step[step] for step in sorted(by_step)]


def trim_log(run_dir: Path, step: int) -> None:
    """Drop what the log says happened after the checkpoint a run resumes from (those steps run again) and any
    line a kill cut short, so log.jsonl reads as one consistent history."""
    path = Path(run_dir) / LOG_FILE
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("kind") in ("start", "end") or record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_atomic(path, "".join(kept))

