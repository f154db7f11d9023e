"""Structured outputs: every answer under a JSON schema, a regex or a grammar parses and validates whatever the
model, from a demo-shaped char model and a BPE model, through the official `openai` client against a live server
(batched, streamed and whole); the same from `lmforge sample --json-schema`; and every bad format is a 400 (a
one-line error on the command line) while the server keeps serving."""

from __future__ import annotations

import io
import json
import random
import re
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jsonschema
import pytest
import torch
from openai import BadRequestError, OpenAI
from serve_fixtures import LiveServer, ServeProcess, http

from lmforge.config.load import dumps_config, load_config
from lmforge.data.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer
from lmforge.infer.batched import generate_batch
from lmforge.infer.chat import MODEL_PROMPT, chat
from lmforge.infer.constrained import FormatError, OutputFormat, compile_format
from lmforge.infer.generate import generate
from lmforge.infer.load import load_run
from lmforge.model.factory import build_model
from lmforge.run.checkpoints import save_checkpoint
from lmforge.serve.cli import build_app
from tests.conftest import assert_one_line_error, run_cli

# The demo preset's shape (configs/shakespeare-char.toml), with a longer context so that a nested answer and the
# chat template's prompt fit together; random weights, as "whatever the model" asks.
DEMO_SHAPE = {"model.n_layer": "4", "model.n_head": "4", "model.n_embd": "128", "model.block_size": "256",
              "model.position": "rope", "model.norm": "rmsnorm", "model.mlp": "relu2", "model.bias": "false",
              "train.device": "cpu", "train.precision": "fp32", "train.compile": "false"}
# Printable ASCII: JSON's brackets and quotes included (the Shakespeare corpus has none of them).
PRINTABLE = "".join(sorted(set(string.printable) - set("\t\r\x0b\x0c")))
BPE_TEXT = ('{"name": "Ada", "age": 36, "tags": ["red", "blue"], "ok": true, "score": 9.5, "when": null} '
            "The quick brown fox jumps over the lazy dog. 0123456789 ") * 40


def make_random_run(run_dir: Path, tokenizer: Tokenizer, seed: int = 0) -> Path:
    """A run directory (config, tokenizer, one checkpoint) holding a randomly initialized demo-shaped model."""
    config = load_config(None, {**DEMO_SHAPE, "model.vocab_size": str(tokenizer.vocab_size)})
    torch.manual_seed(seed)
    model = build_model(config.model)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(dumps_config(config))
    tokenizer.save(run_dir / "tokenizer.json")
    save_checkpoint(run_dir, 0, model.state_dict(), [], {"step": 0})
    return run_dir


# ---- fifty schemas: objects, nested objects, arrays, enums, numbers, strings with patterns, optional fields ----
# Every string, array and number is bounded, so that an answer fits the context whatever the model (the format
# allows end-of-text only once it is complete; an unbounded string could run to max_tokens).
VALUES = [
    {"type": "string", "maxLength": 6},
    {"type": "string", "pattern": "^[a-z]{2,4}$"},
    {"type": "string", "pattern": "^[A-Z][0-9]{2}-[a-z]$"},
    {"enum": ["red", "green", "blue"]},
    {"enum": [1, "two", None, True]},
    {"type": "integer", "minimum": -5, "maximum": 500},
    {"type": "number", "minimum": 0, "maximum": 10},
    {"type": "boolean"},
    {"type": "null"},
    {"const": "fixed"},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 3},
    {"type": "array", "items": {"enum": ["x", "y"]}, "minItems": 1, "maxItems": 2},
    {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 99}, {"type": "string", "maxLength": 3}]},
]


def object_schema(rng: random.Random, depth: int) -> dict:
    names = rng.sample(["id", "name", "kind", "n", "ok", "tags", "when", "score", "code", "x"], rng.randint(1, 3))
    properties = {name: rng.choice(VALUES) for name in names}
    if depth > 0 and rng.random() < 0.6:
        properties["inner"] = object_schema(rng, depth - 1)
    required = [name for name in properties if rng.random() < 0.7]  # the rest are optional
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


def fifty_schemas() -> list[dict]:
    rng = random.Random(22)
    schemas = [object_schema(rng, depth=1) for _ in range(40)]
    schemas += [{"type": "array", "items": object_schema(rng, depth=0), "minItems": 1, "maxItems": 2}
                for _ in range(4)]
    schemas += [value for value in VALUES if value.get("type") not in ("null",)][:6]  # top-level scalars
    assert len(schemas) == 50
    return schemas


SCHEMAS = fifty_schemas()


