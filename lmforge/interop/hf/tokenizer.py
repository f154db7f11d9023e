"""Tokenizers between lmforge and Hugging Face `tokenizer.json` files, both ways.

In: a transformers directory's `tokenizer.json` becomes an lmforge bpe tokenizer. Out: every lmforge kind
becomes a fast tokenizer that `AutoTokenizer.from_pretrained` loads and that encodes text to the same ids:
a trained bpe tokenizer is already a tokenizers file; a char tokenizer becomes a word-level vocabulary of
single characters; GPT-2's tiktoken encoding becomes the byte-level BPE its ranks imply.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmforge.data.bytelevel import merges_from_ranks, spell_bytes
from lmforge.data.tokenizer import EOT_TEXT, BPETokenizer, Tokenizer
from lmforge.errors import UserError


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


def tiktoken_json(tokenizer: Tokenizer) -> dict:
    """GPT-2's tiktoken encoding as a tokenizers file: tiktoken keeps only each token's rank; the merges are
    the ones those ranks imply (data/bytelevel.py)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    encoding = tokenizer.encoding
    special = {encoding.encode_single_token(text) for text in encoding.special_tokens_set}
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(encoding.n_vocab) if i not in special}
    merges = [(spell_bytes(first), spell_bytes(second)) for first, second in merges_from_ranks(ranks)]
    hf = HFTokenizer(models.BPE({spell_bytes(token): rank for token, rank in ranks.items()}, merges))
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


