"""Text from a stream of tokens, piece by piece, as a terminal or a client should see it.

`TextStream` is the one place that decides what of a growing reply may be shown: `lmforge sample`
(`stream_text`), `lmforge chat` and the batched engine behind the server all release text through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from lmforge.data.tokenizer import Tokenizer


class TextStream:
    """The text of a growing list of token ids, released in pieces that never end inside an unfinished
    multi-byte character (the tokenizer decodes it as U+FFFD until its last byte arrives) nor show what may
    still become a stop string. Once a stop string appears the text ends before it and `stopped` is set."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.released = 0
        self.stopped = False

    @property
    def shown(self) -> str:
        """The text released so far."""
        return self.text[: self.released]

    def add(self, token: int) -> str:
        """Take one token; return the text now safe to show (often empty). At a stop string: the rest of the
        text before it, and `stopped` is set."""
        self.ids.append(token)
        self.text = self.tokenizer.decode(self.ids)
        hits = [index for index in (self.text.find(s, self.released) for s in self.stop) if index >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            return self.flush()
        end = len(self.text.rstrip("\ufffd"))
        held = max((size for stop in self.stop for size in range(1, len(stop))
                    if self.text[:end].endswith(stop[:size])), default=0)
        return self._release(max(end - held, self.released))

    def flush(self) -> str:
        """Everything not yet released (at the end: a held-back tail is final)."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        delta, self.released = self.text[self.released : end], end
        return delta


def stream_text(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """The new text after each token that completes some (a token that ends inside a multi-byte character waits
    for the rest of it), and whatever is left at the end last."""
    stream = TextStream(tokenizer)
    for token in tokens:
        piece = stream.add(token)
        if piece:
            yield piece
    rest = stream.flush()
    if rest:
        yield rest
