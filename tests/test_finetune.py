"""Fine-tuning: each task end to end (finetune -> predict), masking, the classification head's pad handling,
blocks trained, exact resume, early stopping and every bad input, on tiny models and a few dozen records."""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config.load import dumps_config
from lmforge.config.sections import Config, FinetuneConfig, ModelConfig
from lmforge.data.template import ChatTemplate
from lmforge.data.tokenizer import CharTokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.infer.load import load_run
from lmforge.model.factory import build_model
from lmforge.model.finetuned import build_finetune_model
from lmforge.model.heads import Classifier, pad_right
from lmforge.run.checkpoints import save_checkpoint
from lmforge.run.directory import read_config, write_run
from lmforge.tasks.examples import IGNORE, encode_examples, lm_batch, macro_f1, task_loss
from lmforge.tasks.finetune import finetune_command
from lmforge.tasks.kinds import encode_texts, task_kind
from lmforge.tasks.predict import predict
from lmforge.train.trainer import Trainer

CHARS = "".join(sorted(set(string.ascii_letters + string.digits + " .,:;!'\n-")))
TOKENIZER = CharTokenizer(CHARS)
FAST = ["--max-steps", "4", "--train.eval_every", "2", "--train.batch_size", "4", "--train.device", "cpu",
        "--quiet"]


def tiny_model_config(arch: str = "gpt", **changes) -> ModelConfig:
    values = dict(arch=arch, vocab_size=TOKENIZER.vocab_size, block_size=24, n_layer=2, n_head=2, n_embd=16)
    return ModelConfig(**{**values, **changes})


def make_base(directory: Path, arch: str = "gpt", **changes) -> Path:
    """A run holding a randomly initialised tiny model (what an imported run looks like: one checkpoint)."""
    torch.manual_seed(0)
    config = tiny_model_config(arch, **changes)
    model = build_model(config)
    directory.mkdir(parents=True)
    (directory / "config.toml").write_text(dumps_config(Config(model=config)))
    TOKENIZER.save(directory / "tokenizer.json")
    save_checkpoint(directory, 0, model.state_dict(), [], {})
    return directory


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def task_data(directory: Path, task: str, count: int = 12) -> Path:
    words = ["cat", "dog", "tree"]
    for split in ("train", "val"):
        records = []
        for i in range(count):
            word = words[i % 3]
            records.append({
                "classify": {"text": f"the {word} sat on a mat", "label": word},
                "sft": {"prompt": f"say {word}", "response": f"{word} {word}"},
                "translate": {"source": f"a {word}", "target": f"the {word}"},
                "qa": {"context": f"the {word} sat", "question": "who sat", "answers": [word]},
            }[task])
        write_jsonl(directory / f"{split}.jsonl", records)
    return directory


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_base(tmp_path_factory.mktemp("base") / "run")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def log_records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if r["kind"] == kind]


# ----- end to end -----
def test_classify_from_a_run_trained_here_then_predict(tmp_path, tiny_data, tiny_config, capsys):
    trained = tmp_path / "pretrained"
    Trainer(tiny_config(), tiny_data, trained, quiet=True).run()
    chars = load_tokenizer(trained / "tokenizer.json").chars
    data = tmp_path / "data"
    for split in ("train", "val"):  # only characters of the tiny corpus, which the base tokenizer knows
        write_jsonl(data / f"{split}.jsonl", [{"text": f"the {w} sat on a mat", "label": w}
                                              for w in ("cat", "dog", "bird") * 3])
    assert set("the cat dog bird sat on a mat") <= set(chars)
    out = tmp_path / "genre"
    code, _, err = run_cli(capsys, "finetune", str(trained), "--task", "classify", "--data", str(data),
                           "--out", str(out), *FAST)
    assert code == 0, err
    assert read_config(out).finetune.labels == ["bird", "cat", "dog"]
    assert (out / "tokenizer.json").read_text() == (trained / "tokenizer.json").read_text()
    evals = log_records(out, "eval")
    assert [e["step"] for e in evals] == [2, 4] and all(0 <= e["val_accuracy"] <= 1 for e in evals)
    code, printed, err = run_cli(capsys, "predict", str(out), "--text", "the dog sat", "--device", "cpu")
    assert code == 0, err
    result = json.loads(printed)
    assert result["label"] in ("bird", "cat", "dog")
    assert sum(result["probabilities"].values()) == pytest.approx(1.0)
    assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)


