"""Streamed text: one TextStream holds back unfinished multi-byte characters and possible stop strings, and
each of its users (`sample`'s stream_text, `chat`'s stream_reply, the batched engine behind the server) shows
only what it releases."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from lmforge.data.tokenizer import BPETokenizer
from lmforge.infer.batched import BatchedEngine, GenerationEvent, GenerationRequest
from lmforge.infer.chat import stream_reply
from lmforge.infer.decode import TextStream, stream_text
from lmforge.infer.generate import generate

# A byte-level BPE trained on ASCII only: every non-ASCII character is several byte tokens, so a prefix of
# the ids often decodes to U+FFFD at its end.
TOKENIZER = BPETokenizer.train(["plain ascii text only, the end"], vocab_size=300)
REPLY = "naïve € ✓ ok"
STOP = "✓ ok"  # a stop string of several tokens, starting inside a multi-byte character's bytes


class ScriptedModel(torch.nn.Module):
    """A stand-in model whose next token is always the next one of a script (whatever the input)."""

    def __init__(self, script: list[int], vocab_size: int = TOKENIZER.vocab_size):
        super().__init__()
        self.wte = torch.nn.Embedding(vocab_size, 1)
        self.config = SimpleNamespace(block_size=64)
        self.script, self.vocab_size = iter(script), vocab_size

    def new_cache(self, *args):
        return None

    def forward(self, idx, cache=None):
        logits = torch.zeros(1, idx.shape[1], self.vocab_size)
        logits[0, -1, next(self.script)] = 1.0
        return logits, None


class Writes(io.StringIO):
    """Records each write: a character shown half (U+FFFD) and completed later would be in one of them."""

    def __init__(self):
        super().__init__()
        self.pieces: list[str] = []

    def write(self, text: str) -> int:
        self.pieces.append(text)
        return super().write(text)


def test_the_reply_spans_tokens_inside_its_characters():
    ids = TOKENIZER.encode(REPLY)
    assert len(ids) > len(REPLY)
    assert any(TOKENIZER.decode(ids[:end]).endswith("\ufffd") for end in range(1, len(ids)))


def test_text_stream_releases_whole_characters_and_stops_before_a_stop_string():
    stream = TextStream(TOKENIZER, stop=[STOP])
    pieces = []
    for token in TOKENIZER.encode(REPLY + " more"):
        pieces.append(stream.add(token))
        if stream.stopped:
            break
    assert stream.stopped and "".join(pieces) == stream.shown == stream.text == REPLY[: REPLY.find(STOP)]
    assert not any("\ufffd" in piece or "✓" in piece for piece in pieces)


def test_sample_streams_whole_characters():
    ids = TOKENIZER.encode(REPLY)
    pieces = list(stream_text(TOKENIZER, generate(ScriptedModel(ids), [0], len(ids), temperature=0)))
    assert "".join(pieces) == REPLY
    assert all(pieces) and not any("\ufffd" in piece for piece in pieces)


@pytest.mark.parametrize("stop, reply, reason", [([STOP], REPLY[: REPLY.find(STOP)], "stop"), ([], REPLY, "length")])
def test_chat_streams_whole_characters_and_never_shows_a_stop_text(stop, reply, reason):
    ids = TOKENIZER.encode(REPLY)
    out = Writes()
    shown, why = stream_reply(ScriptedModel(ids + [0] * 4), TOKENIZER, [0], stop, out, max_new_tokens=len(ids),
                              temperature=0.0, top_k=None, top_p=None, generator=None)
    assert (shown, why) == (reply, reason)
    assert out.getvalue() == reply
    assert not any("\ufffd" in piece for piece in out.pieces)


@pytest.mark.parametrize("stop, reply, reason", [([STOP], REPLY[: REPLY.find(STOP)], "stop"), ([], REPLY, "length")])
def test_the_batched_engine_streams_whole_characters_and_never_shows_a_stop_string(stop, reply, reason):
    ids = TOKENIZER.encode(REPLY)
    events: list[GenerationEvent] = []
    engine = BatchedEngine(ScriptedModel(ids + [0] * 4), TOKENIZER, max_batch=1)
    engine.submit(GenerationRequest([0], len(ids), events.append, temperature=0, stop=stop))
    while engine.has_work():
        engine.step()
    texts = [event.text for event in events]
    assert "".join(texts) == reply and events[-1].finish_reason == reason
    assert not any("\ufffd" in text for text in texts)
