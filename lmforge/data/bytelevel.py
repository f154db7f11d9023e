"""Byte-level BPE's shared pieces: GPT-2's printable alphabet for the 256 bytes, and the merges a rank table
implies (tiktoken keeps only ranks; Hugging Face files and GGUF files need merges).

Every exporter that writes a byte-level vocabulary (Hugging Face, llm.c, GGUF) spells tokens with this alphabet.
"""

from __future__ import annotations


def byte_characters() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (byte-level BPE's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    characters, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + extra)
            extra += 1
    return [characters[byte] for byte in range(256)]


BYTE_CHARACTERS = byte_characters()


def spell_bytes(data: bytes) -> str:
    """`data` in the byte-level alphabet: how a byte-level vocabulary writes the token of these bytes."""
    return "".join(BYTE_CHARACTERS[byte] for byte in data)


def bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """The pieces byte-pair encoding leaves of `token` when only merges ranked below max_rank exist."""
    parts = [bytes([byte]) for byte in token]
    while True:
        candidates = [(ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1)]
        rank, i = min(candidates, default=(max_rank, 0))
        if rank >= max_rank:
            return parts
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges, best first, of a rank table (tiktoken's): a token's merge is the last step of encoding it
    with the lower-ranked tokens alone."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            first, second = bpe_parts(ranks, token, rank)
            merges.append((first, second))
    return merges