def test_classify_learns_a_separable_task(tmp_path, base):
    data = task_data(tmp_path / "data", "classify", count=12)
    result = finetune_command(str(base), task="classify", data=str(data), out=str(tmp_path / "run"), quiet=True,
                              overrides={"train.max_steps": "40", "train.eval_every": "20", "optim.lr": "1e-2",
                                         "train.device": "cpu"})
    assert result["best"] == 1.0  # "cat", "dog", "tree" differ in one word: a fine-tuned model separates them


@pytest.mark.parametrize("task,method", [("sft", "full"), ("translate", "lora"), ("qa", "full")])
def test_language_tasks_end_to_end(tmp_path, base, task, method):
    data = task_data(tmp_path / "data", task)
    out = tmp_path / "run"
    finetune_command(str(base), task=task, data=str(data), out=str(out), method=method, quiet=True,
                     overrides={"train.max_steps": "4", "train.eval_every": "2", "train.device": "cpu"})
    evals = log_records(out, "eval")
    assert len(evals) == 2 and all(e["val_loss"] > 0 and e["val_ppl"] > 1 for e in evals)
    assert (out / "chat_template.json").is_file() == (task in ("sft", "qa"))
    config = read_config(out).finetune
    assert (config.task, config.method) == (task, method)
    reply = predict(str(out), "the cat" if task != "qa" else "who sat", max_new_tokens=5,
                    context="the cat sat" if task == "qa" else None)
    assert isinstance(reply["reply"], str) and len(reply["reply"]) <= 5


def test_runs_from_an_imported_run(tmp_path):
    """interop's write_run (what `lmforge import` uses) makes a run that fine-tunes like any other."""
    torch.manual_seed(0)
    config = tiny_model_config(position="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    imported = write_run(tmp_path / "imported", config, TOKENIZER.to_dict(), build_model(config).state_dict(),
                         origin="test")
    out = tmp_path / "run"
    finetune_command(str(imported), task="sft", data=str(task_data(tmp_path / "data", "sft")), out=str(out),
                     method="lora", quiet=True, overrides={"train.max_steps": "2", "train.eval_every": "2"})
    assert log_records(out, "eval")


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru", "mlp"])
def test_classify_and_sft_on_other_architectures(tmp_path, arch):
    base = make_base(tmp_path / "base", arch)
    for task in ("classify", "sft"):
        out = tmp_path / task
        data = task_data(tmp_path / f"{task}-data", task, count=4)  # a run is never written where its data is
        finetune_command(str(base), task=task, data=str(data), out=str(out),
                         quiet=True, overrides={"train.max_steps": "2", "train.eval_every": "2"})
        assert log_records(out, "eval")
    model = load_run(tmp_path / "classify", language_model=False).model
    assert isinstance(model, Classifier)


# ----- the classification head -----
@pytest.mark.parametrize("arch,changes", [("gpt", {}), ("gpt", {"position": "rope"}), ("lstm", {}),
                                          ("rnn", {}), ("mlp", {}), ("encoder", {}),
                                          ("encoder", {"position": "rope"})])
def test_padding_does_not_change_a_texts_logits(arch, changes):
    torch.manual_seed(0)
    model = Classifier(build_model(tiny_model_config(arch, **changes)), ["a", "b", "c"]).eval()
    short, long = TOKENIZER.encode("a cat"), TOKENIZER.encode("the dog sat on a mat")
    alone = model(*pad_right([short], TOKENIZER.eot_id, "cpu"))
    batch = model(*pad_right([long, short], TOKENIZER.eot_id, "cpu"))
    assert batch.shape == (2, 3)
    torch.testing.assert_close(batch[1:], alone, rtol=0, atol=1e-6)
    other_pad = model(*pad_right([long, short], 0, "cpu"))  # the pad id itself never matters
    torch.testing.assert_close(other_pad, batch, rtol=0, atol=1e-6)


