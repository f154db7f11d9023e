"""Hugging Face transformers directories in and out: GPT-2 (`GPT2LMHeadModel`) and Llama (`LlamaForCausalLM`).

Import reads `config.json`, the weights (`model.safetensors`, sharded or not, or `pytorch_model.bin`) and
`tokenizer.json`, and writes an lmforge run. Export writes a directory that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load. lmforge itself never
needs transformers: both directions are a renaming of tensors.

The renaming, per layer i (ours ← theirs):
  GPT-2: norm_1 ← h.i.ln_1, attn.qkv ← h.i.attn.c_attn, attn.proj ← h.i.attn.c_proj, norm_2 ← h.i.ln_2,
         mlp.fc ← h.i.mlp.c_fc, mlp.proj ← h.i.mlp.c_proj. GPT-2's Conv1D stores weights (in, out), so
         every matrix is transposed.
  Llama: norm_1 ← input_layernorm, attn.qkv ← q_proj, k_proj, v_proj stacked by rows, attn.proj ← o_proj,
         norm_2 ← post_attention_layernorm, mlp.fc ← gate_proj, up_proj stacked (silu(gate) * up),
         mlp.proj ← down_proj. Rotary embeddings rotate (first half, second half) channel pairs in both
         (transformers' rotate_half), and key/value head j serves query heads j*g ... (j+1)*g - 1 in both.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.config.sections import ModelConfig
from lmforge.data.tokenizer import EOT_TEXT, BPETokenizer, Tokenizer, load_tokenizer
from lmforge.errors import UserError
from lmforge.files import check_output, load_safetensors, remove_path, replace_output, writing
from lmforge.infer.load import load_run
from lmforge.inputs import refuse_special_file
from lmforge.interop.llmc import byte_characters, pad_rows
from lmforge.model.gpt import mlp_hidden_size, norm_eps, padded_vocab_size
from lmforge.run.directory import check_import_output, write_run

GPT2_LAYER = (("norm_1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
              ("norm_2", "ln_2", False), ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True))
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What export writes into its directory: all that --overwrite may replace there.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


# ----- reading a Hugging Face directory -----
def resolve_source(source: str) -> Path:
    """A local model directory as given, or a hub name downloaded into the local Hugging Face cache."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or source.count("/") > 1 or source.startswith((".", "~")):
        raise UserError(f"{source} is not a model directory (a folder with config.json and the weights)")
    return download(source)


def download(name: str) -> Path:
    how = (f"on a machine with network access run `huggingface-cli download {name} --local-dir DIR` (or "
           f"`git clone https://huggingface.co/{name}`), copy DIR here and pass its path instead of '{name}'")
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        raise UserError(f"'{name}' is not a local directory and huggingface_hub is not installed; {how}") from None
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"'{name}' is not a local directory and the Hugging Face hub is offline "
                        f"(HF_HUB_OFFLINE); {how}")
    patterns = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "vocab.json", "merges.txt"]
    try:
        folder = Path(snapshot_download(name, allow_patterns=patterns + ["*.safetensors", "*.safetensors.index.json"]))
        if not any(folder.glob("*.safetensors")):  # older repositories hold only PyTorch pickles
            folder = Path(snapshot_download(name, allow_patterns=patterns + ["pytorch_model*.bin", "*.bin.index.json"]))
    except Exception as err:  # no network, unknown name, gated model: all end the same way for the user
        raise UserError(f"could not download '{name}' from the Hugging Face hub ({type(err).__name__}); {how}") \
            from None
    return folder


def read_json(path: Path) -> dict:
    refuse_special_file(path, "model config")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path} not found: {path.parent} is not a Hugging Face model directory") from None
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err})") from None
    except RecursionError:
        raise UserError(f"{path}: JSON nested too deeply to read") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the model, from safetensors (one file or an index of shards) or a PyTorch pickle."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (folder / index_name).is_file():
            files = sorted(set(read_json(folder / index_name).get("weight_map", {}).values()))
        elif (folder / single).is_file():
            files = [single]
        else:
            continue
        tensors: dict[str, torch.Tensor] = {}
        for name in files:
            if name.endswith(".safetensors"):
                tensors.update(load_safetensors(folder / name, f"weights file {folder / name}"))
                continue
            try:
                tensors.update(torch.load(folder / name, map_location="cpu", weights_only=True))
            except EOFError:
                raise UserError(f"weights file {folder / name} is truncated") from None
            except pickle.UnpicklingError:  # torch's message suggests weights_only=False: unsafe, and no help here
                raise UserError(f"weights file {folder / name} is not a PyTorch file of tensors") from None
            except (OSError, RuntimeError) as err:
                raise UserError(f"weights file {folder / name} is unreadable ({err})") from None
        return tensors
    raise UserError(f"no weights in {folder} (model.safetensors or pytorch_model.bin)")


def strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Names without the base model's prefix (`transformer.`, `model.`), which some checkpoints omit."""
    return {name.removeprefix(prefix): tensor for name, tensor in tensors.items()}


def take(tensors: dict[str, torch.Tensor], name: str, origin: Path) -> torch.Tensor:
    if name not in tensors:
        raise UserError(f"{origin}: tensor '{name}' missing from the weights")
    tensor = tensors[name]
    # Converted as they are, integer weights (a quantized checkpoint) would import as a model that emits noise.
    if not tensor.is_floating_point():
        raise UserError(f"{origin}: tensor '{name}' holds {str(tensor.dtype).removeprefix('torch.')} numbers "
                        "(a quantized checkpoint?); lmforge imports floating-point weights only")
    return tensor.float()


def refuse_unless(condition: bool, origin: Path, what: str) -> None:
    if not condition:
        raise UserError(f"{origin}: {what} has no lmforge equivalent; cannot import this model")


def require_sizes(cfg: dict, origin: Path, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> None:
    """config.json's sizes must be positive whole numbers (null allowed for the optional ones), checked
    before any arithmetic on them."""
    for name in required + optional:
        value = cfg.get(name)
        if value is None and name in optional:
            continue
        if name not in cfg:
            raise UserError(f"{origin / 'config.json'} lacks '{name}'")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{origin / 'config.json'}: '{name}' must be a positive whole number, got "
                            f"{json.dumps(value)}")