def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def schema_answers(url: str, model: str) -> list[tuple[dict, object]]:
    """Each schema's chat answer from 16 concurrent clients (they batch in the engine), sampled at temperature 1."""

    def ask(index: int):
        schema = SCHEMAS[index]
        answer = client(url).chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Answer in JSON."}], temperature=1.0, seed=index,
            response_format={"type": "json_schema", "json_schema": {"name": f"s{index}", "schema": schema,
                                                                    "strict": True}})
        return schema, answer.choices[0]

    with ThreadPoolExecutor(16) as pool:
        return list(pool.map(ask, range(len(SCHEMAS))))


def assert_valid(schema: dict, choice) -> None:
    text = choice.message.content if hasattr(choice, "message") else choice.text
    assert choice.finish_reason == "stop", (schema, text)
    jsonschema.validate(json.loads(text), schema)


@pytest.fixture(scope="module")
def char_run(tmp_path_factory) -> Path:
    return make_random_run(tmp_path_factory.mktemp("structured") / "demo-char", CharTokenizer(PRINTABLE))


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory) -> Path:
    tokenizer = BPETokenizer.train([BPE_TEXT], vocab_size=400)
    return make_random_run(tmp_path_factory.mktemp("structured") / "tiny-bpe", tokenizer, seed=1)


@pytest.fixture(scope="module")
def char_server(char_run, tmp_path_factory):
    """`lmforge serve` in a child process, so that the tests can read its log."""
    with ServeProcess(char_run, tmp_path_factory.mktemp("logs") / "serve.log", "--max-batch", "16") as server:
        yield server


@pytest.fixture(scope="module")
def bpe_server(bpe_run):
    with LiveServer(build_app(bpe_run, device="cpu", max_batch=16)) as server:
        yield server


def test_fifty_schemas_from_the_char_model_parse_and_validate(char_server):
    for schema, choice in schema_answers(char_server.url, "demo-char"):
        assert_valid(schema, choice)


def test_fifty_schemas_from_the_bpe_model_parse_and_validate(bpe_server):
    answers = schema_answers(bpe_server.url, "tiny-bpe")
    for schema, choice in answers:
        assert_valid(schema, choice)
    assert max(bpe_server.engine.counters.rows_per_step) > 1  # they were decoded together


@pytest.mark.parametrize("model", ["char", "bpe"])
def test_regex_answers_match_in_full(model, char_server, bpe_server):
    url, name = (char_server.url, "demo-char") if model == "char" else (bpe_server.url, "tiny-bpe")
    # [0-9], not \d: llguidance's \d is Rust's, any Unicode digit, some newer than Python's tables.
    patterns = [r"[a-z]{2,5}@[a-z]{2,6}\.(com|org)", r"[0-9]{3}-[0-9]{4}", r"(yes|no|maybe)",
                r"[A-Z][a-z]{0,6}( [A-Z][a-z]{0,6})?"]

    def ask(pattern: str):
        return pattern, client(url).completions.create(
            model=name, prompt="Say it:", max_tokens=60, temperature=1.0, n=2,
            extra_body={"structured_outputs": {"regex": pattern}})

    with ThreadPoolExecutor(4) as pool:
        for pattern, answer in pool.map(ask, patterns):
            for choice in answer.choices:
                assert choice.finish_reason == "stop"
                assert re.fullmatch(pattern, choice.text), (pattern, choice.text)


