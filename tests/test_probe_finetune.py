"""The hostile probe of fine-tuning (issue 17: D3, D4, D11, D12, D15, D16, D17), through the command line: each
bad input ends in one line and exit 2 with nothing lost, a signal's resume is the uninterrupted run, and a LoRA
run never silently adapts weights other than its own base's."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest

from lmforge.tasks.finetune import FinetuneTask
from tests.conftest import assert_one_line_error, checksums, prepare_and_train, records, run_cli

FAST = ["--max-steps", "2", "--train.eval_every", "2", "--train.batch_size", "4", "--train.device", "cpu", "--quiet"]
WORDS = ("cat", "dog", "tree")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def task_data(directory: Path, task: str, count: int = 8) -> Path:
    """train and val files of `task` in the tiny corpus's lower-case words."""
    for split in ("train", "val"):
        rows = []
        for i in range(count):
            word = WORDS[i % len(WORDS)]
            rows.append({"classify": {"text": f"the {word} sat on a mat", "label": word},
                         "sft": {"prompt": f"the {word}", "response": f"a {word}"},
                         "translate": {"source": f"a {word}", "target": f"the {word}"}}[task])
        write_jsonl(directory / f"{split}.jsonl", rows)
    return directory


@pytest.fixture(scope="module")
def lower(tmp_path_factory, tiny_corpus):
    """A run trained on the lower-case tiny corpus: its char tokenizer has no capitals, no '-'."""
    return prepare_and_train(tmp_path_factory.mktemp("lower"), tiny_corpus)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_corpus):
    """A run whose tokenizer also knows the chat template's and the translate separator's characters."""
    root = tmp_path_factory.mktemp("base")
    corpus = root / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    (corpus / "markers.txt").write_text("SYSTEM:\nUSER:\nASSISTANT:\n--\n")
    return prepare_and_train(root, corpus)


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory, base):
    root = tmp_path_factory.mktemp("classify")
    data = task_data(root / "data", "classify")
    out = root / "run"
    assert run_cli_plain("finetune", base.run, "--task", "classify", "--data", data, "--out", out, *FAST) == 0
    return out


def run_cli_plain(*argv) -> int:
    from lmforge.cli import main

    return main([str(arg) for arg in argv])


# ----- D11, D17: task records -----
def test_a_choice_label_that_is_not_an_ascii_digit_is_one_line_naming_the_line(tmp_path, base, capsys):
    path = tmp_path / "choice.csv"
    path.write_text('context,choices,label\nthe cat,"[""a mat"", ""a dog""]",0\nthe cat,"[""a mat"", ""a dog""]",²\n')
    code, _, err = run_cli(capsys, "eval", base.run, "--task", "choice", "--data", path)
    assert_one_line_error(code, err, f"{path} line 3", "'label'")
    write_jsonl(path.with_suffix(".jsonl"), [{"context": "the", "choices": ["cat", ""], "label": 0}])
    code, _, err = run_cli(capsys, "eval", base.run, "--task", "choice", "--data", path.with_suffix(".jsonl"))
    assert_one_line_error(code, err, "choice.jsonl line 1", "choice 1 is empty")


@pytest.mark.parametrize("field, value", [("label", "c\x00t"), ("text", "the \x1b[2J cat")])
def test_control_characters_in_task_texts_are_refused_by_line(tmp_path, base, capsys, field, value):
    data = task_data(tmp_path / "data", "classify")
    rows = [json.loads(line) for line in (data / "train.jsonl").read_text().splitlines()]
    rows[1][field] = value
    write_jsonl(data / "train.jsonl", rows)
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", base.run, "--task", "classify", "--data", data, "--out", out, *FAST)
    assert_one_line_error(code, err, "train.jsonl line 2", "control character")
    assert not out.exists()
    code, _, err = run_cli(capsys, "eval", base.run, "--task", "choice", "--data",
                           write_jsonl(tmp_path / "c.jsonl", [{"context": value, "choices": ["a", "b"], "label": 0}]))
    assert_one_line_error(code, err, "c.jsonl line 1", "control character")


def test_unknown_characters_and_unseen_labels_name_the_line(tmp_path, classify_run, capsys):
    path = write_jsonl(tmp_path / "test.jsonl", [{"text": "the cat", "label": "cat"},
                                                  {"text": "the cat", "label": "cat"},
                                                  {"text": "the cat", "label": "fox"}])
    code, _, err = run_cli(capsys, "eval", classify_run, "--task", "classify", "--data", path)
    assert_one_line_error(code, err, "test.jsonl line 3", "'fox'")
    write_jsonl(path, [{"text": "the cat", "label": "cat"}, {"text": "the çat", "label": "cat"}])
    code, _, err = run_cli(capsys, "eval", classify_run, "--task", "classify", "--data", path)
    assert_one_line_error(code, err, "the first at", "test.jsonl line 2")


