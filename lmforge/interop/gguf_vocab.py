"""A run's tokenizer as GGUF metadata that llama.cpp tokenizes with exactly as lmforge does, or a refusal.

Every lmforge tokenizer goes to llama.cpp's `gpt2` tokenizer model (byte-level BPE: the text split by a
pre-tokenizer pattern, each piece spelled in GPT-2's byte alphabet, then merged pair by pair, best rank first):

  char  one token per character, spelled as its UTF-8 bytes; merges build each multi-byte character from its
        bytes (lead byte + next byte, then + the next), and no merge joins two characters, so whatever the
        pre-tokenizer pattern, every character becomes its own token. The unknown id is the token of U+FFFD,
        the character lmforge decodes it to and encodes U+FFFD itself to. A character outside the vocabulary
        becomes that id in lmforge but is dropped by llama.cpp (lmforge refuses such prompts by default).
  bpe   the Hugging Face byte-level BPE lmforge trains (GPT-2's split pattern, no prefix space, no
        normalizer): its vocabulary and merges as they are, pre-tokenizer "gpt-2". Anything else in the file
        (another pre-tokenizer, a normalizer, byte fallback, ...) is refused: llama.cpp would split differently.
  gpt2  tiktoken's GPT-2 encoding: its ranks spelled in the byte alphabet, the merges recovered from the ranks.

The end-of-text token is a control token (never matched in plain text, as lmforge never encodes it from text)
and is both bos and eos; llama.cpp adds neither to a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.data.bytelevel import merges_from_ranks, spell_bytes
from lmforge.data.tokenizer import EOT_TEXT, BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer
from lmforge.errors import UserError

NORMAL, CONTROL = 1, 3  # llama.cpp's token types (gguf.TokenType)
PRE_TOKENIZER = "gpt-2"  # llama.cpp's name for GPT-2's split pattern
UNKNOWN_CHARACTER = "\ufffd"


@dataclass(frozen=True)
class GGUFVocab:
    """What tokenizer.ggml.* holds: one entry of `tokens` and `types` per id, merges as "left right"."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    eot_id: int


def gguf_vocab(tokenizer: Tokenizer) -> GGUFVocab:
    if isinstance(tokenizer, CharTokenizer):
        return char_vocab(tokenizer)
    if isinstance(tokenizer, BPETokenizer):
        return bpe_vocab(tokenizer)
    if isinstance(tokenizer, GPT2Tokenizer):
        return tiktoken_vocab(tokenizer)
    raise UserError(f"the {tokenizer.kind} tokenizer has no llama.cpp equivalent; cannot export to gguf")


def char_vocab(tokenizer: CharTokenizer) -> GGUFVocab:
    tokens = [spell_bytes(char.encode("utf-8")) for char in tokenizer.chars]
    types = [NORMAL] * len(tokens)
    tokens.append(EOT_TEXT)
    types.append(CONTROL)
    if UNKNOWN_CHARACTER in tokenizer.chars:  # its own id already: the unknown id can only be a control token
        tokens.append("<|unknown|>")
        types.append(CONTROL)
    else:
        tokens.append(spell_bytes(UNKNOWN_CHARACTER.encode("utf-8")))
        types.append(NORMAL)
    merges: dict[str, None] = {}  # ordered and without repeats: characters share their first bytes
    for char in [*tokenizer.chars, UNKNOWN_CHARACTER]:
        data = char.encode("utf-8")
        for end in range(2, len(data) + 1):
            merges[f"{spell_bytes(data[:end - 1])} {spell_bytes(data[end - 1:end])}"] = None
    return GGUFVocab(tokens, types, list(merges), tokenizer.eot_id)


def refuse_bpe(what: str) -> UserError:
    return UserError(f"the run's bpe tokenizer {what}, which llama.cpp cannot reproduce exactly; cannot export to "
                     "gguf (a tokenizer trained by `lmforge prepare --tokenizer bpe` exports)")


def bpe_vocab(tokenizer: BPETokenizer) -> GGUFVocab:
    """The trained tokenizer's own vocabulary and merges, after checking that llama.cpp's `gpt2` model with
    GPT-2's pattern splits and merges as it does."""
    data = tokenizer.to_dict()["hf"]
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise refuse_bpe(f"is a {model.get('type')} model, not byte-pair encoding")
    for key, harmless in (("dropout", (None, 0, 0.0)), ("continuing_subword_prefix", (None, "")),
                          ("end_of_word_suffix", (None, "")), ("byte_fallback", (None, False)),
                          ("ignore_merges", (None, False))):
        if model.get(key) not in harmless:
            raise refuse_bpe(f"sets {key} = {model.get(key)!r}")
    if data.get("normalizer") is not None:
        raise refuse_bpe("normalizes text")
    pre = data.get("pre_tokenizer") or {}
    if (pre.get("type"), pre.get("add_prefix_space"), pre.get("use_regex", True)) != ("ByteLevel", False, True):
        raise refuse_bpe(f"splits text with a {pre.get('type')} pre-tokenizer other than GPT-2's byte level "
                         "without a prefix space")
    by_id: dict[int, str] = {index: token for token, index in model.get("vocab", {}).items()}
    types = dict.fromkeys(by_id, NORMAL)
    for added in data.get("added_tokens") or []:
        if not added.get("special"):
            raise refuse_bpe(f"has the non-special added token {added.get('content')!r}")
        by_id[added["id"]] = added["content"]
        types[added["id"]] = CONTROL
    missing = [index for index in range(tokenizer.vocab_size) if index not in by_id]
    if missing or len(by_id) != tokenizer.vocab_size:
        raise refuse_bpe(f"has no token for id {missing[0] if missing else tokenizer.vocab_size}")
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
    if any(merge.count(" ") != 1 for merge in merges):
        raise refuse_bpe("has a merge of tokens holding spaces")
    ids = range(tokenizer.vocab_size)
    return GGUFVocab([by_id[i] for i in ids], [types[i] for i in ids], merges, tokenizer.eot_id)


def tiktoken_vocab(tokenizer: GPT2Tokenizer) -> GGUFVocab:
    encoding = tokenizer.encoding
    special = {encoding.encode_single_token(text): text for text in encoding.special_tokens_set}
    ranks = {encoding.decode_single_token_bytes(i): i for i in range(encoding.n_vocab) if i not in special}
    tokens = [special[i] if i in special else spell_bytes(encoding.decode_single_token_bytes(i))
              for i in range(encoding.n_vocab)]
    types = [CONTROL if i in special else NORMAL for i in range(encoding.n_vocab)]
    merges = [f"{spell_bytes(first)} {spell_bytes(second)}" for first, second in merges_from_ranks(ranks)]
    return GGUFVocab(tokens, types, merges, tokenizer.eot_id)
