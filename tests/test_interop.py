"""Interoperability: Hugging Face GPT-2 and Llama in and out (every exported architecture against transformers:
test_export_hf.py), llm.c's model and tokenizer files, and training
from imported weights on llm.c shards made elsewhere. Tiny random models built here; nothing downloaded."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.cli import main
from lmforge.config.sections import ModelConfig
from lmforge.data.shards import ShardWriter
from lmforge.data.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer
from lmforge.infer.generate import generate
from lmforge.infer.load import load_run
from lmforge.model.gpt import GPT
from lmforge.run.directory import write_run
from tests.conftest import records, run_cli

transformers = pytest.importorskip("transformers")

HF_VOCAB = 300  # not a multiple of 64: lmforge pads its tables to 320 rows
TINY_TRAIN = ["--model.n_layer", "1", "--model.n_embd", "32", "--model.n_head", "2", "--model.block_size", "16",
              "--train.batch_size", "4", "--max-steps", "2", "--train.eval_every", "0", "--train.eval_tokens", "64",
              "--train.device", "cpu", "--train.precision", "fp32", "--train.compile", "false",
              "--train.warmup_steps", "1", "--quiet"]
TEXT = "the cat sat on a mat . we read books , naïve café!\n"


def randomize(model: torch.nn.Module, std: float = 0.3) -> None:
    """Random values in every tensor (norm weights and biases included), so a swapped or untransposed
    tensor cannot go unnoticed."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def bpe(tiny_corpus) -> BPETokenizer:
    texts = [path.read_text() for path in sorted(tiny_corpus.iterdir())]
    return BPETokenizer.train(texts, vocab_size=HF_VOCAB)


def hf_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(vocab_size=HF_VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                     eos_token_id=None, bos_token_id=None)
    return transformers.GPT2LMHeadModel(config)


def hf_llama() -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=HF_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                                      rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=False,
                                      eos_token_id=None, bos_token_id=None)
    return transformers.LlamaForCausalLM(config)


def import_tiny(root: Path, family: str, bpe: BPETokenizer) -> SimpleNamespace:
    """A tiny random transformers model saved with a tokenizer, and the lmforge run `import` made of it."""
    hf = {"gpt2": hf_gpt2, "llama": hf_llama}[family]()
    randomize(hf)
    hf.eval().save_pretrained(root / "hf")
    bpe.hf.save(str(root / "hf" / "tokenizer.json"))
    assert main(["import", str(root / "hf"), "--out", str(root / "run")]) == 0
    return SimpleNamespace(family=family, hf=hf, hf_dir=root / "hf", run=root / "run", root=root)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def imported(request, tmp_path_factory, bpe) -> SimpleNamespace:
    return import_tiny(tmp_path_factory.mktemp(f"hf-{request.param}"), request.param, bpe)


