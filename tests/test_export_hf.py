"""export --format hf, checked against transformers itself: for GPT-2, Llama, Arcee and Qwen3 shapes and the
char, trained BPE and GPT-2 tokenizers, the exported model's logits, token ids and greedy text equal lmforge's;
import reads Arcee and Qwen3 back; export --check and the refusals (architecture, bad input) are one line and
exit 2. Tiny random models made here; nothing downloaded."""

from __future__ import annotations

import itertools
import string
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmforge.cli import main
from lmforge.config.sections import ModelConfig
from lmforge.data.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer
from lmforge.errors import UserError
from lmforge.infer.generate import generate
from lmforge.infer.load import load_run
from lmforge.interop.architectures import architecture_for
from lmforge.model.gpt import GPT, mlp_hidden_size
from lmforge.run.directory import write_run
from tests.conftest import assert_one_line_error, checksums, child_cli, run_cli

transformers = pytest.importorskip("transformers")

TEXT = "ROMEO: Is the day so young?\n  Naïve café, 'tis — well; go!\n"
PROMPT = "ROMEO:"
NEW_TOKENS = 32
BLOCK_SIZE = 64  # the whole TEXT and PROMPT + 32 new tokens fit: learned positions never slide
# Every option export must carry over, spread across the four shapes: untied heads, biases on and off,
# rope_theta, norm_eps, grouped-query attention, an MLP width of one's own, multi-token heads.
SHAPES = {
    "gpt2": dict(tie_embeddings=False, norm_eps=1e-4),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=True, rope_theta=500.0,
                  norm_eps=1e-5),
    "arcee": dict(position="rope", norm="rmsnorm", mlp="relu2", n_kv_head=1, bias=False, tie_embeddings=False,
                  rope_theta=1000.0, mlp_hidden=48),
    "qwen3": dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, n_kv_head=2, bias=False,
                  rope_theta=2000.0, multi_token=2),  # multi-token heads: training's alone, left out
}
HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "arcee": "ArceeForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}
TOKENIZER_KINDS = ("char", "bpe", "gpt2")


def model_config(shape: str, vocab_size: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab_size, block_size=BLOCK_SIZE, n_layer=2, n_head=4, n_embd=32,
                       **SHAPES[shape])


