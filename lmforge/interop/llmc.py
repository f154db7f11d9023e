"""llm.c's binary files: the GPT-2 model file (in and out) and the tokenizer file (out).

Model file (llm.c `train_gpt2.c`): a header of 256 little-endian int32 — magic 20240326, version (3: fp32
weights, 5: bf16), max_seq_len, vocab_size, n_layer, n_head, n_embd, padded_vocab_size, the rest 0 — then
16 tensors back to back, each grouped across layers and in Linear (out, in) layout:
wte (Vp, C; rows past vocab_size zero), wpe (T, C), ln1w, ln1b (L, C), qkvw (L, 3C, C), qkvb (L, 3C),
attprojw (L, C, C), attprojb (L, C), ln2w, ln2b (L, C), fcw (L, 4C, C), fcb (L, 4C), fcprojw (L, C, 4C),
fcprojb (L, C), lnfw, lnfb (C).

Tokenizer file: 256 int32 — magic 20240328, version 2, n_tokens, end-of-text id — then per token its
length as one uint8 and its bytes. llm.c only decodes with it (to print samples).

Only GPT-2's architecture fits: learned positions, LayerNorm with biases, tanh GELU 4x, tied head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.config.sections import ModelConfig
from lmforge.data.bytelevel import byte_characters
from lmforge.data.shards import HEADER_INTS
from lmforge.data.tokenizer import EOT_TEXT, Tokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.files import check_output, move_into_place, temporary_beside, writing
from lmforge.infer.load import load_run
from lmforge.inputs import refuse_special_file
from lmforge.model.gpt import mlp_hidden_size, norm_eps, padded_vocab_size
from lmforge.run.directory import check_import_output, write_run

MODEL_MAGIC = 20240326
VERSIONS = {3: "fp32", 5: "bf16"}
TOKENIZER_MAGIC, TOKENIZER_VERSION = 20240328, 2
GPT2_VOCAB_SIZE = 50257
# llm.c's tensor order; the per-layer ones map to lmforge's `blocks.{i}.<name>`.
LAYER_TENSORS = {"ln1w": "norm_1.weight", "ln1b": "norm_1.bias", "qkvw": "attn.qkv.weight",
                 "qkvb": "attn.qkv.bias", "attprojw": "attn.proj.weight", "attprojb": "attn.proj.bias",
                 "ln2w": "norm_2.weight", "ln2b": "norm_2.bias", "fcw": "mlp.fc.weight", "fcb": "mlp.fc.bias",
                 "fcprojw": "mlp.proj.weight", "fcprojb": "mlp.proj.bias"}
TENSOR_ORDER = ("wte", "wpe", *LAYER_TENSORS, "lnfw", "lnfb")


def pad_rows(table: torch.Tensor, rows: int) -> torch.Tensor:
    """An embedding or head matrix grown to `rows` rows with zeros (lmforge pads the vocabulary)."""
    if table.shape[0] > rows:
        raise UserError(f"a vocabulary table has {table.shape[0]} rows, more than the {rows} expected")
    padded = torch.zeros(rows, table.shape[1], dtype=torch.float32)
    padded[: table.shape[0]] = table.float()
    return padded


def tensor_shapes(max_seq_len: int, padded_vocab: int, n_layer: int, n_embd: int) -> dict[str, tuple[int, ...]]:
    """The shape of each of the 16 tensors, in file order."""
    L, C = n_layer, n_embd
    return {"wte": (padded_vocab, C), "wpe": (max_seq_len, C), "ln1w": (L, C), "ln1b": (L, C),
            "qkvw": (L, 3 * C, C), "qkvb": (L, 3 * C), "attprojw": (L, C, C), "attprojb": (L, C),
            "ln2w": (L, C), "ln2b": (L, C), "fcw": (L, 4 * C, C), "fcb": (L, 4 * C), "fcprojw": (L, C, 4 * C),
            "fcprojb": (L, C), "lnfw": (C,), "lnfb": (C,)}


def check_llmc_model(config: ModelConfig) -> None:
    """Refuse, naming the option, a model llm.c's GPT-2 cannot compute."""
    gpt2 = {"arch": "gpt", "activation": "", "position": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True,
            "tie_embeddings": True,
            "qk_norm": False, "logit_softcap": 0.0, "value_embeddings": False}
    for key, value in gpt2.items():
        if getattr(config, key) != value:
            raise UserError(f"model.{key} = {getattr(config, key)}: llm.c's GPT-2 needs {key} = {value}; "
                            "cannot export this model to llm.c")
    if (config.n_kv_head or config.n_head) != config.n_head:
        raise UserError("model.n_kv_head (grouped-query attention): llm.c's GPT-2 has none; cannot export")
    if mlp_hidden_size(config) != 4 * config.n_embd:
        raise UserError(f"model.mlp_hidden = {config.mlp_hidden}: llm.c's GPT-2 needs 4 * n_embd; cannot export")
    if norm_eps(config) != 1e-5:
        raise UserError(f"model.norm_eps = {config.norm_eps}: llm.c's LayerNorm uses 1e-5; cannot export")