def test_import_matches_transformers_logits(imported, bpe):
    loaded = load_run(imported.run)
    model, config, tokenizer = loaded.model, loaded.config, loaded.tokenizer
    assert config.model.position == ("learned" if imported.family == "gpt2" else "rope")
    tokens = torch.randint(0, HF_VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(tokens)
        theirs = imported.hf(tokens).logits
    torch.testing.assert_close(ours, theirs)
    assert tokenizer.kind == "bpe" and tokenizer.encode(TEXT) == bpe.encode(TEXT)  # tokenizer.json carried over


def test_greedy_generation_matches_transformers(imported):
    model = load_run(imported.run).model
    prompt = [5, 17, 42, 99]
    ours = list(generate(model, prompt, 20, temperature=0))
    with torch.no_grad():
        output = imported.hf.generate(torch.tensor([prompt]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    theirs = output[0, len(prompt):].tolist()
    assert len(ours) == 20
    assert ours == theirs


def test_imported_model_exports_back_to_transformers(imported, capsys):
    out = imported.root / "exported"
    code, _, err = run_cli(capsys, "export", imported.run, "--format", "hf", "--out", out)
    assert code == 0, err
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(imported.hf)
    tokens = torch.randint(0, HF_VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, imported.hf(tokens).logits)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.encode(TEXT) == load_tokenizer(imported.run).encode(TEXT)


def native_run(root: Path, model_config: ModelConfig, tokenizer) -> Path:
    """An lmforge model with random weights everywhere (padding rows zero), written as a run."""
    torch.manual_seed(0)
    model = GPT(model_config)
    randomize(model)
    with torch.no_grad():
        model.wte.weight[model_config.vocab_size :] = 0
        if model.lm_head is not None:
            model.lm_head.weight[model_config.vocab_size :] = 0
    return write_run(root, model_config, tokenizer.to_dict(), model.state_dict(), origin="test")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory, tiny_corpus) -> SimpleNamespace:
    """prepare --tokenizer bpe, then a two-step training run on it, through the command line."""
    root = tmp_path_factory.mktemp("bpe")
    assert main(["prepare", "--source", str(tiny_corpus), "--tokenizer", "bpe", "--vocab-size", "300",
                 "--val-fraction", "0.2", "--workers", "1", "--out", str(root / "data"), "--quiet"]) == 0
    (root / "defaults.toml").write_text("")
    assert main(["train", "--config", str(root / "defaults.toml"), "--data", str(root / "data"),
                 "--out", str(root / "run"), *TINY_TRAIN]) == 0
    return SimpleNamespace(root=root, data=root / "data", run=root / "run")


def test_prepared_bpe_tokenizer_survives_hf_export(bpe_run, capsys):
    out = bpe_run.root / "hf"
    code, _, err = run_cli(capsys, "export", bpe_run.run, "--format", "hf", "--out", out)
    assert code == 0, err
    ours = load_tokenizer(bpe_run.data)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = ours.encode(TEXT)
    assert len(ids) < len(TEXT)  # merges were learned and are used
    assert hf_tokenizer.encode(TEXT) == ids
    assert hf_tokenizer.decode(ids) == TEXT
    assert hf_tokenizer.eos_token_id == ours.eot_id
    model = load_run(bpe_run.run).model
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    window = torch.tensor([ids[:16]])  # the run's block_size
    with torch.no_grad():
        torch.testing.assert_close(hf(window).logits, model(window)[0])


# ----- llm.c -----
LLMC_ORDER = [  # the specification: name, shape (L layers, C width, Vp padded vocab, T context), lmforge name
    ("wte", "Vp C", "wte.weight"), ("wpe", "T C", "wpe.weight"), ("ln1w", "L C", "norm_1.weight"),
    ("ln1b", "L C", "norm_1.bias"), ("qkvw", "L 3C C", "attn.qkv.weight"), ("qkvb", "L 3C", "attn.qkv.bias"),
    ("attprojw", "L C C", "attn.proj.weight"), ("attprojb", "L C", "attn.proj.bias"),
    ("ln2w", "L C", "norm_2.weight"), ("ln2b", "L C", "norm_2.bias"), ("fcw", "L 4C C", "mlp.fc.weight"),
    ("fcb", "L 4C", "mlp.fc.bias"), ("fcprojw", "L C 4C", "mlp.proj.weight"), ("fcprojb", "L C", "mlp.proj.bias"),
    ("lnfw", "C", "norm_f.weight"), ("lnfb", "C", "norm_f.bias"),
]


@pytest.fixture
def gpt2_run(tmp_path) -> tuple[Path, CharTokenizer]:
    tokenizer = CharTokenizer("\n !,.?abcdefghijklmnopqrstuvwxyzéï")
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return native_run(tmp_path / "run", config, tokenizer), tokenizer


def expected_llmc_tensors(run: Path) -> list[tuple[str, torch.Tensor]]:
    loaded = load_run(run)
    model, config = loaded.model, loaded.config
    weights = model.state_dict()
    sizes = {"L": config.model.n_layer, "C": config.model.n_embd, "T": config.model.block_size, "Vp": 64}
    tensors = []
    for name, shape, ours in LLMC_ORDER:
        if name in ("wte", "wpe", "lnfw", "lnfb"):
            tensor = weights[ours]
        else:
            tensor = torch.stack([weights[f"blocks.{i}.{ours}"] for i in range(sizes["L"])])
        dims = [int(part[:-1]) * sizes["C"] if part.endswith("C") and part != "C" else sizes[part]
                for part in shape.split()]
        assert list(tensor.shape) == dims, name
        tensors.append((name, tensor))
    return tensors


def test_llmc_export_header_and_tensor_order(gpt2_run, tmp_path, capsys):
    run, tokenizer = gpt2_run
    code, out, err = run_cli(capsys, "export", run, "--format", "llmc", "--out", tmp_path / "model.bin")
    assert code == 0, err
    data = (tmp_path / "model.bin").read_bytes()
    header = np.frombuffer(data[:1024], dtype="<i4")
    assert header[:8].tolist() == [20240326, 3, 16, tokenizer.vocab_size, 2, 4, 32, 64]
    assert not header[8:].any()
    offset = 1024
    for name, tensor in expected_llmc_tensors(run):
        count = tensor.numel()
        values = np.frombuffer(data, dtype="<f4", count=count, offset=offset).reshape(tensor.shape)
        np.testing.assert_array_equal(values, tensor.numpy(), err_msg=name)
        if name == "wte":
            assert not values[tokenizer.vocab_size :].any()  # padding rows zero
        offset += 4 * count
    assert offset == len(data)

    vocab = (tmp_path / "model_tokenizer.bin").read_bytes()
    header = np.frombuffer(vocab[:1024], dtype="<i4")
    assert header[:4].tolist() == [20240328, 2, tokenizer.vocab_size, tokenizer.eot_id]
    pieces, offset = [], 1024
    while offset < len(vocab):
        length = vocab[offset]
        pieces.append(vocab[offset + 1 : offset + 1 + length])
        offset += 1 + length
    assert pieces == [char.encode() for char in tokenizer.chars] + [b"<|endoftext|>", "\ufffd".encode()]


def test_llmc_bf16_export_and_round_trips(gpt2_run, tmp_path, capsys):
    run, tokenizer = gpt2_run
    original = load_run(run).model.state_dict()
    for dtype in ("fp32", "bf16"):
        model_file = tmp_path / f"model_{dtype}.bin"
        assert run_cli(capsys, "export", run, "--format", "llmc", "--dtype", dtype, "--out", model_file)[0] == 0
        header = np.frombuffer(model_file.read_bytes()[:1024], dtype="<i4")
        assert header[1] == {"fp32": 3, "bf16": 5}[dtype]
        tensors = expected_llmc_tensors(run)
        assert model_file.stat().st_size == 1024 + {"fp32": 4, "bf16": 2}[dtype] * sum(t.numel() for _, t in tensors)
        code, _, err = run_cli(capsys, "import", model_file, "--out", tmp_path / f"back_{dtype}", "--tokenizer", run)
        assert code == 0, err
        loaded = load_run(tmp_path / f"back_{dtype}")
        back, config, back_tokenizer = loaded.model, loaded.config, loaded.tokenizer
        assert back_tokenizer.to_dict() == tokenizer.to_dict()
        assert config.model == load_run(run).config.model
        for name, tensor in back.state_dict().items():
            expected = original[name] if dtype == "fp32" else original[name].to(torch.bfloat16).float()
            assert torch.equal(tensor, expected), name


def test_llmc_tokenizer_file_spells_bpe_tokens(bpe_run, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", bpe_run.run, "--format", "llmc", "--out", tmp_path / "m.bin")
    assert code == 0, err
    data = (tmp_path / "m_tokenizer.bin").read_bytes()
    tokenizer = load_tokenizer(bpe_run.run)
    pieces, offset = [], 1024
    while offset < len(data):
        pieces.append(data[offset + 1 : offset + 1 + data[offset]])
        offset += 1 + data[offset]
    assert len(pieces) == tokenizer.vocab_size
    assert b"".join(pieces[i] for i in tokenizer.encode(TEXT)) == TEXT.encode()
    assert pieces[tokenizer.eot_id] == b"<|endoftext|>"


def test_import_reads_pytorch_pickles(imported, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((imported.hf_dir / name).read_bytes())
    torch.save(load_file(imported.hf_dir / "model.safetensors"), folder / "pytorch_model.bin")
    assert main(["import", str(folder), "--out", str(tmp_path / "run")]) == 0
    ours, theirs = load_run(tmp_path / "run").model.state_dict(), load_run(imported.run).model.state_dict()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


# ----- refusals -----
def test_export_refuses_what_the_format_cannot_hold(tmp_path, capsys):
    tokenizer = CharTokenizer("abc")
    qk = native_run(tmp_path / "qk", ModelConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=16,
                                                  qk_norm=True), tokenizer)
    code, _, err = run_cli(capsys, "export", qk, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 2 and "model.qk_norm" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "hf").exists()
    rope = native_run(tmp_path / "rope", ModelConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=16,
                                                      position="rope", norm="rmsnorm", mlp="swiglu"), tokenizer)
    code, _, err = run_cli(capsys, "export", rope, "--format", "llmc", "--out", tmp_path / "m.bin")
    assert code == 2 and "model.position = rope" in err
    relu = native_run(tmp_path / "relu", ModelConfig(vocab_size=5, block_size=8, n_layer=1, n_head=2, n_embd=16,
                                                      mlp="relu2"), tokenizer)
    code, _, err = run_cli(capsys, "export", relu, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 2 and "model.mlp = relu2" in err


def test_import_refusals(tmp_path, capsys, monkeypatch, gpt2_run):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    code, _, err = run_cli(capsys, "import", "gpt2", "--out", tmp_path / "gpt2")
    assert code == 2 and "'gpt2'" in err and "--local-dir" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "gpt2").exists()

    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    code, _, err = run_cli(capsys, "import", tmp_path / "mistral", "--out", tmp_path / "m")
    assert code == 2 and "mistral" in err

    run, _ = gpt2_run
    assert run_cli(capsys, "export", run, "--format", "llmc", "--out", tmp_path / "model.bin")[0] == 0
    code, _, err = run_cli(capsys, "import", tmp_path / "model.bin", "--out", tmp_path / "no_tokenizer")
    assert code == 2 and "--tokenizer" in err  # not GPT-2's vocabulary, and the file carries no tokenizer
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-4])
    code, _, err = run_cli(capsys, "import", tmp_path / "cut.bin", "--out", tmp_path / "cut", "--tokenizer", run)
    assert code == 2 and "corrupt" in err
    code, _, err = run_cli(capsys, "export", run, "--format", "llmc", "--out", tmp_path / "model.bin")
    assert code == 2 and "--overwrite" in err


