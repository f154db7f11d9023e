"""export --format gguf, checked in llama.cpp itself (llama-cpp-python): each architecture's file loads, tokenizes
text to lmforge's ids, computes lmforge's logits and decodes greedily to lmforge's text; f16 and q8_0 stay close;
bad input is one line and leaves nothing behind."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.config.sections import ModelConfig
from lmforge.data.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer
from lmforge.infer.generate import generate
from lmforge.infer.load import load_run
from lmforge.interop.gguf import adjacent_pairs
from lmforge.model.gpt import GPT
from lmforge.run.directory import write_run
from tests.conftest import assert_one_line_error, checksums, child_cli, require_llama_cpp, run_cli

# Newlines, runs of spaces, punctuation, digits, contractions, non-ASCII (2- and 3-byte), trailing whitespace.
F32 = 0  # GGML_TYPE_F32
TEXT = "ROMEO:\nBut soft, what light?  It's 12 o'clock — café déjà vu!\n\n  tail  \n"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ARCHITECTURES = {
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", bias=True),
    "llama": dict(position="rope", norm="rmsnorm", mlp="swiglu", bias=True, n_kv_head=2, tie_embeddings=False),
    "arcee": dict(position="rope", norm="rmsnorm", mlp="relu2", bias=False),
    # with multi-token heads, which only training reads: the export leaves them out
    "qwen3": dict(position="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, bias=False, n_kv_head=2,
                  multi_token=2),
}


def corpus_texts() -> list[str]:
    return [TEXT, "the cat sat on the mat. It's 3 o'clock, déjà vu — café.\n" * 3, "ROMEO: what light?\n" * 4,
            "SYSTEM: USER: ASSISTANT:",  # the chat template's markers, for the fine-tuning tests
            "<|endoftext|>\t\r\n the quick brown fox jumps over the lazy dog 0123456789"]


def char_tokenizer() -> CharTokenizer:
    return CharTokenizer.train(corpus_texts())


def bpe_tokenizer() -> BPETokenizer:
    return BPETokenizer.train(corpus_texts(), vocab_size=300)


def gpt2_tokenizer(monkeypatch) -> GPT2Tokenizer:
    """A small encoding with GPT-2's split pattern and rank scheme stands in for GPT-2's (whose files would need
    the network); the export recovers its merges from the ranks as it does GPT-2's."""
    import tiktoken

    ranks = {bytes([byte]): byte for byte in range(256)}
    for token in (b"th", b"the", b" t", b" the", b"at", b" c", b" cat", b"ca", b"ig", b"igh", b"ight", b" l",
                  b"\xc3\xa9", b"caf", b"caf\xc3\xa9", b"'s", b"  ", b"\n\n"):
        ranks[token] = len(ranks)
    encoding = tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": len(ranks)})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)
    return GPT2Tokenizer()


def make_run(root: Path, architecture: str, tokenizer, **options) -> Path:
    """A run of `architecture`'s shape with random weights large enough that logits differ clearly (so a
    swapped, unpermuted or misnamed tensor shows, and greedy decoding has no near-ties)."""
    shape = dict(vocab_size=tokenizer.vocab_size, block_size=64, n_layer=2, n_head=4, n_embd=32)
    config = ModelConfig(**{**shape, **ARCHITECTURES[architecture], **options})
    generator = torch.Generator().manual_seed(0)
    weights = {}
    with torch.device("meta"):
        shapes = {name: tensor.shape for name, tensor in GPT(config).state_dict().items()}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if "norm" in name and name.endswith("weight"):
            weights[name] = 1 + 0.2 * noise
        elif len(shape) == 2 and name != "wpe.weight":
            weights[name] = noise / shape[-1] ** 0.5 * (1.0 if name in ("wte.weight", "lm_head.weight") else 1.5)
        else:
            weights[name] = 0.2 * noise
    return write_run(root, config, tokenizer.to_dict(), weights, origin="test")


def export(capsys, run: Path, out: Path, *flags: str) -> str:
    code, printed, err = run_cli(capsys, "export", run, "--format", "gguf", "--out", out, *flags)
    assert code == 0, err
    return printed


def llama(path: Path, **options):
    llama_cpp = require_llama_cpp()
    # f32 keys and values in the cache (llama.cpp keeps them in f16 by default, some 1e-3 off lmforge)
    return llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=False, type_k=F32, type_v=F32,
                           **options)