def native_run(root: Path, config: ModelConfig, tokenizer, std: float = 0.3) -> Path:
    """An lmforge run whose every tensor (norm gains and biases included) is random, so a swapped or
    untransposed tensor cannot go unnoticed; the vocabulary's padding rows stay zero."""
    model = GPT(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
        model.wte.weight[config.vocab_size :] = 0
        if model.lm_head is not None:
            model.lm_head.weight[config.vocab_size :] = 0
    return write_run(root, config, tokenizer.to_dict(), model.state_dict(), origin="test")


@pytest.fixture(scope="module", autouse=True)
def stand_in_gpt2_encoding():
    """GPT-2's tiktoken files need the network; a byte-level encoding with GPT-2's split pattern and a few
    merges (one of them a two-byte character) stands in for the whole module, so runs load it too."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = {bytes([byte]): byte for byte in range(256)}
    for token in (b"th", b"the", b" t", b" the", b"RO", b"ROM", b"EO", b"ay", b" d", b" day", "é".encode()):
        ranks[token] = len(ranks)
    encoding = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": len(ranks)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiktoken, "get_encoding", lambda name: encoding)
        yield


@pytest.fixture(scope="module")
def tokenizers(tiny_corpus) -> dict:
    texts = [path.read_text() for path in sorted(tiny_corpus.iterdir())]
    alphabet = "".join(sorted(set(TEXT + string.ascii_letters + string.punctuation + " \n")))
    return {"char": CharTokenizer(alphabet), "bpe": BPETokenizer.train(texts, vocab_size=300),
            "gpt2": GPT2Tokenizer()}


@pytest.fixture(scope="module", params=list(itertools.product(SHAPES, TOKENIZER_KINDS)),
                ids=lambda param: "-".join(param))
def exported(request, tmp_path_factory, tokenizers) -> SimpleNamespace:
    """A random run of one shape and tokenizer kind, exported through the command line, and what
    transformers loads of the export."""
    shape, kind = request.param
    root = tmp_path_factory.mktemp(f"{shape}-{kind}")
    tokenizer = tokenizers[kind]
    run = native_run(root / "run", model_config(shape, tokenizer.vocab_size), tokenizer)
    assert main(["export", str(run), "--format", "hf", "--out", str(root / "hf")]) == 0
    return SimpleNamespace(shape=shape, kind=kind, run=run, hf_dir=root / "hf", tokenizer=tokenizer,
                           ours=load_run(run).model,
                           hf=transformers.AutoModelForCausalLM.from_pretrained(root / "hf").eval(),
                           hf_tokenizer=transformers.AutoTokenizer.from_pretrained(root / "hf"))


def test_exported_logits_equal_lmforge(exported):
    assert type(exported.hf).__name__ == HF_CLASSES[exported.shape]
    ids = torch.tensor([exported.tokenizer.encode(TEXT)[:BLOCK_SIZE]])
    with torch.no_grad():
        torch.testing.assert_close(exported.hf(ids).logits, exported.ours(ids)[0], atol=1e-4, rtol=1e-4)


def test_exported_tokenizer_gives_lmforge_ids(exported):
    ids = exported.tokenizer.encode(TEXT)
    if exported.kind != "char":
        assert len(ids) < len(TEXT)  # merges exist and are used
    assert exported.hf_tokenizer.encode(TEXT) == ids
    assert exported.hf_tokenizer.decode(ids) == TEXT
    assert exported.hf_tokenizer.eos_token_id == exported.tokenizer.eot_id


def test_greedy_generation_gives_the_same_text(exported):
    prompt = exported.tokenizer.encode(PROMPT)
    ours = list(generate(exported.ours, prompt, NEW_TOKENS, temperature=0))
    with torch.no_grad():
        output = exported.hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                      do_sample=False)
    theirs = output[0, len(prompt):].tolist()
    assert len(ours) == NEW_TOKENS
    assert theirs == ours
    assert exported.hf_tokenizer.decode(theirs) == exported.tokenizer.decode(ours)


def test_transformers_pipeline_continues_like_lmforge_sample(exported, capsys):
    """The docs' snippet: a transformers text-generation pipeline on the export, greedy, continues the
    prompt as `lmforge sample --temperature 0` does (both stop at end-of-text)."""
    code, printed, err = run_cli(capsys, "sample", exported.run, "--prompt", PROMPT, "--temperature", "0",
                                 "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu")
    assert code == 0, err
    generator = transformers.pipeline("text-generation", model=str(exported.hf_dir))
    text = generator(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)[0]["generated_text"]
    assert printed == text + "\n"
    assert len(text) > len(PROMPT)


@pytest.mark.parametrize("shape", ["arcee", "qwen3"])
def test_import_reads_the_export_back(shape, tokenizers, tmp_path, capsys):
    tokenizer = tokenizers["char"]
    run = native_run(tmp_path / "run", model_config(shape, tokenizer.vocab_size), tokenizer)
    assert run_cli(capsys, "export", run, "--format", "hf", "--out", tmp_path / "hf")[0] == 0
    code, _, err = run_cli(capsys, "import", tmp_path / "hf", "--out", tmp_path / "back")
    assert code == 0, err
    original, back = load_run(run), load_run(tmp_path / "back")
    for key in ("position", "norm", "mlp", "qk_norm", "n_kv_head", "bias", "tie_embeddings", "rope_theta"):
        assert getattr(back.config.model, key) == getattr(original.config.model, key), key
    assert mlp_hidden_size(back.config.model) == mlp_hidden_size(original.config.model)
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        torch.testing.assert_close(back.model(ids)[0], original.model(ids)[0])
    assert back.tokenizer.encode(TEXT) == tokenizer.encode(TEXT)


def test_import_refuses_a_qk_norm_gain(tokenizers, tmp_path, capsys):
    """lmforge's QK-norm has no gain: a Qwen3 whose q_norm is not all ones would import as another model."""
    tokenizer = tokenizers["char"]
    run = native_run(tmp_path / "run", model_config("qwen3", tokenizer.vocab_size), tokenizer)
    assert run_cli(capsys, "export", run, "--format", "hf", "--out", tmp_path / "hf")[0] == 0
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    weights["model.layers.1.self_attn.q_norm.weight"][3] = 1.5
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    code, _, err = run_cli(capsys, "import", tmp_path / "hf", "--out", tmp_path / "back")
    assert_one_line_error(code, err, "layers.1.self_attn.q_norm.weight", "other than 1")
    assert not (tmp_path / "back").exists()


def test_qk_norm_epsilon_gap_is_within_tolerance_at_lmforge_init(tokenizers, tmp_path, capsys):
    """Qwen3's q_norm and k_norm add rms_norm_eps (model.norm_eps, 1e-6 by default) where lmforge's QK-norm adds
    fp32's epsilon; at lmforge's own init (std 0.02: small queries and keys, where an epsilon matters most) the
    logits still agree to 1e-4 (measured: about 7e-6; at norm_eps = 1e-5 it grows to about 9e-5)."""
    tokenizer = tokenizers["char"]
    config = model_config("qwen3", tokenizer.vocab_size)
    torch.manual_seed(0)
    model = GPT(config)
    run = write_run(tmp_path / "run", config, tokenizer.to_dict(), model.state_dict(), origin="test")
    assert run_cli(capsys, "export", run, "--format", "hf", "--out", tmp_path / "hf")[0] == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.tensor([tokenizer.encode(TEXT)])
    with torch.no_grad():
        ours, theirs = load_run(run).model(ids)[0], hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


# ----- which architecture, and the refusals -----
@pytest.mark.parametrize("options, fragments", [
    (dict(position="rope", norm="rmsnorm", mlp="relu2", qk_norm=True), ("model.qk_norm = true", "nearest exportable")),
    (dict(logit_softcap=30.0), ("model.logit_softcap = 30.0", "nearest exportable: model.logit_softcap = 0")),
    (dict(norm="rmsnorm"), ("model.norm = rmsnorm", "nearest exportable: model.norm = layernorm", "gpt2")),
    (dict(n_kv_head=2), ("model.n_kv_head = 2", "nearest exportable")),
    (dict(bias=False), ("model.bias = false", "nearest exportable: model.bias = true")),
    (dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=True),
     ("model.bias = true", "qwen3", "nearest exportable: model.bias = false")),
    (dict(arch="rnn"), ("model.arch = rnn",)),
    (dict(value_embeddings=True), ("model.value_embeddings = true", "nearest exportable")),
])
def test_architecture_refusals_name_the_option_and_the_nearest_choice(options, fragments):
    config = ModelConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_embd=16, **options)
    for fmt in ("hf", "gguf"):
        with pytest.raises(UserError) as refusal:
            architecture_for(config, fmt)
        assert all(fragment in str(refusal.value) for fragment in fragments), str(refusal.value)