def test_long_texts_keep_their_last_tokens_and_are_counted():
    encoded, truncated = encode_texts(TOKENIZER, ["abc", "x" * 10 + "the end"], block_size=5)
    assert truncated == 1
    assert encoded == [TOKENIZER.encode("abc"), TOKENIZER.encode("e end")]


def test_train_blocks_freezes_all_but_the_last_blocks(tmp_path, base):
    config = Config(model=tiny_model_config())
    finetune = FinetuneConfig(task="classify", labels=["a", "b"], train_blocks=1)
    model = build_finetune_model(config, finetune, None)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("body.blocks.1.", "body.norm_f.", "score.")) for name in trained)
    assert {"score.weight", "body.norm_f.weight", "body.blocks.1.attn.qkv.weight"} <= trained
    out = tmp_path / "run"
    finetune_command(str(base), task="classify", data=str(task_data(tmp_path / "data", "classify", 4)),
                     out=str(out), train_blocks=1, quiet=True,
                     overrides={"train.max_steps": "2", "train.eval_every": "2", "optim.lr": "1e-2"})
    before = load_run(base, language_model=False).model
    after = load_run(out, language_model=False).model.body
    torch.testing.assert_close(after.blocks[0].attn.qkv.weight, before.blocks[0].attn.qkv.weight, rtol=0, atol=0)
    assert not torch.equal(after.blocks[1].attn.qkv.weight, before.blocks[1].attn.qkv.weight)


def test_macro_f1_by_hand():
    # truth 0 0 1 1 2, predicted 0 1 1 1 0: F1 of class 0 = 2*1/(2+1+1) = 0.5, class 1 = 2*2/(4+1) = 0.8,
    # class 2 = 0 (never predicted)
    assert macro_f1(torch.tensor([0, 1, 1, 1, 0]), torch.tensor([0, 0, 1, 1, 2]), 3) == pytest.approx(1.3 / 3)


# ----- masking -----
def test_masked_positions_have_exactly_zero_loss_and_gradient():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(block_size=64))
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"},
                           {"role": "user", "content": "more"}, {"role": "assistant", "content": "no"}]}
    examples = encode_examples([record, {"prompt": "a", "response": "b"}], "sft", TOKENIZER, 64, [],
                               ChatTemplate(), Path("x"))
    inputs, targets = lm_batch(examples, [0, 1], TOKENIZER.eot_id, "cpu")
    logits, _ = model(inputs)
    logits.retain_grad()
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                               ignore_index=IGNORE, reduction="none").view_as(targets)
    masked = targets == IGNORE
    assert masked.any() and (~masked).any()
    assert torch.all(losses[masked] == 0)
    losses.sum().backward()
    assert torch.all(logits.grad[masked] == 0)
    assert torch.all(logits.grad[~masked].abs().sum(-1) > 0)
    # every user turn and every marker is masked; exactly the assistant replies and their end-of-text train
    ids, trained = examples.ids[0], examples.trained[0]
    assert TOKENIZER.decode(i for i, t in zip(ids, trained, strict=True) if t) == "yes<|endoftext|>no<|endoftext|>"


def test_translate_trains_on_the_target_and_end_of_text_only():
    examples = encode_examples([{"source": "a cat", "target": "the cat"}], "translate", TOKENIZER, 64, [],
                               ChatTemplate(), Path("x"))
    ids, trained = examples.ids[0], examples.trained[0]
    assert TOKENIZER.decode(i for i, t in zip(ids, trained, strict=True) if t) == "the cat<|endoftext|>"
    assert TOKENIZER.decode(ids) == "a cat\n--\nthe cat<|endoftext|>"