def llama_logits(model, ids: list[int]) -> np.ndarray:
    model.reset()
    model.eval(ids)
    return np.array(model.scores[: len(ids)])


def llama_cpp_gelu(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's CPU GELU (GGML_GELU_FP16, set at compile time): GPT-2's tanh form read from a table of f16
    inputs and f16 outputs, so it is up to ~1e-3 off lmforge's float32 GELU."""
    table = F.gelu(x.half().float(), approximate="tanh").half().float()
    return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))


def lmforge_logits(run: Path, ids: list[int], *, f16_gelu: bool = False) -> np.ndarray:
    """lmforge's logits for `ids`; with `f16_gelu`, its GELU computed as llama.cpp's is."""
    loaded = load_run(run)
    if f16_gelu:
        for block in loaded.model.blocks:
            block.mlp.act = llama_cpp_gelu
    with torch.no_grad():
        logits, _ = loaded.model(torch.tensor([ids]))
    return logits[0, :, : loaded.config.model.vocab_size].numpy()


def greedy_ids(model, prompt: list[int], count: int) -> list[int]:
    """llama.cpp's greedy continuation of `prompt`: `count` ids (fewer if it reaches end-of-text)."""
    found = []
    for token in model.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):
        if token == model.token_eos() or len(found) == count:
            break
        found.append(token)
    return found