# ----- D15: the template's own text -----
@pytest.mark.parametrize("task, named", [("sft", "'U'"), ("translate", "'-'")])
def test_template_text_a_lower_case_tokenizer_cannot_encode_is_refused(tmp_path, lower, capsys, task, named):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", lower.run, "--task", task, "--data", task_data(tmp_path / "d", task),
                           "--out", out, *FAST)
    assert_one_line_error(code, err, named, "cannot encode")
    assert not out.exists()
    code, _, err = run_cli(capsys, "eval", lower.run, "--task", task, "--data", tmp_path / "d" / "val.jsonl")
    assert_one_line_error(code, err, named, "cannot encode")


# ----- D12, D17: a classify run where next tokens are needed -----
@pytest.mark.parametrize("argv", [
    ("plot", "next-token", "{run}", "--out", "{tmp}/p.png", "--prompt", "the"),
    ("plot", "landscape", "{run}", "--out", "{tmp}/p.png"),
    ("sample", "{run}", "--device", "cpu"),
    ("chat", "{run}", "--device", "cpu"),
    ("export", "{run}", "--format", "hf", "--out", "{tmp}/hf"),
    ("eval", "{run}", "--data", "{tmp}"),
    ("eval", "{run}", "--task", "translate", "--data", "{tmp}/t.jsonl"),
    ("predict", "{run}", "--text", "the cat", "--max-new-tokens", "5"),
])
def test_a_classify_run_is_refused_by_name_where_text_is_needed(tmp_path, classify_run, capsys, argv):
    write_jsonl(tmp_path / "t.jsonl", [{"source": "a cat", "target": "the cat"}])
    before = checksums(classify_run)
    code, _, err = run_cli(capsys, *(arg.format(run=classify_run, tmp=tmp_path) for arg in argv))
    assert_one_line_error(code, err, "classify")
    assert checksums(classify_run) == before
    assert not (tmp_path / "p.png").exists() and not (tmp_path / "hf").exists()


def test_report_of_a_classify_run_says_why_it_has_no_sample(tmp_path, classify_run, capsys):
    run = tmp_path / "run"
    shutil.copytree(classify_run, run)
    code, _, err = run_cli(capsys, "report", run)
    assert code == 0 and "Traceback" not in err and "Warning" not in err, err
    assert "A classify run predicts labels, not text" in (run / "report" / "report.md").read_text()


def test_landscape_of_a_fine_tuned_language_model_asks_for_token_data(tmp_path, base, capsys):
    out = tmp_path / "sft"
    assert run_cli(capsys, "finetune", base.run, "--task", "sft", "--data", task_data(tmp_path / "d", "sft"),
                   "--out", out, *FAST)[0] == 0
    code, _, err = run_cli(capsys, "plot", "landscape", out, "--out", tmp_path / "l.png")
    assert_one_line_error(code, err, "fine-tuning run", "its base run's: --data")
    code, _, err = run_cli(capsys, "plot", "landscape", out, "--out", tmp_path / "l.png", "--data", base.data,
                           "--points", "3", "--windows", "1")
    assert code == 0, err


# ----- D3: a LoRA run and its base -----
def lora_classify(tmp_path: Path, base_checkpoint: Path, name: str = "lora") -> Path:
    out = tmp_path / name
    assert run_cli_plain("finetune", base_checkpoint, "--task", "classify", "--method", "lora", "--data",
                         task_data(tmp_path / "data", "classify"), "--out", out, *FAST) == 0
    return out


def test_a_lora_run_refuses_a_base_trained_again_into_the_same_directory(tmp_path, base, capsys):
    own = tmp_path / "base"
    shutil.copytree(base.run, own)
    lora = lora_classify(tmp_path, own)
    assert run_cli(capsys, "predict", lora, "--text", "the cat")[0] == 0
    assert run_cli(capsys, "train", "--config", base.config, "--data", base.data, "--out", own, "--overwrite",
                   "--train.seed", "7", "--quiet")[0] == 0
    before = checksums(lora)
    for argv in (("predict", lora, "--text", "the cat"),
                 ("eval", lora, "--task", "classify", "--data", tmp_path / "data" / "val.jsonl")):
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, str(lora), "weights have changed")
    assert checksums(lora) == before


def test_resuming_a_base_keeps_and_names_the_checkpoint_a_lora_run_adapts(tmp_path, base, capsys):
    own = tmp_path / "base"
    shutil.copytree(base.run, own)
    adapted = own / "checkpoints" / "step_0000010"
    lora = lora_classify(tmp_path, adapted)
    code, out, err = run_cli(capsys, "train", "--out", own, "--data", base.data, "--resume", "--max-steps", "40",
                             "--train.keep_last", "1")
    assert code == 0, err
    assert f"kept {adapted}" in out and str(lora) in out and out.count(f"kept {adapted}") == 1, out
    assert adapted.is_dir()
    assert run_cli(capsys, "predict", lora, "--text", "the cat")[0] == 0
    shutil.rmtree(lora)  # nothing adapts it any more: the next prune removes it
    assert run_cli(capsys, "train", "--out", own, "--data", base.data, "--resume", "--max-steps", "50",
                   "--train.keep_last", "1", "--quiet")[0] == 0
    assert not adapted.exists()


