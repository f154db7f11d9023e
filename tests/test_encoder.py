"""The encoder (`model.arch = "encoder"`): bidirectional attention, masked-language modelling, and the commands
that take it or refuse it."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.config.load import load_config
from lmforge.config.sections import OptimConfig
from lmforge.data.datadir import describe_data
from lmforge.data.loader import TokenWindows, to_batch
from lmforge.data.shards import shard_header, shard_name
from lmforge.errors import UserError
from lmforge.infer.evaluate import check_no_reserved_ids, pseudo_perplexity
from lmforge.infer.load import load_run
from lmforge.interop.architectures import architecture_for
from lmforge.model.factory import build_model
from lmforge.model.gpt import GPT
from lmforge.model.heads import Classifier, pad_right
from lmforge.model.masking import IGNORE, MASK_WORDS, chosen_count, mask_token_id, mask_tokens
from lmforge.run import directory as rundir
from lmforge.scratch import layers as scratch_layers
from lmforge.scratch.gradcheck import check_model, tiny_model_config
from lmforge.tasks.finetune import finetune_command
from lmforge.train.engine import TorchEngine
from lmforge.train.masked import MaskedLanguageModelling
from lmforge.train.trainer import Trainer
from tests.conftest import TINY_OVERRIDES, assert_one_line_error, records, run_cli, train_losses
from tests.test_finetune import TOKENIZER, make_base, task_data
from tests.test_scratch import engines_side_by_side


def encoder_config(**overrides: object):
    dotted = {key.replace("__", "."): str(value) for key, value in overrides.items()}
    return load_config(None, {**TINY_OVERRIDES, "model.arch": "encoder", "model.vocab_size": "40", **dotted})


# ---- the model ----

MODERN = dict(model__position="rope", model__norm="rmsnorm", model__mlp="swiglu", model__qk_norm=True,
              model__n_kv_head=1, model__bias=False)


@pytest.mark.parametrize("arch,options", [("encoder", {}), ("gpt", {}), ("encoder", MODERN), ("gpt", MODERN)],
                         ids=["encoder", "gpt", "encoder-modern", "gpt-modern"])
def test_the_encoder_attends_both_ways_and_the_decoder_only_backwards(arch, options):
    torch.manual_seed(0)
    model = build_model(encoder_config(model__arch=arch, **options).model).eval()
    tokens = torch.randint(0, 39, (1, 12))
    changed = tokens.clone()
    changed[0, 9] = (tokens[0, 9] + 1) % 39  # a later token
    with torch.no_grad():
        before, after = model(tokens)[0], model(changed)[0]
    earlier_moved = not torch.allclose(before[0, :9], after[0, :9])
    assert earlier_moved == (arch == "encoder")
    assert not torch.allclose(before[0, 9:], after[0, 9:])  # the changed position itself moves either way


def test_the_attention_map_of_an_encoder_has_no_mask():
    torch.manual_seed(0)
    model = build_model(encoder_config().model).eval()
    maps = model.attention_maps(torch.randint(0, 39, (1, 8)), 0)
    assert (maps[0, :, 0, 1:] > 0).all()  # the first position looks ahead
    assert torch.allclose(maps.sum(-1), torch.ones(1, 2, 8))


def test_masking_chooses_fifteen_percent_and_mixes_mask_random_and_kept():
    config = encoder_config()
    mask_id = mask_token_id(config.model)
    tokens = torch.randint(0, mask_id, (400, 20), generator=torch.Generator().manual_seed(1))
    inputs, targets = mask_tokens(tokens, mask_id, torch.Generator().manual_seed(2))
    chosen = targets != IGNORE
    assert chosen_count(20) == 3 and (chosen.sum(1) == 3).all()
    assert torch.equal(targets[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # unchosen positions are left alone
    masked = (inputs[chosen] == mask_id).float().mean().item()
    kept = (inputs[chosen] == tokens[chosen]).float().mean().item()
    assert 0.75 < masked < 0.85 and 0.07 < kept < 0.15  # 80% masked, 10% kept (+ the random draws equal to it)
    assert (inputs < mask_id + 1).all() and (inputs[chosen & (inputs != mask_id)] < mask_id).all()
    assert chosen_count(4) == 1  # a short sequence still has one position to predict


def test_the_loss_covers_the_masked_positions_only():
    torch.manual_seed(0)
    config = encoder_config()
    model = build_model(config.model)
    mask_id = mask_token_id(config.model)
    inputs, targets = mask_tokens(torch.randint(0, mask_id, (3, 16)), mask_id)
    logits, _ = model(inputs)
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
    _, model_loss = model(inputs, targets)
    torch.testing.assert_close(model_loss, loss)
    loss.backward()
    chosen = targets != IGNORE
    assert (logits.grad[~chosen] == 0).all()  # exactly zero, not small
    assert (logits.grad[chosen].abs().sum(-1) > 0).all()


# ---- training ----

@pytest.mark.parametrize("variant", [{}, {"train__tokens_per_step": 2 * 4 * 16}], ids=["adamw", "accumulation"])
def test_an_encoder_trains_resumes_exactly_and_loads(tiny_data, tmp_path, variant):
    options = dict(train__schedule="constant", train__checkpoint_every=4, model__dropout=0.1, model__vocab_size=0,
                   **variant)
    Trainer(encoder_config(train__max_steps=8, **options), tiny_data, tmp_path / "whole", quiet=True).run()
    Trainer(encoder_config(train__max_steps=4, **options), tiny_data, tmp_path / "halves", quiet=True).run()
    resumed = Trainer(encoder_config(train__max_steps=8, **options), tiny_data, tmp_path / "halves", resume=True,
                      quiet=True)
    assert resumed.progress.step == 4
    resumed.run()
    whole, halves = train_losses(tmp_path / "whole"), train_losses(tmp_path / "halves")
    assert [halves[step] for step in range(5, 9)] == [whole[step] for step in range(5, 9)]  # bit for bit
    assert len(set(whole.values())) == 8
    weights = [load_file(rundir.checkpoint_dir(run, 8) / "model.safetensors") for run in
               (tmp_path / "whole", tmp_path / "halves")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

    loaded = load_run(tmp_path / "whole")
    tokenizer = rundir.read_tokenizer(tmp_path / "whole")
    assert loaded.config.model.arch == "encoder"
    assert loaded.config.model.vocab_size == tokenizer.vocab_size + 1  # the reserved mask id
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, weights[0][name], rtol=0, atol=0)
    evals = records(tmp_path / "whole", "eval")
    assert evals[-1]["final"] and evals[-1]["val_bpb"] is None  # a masked loss is no compression of the text


def test_a_vocabulary_without_room_for_the_mask_token_is_refused(tiny_data, tmp_path):
    size = describe_data(tiny_data)[1].vocab_size  # the tokenizer's ids fill it: no id left for the mask
    with pytest.raises(UserError, match="mask token"):
        Trainer(encoder_config(model__vocab_size=size), tiny_data, tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_shards_holding_the_mask_id_are_refused(tmp_path):
    # Bare llm.c shards (no tokenizer of their own) can hold any id; here the encoder's mask id 50257.
    data = tmp_path / "shards"
    data.mkdir()
    tokens = np.arange(600, dtype=np.uint16) % 50
    tokens[7] = 50257
    for split in ("train", "val"):
        (data / shard_name(split, 0)).write_bytes(shard_header(len(tokens), 50258) + tokens.tobytes())
    config = encoder_config(model__vocab_size=50258)
    with pytest.raises(UserError, match="reserves for the encoder.s mask token"):
        check_no_reserved_ids(data, mask_token_id(config.model), MASK_WORDS)
    tokens[7] = 3
    (data / shard_name("train", 0)).write_bytes(shard_header(len(tokens), 50258) + tokens.tobytes())
    with pytest.raises(UserError, match="reserves for the encoder.s mask token"):  # the val split still holds it
        check_no_reserved_ids(data, mask_token_id(config.model), MASK_WORDS)
    check_no_reserved_ids(data, mask_token_id(config.model), MASK_WORDS, ("train",))


def test_a_literal_mask_in_text_is_ordinary_characters(tiny_data):
    tokenizer = describe_data(tiny_data)[1]
    config = encoder_config(model__vocab_size=tokenizer.vocab_size + 1)
    text = "the cat sat [MASK] <mask>"
    ids = tokenizer.encode(text)
    assert mask_token_id(config.model) not in ids and max(ids) < tokenizer.vocab_size


# ---- the commands on an encoder run ----

@pytest.fixture(scope="module")
def encoder_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("encoder") / "run"
    Trainer(encoder_config(model__vocab_size=0), tiny_data, run, quiet=True).run()
    return run


def test_eval_reports_the_masked_loss_and_the_pseudo_perplexity(encoder_run, tiny_data, capsys):
    code, out, err = run_cli(capsys, "eval", encoder_run, "--data", tiny_data, "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    assert "loss" not in result  # nothing a reader could line up against a decoder's loss by its name
    windows = result["masked_lm_tokens"] // chosen_count(16)  # each window has its chosen positions scored
    assert windows > 0 and result["pseudo_tokens"] == min(1024, windows * 16)
    assert result["pseudo_perplexity"] == pytest.approx(math.exp(result["pseudo_loss"]))
    assert len(err.strip().splitlines()) == 1 and "comparable to a decoder" in err
    # The same masked loss as the final evaluation of the training run (the same fixed masks, the whole split).
    final = [r for r in records(encoder_run, "eval") if r["final"]][-1]
    assert result["masked_lm_loss"] == pytest.approx(final["val_loss"], rel=1e-5)


def test_the_pseudo_perplexity_masks_each_token_alone(encoder_run, tiny_data):
    loaded = load_run(encoder_run)
    mask_id = mask_token_id(loaded.config.model)
    windows = TokenWindows(tiny_data, "val", loaded.config.model.block_size)
    result = pseudo_perplexity(loaded.model, windows, mask_id=mask_id, device=torch.device("cpu"),
                               precision="fp32", batch_size=5, max_tokens=32)
    total = 0.0
    for window in range(2):
        tokens, _ = to_batch(windows.gather(np.array([window])), torch.device("cpu"))
        for position in range(16):
            masked = tokens.clone()
            masked[0, position] = mask_id
            with torch.no_grad():
                logits, _ = loaded.model(masked)
            total -= torch.log_softmax(logits[0, position].double(), -1)[tokens[0, position]].item()
    assert result["pseudo_tokens"] == 32
    assert result["pseudo_loss"] == pytest.approx(total / 32, rel=1e-5)


@pytest.mark.parametrize("command", [["sample"], ["sample", "--num-samples", "2"], ["chat"], ["serve"]])
def test_commands_that_generate_refuse_an_encoder(encoder_run, capsys, command):
    code, out, err = run_cli(capsys, command[0], encoder_run, *command[1:], "--device", "cpu")
    assert_one_line_error(code, err, "model.arch = encoder does not generate text", f"lmforge {command[0]}: error")
    assert out == ""


def test_plot_next_token_refuses_an_encoder(encoder_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "plot", "next-token", encoder_run, "--out", tmp_path / "next.png")
    assert_one_line_error(code, err, "model.arch = encoder does not generate text")
    assert not (tmp_path / "next.png").exists()


@pytest.mark.parametrize("fmt", ["hf", "llmc"])
def test_export_refuses_an_encoder_by_name(encoder_run, tmp_path, capsys, fmt):
    code, _, err = run_cli(capsys, "export", encoder_run, "--format", fmt, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "encoder")
    assert not (tmp_path / "out").exists()
    for fmt_name in ("hf", "gguf"):
        with pytest.raises(UserError, match="model.arch = encoder: a bidirectional encoder has no"):
            architecture_for(encoder_config().model, fmt_name)


# ---- fine-tuning ----

@pytest.fixture(scope="module")
def encoder_base(tmp_path_factory):
    return make_base(tmp_path_factory.mktemp("encoder-base") / "run", "encoder", vocab_size=TOKENIZER.vocab_size + 1)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_classify_on_an_encoder_pools_the_passage_and_learns(tmp_path, encoder_base, method):
    data = task_data(tmp_path / "data", "classify", count=12)
    result = finetune_command(str(encoder_base), task="classify", data=str(data), out=str(tmp_path / "run"),
                              method=method, quiet=True,
                              overrides={"train.max_steps": "80", "train.eval_every": "40", "optim.lr": "1e-2",
                                         "train.device": "cpu"})
    assert result["best"] == 1.0  # "cat", "dog", "tree" differ in one word
    model = load_run(tmp_path / "run", language_model=False).model
    assert isinstance(model, Classifier) and model.body.config.arch == "encoder"
    # The pooled state is the mean over the real tokens: the head applied to it by hand gives the same logits.
    ids, lengths = pad_right([TOKENIZER.encode("the dog sat"), TOKENIZER.encode("a cat")], TOKENIZER.eot_id, "cpu")
    with torch.no_grad():
        alone = [model.body.hidden_states(ids[row : row + 1, : lengths[row]]).mean(1) for row in range(2)]
        torch.testing.assert_close(model(ids, lengths), model.score(torch.cat(alone)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("task", ["sft", "translate", "qa"])
def test_text_tasks_refuse_an_encoder_by_name(tmp_path, encoder_base, capsys, task):
    data = task_data(tmp_path / "data", task, count=4)
    code, _, err = run_cli(capsys, "finetune", encoder_base, "--task", task, "--data", data,
                           "--out", tmp_path / "run", "--train.device", "cpu", "--quiet")
    assert_one_line_error(code, err, f"the {task} task needs a model that writes text", "model.arch = encoder")
    assert not (tmp_path / "run").exists()


def test_eval_task_and_predict_refuse_to_generate_from_an_encoder(tmp_path, encoder_base, capsys):
    data = task_data(tmp_path / "data", "sft", count=4)
    code, _, err = run_cli(capsys, "eval", encoder_base, "--task", "sft", "--data", data, "--split", "val",
                           "--device", "cpu")
    assert_one_line_error(code, err, "model.arch = encoder")
    code, _, err = run_cli(capsys, "predict", encoder_base, "--text", "the cat", "--device", "cpu")
    assert_one_line_error(code, err, "model.arch = encoder")


# ---- the scratch engine ----

def test_the_scratch_encoder_matches_the_torch_encoder_and_finite_differences():
    config = tiny_model_config("encoder")
    results = check_model(config)
    names = {name for name, _ in GPT(config).named_parameters()}
    assert {r.case for r in results} == {"encoder"}
    for reference, tolerance in (("torch autograd (float64)", 1e-8), ("torch autograd (float32)", 1e-4),
                                 ("finite difference", 1e-6)):  # the GPT's tolerances (tests/test_scratch.py)
        checked = {r.tensor: r.error for r in results if r.reference == reference}
        assert set(checked) == names | ({"logits", "loss"} if reference.startswith("torch") else set())
        assert max(checked.values()) < tolerance, (reference, checked)


def test_the_scratch_attention_without_a_mask_sees_later_tokens():
    qkv = np.random.default_rng(0).standard_normal((1, 4, 12))
    _, (_, _, _, causal, _) = scratch_layers.attention_forward(qkv, 2)
    _, (_, _, _, bidirectional, _) = scratch_layers.attention_forward(qkv, 2, causal=False)
    assert (causal[..., 0, 1:] == 0).all() and (bidirectional[..., 0, 1:] > 0).all()


def test_masked_lm_steps_are_the_same_in_both_engines():
    config = encoder_config(model__n_layer=2).model
    optim = OptimConfig(lr=3e-3, weight_decay=0.1)
    torch_model, optimizers, engine = engines_side_by_side(config, optim)
    mask_id = mask_token_id(config)
    tokens = torch.randint(0, mask_id, (4, config.block_size), generator=torch.Generator().manual_seed(1))
    batch = mask_tokens(tokens, mask_id, torch.Generator().manual_seed(2))
    torch_engine = TorchEngine(torch_model, optimizers, device=torch.device("cpu"), precision="fp32")
    for _ in range(5):
        torch_loss, torch_norm = torch_engine.step(lambda: batch, 1, grad_clip=1.0)
        scratch_loss, scratch_norm = engine.step(lambda: batch, 1, grad_clip=1.0)
        assert scratch_loss.item() == pytest.approx(torch_loss.item(), abs=1e-4)
        assert scratch_norm.item() == pytest.approx(torch_norm.item(), rel=1e-4)
    weights = dict(torch_model.named_parameters())
    for name, value in engine.optimizer.params.items():
        np.testing.assert_allclose(value, weights[name].detach().numpy(), atol=1e-5)


def test_an_encoder_trains_on_the_scratch_engine(tiny_data, tmp_path):
    Trainer(encoder_config(model__vocab_size=0, train__engine="scratch", train__max_steps=3), tiny_data,
            tmp_path / "run", quiet=True).run()
    assert len(train_losses(tmp_path / "run")) == 3
    assert records(tmp_path / "run", "eval")[-1]["final"]


def test_the_report_of_an_encoder_shows_its_maps_and_no_sample(encoder_run, capsys):
    code, _, err = run_cli(capsys, "report", encoder_run)
    assert code == 0, err
    report = (encoder_run / "report" / "report.md").read_text()
    assert "An encoder fills in masked tokens from both sides and does not generate" in report
    assert (encoder_run / "report" / "attention.png").is_file()
    assert (encoder_run / "report" / "gradients.png").is_file()


def test_each_rank_masks_its_own_rows_of_the_global_batch():
    from types import SimpleNamespace

    config = encoder_config()
    tokens = torch.randint(0, 39, (4, 16), generator=torch.Generator().manual_seed(3))
    masked = {}
    for rank in (0, 1):
        task = MaskedLanguageModelling.__new__(MaskedLanguageModelling)
        task.mask_id = mask_token_id(config.model)
        task.cluster = SimpleNamespace(world_size=2, rank=rank)
        task.loader = SimpleNamespace(next_batch=lambda: (tokens, None))
        torch.manual_seed(7)  # every rank's generator starts the same, as the trainer seeds it
        masked[rank] = task.next_batch()
    torch.manual_seed(7)
    global_inputs, global_targets = mask_tokens(tokens.repeat(2, 1), mask_token_id(config.model))
    for rank in (0, 1):
        assert torch.equal(masked[rank][1], global_targets[rank * 4 : (rank + 1) * 4])
        assert torch.equal(masked[rank][0], global_inputs[rank * 4 : (rank + 1) * 4])
    assert not torch.equal(masked[0][1] != IGNORE, masked[1][1] != IGNORE)  # the ranks chose other positions