# ----- training from imported weights on llm.c shards -----
def test_train_init_from_on_bare_llmc_shards(bpe, tiny_corpus, tmp_path, capsys):
    imported = import_tiny(tmp_path, "gpt2", bpe)
    shards = tmp_path / "shards"  # llm.c's names, no meta.json, no tokenizer.json
    shards.mkdir()
    texts = [path.read_text() for path in sorted(tiny_corpus.iterdir())]
    for split, documents in (("train", texts[:20]), ("val", texts[20:])):
        with ShardWriter(shards, f"fineweb_{split}", bpe.vocab_size, 10**6) as writer:
            for text in documents:
                writer.write(np.array([bpe.eot_id, *bpe.encode(text)]))
    out = tmp_path / "tuned"
    code, _, err = run_cli(capsys, "train", "--init-from", imported.run, "--data", shards, "--out", out,
                           "--max-steps", "2", "--optim.lr", "0", "--train.batch_size", "2", "--train.eval_tokens",
                           "64", "--train.device", "cpu", "--train.precision", "fp32", "--train.compile", "false",
                           "--train.eval_every", "0", "--quiet")
    assert code == 0, err
    start = load_file(next((imported.run / "checkpoints").iterdir()) / "model.safetensors")
    end = load_file(sorted((out / "checkpoints").iterdir())[-1] / "model.safetensors")
    assert start.keys() == end.keys()
    assert all(torch.equal(start[name], end[name]) for name in start)  # lr 0: training began from them
    assert load_tokenizer(out).to_dict() == load_tokenizer(imported.run).to_dict()
    evals = records(out, "eval")
    assert evals and evals[-1]["val_bpb"] is None and np.isfinite(evals[-1]["val_loss"])
    code, printed, err = run_cli(capsys, "eval", out, "--data", shards, "--device", "cpu")
    assert code == 0, err
    result = json.loads(printed)
    assert result["bpb"] is None and result["loss"] == pytest.approx(evals[-1]["val_loss"], rel=1e-5)

    code, _, err = run_cli(capsys, "train", "--init-from", imported.run, "--data", shards, "--out", tmp_path / "x",
                           "--model.n_layer", "1", "--quiet")
    assert code == 2 and "model.n_layer is 2 there, 1 here" in err


def test_gpt2_kind_tokenizer_exports_as_byte_level_bpe(tmp_path, capsys, monkeypatch):
    """The gpt2 kind is tiktoken's, which keeps ranks but no merges: the export recovers the merges. A small
    encoding with GPT-2's split pattern stands in for GPT-2's (whose files would need the network)."""
    import tiktoken

    from lmforge.data.tokenizer import GPT2Tokenizer

    ranks = {bytes([byte]): byte for byte in range(256)}
    for token in (b"th", b"the", b" t", b" the", b"at", b" c", b" cat", b"ca"):
        ranks[token] = len(ranks)
    gpt2_pattern = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
    encoding = tiktoken.Encoding("gpt2", pat_str=gpt2_pattern, mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": len(ranks)})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: encoding)
    tokenizer = GPT2Tokenizer()
    config = ModelConfig(vocab_size=tokenizer.vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16)
    run = native_run(tmp_path / "run", config, tokenizer)
    code, _, err = run_cli(capsys, "export", run, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0, err
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "the cat sat, the cathedral's 12 cats thé\n"
    assert hf_tokenizer.encode(text) == tokenizer.encode(text)
    assert len(tokenizer.encode(text)) < len(text.encode())
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id == 264