def test_task_loss_is_the_mean_over_trained_tokens():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(block_size=64)).eval()
    records = [{"prompt": "say cat", "response": "cat"}, {"prompt": "a", "response": "dog dog"}]
    losses = []
    for record in records:
        ids, trained = ChatTemplate().encode([{"role": "user", "content": record["prompt"]},
                                              {"role": "assistant", "content": record["response"]}], TOKENIZER)
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]))[0][0]
        losses += [torch.nn.functional.cross_entropy(logits[i], torch.tensor(ids[i + 1])).item()
                   for i in range(len(ids) - 1) if trained[i + 1]]
    result = task_loss(model, TOKENIZER, records, "sft", template=ChatTemplate(), batch_size=2, device="cpu")
    assert len(losses) == len("cat") + 1 + len("dog dog") + 1
    assert result["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_nothing_after_the_last_reply_is_kept():
    late_user_turn = {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "x" * 40}]}
    examples = encode_examples([late_user_turn], "sft", TOKENIZER, 30, [], ChatTemplate(), Path("x"))
    assert examples.truncated == 0
    assert TOKENIZER.decode(examples.ids[0]) == "ASSISTANT:\nhi<|endoftext|>"


# ----- resume, early stopping, best checkpoint -----
def test_resume_continues_the_same_loss_sequence(tmp_path, base):
    data = task_data(tmp_path / "data", "sft")
    overrides = {"train.max_steps": "6", "train.eval_every": "3", "train.log_every": "1", "train.keep_last": "2",
                 "lora.dropout": "0.2", "optim.lr": "1e-2"}  # dropout: the RNG must resume too
    whole = tmp_path / "whole"
    finetune_command(str(base), task="sft", data=str(data), out=str(whole), method="lora", quiet=True,
                     overrides=overrides)
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(cut / "checkpoints" / "step_0000006")  # as if killed after the checkpoint at step 3
    finetune_command(str(base), task="sft", data=str(data), out=str(cut), method="lora", quiet=True,
                     overrides=overrides, resume=True)
    losses = [(r["step"], r["loss"]) for r in log_records(whole, "train")]
    assert len(losses) == 6
    assert [(r["step"], r["loss"]) for r in log_records(cut, "train")] == losses


def test_early_stopping_keeps_the_best_checkpoint(tmp_path, base):
    out = tmp_path / "run"
    result = finetune_command(str(base), task="classify", data=str(task_data(tmp_path / "data", "classify")),
                              out=str(out), quiet=True,
                              overrides={"train.max_steps": "50", "train.eval_every": "2", "finetune.patience": "2",
                                         "optim.lr": "0"})  # nothing changes: no evaluation improves on the first
    assert result["reason"] == "early_stopping" and result["step"] == 6 and result["best_step"] == 2
    assert log_records(out, "end")[-1]["reason"] == "early_stopping"
    assert load_run(out, language_model=False).checkpoint.name == "step_0000002"


def test_only_the_last_fine_tuning_evaluation_is_final(tmp_path, base, capsys):
    """One loop for every run: as in pretraining, an evaluation is logged `final` only at the end of the run."""
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "finetune", str(base), "--task", "sft", "--data",
                           str(task_data(tmp_path / "data", "sft")), "--out", str(out), *FAST, "--max-steps", "6")
    assert code == 0, err
    assert [(r["step"], r["final"]) for r in log_records(out, "eval")] == [(2, False), (4, False), (6, True)]
    assert [path.name for path in sorted((out / "checkpoints").iterdir())][-1] == "step_0000006"