def test_streamed_and_whole_answers_under_a_schema_and_a_grammar(char_server):
    schema = {"type": "object", "properties": {"city": {"enum": ["Oslo", "Lima"]},
                                               "temp": {"type": "integer", "minimum": -40, "maximum": 50}},
              "required": ["city", "temp"], "additionalProperties": False}
    openai = client(char_server.url)
    stream = openai.chat.completions.create(
        model="demo-char", messages=[{"role": "user", "content": "Weather?"}], stream=True, seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": schema}})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert chunks[-1].choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(text), schema)
    # /v1/completions takes response_format too (through extra_body: OpenAI's completions API has none).
    answer = openai.completions.create(model="demo-char", prompt="{", max_tokens=80, n=3, seed=4,
                                       extra_body={"response_format": {"type": "json_schema",
                                                                       "json_schema": {"name": "w", "schema": schema}}})
    for choice in answer.choices:
        assert_valid(schema, choice)
    grammar = 'start: greeting " " name "!"\ngreeting: "hello" | "hi"\nname: /[a-z]{1,5}/'
    answer = openai.completions.create(model="demo-char", prompt="", max_tokens=30, n=4,
                                       extra_body={"structured_outputs": {"grammar": grammar}})
    for choice in answer.choices:
        assert choice.finish_reason == "stop"
        assert re.fullmatch(r"(hello|hi) [a-z]{1,5}!", choice.text), choice.text
    answer = openai.chat.completions.create(model="demo-char", messages=[{"role": "user", "content": "Pick"}],
                                            extra_body={"structured_outputs": {"choice": ["left", "right"]}})
    assert answer.choices[0].message.content in ("left", "right")


def test_an_answer_cut_by_max_tokens_ends_with_length(char_server):
    schema = {"type": "object", "properties": {"name": {"type": "string", "minLength": 20, "maxLength": 30}},
              "required": ["name"]}
    answer = client(char_server.url).chat.completions.create(
        model="demo-char", messages=[{"role": "user", "content": "x"}], max_tokens=10,
        response_format={"type": "json_schema", "json_schema": {"name": "long", "schema": schema}})
    [choice] = answer.choices
    assert choice.finish_reason == "length"
    assert choice.message.content.startswith('{"name":"') and len(choice.message.content) == 10


BAD_FORMATS = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "banana"}}}},
     "response_format", "banana"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}}}},
     "response_format", '"not"'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "'yaml'"),
    ({"response_format": "json"}, "response_format", "response_format"),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "unclosed group"),
    ({"structured_outputs": {"grammar": 'start: "a" ('}}, "structured_outputs", "grammar does not parse"),
    ({"structured_outputs": {"regex": "a", "grammar": "start: \"a\""}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs", "whitespace_pattern"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "choice"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "not both"),
    # Other servers' fields would be ignored like any unknown field, and the answer not held to them.
    ({"guided_regex": "[a-z]+"}, "guided_regex", '"structured_outputs": {"regex": ...}'),
    ({"grammar": 'start: "a"'}, "grammar", '"structured_outputs": {"grammar": ...}'),
    ({"json_schema": {"type": "object"}}, "json_schema", '"structured_outputs": {"json": ...}'),
]


def test_bad_formats_are_400s_naming_the_problem_and_the_server_keeps_serving(char_server):
    before = char_server.log()
    for extra, param, fragment in BAD_FORMATS:
        for route, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                            ("/v1/completions", {"prompt": "hi"})):
            reply = http.post(char_server.url + route, json={"model": "demo-char", **body, **extra})
            assert reply.status_code == 400, (extra, reply.text)
            error = reply.json()["error"]
            assert error["param"] == param and error["type"] == "invalid_request_error", error
            assert fragment in error["message"] and "\n" not in error["message"], error
    with pytest.raises(BadRequestError, match="cannot enforce"):
        client(char_server.url).chat.completions.create(
            model="demo-char", messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": {"not": {}}}})
    answer = client(char_server.url).chat.completions.create(
        model="demo-char", messages=[{"role": "user", "content": "hi"}], response_format={"type": "json_object"},
        max_tokens=5)
    assert answer.choices[0].message.content.startswith("{")
    logged = char_server.log()[len(before):]
    assert "Traceback" not in logged and "ERROR" not in logged, logged


def test_a_format_the_vocabulary_cannot_write_is_refused_by_name():
    shakespeare_like = CharTokenizer("".join(sorted(set(string.ascii_letters + " .,:;!?'-\n"))))
    with pytest.raises(FormatError, match="no token of the run's char tokenizer can begin"):
        compile_format(shakespeare_like, OutputFormat("json_object", param="response_format"))


def test_end_of_text_is_allowed_only_where_the_format_is_complete():
    tokenizer = CharTokenizer("abc")
    constraint = compile_format(tokenizer, OutputFormat("regex", "ab(c)?")).constraint()
    allowed = []
    for token in tokenizer.encode("abc"):
        allowed.append(bool(constraint.allowed()[tokenizer.eot_id]))
        constraint.accept(token)
    allowed.append(bool(constraint.allowed()[tokenizer.eot_id]))
    assert allowed == [False, False, True, True]
    assert constraint.allowed().tolist() == [False, False, False, True, False]  # after "abc": only end-of-text


def test_constrained_batched_greedy_equals_constrained_alone(char_run):
    loaded = load_run(char_run)
    model, tokenizer = loaded.model, loaded.tokenizer
    output = compile_format(tokenizer, OutputFormat("json_schema", SCHEMAS[0]))
    prompts = [tokenizer.encode(text) for text in ("a", "{", "the cat", "JSON:")]
    batched = generate_batch(model, tokenizer, prompts, 120, temperature=0, stop_token=tokenizer.eot_id,
                             constraints=[output.constraint() for _ in prompts])
    for prompt, completion in zip(prompts, batched, strict=True):
        alone = list(generate(model, prompt, 120, temperature=0, stop_token=tokenizer.eot_id,
                              constraint=output.constraint()))
        assert completion.tokens == alone
        jsonschema.validate(json.loads(completion.text), SCHEMAS[0])


def test_sample_json_schema_and_regex(capsys, char_run, tmp_path):
    schema = SCHEMAS[7]
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema))
    code, out, err = run_cli(capsys, "sample", char_run, "--json-schema", schema_file, "--num-samples", "3",
                             "--max-new-tokens", "150", "--device", "cpu")
    assert code == 0, err
    samples = [part.strip("\n") for part in re.split(r"--- sample \d ---\n", out) if part.strip()]
    assert len(samples) == 3
    for sample in samples:
        jsonschema.validate(json.loads(sample), schema)
    code, out, err = run_cli(capsys, "sample", char_run, "--regex", r"[0-9]{3}-[a-z]{2}", "--max-new-tokens", "20",
                             "--device", "cpu", "--prompt", "id ")
    assert code == 0, err
    assert re.fullmatch(r"id [0-9]{3}-[a-z]{2}\n", out), out