def test_refused_export_writes_nothing(tokenizers, tmp_path, capsys):
    tokenizer = tokenizers["char"]
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=2, n_embd=16,
                         position="rope", norm="rmsnorm", mlp="relu2", qk_norm=True)
    run = native_run(tmp_path / "run", config, tokenizer)
    code, _, err = run_cli(capsys, "export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert_one_line_error(code, err, "model.qk_norm = true", "nearest exportable")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_export_check_reports_each_format(tokenizers, tmp_path, capsys):
    tokenizer = tokenizers["char"]
    run = native_run(tmp_path / "run", model_config("arcee", tokenizer.vocab_size), tokenizer)
    code, printed, err = run_cli(capsys, "export", "--check", run)
    assert code == 0, err
    assert printed.splitlines() == ["hf: ArceeForCausalLM", "gguf: llama.cpp 'arcee'"]
    (tmp_path / "soft.toml").write_text("[model]\nlogit_softcap = 15.0\n")
    code, printed, err = run_cli(capsys, "export", "--check", tmp_path / "soft.toml", "--format", "hf")
    assert code == 0, err
    assert printed.startswith("hf: refused: model.logit_softcap = 15.0") and len(printed.splitlines()) == 1
    code, _, err = run_cli(capsys, "export", "--check", tmp_path / "missing.toml")
    assert_one_line_error(code, err, "missing.toml")
    code, _, err = run_cli(capsys, "export", run, "--format", "hf")
    assert_one_line_error(code, err, "--out", "--check")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run", "soft.toml"]


def test_train_check_export_prints_the_report_first(tiny_data, tmp_path, capsys):
    code, printed, err = run_cli(capsys, "train", "--config", "configs/shakespeare-char.toml", "--data", tiny_data,
                                 "--out", tmp_path / "run", "--check-export", "--max-steps", "1",
                                 "--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2",
                                 "--model.block_size", "16", "--train.batch_size", "2", "--train.eval_every", "0",
                                 "--train.eval_tokens", "32", "--train.device", "cpu", "--train.compile", "false",
                                 "--quiet")
    assert code == 0, err
    assert printed.splitlines()[:2] == ["export --format hf: ArceeForCausalLM",
                                        "export --format gguf: llama.cpp 'arcee'"]


# ----- bad input -----
def test_export_of_a_corrupt_checkpoint_is_one_line(tokenizers, tmp_path, capsys):
    tokenizer = tokenizers["char"]
    run = native_run(tmp_path / "run", model_config("llama", tokenizer.vocab_size), tokenizer)
    weights = next((run / "checkpoints").iterdir()) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    code, _, err = run_cli(capsys, "export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert_one_line_error(code, err, "step_0000000 is unreadable")
    assert not (tmp_path / "hf").exists()


def test_export_refuses_an_existing_out_and_overwrites_only_its_own_files(tokenizers, tmp_path, capsys):
    tokenizer = tokenizers["char"]
    run = native_run(tmp_path / "run", model_config("gpt2", tokenizer.vocab_size), tokenizer)
    out = tmp_path / "hf"
    assert run_cli(capsys, "export", run, "--format", "hf", "--out", out)[0] == 0
    before = checksums(out)
    code, _, err = run_cli(capsys, "export", run, "--format", "hf", "--out", out)
    assert_one_line_error(code, err, "--overwrite")
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "export", run, "--format", "hf", "--out", out, "--overwrite")
    assert_one_line_error(code, err, "notes.txt")
    assert checksums(out) == {**before, "hf/notes.txt": checksums(out)["hf/notes.txt"]}
    (out / "notes.txt").unlink()
    code, _, err = run_cli(capsys, "export", run, "--format", "hf", "--out", out, "--overwrite")
    assert code == 0, err
    assert checksums(out) == before  # the same model written again, and nothing else


def test_export_on_a_full_disk_is_one_line_and_leaves_nothing(tokenizers, tmp_path):
    tokenizer = tokenizers["char"]
    run = native_run(tmp_path / "run", model_config("arcee", tokenizer.vocab_size), tokenizer)
    code, _, err = child_cli("export", run, "--format", "hf", "--out", tmp_path / "hf", file_size_limit=20_000)
    assert_one_line_error(code, err, "hf")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]


def test_export_of_a_classify_run_is_refused_naming_why(tmp_path, capsys):
    from lmforge.tasks.finetune import finetune_command
    from tests.test_finetune import make_base, task_data

    base, out = make_base(tmp_path / "base"), tmp_path / "classify"
    finetune_command(str(base), task="classify", data=str(task_data(tmp_path / "data", "classify", 4)), out=str(out),
                     method="full", quiet=True, overrides={"train.max_steps": "1", "train.eval_every": "1",
                                                           "train.device": "cpu"})
    code, _, err = run_cli(capsys, "export", out, "--format", "hf", "--out", tmp_path / "hf")
    assert_one_line_error(code, err, "classify", "not next tokens")
    assert not (tmp_path / "hf").exists()
    code, printed, err = run_cli(capsys, "export", "--check", out)
    assert code == 0, err
    assert all("refused: a classify run" in line for line in printed.splitlines())