def tensor_bytes(tensor: torch.Tensor, dtype: str) -> bytes:
    if dtype == "bf16":  # the raw 16 bits of each bfloat16, little-endian
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
    return tensor.to(torch.float32).contiguous().numpy().astype("<f4").tobytes()


def model_bytes(config: ModelConfig, weights: dict[str, torch.Tensor], dtype: str) -> bytes:
    check_llmc_model(config)
    version = {name: number for number, name in VERSIONS.items()}[dtype]
    padded = padded_vocab_size(config.vocab_size)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = (MODEL_MAGIC, version, config.block_size, config.vocab_size, config.n_layer, config.n_head,
                  config.n_embd, padded)
    wte = weights["wte.weight"].clone()
    wte[config.vocab_size :] = 0  # llm.c expects the padding rows to be zero
    tensors = {"wte": wte, "wpe": weights["wpe.weight"], "lnfw": weights["norm_f.weight"],
               "lnfb": weights["norm_f.bias"]}
    for short, name in LAYER_TENSORS.items():
        tensors[short] = torch.stack([weights[f"blocks.{i}.{name}"] for i in range(config.n_layer)])
    return header.tobytes() + b"".join(tensor_bytes(tensors[name], dtype) for name in TENSOR_ORDER)


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """Each token id's bytes, for llm.c's decoder (which needs 1 to 255 bytes per token)."""
    data = tokenizer.to_dict()
    if data["kind"] == "gpt2":
        pieces = [tokenizer.encoding.decode_single_token_bytes(i) for i in range(tokenizer.vocab_size)]
    elif data["kind"] == "char":
        pieces = [char.encode("utf-8") for char in data["chars"]] + [EOT_TEXT.encode(), "\ufffd".encode()]
    else:
        pieces = bpe_token_bytes(tokenizer)
    # A piece llm.c cannot hold is shown as the replacement character: the file only serves printing.
    return [piece if 0 < len(piece) < 256 else "\ufffd".encode() for piece in pieces]


def bpe_token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """Byte-level BPE tokens spell their bytes with GPT-2's byte-to-character table: invert it. Special
    tokens and other tokenizers' pieces are decoded as text."""
    hf = tokenizer.hf
    byte_level = (tokenizer.to_dict()["hf"].get("decoder") or {}).get("type") == "ByteLevel"
    special = {token.content for token in hf.get_added_tokens_decoder().values()}
    to_byte = {char: byte for byte, char in enumerate(byte_characters())}
    pieces = []
    for index in range(tokenizer.vocab_size):
        token = hf.id_to_token(index) or ""
        if byte_level and token not in special and all(char in to_byte for char in token):
            pieces.append(bytes(to_byte[char] for char in token))
        else:
            pieces.append(token.encode("utf-8") if token in special else hf.decode([index]).encode("utf-8"))
    return pieces


def tokenizer_bytes(tokenizer: Tokenizer) -> bytes:
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = TOKENIZER_MAGIC, TOKENIZER_VERSION, tokenizer.vocab_size, tokenizer.eot_id
    return header.tobytes() + b"".join(bytes([len(piece)]) + piece for piece in token_bytes(tokenizer))


def tokenizer_path(model_path: Path) -> Path:
    """Where the tokenizer file goes beside the model file: gpt2_124M.bin -> gpt2_124M_tokenizer.bin."""
    return model_path.with_name(f"{model_path.stem}_tokenizer.bin")


def check_llmc_output(path: Path, magic: int, overwrite: bool, inputs: tuple[str | Path, ...] = ()) -> None:
    """An llm.c output file may replace only a file of the same kind (its magic number): never another file."""
    check_output(path, overwrite, directory=False, inputs=inputs)
    if path.is_file():
        with open(path, "rb") as file:
            head = file.read(4)
        if len(head) < 4 or int(np.frombuffer(head, dtype="<i4")[0]) != magic:
            raise UserError(f"{path} is not an llm.c file lmforge writes (no magic {magic}); --overwrite "
                            "replaces only those: move it away or choose another --out")


