"""Hugging Face transformers directories into lmforge runs: GPT-2, Llama, Arcee and Qwen3.

`import_hf` reads `config.json`, the weights (`model.safetensors`, sharded or not, or `pytorch_model.bin`) and
`tokenizer.json`, and writes an lmforge run; the tensors are renamed as `layout` says. What lmforge cannot
compute exactly (a scaled rotary, a QK-norm gain, a sliding window...) is refused by name.
"""

from __future__ import annotations

import json
import pickle
from functools import partial
from pathlib import Path

import torch

from lmforge.config.sections import ModelConfig
from lmforge.data.tokenizer import load_tokenizer
from lmforge.errors import UserError
from lmforge.files import load_safetensors
from lmforge.inputs import refuse_special_file
from lmforge.interop.hf.layout import GPT2_LAYER, HIDDEN_ACT, MLP_PARTS
from lmforge.interop.hf.tokenizer import tokenizer_from_hf
from lmforge.interop.llmc import pad_rows
from lmforge.model.gpt import padded_vocab_size
from lmforge.run.directory import check_import_output, write_run

TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


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


def head_size(cfg: dict, family: str) -> int:
    """config.json's head_dim, or the family's default when it is absent (Qwen3's is 128, not width / heads)."""
    if cfg.get("head_dim") is not None:
        return cfg["head_dim"]
    return 128 if family == "qwen3" else cfg["hidden_size"] // cfg["num_attention_heads"]


def rope_family_from_hf(family: str, cfg: dict, tensors: dict[str, torch.Tensor], origin: Path
                        ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Llama, Arcee or Qwen3 model (rotary, RMSNorm, no biases or biases everywhere) as lmforge's."""
    width, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    hidden_act = cfg.get("hidden_act", HIDDEN_ACT[family])
    refuse_unless(hidden_act == HIDDEN_ACT[family], origin, f"{family} with hidden_act '{hidden_act}'")
    refuse_unless(head_size(cfg, family) * heads == width, origin, "head_dim != hidden_size / heads")
    bias = cfg.get("attention_bias", False)
    if family == "qwen3":  # Qwen3's MLP has no biases, and lmforge's model.bias puts them in both or neither
        refuse_unless(not bias, origin, "qwen3 with attention_bias = true (biases in attention but not the MLP)")
        refuse_unless(not cfg.get("use_sliding_window", False), origin, "qwen3 with use_sliding_window = true")
    else:
        refuse_unless(bias == cfg.get("mlp_bias", False), origin, "attention_bias without mlp_bias (or the reverse)")
    config = ModelConfig(vocab_size=cfg["vocab_size"], block_size=cfg["max_position_embeddings"],
                         n_layer=cfg["num_hidden_layers"], n_head=heads,
                         n_kv_head=cfg.get("num_key_value_heads") or heads, n_embd=width,
                         mlp="relu2" if family == "arcee" else "swiglu", mlp_hidden=cfg["intermediate_size"],
                         norm="rmsnorm", norm_eps=cfg.get("rms_norm_eps", 1e-6), position="rope",
                         rope_theta=rope_theta(cfg, origin), qk_norm=family == "qwen3",
                         tie_embeddings=cfg.get("tie_word_embeddings", False), bias=bias)
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
        layer, attn, mlp = f"layers.{i}", f"layers.{i}.self_attn", f"layers.{i}.mlp"
        weights[f"blocks.{i}.norm_1.weight"] = take(tensors, f"{layer}.input_layernorm.weight", origin)
        weights[f"blocks.{i}.norm_2.weight"] = take(tensors, f"{layer}.post_attention_layernorm.weight", origin)
        if config.qk_norm:
            for name in (f"{attn}.q_norm.weight", f"{attn}.k_norm.weight"):
                # lmforge's QK-norm has no gain: a trained one would be dropped and the model would change
                refuse_unless(bool((take(tensors, name, origin) == 1).all()), origin,
                              f"{name} with values other than 1 (a QK-norm gain)")
        for kind in kinds:
            weights[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                [take(tensors, f"{attn}.{p}_proj.{kind}", origin) for p in "qkv"])
            weights[f"blocks.{i}.attn.proj.{kind}"] = take(tensors, f"{attn}.o_proj.{kind}", origin)
            weights[f"blocks.{i}.mlp.fc.{kind}"] = torch.cat(
                [take(tensors, f"{mlp}.{p}_proj.{kind}", origin) for p in MLP_PARTS[family]])
            weights[f"blocks.{i}.mlp.proj.{kind}"] = take(tensors, f"{mlp}.down_proj.{kind}", origin)
    return config, weights


ROPE_SIZES = (("vocab_size", "max_position_embeddings", "num_hidden_layers", "hidden_size", "num_attention_heads",
               "intermediate_size"), ("num_key_value_heads", "head_dim"))
FAMILIES = {"gpt2": gpt2_from_hf, **{family: partial(rope_family_from_hf, family) for family in MLP_PARTS}}
# Each family's sizes in config.json: (required, optional).
FAMILY_SIZES = {"gpt2": (("vocab_size", "n_positions", "n_layer", "n_head", "n_embd"), ("n_inner",)),
                **{family: ROPE_SIZES for family in MLP_PARTS}}


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


