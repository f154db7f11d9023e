"""The encoder (`model.arch = "encoder"`): bidirectional attention, masked-language modelling, and the commands
that take it or refuse it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.config.load import load_config
from lmforge.data.datadir import describe_data
from lmforge.data.shards import shard_header, shard_name
from lmforge.errors import UserError
from lmforge.infer.load import load_run
from lmforge.model.factory import build_model
from lmforge.model.masking import IGNORE, chosen_count, mask_token_id, mask_tokens
from lmforge.run import directory as rundir
from lmforge.train.masked import check_no_mask_token
from lmforge.train.trainer import Trainer
from tests.conftest import TINY_OVERRIDES, records, train_losses


def encoder_config(**overrides: object):
    dotted = {key.replace("__", "."): str(value) for key, value in overrides.items()}
    return load_config(None, {**TINY_OVERRIDES, "model.arch": "encoder", "model.vocab_size": "40", **dotted})


# ---- the model ----

@pytest.mark.parametrize("arch", ["encoder", "gpt"])
def test_the_encoder_attends_both_ways_and_the_decoder_only_backwards(arch):
    torch.manual_seed(0)
    model = build_model(encoder_config(model__arch=arch).model).eval()
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

def test_an_encoder_trains_resumes_exactly_and_loads(tiny_data, tmp_path):
    options = dict(train__schedule="constant", train__checkpoint_every=4, model__dropout=0.1, model__vocab_size=0)
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
    with pytest.raises(UserError, match="reserves for its mask token"):
        check_no_mask_token(data, config)
    tokens[7] = 3
    (data / shard_name("train", 0)).write_bytes(shard_header(len(tokens), 50258) + tokens.tobytes())
    with pytest.raises(UserError, match="reserves for its mask token"):  # the val split still holds it
        check_no_mask_token(data, config)
    check_no_mask_token(data, config, ("train",))


def test_a_literal_mask_in_text_is_ordinary_characters(tiny_data):
    tokenizer = describe_data(tiny_data)[1]
    config = encoder_config(model__vocab_size=tokenizer.vocab_size + 1)
    text = "the cat sat [MASK] <mask>"
    ids = tokenizer.encode(text)
    assert mask_token_id(config.model) not in ids and max(ids) < tokenizer.vocab_size
