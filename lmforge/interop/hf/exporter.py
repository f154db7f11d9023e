"""lmforge runs out to Hugging Face transformers directories: GPT-2, Llama, Arcee or Qwen3, whichever
`interop.architectures.architecture_for` says computes the model exactly.

`export_hf` writes `config.json`, `generation_config.json`, `model.safetensors` and a fast tokenizer
(`tokenizer.json`, `tokenizer_config.json`) that `AutoModelForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load with no custom code; the tensors are renamed as `layout` says.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from lmforge.config.sections import ModelConfig
from lmforge.errors import UserError
from lmforge.files import check_output, remove_path, replace_output, writing
from lmforge.infer.load import load_run
from lmforge.interop.architectures import Architecture, architecture_for
from lmforge.interop.hf.layout import GPT2_LAYER, HIDDEN_ACT, MLP_PARTS
from lmforge.interop.hf.tokenizer import hf_tokenizer_files
from lmforge.model.gpt import mlp_hidden_size, norm_eps

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# What export writes into its directory: all that --overwrite may replace there.
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def hf_config(config: ModelConfig, architecture: Architecture, eot_id: int, dtype: str) -> dict:
    """config.json: every size and option transformers needs to build the same model."""
    common = {"architectures": [architecture.hf_class], "model_type": architecture.name,
              "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
              "bos_token_id": eot_id, "eos_token_id": eot_id, "pad_token_id": eot_id,
              "torch_dtype": {"fp32": "float32", "bf16": "bfloat16"}[dtype]}
    if architecture.name == "gpt2":
        return {"n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
                "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": mlp_hidden_size(config),
                "activation_function": "gelu_new", "layer_norm_epsilon": norm_eps(config), "resid_pdrop": 0.0,
                "embd_pdrop": 0.0, "attn_pdrop": 0.0, **common}
    # Qwen3's q_norm and k_norm take rms_norm_eps too, where lmforge's QK-norm adds the dtype's epsilon
    # (F.rms_norm's eps=None: 1.2e-7 in fp32): each query and key changes by about (norm_eps - 1.2e-7) / (2 *
    # its mean square). Largest at lmforge's init (mean square about 0.012): logits then differ by about 7e-6
    # at the default norm_eps = 1e-6, and 9e-5 at 1e-5 (tests/test_export_hf.py measures the first).
    return {"hidden_size": config.n_embd, "intermediate_size": mlp_hidden_size(config),
            "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
            "num_key_value_heads": config.n_kv_head or config.n_head, "head_dim": config.n_embd // config.n_head,
            "max_position_embeddings": config.block_size, "rms_norm_eps": norm_eps(config),
            "hidden_act": HIDDEN_ACT[architecture.name], "attention_bias": config.bias, "mlp_bias": config.bias,
            "rope_theta": config.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "use_sliding_window": False, **common}


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


def rope_family_to_hf(family: str, config: ModelConfig, weights: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
    """The tensors of a Llama, Arcee or Qwen3 model holding lmforge's."""
    vocab, head_size = config.vocab_size, config.n_embd // config.n_head
    kv_size = (config.n_kv_head or config.n_head) * head_size
    out = {"model.embed_tokens.weight": weights["wte.weight"][:vocab], "model.norm.weight": weights["norm_f.weight"]}
    if not config.tie_embeddings:
        out["lm_head.weight"] = weights["lm_head.weight"][:vocab]
    for i in range(config.n_layer):
        layer = f"model.layers.{i}"
        out[f"{layer}.input_layernorm.weight"] = weights[f"blocks.{i}.norm_1.weight"]
        out[f"{layer}.post_attention_layernorm.weight"] = weights[f"blocks.{i}.norm_2.weight"]
        if config.qk_norm:  # unit gains: lmforge's QK-norm normalises and does not scale
            out[f"{layer}.self_attn.q_norm.weight"] = torch.ones(head_size)
            out[f"{layer}.self_attn.k_norm.weight"] = torch.ones(head_size)
        for kind in ("weight", "bias") if config.bias else ("weight",):
            q, k, v = weights[f"blocks.{i}.attn.qkv.{kind}"].split([config.n_embd, kv_size, kv_size])
            parts = weights[f"blocks.{i}.mlp.fc.{kind}"].chunk(len(MLP_PARTS[family]))
            out.update({f"{layer}.self_attn.q_proj.{kind}": q, f"{layer}.self_attn.k_proj.{kind}": k,
                        f"{layer}.self_attn.v_proj.{kind}": v,
                        f"{layer}.self_attn.o_proj.{kind}": weights[f"blocks.{i}.attn.proj.{kind}"],
                        f"{layer}.mlp.down_proj.{kind}": weights[f"blocks.{i}.mlp.proj.{kind}"]})
            out.update({f"{layer}.mlp.{name}_proj.{kind}": part
                        for name, part in zip(MLP_PARTS[family], parts, strict=True)})
    return out


def export_hf(run: str | Path, out: str | Path, *, dtype: str = "fp32", overwrite: bool = False) -> Path:
    """Write the run's model as a transformers directory (config.json, model.safetensors, tokenizer); a model
    no transformers architecture computes exactly is refused before anything is written."""
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype '{dtype}'; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    check_output(out, overwrite, directory=True, owned=EXPORT_FILES, inputs=(run,))
    loaded = load_run(run)  # a LoRA run comes merged into its base; a classify run is refused here
    model, config, tokenizer = loaded.model, loaded.config, loaded.tokenizer
    architecture = architecture_for(config.model, "hf")
    weights = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    renamed = (gpt2_to_hf(config.model, weights) if architecture.name == "gpt2"
               else rope_family_to_hf(architecture.name, config.model, weights))
    tensors = {name: tensor.to(DTYPES[dtype]).contiguous() for name, tensor in renamed.items()}
    files = {"config.json": hf_config(config.model, architecture, tokenizer.eot_id, dtype),
             "generation_config.json": {"bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id,
                                        "pad_token_id": tokenizer.eot_id},
             **hf_tokenizer_files(tokenizer, config.model.block_size)}
    # One temporary per process: two exports to the same place never write into (or delete) each other's.
    temporary = out.with_name(f".tmp-{out.name}.{os.getpid()}")
    with writing(out, temporary, needed=sum(tensor.nbytes for tensor in tensors.values())):
        remove_path(temporary)
        temporary.mkdir(parents=True)
        save_file(tensors, temporary / "model.safetensors", metadata={"format": "pt"})
        for name, content in files.items():
            (temporary / name).write_text(json.dumps(content, indent=2, ensure_ascii=False), encoding="utf-8")
    replace_output(temporary, out, overwrite, EXPORT_FILES)
    return out
