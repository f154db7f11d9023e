"""LoRA through PEFT on lmforge's modules: merged equals unmerged, the checkpoint holds only the adapters and
rebuilds the same model, the base run's files are never modified, layer names and their errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import TOKENIZER, make_base, task_data, tiny_model_config

from lmforge.config.sections import Config, FinetuneConfig
from lmforge.errors import UserError
from lmforge.infer.load import load_run
from lmforge.model import lora
from lmforge.model.factory import build_model
from lmforge.model.finetuned import build_finetune_model
from lmforge.model.heads import Classifier, pad_right
from lmforge.run.directory import read_config
from lmforge.tasks.finetune import finetune_command
from lmforge.tasks.predict import predict


def randomize_adapters(model: torch.nn.Module) -> None:
    """PEFT starts B at zero (the adapted model equals the base); give B values so merging has work to do."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)


@pytest.mark.parametrize("arch,changes", [("gpt", {}), ("gpt", {"mlp": "swiglu", "n_kv_head": 1}), ("rnn", {}),
                                          ("mlp", {})])
def test_merged_logits_equal_unmerged(arch, changes):
    torch.manual_seed(0)
    model = lora.apply_lora(build_model(tiny_model_config(arch, **changes)), rank=4, alpha=8.0, dropout=0.0,
                            targets=[], arch=arch).eval()
    randomize_adapters(model)
    idx = torch.randint(0, TOKENIZER.vocab_size, (3, 10))
    unmerged = model(idx)[0]
    merged_model = lora.merge_lora(model)
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    torch.testing.assert_close(merged_model(idx)[0], unmerged, rtol=1e-5, atol=1e-5)


def test_merged_classifier_equals_unmerged():
    torch.manual_seed(0)
    finetune = FinetuneConfig(task="classify", method="lora", labels=["a", "b"])
    model = build_finetune_model(Config(model=tiny_model_config()), finetune, None).eval()
    randomize_adapters(model)
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("score" in name for name in trained) and all("lora_" in n or "score" in n for n in trained)
    batch = pad_right([TOKENIZER.encode("a cat"), TOKENIZER.encode("the dog sat")], TOKENIZER.eot_id, "cpu")
    unmerged = model(*batch)
    merged = lora.merge_lora(model)
    assert isinstance(merged, Classifier)
    torch.testing.assert_close(merged(*batch), unmerged, rtol=1e-5, atol=1e-5)


def test_layer_names_and_defaults():
    gpt = build_model(tiny_model_config())
    assert list(lora.linear_layer_names(gpt)) == ["attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"]
    untied = build_model(tiny_model_config(tie_embeddings=False))
    assert "lm_head" in lora.linear_layer_names(untied) and "lm_head" not in lora.default_targets(untied)
    assert lora.default_targets(build_model(tiny_model_config("rnn"))) == ["input", "recurrent"]
    assert lora.resolve_targets(gpt, ["mlp.proj"], "gpt") == ["blocks.0.mlp.proj", "blocks.1.mlp.proj"]
    with pytest.raises(UserError, match="valid names: attn.qkv, attn.proj, mlp.fc, mlp.proj"):
        lora.resolve_targets(gpt, ["qkv"], "gpt")
    with pytest.raises(UserError, match="lstm.*LSTM"):
        lora.resolve_targets(build_model(tiny_model_config("lstm")), [], "lstm")