def test_a_second_signal_during_a_fine_tuning_save_lets_the_save_finish(tmp_path, base, monkeypatch):
    """The one signal rule of the trainer holds for fine-tuning too: a second Ctrl-C while a checkpoint is
    being written waits for it (it stops the run at once only outside a save)."""
    import signal

    import lmforge.train.trainer as trainer_module
    from lmforge.run import checkpoints as run_checkpoints

    save_checkpoint, seen = run_checkpoints.save_checkpoint, []

    def save_during_signals(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # the first: finish this step, then save and stop
        os.kill(os.getpid(), signal.SIGINT)  # the second, during this save: the save must still complete
        seen.append(args[1])
        return save_checkpoint(*args, **kwargs)

    monkeypatch.setattr(trainer_module.run_checkpoints, "save_checkpoint", save_during_signals)
    out = tmp_path / "run"
    result = finetune_command(str(base), task="sft", data=str(task_data(tmp_path / "data", "sft")), out=str(out),
                              quiet=True, overrides={"train.max_steps": "8", "train.eval_every": "2"})
    assert result["reason"] == "interrupted" and result["signal"] == signal.SIGINT and seen == [2]
    assert [path.name for path in (out / "checkpoints").iterdir()] == ["step_0000002"]
    assert log_records(out, "end")[-1]["reason"] == "interrupted"


def test_max_epochs_counts_examples(tmp_path, base):
    result = finetune_command(str(base), task="classify", data=str(task_data(tmp_path / "data", "classify", 12)),
                              out=str(tmp_path / "run"), quiet=True,
                              overrides={"train.max_epochs": "2", "train.batch_size": "4", "train.eval_every": "0"})
    assert (result["reason"], result["step"]) == ("max_epochs", 6)


# ----- bad input: one line, exit 2, nothing written -----
def bad(capsys, tmp_path, base, task, data, *extra) -> str:
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "finetune", str(base), "--task", task, "--data", str(data), "--out", str(out),
                           *FAST, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not out.exists() or not any(out.iterdir())
    return err


def test_missing_field_names_the_line(tmp_path, base, capsys):
    data = task_data(tmp_path / "data", "classify")
    write_jsonl(data / "train.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c"}])
    err = bad(capsys, tmp_path, base, "classify", data)
    assert "line 3" in err and "'label'" in err


def test_label_unseen_in_training(tmp_path, base, capsys):
    data = task_data(tmp_path / "data", "classify")
    write_jsonl(data / "val.jsonl", [{"text": "a cat", "label": "cat"}, {"text": "a fox", "label": "fox"}])
    err = bad(capsys, tmp_path, base, "classify", data)
    assert "'fox'" in err and "val.jsonl line 2" in err


def test_empty_file(tmp_path, base, capsys):
    data = task_data(tmp_path / "data", "sft")
    (data / "train.jsonl").write_text("")
    assert "no records" in bad(capsys, tmp_path, base, "sft", data)


def test_unknown_characters_are_counted(tmp_path, base, capsys):
    data = task_data(tmp_path / "data", "translate")
    write_jsonl(data / "train.jsonl", [{"source": "b\u00e9b\u00e9 \u00e0", "target": "baby"}])
    err = bad(capsys, tmp_path, base, "translate", data)
    assert "cannot encode 3 characters" in err and "2 distinct" in err


def test_bad_lora_target_lists_the_valid_names(tmp_path, base, capsys):
    err = bad(capsys, tmp_path, base, "sft", task_data(tmp_path / "data", "sft"), "--method", "lora",
              "--lora.targets", "attn.q")
    assert "attn.q" in err and "attn.qkv, attn.proj, mlp.fc, mlp.proj" in err


def test_scratch_engine_and_bigram_classify_are_refused_by_name(tmp_path, base, capsys):
    data = task_data(tmp_path / "data", "classify")
    assert "scratch" in bad(capsys, tmp_path, base, "classify", data, "--train.engine", "scratch")
    bigram = make_base(tmp_path / "bigram", "bigram")
    assert "bigram" in bad(capsys, tmp_path, bigram, "classify", data)
    lstm = make_base(tmp_path / "lstm", "lstm")
    assert "LSTM" in bad(capsys, tmp_path, lstm, "sft", task_data(tmp_path / "sft", "sft"), "--method", "lora")


