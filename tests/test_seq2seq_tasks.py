"""Tasks on an encoder-decoder (the source to the encoder, the target to the decoder), and batched greedy
decoding for `eval --task` (each row equal to the one-at-a-time reply, for a decoder and an encoder-decoder)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.data.template import ChatTemplate
from lmforge.infer.generate import generate, greedy_batch
from lmforge.infer.load import load_run
from lmforge.model.factory import build_model
from lmforge.model.spans import reserved_ids, start_token
from lmforge.run.directory import checkpoint_dir
from lmforge.tasks.examples import IGNORE, encode_examples, lm_loss, training_batch
from lmforge.tasks.finetune import finetune_command
from lmforge.tasks.kinds import translate_prompt
from lmforge.tasks.predict import generate_reply, predict
from tests.conftest import assert_one_line_error, run_cli
from tests.test_finetune import TOKENIZER, log_records, make_base, task_data, tiny_model_config, write_jsonl

SEQ2SEQ_VOCAB = TOKENIZER.vocab_size + reserved_ids(24)  # make_base's block_size


def seq2seq_base(directory: Path) -> Path:
    return make_base(directory, "encoder-decoder", vocab_size=SEQ2SEQ_VOCAB)


def eval_losses(run: Path) -> list[float]:
    return [record["val_loss"] for record in log_records(run, "eval")]


def copy_data(directory: Path, count: int = 12) -> Path:
    """A copy task: the target is the source."""
    words = ["cat", "dog", "tree", "mat"]
    texts = [f"{words[i % 4]} {words[(i + 1) % 4]}" for i in range(count)]
    for split in ("train", "val"):
        write_jsonl(directory / f"{split}.jsonl", [{"source": text, "target": text} for text in texts])
    return directory


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return seq2seq_base(tmp_path_factory.mktemp("seq2seq") / "base")


def test_the_source_goes_to_the_encoder_and_the_loss_is_on_the_target_only():
    config = tiny_model_config("encoder-decoder", vocab_size=SEQ2SEQ_VOCAB)
    records = [{"source": "a cat", "target": "the cat"}, {"source": "a big dog", "target": "it"}]
    examples = encode_examples(records, "translate", TOKENIZER, 24, [], ChatTemplate(), Path("x"),
                               start_token(config))
    (source, decoder_input, lengths), target = training_batch(examples, [0, 1], TOKENIZER.eot_id, torch.device("cpu"))
    assert TOKENIZER.decode(source[0, : lengths[0]].tolist()) == translate_prompt("a cat")
    assert lengths.tolist() == [len(TOKENIZER.encode(translate_prompt(r["source"]))) for r in records]
    assert target[0].tolist() == TOKENIZER.encode("the cat") + [TOKENIZER.eot_id]
    assert decoder_input[0].tolist() == [start_token(config)] + TOKENIZER.encode("the cat")
    assert target[1].tolist() == TOKENIZER.encode("it") + [TOKENIZER.eot_id] + [IGNORE] * 5  # padding scores nothing

    torch.manual_seed(0)
    model = build_model(config)
    logits = model((source, decoder_input, lengths))[0].detach().requires_grad_(True)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                                      ignore_index=IGNORE).backward()
    assert logits.grad[1, 3:].abs().max() == 0 and logits.grad[1, :3].abs().min() > 0  # padding: no gradient
    loss = lm_loss(model, (source, decoder_input, lengths), target)
    other_padding = source.clone()
    other_padding[1, lengths[1]:] = 7  # what the padding holds is hidden from the encoder and the decoder
    torch.testing.assert_close(lm_loss(model, (other_padding, decoder_input, lengths), target), loss)
    changed = examples.ids[0][:]
    changed[-2] = TOKENIZER.encode("x")[0]  # another target token changes the loss
    examples.ids[0] = changed
    (source, decoder_input, lengths), target = training_batch(examples, [0, 1], TOKENIZER.eot_id, torch.device("cpu"))
    assert abs(lm_loss(model, (source, decoder_input, lengths), target).item() - loss.item()) > 1e-4


def test_fine_tuning_learns_to_copy_and_predict_and_eval_generate_from_it(tmp_path, base, capsys):
    data = copy_data(tmp_path / "data")
    out = tmp_path / "run"
    finetune_command(str(base), task="translate", data=str(data), out=str(out), quiet=True,
                     overrides={"train.max_steps": "60", "train.eval_every": "30", "optim.lr": "1e-2",
                                "train.device": "cpu", "train.warmup_steps": "0"})
    losses = eval_losses(out)
    assert losses[-1] < 0.5 * losses[0], losses
    loaded = load_run(out, language_model=False)
    reply = predict(str(out), "cat dog", max_new_tokens=20)["reply"]
    assert reply == generate_reply(loaded.model, TOKENIZER, TOKENIZER.encode(translate_prompt("cat dog")), 20)
    shutil.copy(data / "val.jsonl", data / "test.jsonl")
    code, out_text, err = run_cli(capsys, "eval", out, "--task", "translate", "--data", data, "--device", "cpu",
                                  "--batch-size", "5", "--predictions", tmp_path / "predictions.jsonl")
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    alone = [generate_reply(loaded.model, TOKENIZER, TOKENIZER.encode(translate_prompt(r["source"])),
                            2 * len(TOKENIZER.encode(r["source"])) + 16).strip() for r in records]
    assert [row["prediction"] for row in rows] == alone  # batched equals one at a time
    assert json.loads(out_text)["chrf"] > 50  # it learned to copy (chrF 92 here; the untrained base writes noise)


def test_lora_adapts_both_stacks_and_cross_attention_and_resumes_exactly(tmp_path, base):
    data = copy_data(tmp_path / "data")
    overrides = {"train.max_steps": "6", "train.eval_every": "3", "train.log_every": "1", "train.keep_last": "2",
                 "lora.dropout": "0.2", "optim.lr": "1e-2", "train.device": "cpu"}
    whole = tmp_path / "whole"
    finetune_command(str(base), task="translate", data=str(data), out=str(whole), method="lora", quiet=True,
                     overrides=overrides)
    saved = load_file(checkpoint_dir(whole, 6) / "model.safetensors")
    assert all("lora_" in name for name in saved)
    for layer in ("encoder.0.attn.qkv", "decoder.1.attn.proj", "decoder.0.cross.q", "decoder.1.cross.kv",
                  "decoder.0.cross.proj", "encoder.1.mlp.fc"):
        assert any(f".{layer}.lora_A" in name for name in saved), layer
    base_weights = load_file(checkpoint_dir(base, 0) / "model.safetensors")
    merged = load_run(whole, language_model=False).model.state_dict()
    assert not torch.equal(merged["decoder.0.cross.q.weight"], base_weights["decoder.0.cross.q.weight"])
    torch.testing.assert_close(merged["wte.weight"], base_weights["wte.weight"], rtol=0, atol=0)  # frozen
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    shutil.rmtree(checkpoint_dir(cut, 6))  # as if killed after the checkpoint at step 3
    finetune_command(str(base), task="translate", data=str(data), out=str(cut), method="lora", quiet=True,
                     overrides=overrides, resume=True)

    def train_losses(run):
        return [(record["step"], record["loss"]) for record in log_records(run, "train")]

    assert len(train_losses(whole)) == 6 and train_losses(cut) == train_losses(whole)


def test_sft_fine_tunes_an_encoder_decoder(tmp_path, base, capsys):
    out = tmp_path / "run"
    data = task_data(tmp_path / "data", "sft")
    finetune_command(str(base), task="sft", data=str(data), out=str(out), quiet=True,
                     overrides={"train.max_steps": "2", "train.eval_every": "2", "train.device": "cpu"})
    code, result, err = run_cli(capsys, "eval", out, "--task", "sft", "--data", data / "val.jsonl", "--device", "cpu",
                                "--batch-size", "5")
    assert code == 0, err  # eval scores the tokens fine-tuning's evaluation scored
    assert json.loads(result)["loss"] == pytest.approx(log_records(out, "eval")[-1]["val_loss"], rel=1e-5)
    loaded = load_run(out, language_model=False, chat_template=True)
    prompt = loaded.chat_template.encode([{"role": "user", "content": "say cat"}], TOKENIZER,
                                         add_generation_prompt=True)[0]
    assert predict(str(out), "say cat", max_new_tokens=8)["reply"] == generate_reply(loaded.model, TOKENIZER,
                                                                                      prompt, 8)


@pytest.mark.parametrize("task", ["classify", "qa"])
def test_other_tasks_refuse_an_encoder_decoder_by_name(tmp_path, base, capsys, task):
    code, _, err = run_cli(capsys, "finetune", base, "--task", task, "--data", task_data(tmp_path / "data", task, 4),
                           "--out", tmp_path / "run", "--train.device", "cpu", "--quiet")
    assert_one_line_error(code, err, f"the {task} task", "model.arch = encoder-decoder")
    assert not (tmp_path / "run").exists()


def test_choice_eval_and_mismatched_data_are_one_line(tmp_path, base, capsys):
    choice = write_jsonl(tmp_path / "choice.jsonl", [{"context": "a", "choices": ["b", "c"], "label": 0}])
    code, _, err = run_cli(capsys, "eval", base, "--task", "choice", "--data", choice, "--device", "cpu")
    assert_one_line_error(code, err, "the choice task", "model.arch = encoder-decoder")
    code, _, err = run_cli(capsys, "finetune", base, "--task", "translate", "--data",
                           task_data(tmp_path / "classify", "classify", 4), "--out", tmp_path / "run", "--quiet")
    assert_one_line_error(code, err)
    for record in ({"source": "", "target": "x"}, {"source": "x", "target": ""}):
        bad = write_jsonl(tmp_path / "bad" / "train.jsonl", [record])
        write_jsonl(tmp_path / "bad" / "val.jsonl", [record])
        code, _, err = run_cli(capsys, "finetune", base, "--task", "translate", "--data", bad.parent, "--out",
                               tmp_path / "run", "--quiet")
        assert_one_line_error(code, err, "is empty")
    assert not (tmp_path / "run").exists()


def test_batched_greedy_equals_one_at_a_time_for_a_decoder():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(block_size=12)).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.5)  # lively: greedy decoding varies
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 40, (length,), generator=generator).tolist() for length in (2, 11, 5, 1, 20)]
    limits = [20, 3, 0, 15, 6]  # rows 0 and 3 slide their window past the context, row 4's prompt is cut
    alone = [list(generate(model, prompt, limit, temperature=0.0)) for prompt, limit in zip(prompts, limits,
                                                                                              strict=True)]
    assert len(set(alone[0])) > 2
    for batch_size in (1, 2, 5):
        assert greedy_batch(model, prompts, limits, stop_token=None, batch_size=batch_size) == alone
    stop = alone[0][3]
    alone = [list(generate(model, prompt, limit, temperature=0.0, stop_token=stop))
             for prompt, limit in zip(prompts, limits, strict=True)]
    assert greedy_batch(model, prompts, limits, stop_token=stop, batch_size=5) == alone
