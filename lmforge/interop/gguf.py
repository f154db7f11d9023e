"""GGUF export: a run's transformer as one file llama.cpp (and Ollama, LM Studio, ...) runs, written with the
`gguf` package (llama.cpp's own gguf-py), and on request an Ollama `Modelfile` beside it.

The architecture is `interop.architectures.architecture_for(config, "gguf")`'s: llama.cpp's gpt2, llama, arcee
or qwen3. Tensors, per layer i (llama.cpp's name ← lmforge's):
  blk.i.attn_norm ← norm_1, blk.i.ffn_norm ← norm_2, blk.i.attn_output ← attn.proj, blk.i.ffn_down ← mlp.proj;
  gpt2: blk.i.attn_qkv ← attn.qkv (fused, as lmforge's), blk.i.ffn_up ← mlp.fc;
  llama, arcee, qwen3: blk.i.attn_q/k/v ← attn.qkv split by rows; llama, qwen3: blk.i.ffn_gate, ffn_up ← mlp.fc's
  two halves (silu(gate) * up); arcee: blk.i.ffn_up ← mlp.fc (relu(x)²); qwen3: attn_q_norm, attn_k_norm ← ones
  (lmforge's QK-norm has no gain).
and token_embd ← wte (the vocabulary's rows, without lmforge's padding), position_embd ← wpe, output_norm ←
norm_f, output ← lm_head when the head is untied (llama.cpp reuses token_embd otherwise).

Rotary embeddings: lmforge rotates (first half, second half) channel pairs of each head ("neox" in llama.cpp,
which qwen3 uses). llama.cpp's llama and arcee rotate adjacent pairs ("norm"), so their query and key rows are
reordered within each head, half i going to row 2i and the other half to row 2i + 1: the same attention.

Types (--dtype): f32 everything; f16 the matrices, norms and biases stay f32; q8_0 the matrices whose rows hold a
multiple of 32 numbers (Q8_0's block), the others stay f32 (each export says which), norms and biases f32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.config.sections import ModelConfig
from lmforge.data.template import ChatTemplate
from lmforge.data.tokenizer import EOT_TEXT, Tokenizer
from lmforge.errors import UserError
from lmforge.files import check_output, move_into_place, removing_new_parents, temporary_beside, writing
from lmforge.infer.load import load_run
from lmforge.interop.architectures import Architecture, architecture_for
from lmforge.interop.gguf_vocab import PRE_TOKENIZER, gguf_vocab
from lmforge.model.gpt import mlp_hidden_size, norm_eps

DTYPES = ("f32", "f16", "q8_0")
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # general.file_type: ALL_F32, MOSTLY_F16, MOSTLY_Q8_0
Q8_0_BLOCK = 32
ADJACENT_PAIR_ROPE = ("llama", "arcee")  # llama.cpp's LLAMA_ROPE_TYPE_NORM architectures
GGUF_MAGIC = b"GGUF"
MODELFILE = "Modelfile"
MODELFILE_HEADER = "# Written by lmforge export --ollama"


@dataclass(frozen=True)
class GGUFExport:
    """What an export wrote, and the matrices q8_0 left in f32 (their rows are not a multiple of 32)."""

    path: Path
    modelfile: Path | None
    kept_f32: list[str]


def adjacent_pairs(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Query or key rows (weight or bias) of `heads` heads, reordered from half-split rotary pairs to adjacent
    pairs: within a head, row i of the first half goes to 2i, row i of the second half to 2i + 1."""
    head_size = rows.shape[0] // heads
    shaped = rows.reshape(heads, 2, head_size // 2, *rows.shape[1:])
    return shaped.transpose(1, 2).reshape(rows.shape)


def gguf_tensors(config: ModelConfig, architecture: Architecture, weights: dict[str, torch.Tensor]
                 ) -> dict[str, torch.Tensor]:
    """llama.cpp's tensors (name → float32 tensor in lmforge's (out, in) layout, which GGUF stores as is)."""
    vocab, heads = config.vocab_size, config.n_head
    kv_heads = config.n_kv_head or heads
    head_size = config.n_embd // heads
    out = {"token_embd.weight": weights["wte.weight"][:vocab]}
    if "wpe.weight" in weights:
        out["position_embd.weight"] = weights["wpe.weight"]
    for kind in ("weight", "bias"):
        if f"norm_f.{kind}" in weights:
            out[f"output_norm.{kind}"] = weights[f"norm_f.{kind}"]
    if not config.tie_embeddings:
        out["output.weight"] = weights["lm_head.weight"][:vocab]
    kinds = ("weight", "bias") if config.bias else ("weight",)
    for i in range(config.n_layer):
        ours, theirs = f"blocks.{i}", f"blk.{i}"
        for kind in kinds:
            for our_name, their_name in (("norm_1", "attn_norm"), ("norm_2", "ffn_norm"),
                                         ("attn.proj", "attn_output"), ("mlp.proj", "ffn_down")):
                if f"{ours}.{our_name}.{kind}" in weights:  # an RMSNorm has no bias
                    out[f"{theirs}.{their_name}.{kind}"] = weights[f"{ours}.{our_name}.{kind}"]
            qkv, fc = weights[f"{ours}.attn.qkv.{kind}"], weights[f"{ours}.mlp.fc.{kind}"]
            if architecture.name == "gpt2":
                out[f"{theirs}.attn_qkv.{kind}"] = qkv
            else:
                q, k, v = qkv.split([heads * head_size, kv_heads * head_size, kv_heads * head_size])
                if architecture.name in ADJACENT_PAIR_ROPE:
                    q, k = adjacent_pairs(q, heads), adjacent_pairs(k, kv_heads)
                out.update({f"{theirs}.attn_q.{kind}": q, f"{theirs}.attn_k.{kind}": k, f"{theirs}.attn_v.{kind}": v})
            if config.mlp == "swiglu":
                gate, up = fc.chunk(2)
                out.update({f"{theirs}.ffn_gate.{kind}": gate, f"{theirs}.ffn_up.{kind}": up})
            else:
                out[f"{theirs}.ffn_up.{kind}"] = fc
        if config.qk_norm:
            out[f"{theirs}.attn_q_norm.weight"] = torch.ones(head_size)
            out[f"{theirs}.attn_k_norm.weight"] = torch.ones(head_size)
    return {name: tensor.detach().float().contiguous() for name, tensor in out.items()}


def stored(tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, object | None, bool]:
    """The tensor as GGUF stores it for --dtype: (array, gguf quantization type or None, kept in f32 though
    q8_0 was asked)."""
    import gguf

    array = tensor.numpy()
    if tensor.dim() < 2 or dtype == "f32":
        return array, None, False
    if dtype == "f16":
        return array.astype(np.float16), None, False
    if array.shape[-1] % Q8_0_BLOCK:
        return array, None, True
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0, False


def gguf_writer(config: ModelConfig, architecture: Architecture, tokenizer: Tokenizer, dtype: str, name: str):
    """A GGUFWriter holding the model's and the tokenizer's metadata (no tensors yet)."""
    import gguf

    vocab = gguf_vocab(tokenizer)
    writer = gguf.GGUFWriter(None, architecture.name)
    writer.add_name(name)
    writer.add_file_type(FILE_TYPES[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_feed_forward_length(mlp_hidden_size(config))
    writer.add_head_count(config.n_head)
    writer.add_head_count_kv(config.n_kv_head or config.n_head)
    writer.add_vocab_size(config.vocab_size)
    if config.norm == "layernorm":
        writer.add_layer_norm_eps(norm_eps(config))
    else:
        writer.add_layer_norm_rms_eps(norm_eps(config))
    if config.position == "rope":
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.n_embd // config.n_head)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.eot_id)
    writer.add_eos_token_id(vocab.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    return writer


def go_text(text: str) -> str:
    """Literal text inside a Go template (Ollama's TEMPLATE): `{{` would open an action."""
    return text.replace("{{", '{{ "{{" }}')


def modelfile_text(gguf_name: str, template: ChatTemplate, eot_text: str, block_size: int) -> str:
    """An Ollama Modelfile for the GGUF beside it: the run's chat template (its markers, the end-of-text token
    after an assistant turn) as a Go template, its stop texts, and the context length."""
    texts = [*template.markers.values(), template.turn_end, eot_text]
    if any('"""' in text for text in texts):
        raise UserError('the run\'s chat template holds """, which an Ollama Modelfile cannot quote; cannot write '
                        "--ollama's Modelfile")
    markers = {role: go_text(marker) for role, marker in template.markers.items()}
    turn_end, eot = go_text(template.turn_end), go_text(eot_text)
    turns = "".join(
        f'{{{{ {"if" if index == 0 else "else if"} eq .Role "{role}" }}}}{markers[role]}{{{{ .Content }}}}'
        + (f"{eot}{turn_end}" if role == "assistant" else turn_end)
        for index, role in enumerate(("system", "user", "assistant")))
    stops = [eot_text, *template.stop_texts()]
    lines = [f"{MODELFILE_HEADER} for {gguf_name}: `ollama create NAME -f {MODELFILE}`",
             f"FROM ./{gguf_name}",
             f'TEMPLATE """{{{{- range .Messages }}}}{turns}{{{{ end }}}}{{{{ end }}}}{markers["assistant"]}"""',
             *(f'PARAMETER stop """{stop}"""' for stop in stops),
             f"PARAMETER num_ctx {block_size}",
             "# lmforge sample's defaults: temperature 0.8, no top-k, top-p or repetition penalty (Ollama's are on)",
             "PARAMETER temperature 0.8", "PARAMETER top_k 0", "PARAMETER top_p 1", "PARAMETER repeat_penalty 1"]
    return "\n".join(lines) + "\n"


def check_owned(path: Path, overwrite: bool, run: str | Path, *, starts_with: bytes, what: str) -> None:
    """An output that exists may be replaced (with --overwrite) only when lmforge wrote it: it starts as ours do."""
    check_output(path, overwrite, directory=False, inputs=(run,))
    if path.is_file():
        with open(path, "rb") as file:
            head = file.read(len(starts_with))
        if head != starts_with:
            raise UserError(f"{path} is not {what}; --overwrite replaces only those: move it away or choose "
                            "another --out")


def export_gguf(run: str | Path, out: str | Path, *, dtype: str = "f32", ollama: bool = False,
                overwrite: bool = False) -> GGUFExport:
    """Write the run's model as a GGUF file at `out` (and, with `ollama`, a Modelfile beside it). Both are
    written in full before either replaces anything: a failure leaves what was there as it was."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not a gguf type; choose one of {', '.join(DTYPES)}")
    out = Path(out)
    modelfile = out.parent / MODELFILE if ollama else None

    def check_outputs() -> None:
        check_owned(out, overwrite, run, starts_with=GGUF_MAGIC, what="a GGUF file")
        if modelfile is not None:
            check_owned(modelfile, overwrite, run, starts_with=MODELFILE_HEADER.encode(),
                        what="a Modelfile lmforge wrote")

    check_outputs()
    loaded = load_run(run, chat_template=ollama)
    config, tokenizer = loaded.config.model, loaded.tokenizer
    architecture = architecture_for(config, "gguf")
    if tokenizer.vocab_size != config.vocab_size:
        raise UserError(f"the run's tokenizer has {tokenizer.vocab_size} tokens and its model {config.vocab_size}; "
                        "llama.cpp needs one token per row: cannot export to gguf")
    writer = gguf_writer(config, architecture, tokenizer, dtype, loaded.run_dir.name)
    weights = {name: tensor.detach().cpu() for name, tensor in loaded.model.state_dict().items()}
    kept_f32, arrays = [], []
    for name, tensor in gguf_tensors(config, architecture, weights).items():
        array, quantization, kept = stored(tensor, dtype)
        writer.add_tensor(name, array, raw_dtype=quantization)
        arrays.append(np.ascontiguousarray(array))
        if kept:
            kept_f32.append(name)
    contents = {}
    if modelfile is not None:
        contents[modelfile] = modelfile_text(out.name, loaded.chat_template, getattr(tokenizer, "eot_text", EOT_TEXT),
                                             config.block_size)
    # One temporary per process: two exports to the same place never write into each other's file.
    temporaries = {path: temporary_beside(path) for path in (out, *contents)}
    with removing_new_parents(out.parent), writing(out, *temporaries.values(),
                                                   needed=sum(array.nbytes for array in arrays)):
        out.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(writer, arrays, temporaries[out])
        for path, text in contents.items():
            temporaries[path].write_text(text, encoding="utf-8")
        check_outputs()  # again, now that the files are ready: another process may have written one meanwhile
        for path, temporary in temporaries.items():
            with writing(path, *temporaries.values()):
                move_into_place(temporary, path)
    return GGUFExport(out, modelfile, kept_f32)


def write_gguf(writer, arrays: list[np.ndarray], path: Path) -> None:
    """The writer's header, metadata and tensor table, then the tensors' data (`arrays`, in the order they were
    added), each at the file's alignment. The data is written here with file.write rather than by the writer
    (numpy's tofile), whose failure on a full disk carries no error number for the one-line message."""
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
    finally:
        writer.close()
    with open(path, "ab") as file:
        file.write(bytes(-file.tell() % writer.data_alignment))  # the data section starts aligned
        for array in arrays:
            file.write(array.data)
            file.write(bytes(-file.tell() % writer.data_alignment))