def test_a_run_used_for_a_task_it_was_not_trained_for(tmp_path, base, capsys):
    out = tmp_path / "sft"
    finetune_command(str(base), task="sft", data=str(task_data(tmp_path / "data", "sft", 4)), out=str(out),
                     quiet=True, overrides={"train.max_steps": "1", "train.eval_every": "1"})
    with pytest.raises(UserError, match="not fine-tuned for classify"):
        task_kind("classify").check_run(out, read_config(out).finetune)
    with pytest.raises(UserError, match="resume"):
        finetune_command(str(base), task="classify", data=str(tmp_path / "data"), out=str(out), resume=True)
    code, _, err = run_cli(capsys, "finetune", str(base), "--task", "sft", "--data", str(tmp_path / "data"),
                           "--out", str(out), *FAST)
    assert code == 2 and "--overwrite" in err  # an existing run is never replaced unasked
    code, _, err = run_cli(capsys, "finetune", str(out), "--task", "sft", "--data", str(tmp_path / "data"),
                           "--out", str(out / "inside"), *FAST)
    assert code == 2 and "inside the base run" in err and not (out / "inside").exists()


def test_sample_reads_fine_tuned_runs_and_refuses_a_classifier(tmp_path, base, capsys):
    for task in ("sft", "classify"):
        finetune_command(str(base), task=task, data=str(task_data(tmp_path / task, task, 4)),
                         out=str(tmp_path / f"{task}-run"), method="lora", quiet=True,
                         overrides={"train.max_steps": "1", "train.eval_every": "1"})
    code, printed, err = run_cli(capsys, "sample", str(tmp_path / "sft-run"), "--prompt", "say cat",
                                 "--max-new-tokens", "4", "--device", "cpu")
    assert code == 0 and printed.startswith("say cat"), err
    code, _, err = run_cli(capsys, "sample", str(tmp_path / "classify-run"), "--device", "cpu")
    assert code == 2 and "fine-tuned for classify" in err


def test_a_run_failing_before_its_first_checkpoint_removes_what_it_wrote(tmp_path, base, monkeypatch):
    from lmforge.tasks.finetune import TaskLoss

    monkeypatch.setattr(TaskLoss, "forward",
                        lambda self, inputs, targets: (None, torch.tensor(float("nan"), requires_grad=True)))
    out = tmp_path / "run"
    with pytest.raises(UserError, match="became nan at step 1"):
        finetune_command(str(base), task="sft", data=str(task_data(tmp_path / "data", "sft", 4)), out=str(out),
                         quiet=True, overrides={"train.max_steps": "4", "train.eval_every": "2"})
    assert not out.exists()


def test_finetune_keys_are_checked_and_kept_on_resume(tmp_path, base):
    data = task_data(tmp_path / "data", "sft", 4)
    with pytest.raises(UserError, match="valid keys: finetune.patience, finetune.train_blocks, lora.rank"):
        finetune_command(str(base), task="sft", data=str(data), out=str(tmp_path / "x"),
                         overrides={"lora.rnk": "4"})
    out = tmp_path / "run"
    finetune_command(str(base), task="sft", data=str(data), out=str(out), method="lora", quiet=True,
                     overrides={"train.max_steps": "1", "train.eval_every": "1", "lora.rank": "2"})
    with pytest.raises(UserError, match="keeps the settings it started with"):
        finetune_command(str(base), task=None, data=str(data), out=str(out), resume=True,
                         overrides={"lora.rank": "4"})
    with pytest.raises(UserError, match="uses optim.name 'adamw', not 'muon'"):
        finetune_command(str(base), task=None, data=str(data), out=str(out), resume=True,
                         overrides={"optim.name": "muon"})


# ----- report and sweep on fine-tuning runs -----
def test_report_of_a_classify_run_draws_its_confusion_matrix(tmp_path, base):
    from matplotlib.image import imread

    from lmforge.report import write_report

    data = task_data(tmp_path / "data", "classify", 6)
    (data / "test.jsonl").write_text((data / "val.jsonl").read_text())
    out = tmp_path / "run"
    finetune_command(str(base), task="classify", data=str(data), out=str(out), quiet=True,
                     overrides={"train.max_steps": "2", "train.eval_every": "1"})
    report = write_report(out).read_text()
    assert "## Fine-tuning" in report and "- **task**: classify, method full" in report
    assert "On the test split" in report and "![Confusion matrix on the test split](confusion.png)" in report
    assert "predicts labels" in report  # the fresh sample section says why a classifier writes no text
    pixels = imread(out / "report" / "confusion.png")
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200 and pixels[..., :3].std() > 0.05