def gpt2_from_hf(cfg: dict, tensors: dict[str, torch.Tensor], origin: Path
                 ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    refuse_unless(cfg.get("activation_function", "gelu_new") in TANH_GELUS, origin,
                  f"activation_function '{cfg.get('activation_function')}' (lmforge's GELU is the tanh form)")
    refuse_unless(not cfg.get("scale_attn_by_inverse_layer_idx", False), origin, "scale_attn_by_inverse_layer_idx")
    refuse_unless(cfg.get("scale_attn_weights", True), origin, "scale_attn_weights = false")
    config = ModelConfig(vocab_size=cfg["vocab_size"], block_size=cfg["n_positions"], n_layer=cfg["n_layer"],
                         n_head=cfg["n_head"], n_embd=cfg["n_embd"], mlp="gelu", mlp_hidden=cfg.get("n_inner") or 0,
                         norm="layernorm", norm_eps=cfg.get("layer_norm_epsilon", 1e-5), position="learned",
                         tie_embeddings=cfg.get("tie_word_embeddings", True), bias=True)
    head = tensors.get("lm_head.weight")
    tensors = strip_prefix(tensors, "transformer.")
    rows = padded_vocab_size(config.vocab_size)
    weights = {"wte.weight": pad_rows(take(tensors, "wte.weight", origin), rows),
               "wpe.weight": take(tensors, "wpe.weight", origin),
               "norm_f.weight": take(tensors, "ln_f.weight", origin),
               "norm_f.bias": take(tensors, "ln_f.bias", origin)}
    if not config.tie_embeddings:
        refuse_unless(head is not None, origin, "an untied head without lm_head.weight")
        weights["lm_head.weight"] = pad_rows(head.float(), rows)
    for i in range(config.n_layer):
        for ours, theirs, transpose in GPT2_LAYER:
            weight = take(tensors, f"h.{i}.{theirs}.weight", origin)
            weights[f"blocks.{i}.{ours}.weight"] = weight.t().contiguous() if transpose else weight
            weights[f"blocks.{i}.{ours}.bias"] = take(tensors, f"h.{i}.{theirs}.bias", origin)
    return config, weights


def rope_theta(cfg: dict, origin: Path) -> float:
    """The rotary base, from `rope_parameters` (transformers 5) or `rope_theta` (earlier); scaled variants
    (llama3, yarn, linear, ...) change the frequencies and are refused."""
    parameters = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = parameters.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    refuse_unless(kind == "default", origin, f"rope scaling '{kind}'")
    return float(parameters.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def llama_from_hf(cfg: dict, tensors: dict[str, torch.Tensor], origin: Path
                  ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    width, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    refuse_unless(cfg.get("hidden_act", "silu") == "silu", origin, f"hidden_act '{cfg.get('hidden_act')}'")
    refuse_unless(cfg.get("head_dim") in (None, width // heads), origin, "head_dim != hidden_size / heads")
    refuse_unless(cfg.get("attention_bias", False) == cfg.get("mlp_bias", False), origin,
                  "attention_bias without mlp_bias (or the reverse)")
    config = ModelConfig(vocab_size=cfg["vocab_size"], block_size=cfg["max_position_embeddings"],
                         n_layer=cfg["num_hidden_layers"], n_head=heads,
                         n_kv_head=cfg.get("num_key_value_heads") or heads, n_embd=width, mlp="swiglu",
                         mlp_hidden=cfg["intermediate_size"], norm="rmsnorm", norm_eps=cfg.get("rms_norm_eps", 1e-6),
                         position="rope", rope_theta=rope_theta(cfg, origin),
                         tie_embeddings=cfg.get("tie_word_embeddings", False), bias=cfg.get("attention_bias", False))
    head = tensors.get("lm_head.weight")
    tensors = strip_prefix(tensors, "model.")
    rows = padded_vocab_size(config.vocab_size)
    weights = {"wte.weight": pad_rows(take(tensors, "embed_tokens.weight", origin), rows),
               "norm_f.weight": take(tensors, "norm.weight", origin)}
    if not config.tie_embeddings:
        refuse_unless(head is not None, origin, "an untied head without lm_head.weight")
        weights["lm_head.weight"] = pad_rows(head.float(), rows)
    kinds = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layer):
        layer = f"layers.{i}"
        weights[f"blocks.{i}.norm_1.weight"] = take(tensors, f"{layer}.input_layernorm.weight", origin)
        weights[f"blocks.{i}.norm_2.weight"] = take(tensors, f"{layer}.post_attention_layernorm.weight", origin)
        for kind in kinds:
            attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
            weights[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [take(tensors, f"{attn}.{p}_proj.{kind}", origin) for p in "qkv"])
            weights[f"blocks.{i}.attn.proj.{kind}"] = take(tensors, f"{attn}.o_proj.{kind}", origin)
            weights[f"blocks.{i}.mlp.fc.{kind}"] = torch.cat(
                [take(tensors, f"{mlp}.{p}_proj.{kind}", origin) for p in ("gate", "up")])
            weights[f"blocks.{i}.mlp.proj.{kind}"] = take(tensors, f"{mlp}.down_proj.{kind}", origin)
    return config, weights


FAMILIES = {"gpt2": gpt2_from_hf, "llama": llama_from_hf}
# Each family's sizes in config.json: (required, optional).
FAMILY_SIZES = {"gpt2": (("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"), ("n_inner",)),
                "llama": (("vocab_size", "max_position_embeddings", "num_hidden_layers", "hidden_size",
                           "num_attention_heads", "intermediate_size"), ("num_key_value_heads", "head_dim"))}


def tokenizer_from_hf(folder: Path, cfg: dict) -> dict:
    """The HF directory's tokenizer.json as an lmforge bpe tokenizer; its end-of-text token is the model's
    eos token. Without tokenizer.json, GPT-2's own vocabulary means lmforge's gpt2 kind."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        if cfg.get("model_type") == "gpt2" and cfg.get("vocab_size") == 50257:
            return {"kind": "gpt2", "vocab_size": 50257, "eot_id": 50256}
        raise UserError(f"no tokenizer.json in {folder}; pass --tokenizer with an lmforge tokenizer.json "
                        "(or a run or data directory holding one)")
    from tokenizers import Tokenizer as HFTokenizer

    try:
        hf = HFTokenizer.from_file(str(path))
    except Exception as err:  # the Rust parser's errors have no common Python type
        raise UserError(f"{path} is not a tokenizers file ({err})") from None
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) and eos else eos
    eot_text = hf.id_to_token(eos) if isinstance(eos, int) else None
    if eot_text is None and hf.token_to_id(EOT_TEXT) is not None:
        eot_text = EOT_TEXT
    if eot_text is None:
        raise UserError(f"{folder}: cannot tell the end-of-text token (no eos_token_id in config.json)")
    return BPETokenizer(hf, eot_text).to_dict()


def import_hf(source: str, out: str | Path, *, tokenizer: str | Path | None = None,
              overwrite: bool = False) -> Path:
    """Write an lmforge run holding the Hugging Face model at `source` (a directory, or a hub name)."""
    inputs = [path for path in (Path(source), tokenizer) if path is not None and Path(path).exists()]
    check_import_output(out, overwrite, inputs)  # before a download or reading the weights, which take long
    folder = resolve_source(source)
    cfg = read_json(folder / "config.json")
    if not isinstance(cfg, dict):
        raise UserError(f"{folder / 'config.json'} is not a JSON object")
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise UserError(f"{folder}: model_type '{family}' is not supported; lmforge imports "
                        f"{', '.join(FAMILIES)} models")
    require_sizes(cfg, folder, *FAMILY_SIZES[family])  # before the weights are read, which takes long
    try:
        config, weights = FAMILIES[family](cfg, read_weights(folder), folder)
    except KeyError as err:
        raise UserError(f"{folder / 'config.json'} lacks {err}") from None
    tokenizer_dict = load_tokenizer(tokenizer).to_dict() if tokenizer else tokenizer_from_hf(folder, cfg)
    return write_run(out, config, tokenizer_dict, weights, origin=str(folder), overwrite=overwrite,
                     inputs=[folder, *inputs])


# ----- writing a Hugging Face directory -----
def export_family(config: ModelConfig) -> str:
    """gpt2 or llama: the transformers family that computes exactly this model, or a refusal naming the
    option that neither has."""
    if config.arch != "gpt":
        raise UserError(f"model.arch = {config.arch}: Hugging Face export covers the transformer (gpt) only")
    if config.activation not in ("", "gelu"):
        raise UserError(f"model.activation = {config.activation} has no Hugging Face GPT-2 or Llama equivalent; "
                        "cannot export")
    if config.qk_norm:
        raise UserError("model.qk_norm = true has no Hugging Face GPT-2 or Llama equivalent; cannot export")
    if config.logit_softcap > 0:
        raise UserError("model.logit_softcap has no Hugging Face GPT-2 or Llama equivalent; cannot export")
    combinations = {("learned", "layernorm", "gelu"): "gpt2", ("rope", "rmsnorm", "swiglu"): "llama"}
    family = combinations.get((config.position, config.norm, config.mlp))
    if family is None:
        raise UserError(f"model.position = {config.position}, model.norm = {config.norm}, model.mlp = {config.mlp}: "
                        "Hugging Face export needs GPT-2's (learned, layernorm, gelu) or Llama's (rope, rmsnorm, "
                        "swiglu) combination")
    if family == "gpt2" and (config.n_kv_head or config.n_head) != config.n_head:
        raise UserError("model.n_kv_head (grouped-query attention) has no GPT-2 equivalent; cannot export")
    if family == "gpt2" and not config.bias:
        raise UserError("model.bias = false has no GPT-2 equivalent (GPT-2 has biases everywhere); cannot export")
    return family


def hf_config(config: ModelConfig, family: str, eot_id: int, dtype: str) -> dict:
    common = {"vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
              "bos_token_id": eot_id, "eos_token_id": eot_id, "torch_dtype": {"fp32": "float32",
                                                                               "bf16": "bfloat16"}[dtype]}
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_positions": config.block_size,
                "n_ctx": config.block_size, "n_embd": config.n_embd, "n_layer": config.n_layer,
                "n_head": config.n_head, "n_inner": mlp_hidden_size(config), "activation_function": "gelu_new",
                "layer_norm_epsilon": norm_eps(config), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                **common}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": config.n_embd,
            "intermediate_size": mlp_hidden_size(config), "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head, "num_key_value_heads": config.n_kv_head or config.n_head,
            "head_dim": config.n_embd // config.n_head, "max_position_embeddings": config.block_size,
            "rms_norm_eps": norm_eps(config), "hidden_act": "silu", "attention_bias": config.bias,
            "mlp_bias": config.bias, "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta}, **common}


def gpt2_to_hf(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    vocab = config.vocab_size
    out = {"transformer.wte.weight": weights["wte.weight"][:vocab], "transformer.wpe.weight": weights["wpe.weight"],
           "transformer.ln_f.weight": weights["norm_f.weight"], "transformer.ln_f.bias": weights["norm_f.bias"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = weights["lm_head.weight"][:vocab]
    for i in range(config.n_layer):
        for ours, theirs, transpose in GPT2_LAYER:
            weight = weights[f"blocks.{i}.{ours}.weight"]
            out[f"transformer.h.{i}.{theirs}.weight"] = weight.t() if transpose else weight
            out[f"transformer.h.{i}.{theirs}.bias"] = weights[f"blocks.{i}.{ours}.bias"]
    return out


def llama_to_hf(config: ModelConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    vocab, head_size = config.vocab_size, config.n_embd // config.n_head
    kv_size = (config.n_kv_head or config.n_head) * head_size
    out = {"model.embed_tokens.weight": weights["wte.weight"][:vocab], "model.norm.weight": weights["norm_f.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = weights["lm_head.weight"][:vocab]
    for i in range(config.n_layer):
        layer = f"model.layers.{i}"
        out[f"{layer}.input_layernorm.weight"] = weights[f"blocks.{i}.norm_1.weight"]
        out[f"{layer}.post_attention_layernorm.weight"] = weights[f"blocks.{i}.norm_2.weight"]
        for kind in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = weights[f"blocks.{i}.attn.qkv.{kind}"].split([config.n_embd, kv_size, kv_size])
            gate, up = weights[f"blocks.{i}.mlp.fc.{kind}"].chunk(2)
            out.update({f"{layer}.self_attn.q_proj.{kind}": q, f"{layer}.self_attn.k_proj.{kind}": k,
                        f"{layer}.self_attn.v_proj.{kind}": v,
                        f"{layer}.self_attn.o_proj.{kind}": weights[f"blocks.{i}.attn.proj.{kind}"],
                        f"{layer}.mlp.gate_proj.{kind}": gate, f"{layer}.mlp.up_proj.{kind}": up,
                        f"{layer}.mlp.down_proj.{kind}": weights[f"blocks.{i}.mlp.proj.{kind}"]})
    return out


def char_tokenizer_json(tokenizer_dict: dict) -> dict:
    """A char tokenizer as a tokenizers file: every character is one word of a word-level vocabulary."""
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    vocab = {char: index for index, char in enumerate(tokenizer_dict["chars"])}
    vocab[EOT_TEXT] = tokenizer_dict["eot_id"]
    vocab["\ufffd"] = tokenizer_dict["unknown_id"]
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="\ufffd"))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    hf.add_special_tokens([EOT_TEXT])
    return json.loads(hf.to_str())


def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """The pieces byte-pair encoding leaves of `token` when only merges ranked below max_rank exist."""
    parts = [bytes([byte]) for byte in token]
    while True:
        candidates = [(ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1)]
        rank, i = min(candidates, default=(max_rank, 0))
        if rank >= max_rank:
            return parts
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def tiktoken_json(tokenizer: Tokenizer) -> dict:
    """GPT-2's tiktoken encoding as a tokenizers file: tiktoken keeps only each token's rank, and a token's
    merge is the last step of encoding it with the lower-ranked tokens alone."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    encoding = tokenizer.encoding
    special = {encoding.encode_single_token(text) for text in encoding.special_tokens_set}
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(encoding.n_vocab) if i not in special}
    spell = byte_characters()
    text = {token: "".join(spell[byte] for byte in token) for token in ranks}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            first, second = bpe_parts(ranks, token, rank)
            merges.append((text[first], text[second]))
    hf = HFTokenizer(models.BPE({text[token]: rank for token, rank in ranks.items()}, merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # GPT-2's split pattern
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(sorted(encoding.special_tokens_set, key=encoding.encode_single_token))
    return json.loads(hf.to_str())


def hf_tokenizer_files(tokenizer: Tokenizer, block_size: int) -> dict[str, dict]:
    """tokenizer.json and tokenizer_config.json for AutoTokenizer (a fast tokenizer from tokenizer.json)."""
    data = tokenizer.to_dict()
    if data["kind"] == "bpe":
        hf_json = data["hf"]
    elif data["kind"] == "char":
        hf_json = char_tokenizer_json(data)
    else:
        hf_json = tiktoken_json(tokenizer)
    eot_text = getattr(tokenizer, "eot_text", EOT_TEXT)
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot_text, "eos_token": eot_text,
                "model_max_length": block_size, "clean_up_tokenization_spaces": False}
    return {"tokenizer.json": hf_json, "tokenizer_config.json": settings}


def export_hf(run: str | Path, out: str | Path, *, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the run's model as a transformers directory (config.json, model.safetensors, tokenizer)."""
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    check_output(out, overwrite, directory=True, owned=EXPORT_FILES, inputs=(run,))
    loaded = load_run(run)
    model, config, tokenizer = loaded.model, loaded.config, loaded.tokenizer
    family = export_family(config.model)
    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    tensors = {name: tensor.to(DTYPES[dtype]).contiguous()
               for name, tensor in (gpt2_to_hf if family == "gpt2" else llama_to_hf)(config.model, weights).items()}
    files = {"config.json": hf_config(config.model, family, tokenizer.eot_id, dtype),
             "generation_config.json": {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id},
             **hf_tokenizer_files(tokenizer, config.model.block_size)}
    temporary = out.with_name(f".tmp-{out.name}")
    with writing(out, temporary, needed=sum(tensor.nbytes for tensor in tensors.values())):
        remove_path(temporary)
        temporary.mkdir(parents=True)
        save_file(tensors, temporary / "model.safetensors", metadata={"format": "pt"})
        for name, content in files.items():
            (temporary / name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
    replace_output(temporary, out, overwrite, EXPORT_FILES)
    return out