def test_adjacent_pairs_is_the_rotary_layout_change():
    """Rotating adjacent pairs of the reordered rows gives the half-split rotation of the original rows,
    reordered the same way: q·k, and so attention, is unchanged."""
    from lmforge.model.gpt import apply_rotary, rotary_tables

    heads, head_size, width = 2, 8, 5
    rows = torch.randn(heads * head_size, width)
    x = torch.randn(3, width)
    cos, sin = rotary_tables(head_size, 3, 10000.0)
    halves = apply_rotary((x @ rows.T).view(3, heads, head_size).transpose(0, 1), cos, sin)
    adjacent = (x @ adjacent_pairs(rows, heads).T).view(3, heads, head_size // 2, 2)
    first, second = adjacent[..., 0], adjacent[..., 1]
    cos, sin = cos[:, None], sin[:, None]  # (T, 1, D/2): the same angles for every head
    rotated = torch.stack((first * cos - second * sin, first * sin + second * cos), dim=-1).reshape(3, heads, -1)
    expected = adjacent_pairs(halves.transpose(0, 1).reshape(3, -1).T, heads).T.reshape(3, heads, -1)
    torch.testing.assert_close(rotated, expected)


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_llama_cpp_tokenizes_as_lmforge(kind, tmp_path, capsys, monkeypatch):
    tokenizer = {"char": char_tokenizer, "bpe": bpe_tokenizer}.get(kind, lambda: gpt2_tokenizer(monkeypatch))()
    run = make_run(tmp_path / "run", "arcee", tokenizer)
    export(capsys, run, tmp_path / "m.gguf")
    model = llama(tmp_path / "m.gguf", vocab_only=True)
    texts = [TEXT, "<|endoftext|> is text, here", "a  b   c\t\td\r\n", " café", "'s 's's", "1234 x", "é"]
    for text in texts:
        assert not tokenizer.unknown_characters(text)
        expected = tokenizer.encode(text)
        assert model.tokenize(text.encode(), add_bos=False, special=False) == expected, text
        assert model.detokenize(expected).decode() == tokenizer.decode(expected), text
    if kind != "char":  # byte-level tokenizers merge: the check is not only one token per character
        assert len(tokenizer.encode(TEXT)) < len(TEXT)
    else:  # U+FFFD is the unknown id's token in both; another unknown character is dropped by llama.cpp (as the
        # docs say), where lmforge, when allowed, reads it as the unknown id
        assert model.tokenize("a\ufffdb".encode(), add_bos=False) == tokenizer.encode("a\ufffdb")
        assert tokenizer.encode("a\ufffdb")[1] == tokenizer.unknown_id
        assert model.tokenize("aΩb".encode(), add_bos=False) == tokenizer.encode("ab")
    assert model.token_eos() == model.token_bos() == tokenizer.eot_id


@pytest.mark.parametrize(("architecture", "kind"), [("gpt2", "gpt2"), ("llama", "bpe"), ("arcee", "char"),
                                                    ("qwen3", "bpe")])
def test_llama_cpp_computes_lmforge_logits_and_greedy_text(architecture, kind, tmp_path, capsys, monkeypatch):
    tokenizer = {"char": char_tokenizer, "bpe": bpe_tokenizer}.get(kind, lambda: gpt2_tokenizer(monkeypatch))()
    run = make_run(tmp_path / "run", architecture, tokenizer)
    export(capsys, run, tmp_path / "m.gguf")
    model = llama(tmp_path / "m.gguf", logits_all=True)
    ids = tokenizer.encode(TEXT)[:24]
    expected = lmforge_logits(run, ids)
    assert expected.std() > 0.5  # logits spread out: a wrong tensor could not hide in the tolerance
    got = llama_logits(model, ids)
    if architecture == "gpt2":  # exact but for llama.cpp's f16 GELU table, and close with it
        np.testing.assert_allclose(got, expected, atol=3e-3, rtol=0)
        expected = lmforge_logits(run, ids, f16_gelu=True)
    np.testing.assert_allclose(got, expected, atol=1e-3, rtol=0)

    prompt = tokenizer.encode("ROMEO:")
    loaded = load_run(run)
    ours = list(generate(loaded.model, prompt, 32, temperature=0, stop_token=tokenizer.eot_id))
    theirs = greedy_ids(model, prompt, 32)
    assert tokenizer.decode(theirs) == tokenizer.decode(ours)
    assert theirs == ours


@pytest.mark.parametrize(("dtype", "tolerance"), [("f16", 0.05), ("q8_0", 0.15)])
def test_f16_and_q8_0_load_and_stay_close(dtype, tolerance, tmp_path, capsys):
    tokenizer = char_tokenizer()
    run = make_run(tmp_path / "run", "arcee", tokenizer)
    export(capsys, run, tmp_path / "f32.gguf")
    printed = export(capsys, run, tmp_path / f"{dtype}.gguf", "--dtype", dtype)
    assert (tmp_path / f"{dtype}.gguf").stat().st_size < 0.6 * (tmp_path / "f32.gguf").stat().st_size
    ids = tokenizer.encode(TEXT)[:24]
    exact = lmforge_logits(run, ids)
    got = llama_logits(llama(tmp_path / f"{dtype}.gguf", logits_all=True), ids)
    error = np.abs(got - exact).max()
    assert 0 < error < tolerance * np.abs(exact).max()  # lossy, and close
    if dtype == "q8_0":  # the char vocabulary's embedding rows hold 32 numbers: every matrix quantizes
        assert "kept in f32" not in printed


def test_q8_0_keeps_matrices_whose_rows_are_not_blocks_of_32_in_f32(tmp_path, capsys):
    import gguf

    run = make_run(tmp_path / "run", "arcee", char_tokenizer(), n_embd=64, n_head=4, mlp_hidden=40)
    printed = export(capsys, run, tmp_path / "m.gguf", "--dtype", "q8_0")
    types = {tensor.name: tensor.tensor_type.name for tensor in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "F32" and "blk.0.ffn_down.weight" in printed  # rows of 40
    assert types["blk.0.ffn_up.weight"] == types["blk.0.attn_q.weight"] == "Q8_0"  # rows of 64
    assert types["blk.0.attn_norm.weight"] == "F32"
    llama(tmp_path / "m.gguf")  # and llama.cpp loads the mix


def test_readme_snippet_continues_romeo_as_lmforge_sample(tmp_path, capsys):
    """The README's three lines (Llama(model_path=...), then a greedy completion of "ROMEO:") print what
    `lmforge sample --temperature 0` prints."""
    run = make_run(tmp_path / "run", "arcee", char_tokenizer())
    export(capsys, run, tmp_path / "demo.gguf")
    llama_cpp = require_llama_cpp()
    llm = llama_cpp.Llama(model_path=str(tmp_path / "demo.gguf"), verbose=False)
    text = llm("ROMEO:", max_tokens=32, temperature=0, repeat_penalty=1)["choices"][0]["text"]
    code, printed, err = run_cli(capsys, "sample", run, "--prompt", "ROMEO:", "--max-new-tokens", "32",
                                 "--temperature", "0", "--device", "cpu")
    assert code == 0, err
    assert len(text) > 0 and printed.startswith("ROMEO:" + text)


def test_ollama_modelfile_holds_the_chat_template(tmp_path, capsys):
    run = make_run(tmp_path / "run", "arcee", char_tokenizer())
    printed = export(capsys, run, tmp_path / "out" / "m.gguf", "--ollama")
    modelfile = (tmp_path / "out" / "Modelfile").read_text()
    assert "Modelfile" in printed and modelfile.startswith("# Written by lmforge")
    assert "\nFROM ./m.gguf\n" in modelfile
    template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S).group(1)
    assert "USER:\n{{ .Content }}\n\n" in template and template.endswith("ASSISTANT:\n")
    assert "{{ .Content }}<|endoftext|>\n\n" in template  # an assistant turn ends with end-of-text
    assert 'PARAMETER stop """<|endoftext|>"""' in modelfile and 'PARAMETER stop """\n\nUSER:\n"""' in modelfile
    assert "\nPARAMETER num_ctx 64\n" in modelfile and "\nPARAMETER repeat_penalty 1\n" in modelfile
    export(capsys, run, tmp_path / "out" / "n.gguf")
    assert (tmp_path / "out" / "Modelfile").read_text() == modelfile  # written only on request


# ----- bad input -----
def test_existing_out_is_refused_and_overwrite_replaces_only_exports(tmp_path, capsys):
    run = make_run(tmp_path / "run", "arcee", char_tokenizer())
    out = tmp_path / "m.gguf"
    export(capsys, run, out, "--ollama")
    before = checksums(out)
    code, _, err = run_cli(capsys, "export", run, "--format", "gguf", "--out", out)
    assert_one_line_error(code, err, str(out), "--overwrite")
    assert checksums(out) == before
    export(capsys, run, out, "--ollama", "--overwrite", "--dtype", "f16")
    assert checksums(out) != before
    notes = tmp_path / "notes.gguf"
    notes.write_text("my notes")
    code, _, err = run_cli(capsys, "export", run, "--format", "gguf", "--out", notes, "--overwrite")
    assert_one_line_error(code, err, "not a GGUF file")
    assert notes.read_text() == "my notes"
    (tmp_path / "Modelfile").write_text("FROM llama3\n")
    code, _, err = run_cli(capsys, "export", run, "--format", "gguf", "--out", out, "--ollama", "--overwrite")
    assert_one_line_error(code, err, "Modelfile", "not a Modelfile lmforge wrote")
    assert (tmp_path / "Modelfile").read_text() == "FROM llama3\n"


@pytest.mark.parametrize(("flags", "fragments"), [
    (["--dtype", "bf16"], ["--dtype bf16", "f32, f16, q8_0"]),
    (["--format", "hf", "--ollama"], ["--ollama", "--format gguf"]),
])
def test_wrong_flags_are_one_line(flags, fragments, tmp_path, capsys):
    run = make_run(tmp_path / "run", "arcee", char_tokenizer())
    argv = ["export", run, "--out", tmp_path / "m.gguf", *flags]
    if "--format" not in flags:
        argv += ["--format", "gguf"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize(("options", "fragments"), [
    (dict(bias=True), ["model.bias = true", "arcee", "nearest exportable: model.bias = false"]),
    (dict(logit_softcap=30.0), ["model.logit_softcap"]),
    (dict(qk_norm=True), ["model.qk_norm = true", "nearest exportable"]),
    (dict(value_embeddings=True), ["model.value_embeddings = true", "nearest exportable"]),
])
def test_a_model_llama_cpp_cannot_compute_is_refused(options, fragments, tmp_path, capsys):
    run = make_run(tmp_path / "run", "arcee", char_tokenizer(), **options)
    code, _, err = run_cli(capsys, "export", run, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "m.gguf").exists()


def test_a_bpe_tokenizer_llama_cpp_cannot_reproduce_is_refused(tmp_path, capsys):
    from tokenizers import normalizers

    tokenizer = bpe_tokenizer()
    tokenizer.hf.normalizer = normalizers.Lowercase()
    run = make_run(tmp_path / "run", "arcee", tokenizer)
    code, _, err = run_cli(capsys, "export", run, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert_one_line_error(code, err, "normalizes text", "llama.cpp cannot reproduce")
    assert not (tmp_path / "m.gguf").exists()


def test_a_corrupt_checkpoint_is_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "run", "arcee", char_tokenizer())
    weights = next(run.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    code, _, err = run_cli(capsys, "export", run, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert_one_line_error(code, err)
    assert not (tmp_path / "m.gguf").exists()


def test_a_full_disk_leaves_no_partial_file(tmp_path):
    run = make_run(tmp_path / "run", "arcee", char_tokenizer())
    code, _, err = child_cli("export", run, "--format", "gguf", "--out", tmp_path / "new" / "m.gguf", "--ollama",
                             file_size_limit=20_000)
    assert_one_line_error(code, err, "m.gguf", os.strerror(errno.EFBIG), "it needs")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]  # nor the directory it made


def test_a_file_written_there_during_the_export_is_kept_and_the_export_refused(tmp_path, capsys, monkeypatch):
    """Two exports at once (or any process) may write the output while this one works: the check is made again
    before the move, so the file that arrived first stays whole and the later export says so, exit 2, leaving no
    temporary. Each export writes its own temporary, so neither writes into the other's."""
    import lmforge.interop.gguf as gguf_module

    run = make_run(tmp_path / "run", "arcee", char_tokenizer())
    out = tmp_path / "m.gguf"
    first = run_cli(capsys, "export", run, "--format", "gguf", "--out", tmp_path / "first.gguf")
    assert first[0] == 0
    write_gguf = gguf_module.write_gguf
    temporaries = []

    def another_export_finishes_meanwhile(writer, arrays, path):
        temporaries.append(path.name)
        write_gguf(writer, arrays, path)
        (tmp_path / "first.gguf").rename(out)

    monkeypatch.setattr(gguf_module, "write_gguf", another_export_finishes_meanwhile)
    before = checksums(tmp_path)
    code, _, err = run_cli(capsys, "export", run, "--format", "gguf", "--out", out)
    assert_one_line_error(code, err, "m.gguf", "already exists", "--overwrite")
    assert checksums(tmp_path) == {name.replace("first.gguf", "m.gguf"): digest for name, digest in before.items()}
    assert temporaries == [f".m.gguf.{os.getpid()}.tmp"]


def finetune(base: Path, out: Path, task: str, records: list[dict], *flags: str) -> Path:
    import json

    from lmforge.cli import main

    data = out.parent / f"{task}-data"
    data.mkdir()
    for split in ("train", "val"):
        (data / f"{split}.jsonl").write_text("".join(json.dumps(record) + "\n" for record in records))
    assert main(["finetune", str(base), "--task", task, "--data", str(data), "--out", str(out), "--max-steps", "3",
                 "--train.eval_every", "3", "--train.device", "cpu", "--quiet", *flags]) == 0
    return out


def test_a_lora_run_exports_merged(tmp_path, capsys):
    """A LoRA run's GGUF is the base with the adapters merged in: llama.cpp computes the fine-tuned logits, not
    the base's; its Modelfile carries the run's chat template."""
    tokenizer = char_tokenizer()
    base = make_run(tmp_path / "base", "arcee", tokenizer)
    records = [{"prompt": "what light?", "response": "café"}, {"prompt": "ROMEO:", "response": "soft"}] * 4
    run = finetune(base, tmp_path / "lora", "sft", records, "--method", "lora", "--optim.lr", "0.05")
    export(capsys, run, tmp_path / "m.gguf", "--ollama")
    ids = tokenizer.encode(TEXT)[:24]
    tuned = lmforge_logits(run, ids)
    assert np.abs(tuned - lmforge_logits(base, ids)).max() > 1e-2  # the adapters changed the model
    np.testing.assert_allclose(llama_logits(llama(tmp_path / "m.gguf", logits_all=True), ids), tuned, atol=1e-3,
                               rtol=0)


def test_a_classify_run_is_refused_naming_why(tmp_path, capsys):
    base = make_run(tmp_path / "base", "arcee", char_tokenizer())
    records = [{"text": "the cat sat", "label": "cat"}, {"text": "the dog sat", "label": "dog"}] * 3
    run = finetune(base, tmp_path / "classify", "classify", records)
    code, _, err = run_cli(capsys, "export", run, "--format", "gguf", "--out", tmp_path / "m.gguf")
    assert_one_line_error(code, err, "classify", "not next tokens")
    assert not (tmp_path / "m.gguf").exists()