def test_report_of_a_lora_sft_run_samples_the_merged_model(tmp_path, base):
    from lmforge.report import write_report

    out = tmp_path / "run"
    finetune_command(str(base), task="sft", data=str(task_data(tmp_path / "data", "sft", 4)), out=str(out),
                     method="lora", quiet=True, overrides={"train.max_steps": "2", "train.eval_every": "1"})
    report = write_report(out).read_text()
    assert "- **task**: sft, method lora" in report and "trainable parameters" in report
    assert "confusion" not in report and "From checkpoint `step_0000002`" in report


def test_sweep_searches_fine_tuning_settings(tmp_path, base):
    from lmforge.lab.sweep import FinetuneSearch, sweep

    data = task_data(tmp_path / "data", "sft", 4)
    search = FinetuneSearch(str(base), "sft", "lora")
    best = sweep(None, data, tmp_path / "sweep", ["lora.rank=2,4"], method="grid", finetune=search, quiet=True,
                 overrides={"train.max_steps": "2", "train.eval_every": "2", "train.device": "cpu"})
    ranks = {read_config(tmp_path / "sweep" / f"trial_{i:03d}").finetune.lora_rank for i in range(2)}
    assert ranks == {2, 4} and best["lora.rank"] in ranks
    assert (tmp_path / "sweep" / "results.md").read_text().count("| trial_00") == 2
    with pytest.raises(UserError, match="--config"):
        sweep(tmp_path / "x.toml", data, tmp_path / "other", ["lora.rank=2,4"], finetune=search, quiet=True)
    with pytest.raises(UserError, match="--finetune BASE_RUN"):
        sweep(None, data, tmp_path / "other", ["lora.rank=2,4"], quiet=True)


def test_train_init_from_a_lora_run_starts_from_the_merged_weights(tmp_path, tiny_corpus, tiny_config, capsys):
    from lmforge.data.prepare import prepare

    corpus = tmp_path / "corpus"
    shutil.copytree(tiny_corpus, corpus)
    (corpus / "markers.txt").write_text("SYSTEM:\nUSER:\nASSISTANT:\n")  # the chat template's text encodes
    tiny_data = tmp_path / "prepared"
    prepare([str(corpus)], tiny_data, "char", val_fraction=0.2, workers=1, quiet=True)
    trained = tmp_path / "pretrained"
    Trainer(tiny_config(), tiny_data, trained, quiet=True).run()
    data = tmp_path / "data"
    for split in ("train", "val"):
        write_jsonl(data / f"{split}.jsonl",
                    [{"prompt": f"the {word}", "response": "sat on a mat"} for word in ("cat", "dog")])
    tuned = tmp_path / "tuned"
    finetune_command(str(trained), task="sft", data=str(data), out=str(tuned), method="lora", quiet=True,
                     overrides={"train.max_steps": "2", "train.eval_every": "2", "optim.lr": "0.05"})
    merged = load_run(tuned).model.state_dict()
    base = load_run(trained, language_model=False).model.state_dict()
    assert any(not torch.equal(merged[k], v) for k, v in base.items())
    again = Trainer(tiny_config(), tiny_data, tmp_path / "again", quiet=True, init_from=str(tuned))
    assert all(torch.equal(again.model.state_dict()[k], v) for k, v in merged.items())
    code, _, err = run_cli(capsys, "train", "--data", str(tiny_data), "--out", str(tmp_path / "cli"),
                           "--init-from", str(tuned), "--max-steps", "1", "--quiet")
    assert code == 0, err
    assert "[finetune]" not in (tmp_path / "cli" / "config.toml").read_text()