def export_llmc(run: str | Path, out: str | Path, *, dtype: str = "fp32", overwrite: bool = False
                ) -> tuple[Path, Path]:
    """Write the run's model as llm.c's model file, and its tokenizer beside it; returns both paths. Both
    are written in full before either replaces anything, so a failure leaves the earlier pair as it was."""
    if dtype not in VERSIONS.values():
        raise UserError(f"unknown --dtype '{dtype}'; choose one of {', '.join(VERSIONS.values())}")
    out = Path(out)
    check_llmc_output(out, MODEL_MAGIC, overwrite, inputs=(run,))  # first: it refuses a path with no file name
    vocab_file = tokenizer_path(out)
    check_llmc_output(vocab_file, TOKENIZER_MAGIC, overwrite, inputs=(run,))
    loaded = load_run(run)
    model, config, tokenizer = loaded.model, loaded.config, loaded.tokenizer
    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    contents = {out: model_bytes(config.model, weights, dtype), vocab_file: tokenizer_bytes(tokenizer)}
    temporaries = {path: temporary_beside(path) for path in contents}
    for path, data in contents.items():
        with writing(path, *temporaries.values(), needed=len(data)):
            path.parent.mkdir(parents=True, exist_ok=True)
            temporaries[path].write_bytes(data)
    for path, temporary in temporaries.items():
        with writing(path, *temporaries.values()):
            move_into_place(temporary, path)
    return out, vocab_file


def read_llmc_model(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and lmforge weights held by an llm.c model file, after checking its header and size."""
    refuse_special_file(path, "llm.c model file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    if len(data) < HEADER_INTS * 4:
        raise UserError(f"{path} is not an llm.c model file: shorter than the 1024-byte header")
    header = np.frombuffer(data, dtype="<i4", count=HEADER_INTS)
    magic, version, max_seq_len, vocab, n_layer, n_head, n_embd, padded = (int(v) for v in header[:8])
    if magic != MODEL_MAGIC:
        raise UserError(f"{path} is not an llm.c model file (magic {magic}, expected {MODEL_MAGIC})")
    if version not in VERSIONS:
        raise UserError(f"{path}: llm.c model version {version} is not supported (3: fp32, 5: bf16)")
    if min(max_seq_len, vocab, n_layer, n_head, n_embd) <= 0 or padded < vocab:
        raise UserError(f"{path}: its header is corrupt ({header[:8].tolist()})")
    shapes = tensor_shapes(max_seq_len, padded, n_layer, n_embd)
    itemsize = 4 if VERSIONS[version] == "fp32" else 2
    expected = HEADER_INTS * 4 + sum(int(np.prod(shape)) for shape in shapes.values()) * itemsize
    if len(data) != expected:
        raise UserError(f"{path} is corrupt: its header describes {expected} bytes but the file has {len(data)}")
    tensors, offset = {}, HEADER_INTS * 4
    for name, shape in shapes.items():
        count = int(np.prod(shape))
        if itemsize == 4:
            values = torch.from_numpy(np.frombuffer(data, dtype="<f4", count=count, offset=offset).copy())
        else:
            raw = torch.from_numpy(np.frombuffer(data, dtype="<i2", count=count, offset=offset).copy())
            values = raw.view(torch.bfloat16).float()
        tensors[name] = values.reshape(shape)
        offset += count * itemsize
    config = ModelConfig(vocab_size=vocab, block_size=max_seq_len, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         mlp="gelu", norm="layernorm", position="learned", tie_embeddings=True, bias=True)
    weights = {"wte.weight": pad_rows(tensors["wte"][:vocab], padded_vocab_size(vocab)), "wpe.weight": tensors["wpe"],
               "norm_f.weight": tensors["lnfw"], "norm_f.bias": tensors["lnfb"]}
    for short, name in LAYER_TENSORS.items():
        for i in range(n_layer):
            weights[f"blocks.{i}.{name}"] = tensors[short][i]
    return config, weights


def import_llmc(source: str | Path, out: str | Path, *, tokenizer: str | Path | None = None,
                overwrite: bool = False) -> Path:
    """Write an lmforge run holding the llm.c model file at `source`. The file carries no tokenizer: GPT-2's
    vocabulary size means the gpt2 kind, otherwise --tokenizer must name one."""
    source = Path(source)
    inputs = [path for path in (source, tokenizer) if path is not None]
    check_import_output(out, overwrite, inputs)
    config, weights = read_llmc_model(source)
    if tokenizer is not None:
        tokenizer_dict = load_tokenizer(tokenizer).to_dict()
    elif config.vocab_size == GPT2_VOCAB_SIZE:
        tokenizer_dict = {"kind": "gpt2", "vocab_size": GPT2_VOCAB_SIZE, "eot_id": GPT2_VOCAB_SIZE - 1}
    else:
        raise UserError(f"{source} has a vocabulary of {config.vocab_size} tokens, not GPT-2's, and llm.c model "
                        "files carry no tokenizer: pass --tokenizer with the lmforge tokenizer.json it was trained "
                        "with (or a run or data directory holding it)")
    return write_run(out, config, tokenizer_dict, weights, origin=str(source), overwrite=overwrite, inputs=inputs)
