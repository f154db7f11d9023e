"""Text from a stream of tokens, piece by piece, as a terminal or a client should see it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from lmforge.data.tokenizer import Tokenizer


def stream_text(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """The new text after each token; a token that ends inside a multi-byte character waits for the rest of it
    (its decoding ends in U+FFFD), and whatever is left at the end comes last."""
    ids: list[int] = []
    shown = 0
    for token in tokens:
        ids.append(token)
        text = tokenizer.decode(ids)
        if not text.endswith("\ufffd"):
            yield text[shown:]
            shown = len(text)
    rest = tokenizer.decode(ids)[shown:]
    if rest:
        yield rest