def test_sample_bad_formats_are_one_line_errors(capsys, char_run, tmp_path):
    not_json = tmp_path / "schema.json"
    not_json.write_text("{type: object")
    assert_one_line_error(*run_cli(capsys, "sample", char_run, "--json-schema", not_json)[::2], "--json-schema",
                          "is not JSON")
    assert_one_line_error(*run_cli(capsys, "sample", char_run, "--json-schema", tmp_path / "none.json")[::2],
                          "no such file")
    unsupported = tmp_path / "not.json"
    unsupported.write_text('{"not": {"type": "string"}}')
    assert_one_line_error(*run_cli(capsys, "sample", char_run, "--json-schema", unsupported)[::2], '"not"')
    assert_one_line_error(*run_cli(capsys, "sample", char_run, "--regex", "a{2,")[::2], "--regex",
                          "does not compile")
    assert_one_line_error(*run_cli(capsys, "sample", char_run, "--regex", "a", "--json-schema", unsupported)[::2],
                          "not both")


def test_chat_replies_follow_the_schema(char_run):
    schema = SCHEMAS[3]
    lines = iter(["Who are you?", "And now?"])

    def read_or_end(prompt: str) -> str:  # two turns, then end of input
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    chat(char_run, max_new_tokens=200, device="cpu", read_line=read_or_end, out=out,
         output_format=OutputFormat("json_schema", schema, param="--json-schema"))
    replies = [line.removeprefix(MODEL_PROMPT) for line in out.getvalue().splitlines()
               if line.startswith(MODEL_PROMPT)]
    assert len(replies) == 2
    for reply in replies:
        jsonschema.validate(json.loads(reply), schema)


def test_a_tiktoken_vocabulary_is_constrained_too():
    """The GPT-2 kind goes through llguidance's tiktoken reader; tiktoken's GPT-2 files need a download, so a small
    byte-level encoding of the same kind stands in for them."""
    import tiktoken

    ranks = {bytes([byte]): byte for byte in range(256)}
    for merged in (b"ab", b"abc", b"12", b'{"'):
        ranks[merged] = len(ranks)
    encoding = tiktoken.Encoding("tiny", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                                 special_tokens={"<|endoftext|>": len(ranks)})
    tokenizer = object.__new__(GPT2Tokenizer)
    tokenizer.encoding, tokenizer.vocab_size, tokenizer.eot_id = encoding, encoding.n_vocab, encoding.eot_token
    output = compile_format(tokenizer, OutputFormat("regex", r"(abc|12){2,3}-[a-c]"))
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        constraint, tokens = output.constraint(), []
        while True:
            logits = constraint.mask(torch.randn(tokenizer.vocab_size, generator=generator))
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=generator))
            constraint.accept(token)
            if token == tokenizer.eot_id:
                break
            tokens.append(token)
        assert re.fullmatch(r"(abc|12){2,3}-[a-c]", tokenizer.decode(tokens))


def test_an_answer_the_vocabulary_cannot_finish_fails_by_name(tmp_path):
    """The format can begin ('"') but its one value needs a 'z' this char tokenizer lacks: the answer fails with an
    error naming why (the server's 500, the command line's one line), never an answer outside the format."""
    loaded = load_run(make_random_run(tmp_path / "few-chars", CharTokenizer('"ab{}:')))
    output = compile_format(loaded.tokenizer, OutputFormat("json_schema", {"enum": ["az"]}, param="response_format"))
    with pytest.raises(RuntimeError, match="response_format: no token of the run's tokenizer can continue"):
        generate_batch(loaded.model, loaded.tokenizer, [[0]], 10, stop_token=loaded.tokenizer.eot_id,
                       constraints=[output.constraint()])
    with pytest.raises(FormatError, match="the format needs characters the vocabulary lacks"):
        list(generate(loaded.model, [0], 10, constraint=output.constraint()))