def test_a_checkpoint_pruned_between_choosing_and_reading_it_is_named_so(tmp_path, base, capsys, monkeypatch):
    import lmforge.infer.load as load_module

    own = tmp_path / "run"
    shutil.copytree(base.run, own)
    real = load_module.read_weights

    def pruned_meanwhile(checkpoint: Path):
        shutil.rmtree(checkpoint)  # what a training run's prune does between resolve and read
        return real(checkpoint)

    monkeypatch.setattr(load_module, "read_weights", pruned_meanwhile)
    code, _, err = run_cli(capsys, "eval", own, "--data", base.data, "--device", "cpu")
    assert_one_line_error(code, err, "removed while being read", "run the command again", "step_0000010")
    assert "unreadable" not in err


# ----- D4: a signal, then --resume, is the uninterrupted run -----
def test_signal_then_resume_of_an_early_stopping_fine_tune_is_the_same_run(tmp_path, base, capsys, monkeypatch):
    data = task_data(tmp_path / "data", "classify", 12)
    flags = ["--task", "classify", "--data", data, "--max-steps", "200", "--train.eval_every", "2",
             "--finetune.patience", "3", "--train.log_every", "1", "--train.batch_size", "4",
             "--train.device", "cpu", "--lr", "3e-3", "--quiet"]
    real, calls = FinetuneTask.next_batch, []

    def counted(self):
        calls.append(1)
        if interrupt_at and len(calls) == interrupt_at:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by the run: it finishes this step and saves
        return real(self)

    monkeypatch.setattr(FinetuneTask, "next_batch", counted)
    interrupt_at = None
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert run_cli(capsys, "finetune", base.run, "--out", whole, *flags)[0] == 0
    interrupt_at = 3  # not an evaluation step
    calls.clear()
    code, _, err = run_cli(capsys, "finetune", base.run, "--out", cut, *flags)
    assert code == 128 + signal.SIGTERM, err
    assert [r["step"] for r in records(cut, "eval")] == [2]  # no evaluation on the signal
    interrupt_at = None
    assert run_cli(capsys, "finetune", base.run, "--out", cut, "--resume", *flags)[0] == 0

    def history(run: Path) -> tuple:
        return ([(r["step"], r["loss"]) for r in records(run, "train")],
                [(r["step"], r["val_loss"], r["val_accuracy"]) for r in records(run, "eval")],
                (records(run, "end")[-1]["step"], records(run, "end")[-1]["reason"]))

    assert history(whole)[2][1] == "early_stopping"
    assert history(cut) == history(whole)


# ----- D16: options that would do nothing -----
def test_options_that_would_do_nothing_are_refused(tmp_path, base, classify_run, capsys):
    data = task_data(tmp_path / "data", "classify")
    refused = {
        ("finetune", base.run, "--task", "classify", "--data", data, "--out", tmp_path / "a", "--lora.rank", "4",
         *FAST): "--lora.rank",
        ("finetune", base.run, "--task", "classify", "--data", data, "--out", tmp_path / "a",
         "--finetune.patience", "3", "--train.eval_every", "0", "--quiet"): "eval_every",
        ("finetune", tmp_path / "other", "--resume", "--data", data, "--out", classify_run): f"not {tmp_path}/other",
        ("predict", classify_run, "--text", "the cat", "--max-new-tokens", "5"): "--max-new-tokens",
        ("eval", classify_run, "--task", "classify", "--data", data / "val.jsonl", "--split", "val"): "--split",
        ("sweep", "--finetune", base.run, "--task", "classify", "--data", data, "--out", tmp_path / "a",
         "--param", "lora.rank=2,4", "--method", "grid"): "lora.rank",
        ("sweep", "--finetune", base.run, "--task", "classify", "--finetune-method", "lora", "--data", data,
         "--out", tmp_path / "a", "--param", "finetune.train_blocks=1,2", "--method", "grid"): "train_blocks",
        ("finetune", base.run, "--resume", "--overwrite", "--data", data, "--out", classify_run): "choose one",
        ("tasks", "list", "--overwrite"): "--overwrite",
    }
    shutil.copytree(base.run, tmp_path / "other")
    before = checksums(classify_run)
    for argv, named in refused.items():
        code, _, err = run_cli(capsys, *argv)
        assert_one_line_error(code, err, named)
    assert not (tmp_path / "a").exists()
    assert checksums(classify_run) == before


def test_a_fine_tuning_sweep_never_reports_another_sweeps_trials(tmp_path, base, capsys):
    out = tmp_path / "sweep"

    def sweep(task: str) -> tuple[int, str, str]:
        return run_cli(capsys, "sweep", "--finetune", base.run, "--task", task, "--data",
                       task_data(tmp_path / task, task), "--out", out, "--param", "optim.lr=1e-3", "--method", "grid",
                       "--quiet", "--train.max_steps", "2", "--train.eval_every", "2", "--train.device", "cpu")

    assert sweep("classify")[0] == 0
    before = checksums(out)
    code, _, err = sweep("sft")
    assert_one_line_error(code, err, "holds another sweep", "'classify'")
    assert checksums(out) == before
