"""`lmforge tasks list` and `lmforge tasks make NAME --out DIR`: the built-in tasks (lmforge/tasks/builtin.py)
as a table, or one of them written as train/val/test .jsonl files and a README.md."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmforge.errors import UserError
from lmforge.files import check_output, remove_path, removing_new_parents, replace_output, temporary_beside, writing
from lmforge.tasks.builtin import BUILTIN, builtin_task
from lmforge.tasks.plays import SPLITS
from lmforge.tasks.task_readme import baseline_scores, readme

# What `make_task` writes into its directory: all that --overwrite may replace there.
TASK_FILES = (*(f"{split}.jsonl" for split in SPLITS), "README.md")


def make_task(name: str, out: str | Path, overwrite: bool = False) -> dict[str, int]:
    """Write NAME's train/val/test .jsonl and README.md into `out` (whole or not at all: a failure removes the
    temporary directory and leaves `out` as it was); the record counts. --overwrite replaces only a directory
    holding nothing but those files."""
    task = builtin_task(name)
    out = Path(out)
    check_output(out, overwrite, directory=True, owned=TASK_FILES)
    splits = task.make()
    temporary = temporary_beside(out)
    with removing_new_parents(out.parent):
        with writing(out, temporary):
            remove_path(temporary)
            temporary.mkdir(parents=True)
            for split, records in splits.items():
                (temporary / f"{split}.jsonl").write_text(
                    "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
            (temporary / "README.md").write_text(readme(name, splits), encoding="utf-8")
        replace_output(temporary, out, overwrite, TASK_FILES)
    return {split: len(records) for split, records in splits.items()}


def list_tasks() -> list[dict]:
    """Each built-in task: name, task type, sizes per split, metrics, baselines (measured on its test split)."""
    rows = []
    for name, task in BUILTIN.items():
        splits = task.make()
        rows.append({"name": name, "task": task.task, "sizes": {s: len(r) for s, r in splits.items()},
                     "metrics": task.metrics, "baseline": task.baseline,
                     "baseline_scores": baseline_scores(name, splits)})
    return rows


def tasks_command(action: str, name: str | None, out: str | None, overwrite: bool = False) -> None:
    """`lmforge tasks list` prints a table of the built-in tasks; `lmforge tasks make NAME --out DIR` writes one."""
    if action == "list":
        if name is not None or out is not None or overwrite:
            raise UserError("tasks list takes no task name, --out or --overwrite")
        print("building the tasks to count them and score their baselines (a few seconds)...", file=sys.stderr)
        print("| task | evaluated as | train / val / test | metrics | baselines (test split) |")
        print("|---|---|---|---|---|")
        for row in list_tasks():
            sizes = " / ".join(str(row["sizes"][split]) for split in SPLITS)
            scores = ", ".join(f"{key} {value:.3f}" for key, value in row["baseline_scores"].items())
            print(f"| {row['name']} | {row['task']} | {sizes} | {row['metrics']} | {scores or row['baseline']} |")
        return
    if name is None or out is None:
        raise UserError(f"usage: lmforge tasks make NAME --out DIR (NAME: {', '.join(BUILTIN)})")
    counts = make_task(name, out, overwrite=overwrite)
    print(f"wrote {out}: " + ", ".join(f"{split}.jsonl {count} records" for split, count in counts.items())
          + f"; evaluate as --task {BUILTIN[name].task} (see {Path(out) / 'README.md'})")