def checksums(directory: Path) -> dict[str, str]:
    """Every file's SHA-256 but the notes a LoRA run leaves in its base run (lora_runs/, which only keep the
    base's pruning off the checkpoint it adapts): the base's own files must never change."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file() and "lora_runs" not in path.parts}


@pytest.mark.parametrize("task", ["classify", "sft"])
def test_lora_run_saves_adapters_and_loads_merged_without_touching_the_base(tmp_path, task):
    base = make_base(tmp_path / "base", tie_embeddings=False)
    before = checksums(base)
    out = tmp_path / "run"
    finetune_command(str(base), task=task, data=str(task_data(tmp_path / "data", task)), out=str(out),
                     method="lora", quiet=True, overrides={"train.max_steps": "3", "train.eval_every": "3",
                                                           "lora.rank": "2", "lora.targets": "attn.qkv,mlp.fc",
                                                           "optim.lr": "1e-2"})
    checkpoint = out / "checkpoints" / "step_0000003"
    saved = load_file(checkpoint / "model.safetensors")
    expected_head = {"base_model.model.score.weight", "base_model.model.score.bias"} if task == "classify" else set()
    assert {name for name in saved if "lora_" not in name} == expected_head
    assert {name.split(".")[-4] for name in saved if "lora_" in name} == {"qkv", "fc"}
    assert all(tensor.shape[0] == 2 or tensor.shape[1] == 2 for name, tensor in saved.items() if "lora_" in name)

    # the checkpoint, loaded the unmerged way (base + adapters), computes what load_run's merged model does
    unmerged = build_finetune_model(Config(model=tiny_model_config(tie_embeddings=False)),
                                    read_config(out).finetune, load_run(base, language_model=False).model.train())
    lora.load_trainable_state(unmerged, saved, "test")
    loaded = load_run(out, language_model=False)
    merged, tokenizer, used = loaded.model, loaded.tokenizer, loaded.checkpoint
    assert used == checkpoint and not any("lora" in name for name, _ in merged.named_parameters())
    sequences = [tokenizer.encode("the cat sat"), tokenizer.encode("a dog")]
    inputs = pad_right(sequences, tokenizer.eot_id, "cpu")
    with torch.no_grad():
        unmerged.eval()
        if task == "classify":
            torch.testing.assert_close(merged(*inputs), unmerged(*inputs), rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(merged(inputs[0])[0], unmerged(inputs[0])[0], rtol=1e-5, atol=1e-5)
    merged_body = merged.body if task == "classify" else merged
    base_model = load_run(base, language_model=False).model
    assert not torch.equal(merged_body.blocks[0].attn.qkv.weight, base_model.blocks[0].attn.qkv.weight)
    torch.testing.assert_close(merged_body.blocks[0].attn.proj.weight, base_model.blocks[0].attn.proj.weight,
                               rtol=0, atol=0)  # not a target: untouched
    predict(str(out), "the cat", max_new_tokens=None if task == "classify" else 3)
    assert checksums(base) == before


def test_trainable_parameters_are_printed(tmp_path, capsys):
    base = make_base(tmp_path / "base")
    finetune_command(str(base), task="sft", data=str(task_data(tmp_path / "data", "sft", 4)), out=str(tmp_path / "r"),
                     method="lora", overrides={"train.max_steps": "1", "train.eval_every": "1"})
    out = capsys.readouterr().out
    model = lora.apply_lora(build_model(tiny_model_config()), rank=8, alpha=16, dropout=0.0, targets=[], arch="gpt")
    trainable, total = lora.parameter_counts(model)
    assert f"{trainable:,} of {total:,} parameters train ({trainable / total:.2%})" in out


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_runs_imported_from_transformers_fine_tune(tmp_path, tiny_corpus, family, capsys):
    transformers = pytest.importorskip("transformers")
    from lmforge.cli import main
    from lmforge.data.tokenizer import BPETokenizer

    bpe = BPETokenizer.train([path.read_text() for path in sorted(tiny_corpus.iterdir())], vocab_size=300)
    if family == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=300, n_positions=48, n_embd=32, n_layer=2, n_head=4, eos_token_id=None, bos_token_id=None))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=48, tie_word_embeddings=False, eos_token_id=None,
            bos_token_id=None))
    hf.save_pretrained(tmp_path / "hf")
    bpe.hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    before = checksums(tmp_path / "imported")
    for task, method in (("sft", "lora"), ("classify", "full")):
        out = tmp_path / task
        finetune_command(str(tmp_path / "imported"), task=task, data=str(task_data(tmp_path / f"{task}-data", task, 4)),
                         out=str(out), method=method, quiet=True,
                         overrides={"train.max_steps": "2", "train.eval_every": "2", "train.device": "cpu"})
        assert predict(str(out), "the cat sat", max_new_tokens=None if task == "classify" else 3)
    assert checksums(tmp_path / "imported") == before


def test_export_of_a_lora_run_writes_the_merged_model(tmp_path):
    from lmforge.interop.hf import export_hf, import_hf

    base, out = make_base(tmp_path / "base"), tmp_path / "lora"
    finetune_command(str(base), task="sft", data=str(task_data(tmp_path / "data", "sft", 4)), out=str(out),
                     method="lora", quiet=True,
                     overrides={"train.max_steps": "2", "train.eval_every": "2", "optim.lr": "0.05"})
    export_hf(out, tmp_path / "hf")
    import_hf(str(tmp_path / "hf"), tmp_path / "back")
    idx = torch.tensor([[1, 2, 3, 4]])
    merged, back = load_run(out).model, load_run(tmp_path / "back").model
    torch.testing.assert_close(back(idx)[0], merged(idx)[0])
    assert not torch.allclose(load_run(base).model(idx)[0], merged(idx)[0])
