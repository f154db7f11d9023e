"""A hostile client against `lmforge serve` in a child process: deep JSON, bodies that stop halfway, request
heads that never finish, too many connections, malformed HTTP, bad token ids, requests that can never fit, and
serve options that cannot work. Each gets an OpenAI-shaped 4xx (or a one-line refusal, exit 2) and the
server's log never shows a traceback."""

from __future__ import annotations

import json
import re
import socket
import time

import httpx
import pytest
import serve_fixtures
import uvicorn
from serve_fixtures import ServeProcess

from lmforge.serve.cli import MAX_BODY_BYTES, MAX_QUEUE, open_files_limit
from lmforge.serve.transport import MAX_HEAD_BYTES
from tests.conftest import PATIENCE, assert_one_line_error, run_cli, start_child_cli

served_run = serve_fixtures.served_run
WAIT = PATIENCE  # the ceiling on every wait for the server; its own timeouts in these tests are 1 second
MODEL = "tiny-served"
VOCAB_SIZE = "the vocabulary size"  # a token id parameter: the first id past the served tokenizer's


@pytest.fixture(scope="module")
def probe_server(served_run, tmp_path_factory):
    """One server for the probes: 1-second head and body deadlines, a 300 kB body limit, 4 in the queue."""
    log = tmp_path_factory.mktemp("probe") / "server.log"
    with ServeProcess(served_run, log, "--header-timeout", "1", "--body-timeout", "1", "--max-body-bytes",
                      "300000", "--max-queue", "4", "--max-batch", "2", "--max-tokens-limit", "50") as server:
        yield server


def assert_quiet_log(server: ServeProcess) -> None:
    assert "Traceback" not in server.log(), server.log()


def error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def connect(server: ServeProcess) -> socket.socket:
    return socket.create_connection(server.address, timeout=WAIT)


def request_bytes(method: str, path: str, body: bytes = b"", content_length: int | None = None) -> bytes:
    length = len(body) if content_length is None else content_length
    return (f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response off the socket: its status, headers (lower-case names) and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection without an answer (got {data!r})"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection in the middle of its answer"
        body += chunk
    return int(status_line.split()[1]), headers, body


def read_to_end(sock: socket.socket) -> bytes:
    """All the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def requests_counted(server: ServeProcess, status: int) -> float:
    """lmforge_requests_total for /v1/completions with this status, from /metrics."""
    text = httpx.get(server.url + "/metrics", timeout=WAIT).text
    found = re.search(rf'lmforge_requests_total{{endpoint="/v1/completions",status="{status}"}} (\S+)', text)
    return float(found.group(1)) if found else 0.0


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_json_nested_100000_deep_is_a_400_and_the_connection_serves_on(probe_server):
    with connect(probe_server) as sock:
        sock.sendall(request_bytes("POST", "/v1/completions", nested(100_000)))
        status, _, body = read_response(sock)
        assert status == 400 and "nested more than 32 levels" in json.loads(body)["error"]["message"]
        sock.sendall(request_bytes("GET", "/health"))  # the same keep-alive connection
        status, _, body = read_response(sock)
        assert status == 200 and json.loads(body)["status"] == "ok"
    assert_quiet_log(probe_server)


def test_a_client_leaving_mid_body_is_no_server_error(probe_server):
    leaving = 3
    before = requests_counted(probe_server, 499)
    for _ in range(leaving):
        with connect(probe_server) as sock:
            sock.sendall(request_bytes("POST", "/v1/completions", b'{"model": "tin', content_length=1000))
    deadline = time.monotonic() + WAIT
    while requests_counted(probe_server, 499) < before + leaving:  # counted once the server has seen each go
        assert time.monotonic() < deadline, "the server never counted the clients that left"
    assert requests_counted(probe_server, 499) == before + leaving
    assert requests_counted(probe_server, 500) == 0
    assert_quiet_log(probe_server)


def test_request_heads_that_never_finish_are_answered_408_and_closed(probe_server):
    half_open = [connect(probe_server) for _ in range(20)]
    silent = [connect(probe_server) for _ in range(3)]
    for sock in half_open:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Le")
    for sock in half_open:
        with sock:
            answer = read_to_end(sock)  # the server closes it: recv returns b"" (the socket's timeout is WAIT)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and b"connection: close" in head.lower()
        assert json.loads(body)["error"]["code"] == "request_timeout"
    for sock in silent:
        with sock:
            assert read_to_end(sock) == b""  # nothing started, nothing to answer
    assert httpx.get(probe_server.url + "/health", timeout=WAIT).status_code == 200
    assert_quiet_log(probe_server)


def test_a_request_head_over_16_kb_is_answered_431_and_closed_before_it_ends(probe_server):
    with connect(probe_server) as sock:  # a header that never ends, arriving faster than the head's deadline
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * (MAX_HEAD_BYTES + 1))
        head, _, body = read_to_end(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431") and b"connection: close" in head.lower()
    assert json.loads(body)["error"]["code"] == "head_too_large"
    with connect(probe_server) as sock:  # a head just under the limit is served
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: test\r\nX-Padding: " + b"a" * (MAX_HEAD_BYTES - 100) + b"\r\n\r\n")
        assert read_response(sock)[0] == 200
    assert_quiet_log(probe_server)


def test_a_body_that_stops_arriving_is_answered_408_and_closed(probe_server):
    with connect(probe_server) as sock:
        sock.sendall(request_bytes("POST", "/v1/completions", b'{"model": ', content_length=100))
        status, headers, body = read_response(sock)
        assert status == 408 and headers["connection"] == "close"
        assert "--body-timeout" in json.loads(body)["error"]["message"]
        assert read_to_end(sock) == b""
    assert_quiet_log(probe_server)


def chunked(size: int):
    """A body sent in chunks, without a Content-Length: only counting what arrives finds it too big."""
    for _ in range(size // 10_000):
        yield b" " * 10_000


@pytest.mark.parametrize("method, path, content, content_type, status, words", [
    ("POST", "/v1/completions", b"{not json", "application/json", 400, "not valid JSON"),
    ("POST", "/v1/completions", b"[1, 2]", "application/json", 400, "must be a JSON object"),
    ("POST", "/v1/completions", nested(40), "application/json", 400, "nested more than 32"),
    ("POST", "/tokenize", b'{"prompt": ' * 40 + b"1" + b"}" * 40, "application/json", 400, "nested more than 32"),
    ("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": "a"}).encode(), "text/plain", 415,
     "must be JSON"),
    ("POST", "/v1/completions", b" " * 400_000, "application/json", 413, "limit of 300000"),
    ("POST", "/v1/completions", chunked(400_000), "application/json", 413, "limit of 300000"),
    ("GET", "/no/such/route", None, None, 404, "Not Found"),
    ("GET", "/v1/completions", None, None, 405, "Method Not Allowed"),
    ("DELETE", "/health", None, None, 405, "Method Not Allowed"),
])
def test_malformed_http_gets_an_openai_shaped_answer(probe_server, method, path, content, content_type, status,
                                                     words):
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.request(method, probe_server.url + path, content=content, headers=headers, timeout=WAIT)
    assert response.status_code == status
    assert words in error(response)["message"]
    assert_quiet_log(probe_server)


@pytest.mark.parametrize("token", [-1, VOCAB_SIZE, 10**30, 1.0, True, "a", None])
def test_every_endpoint_refuses_the_same_bad_token_ids(probe_server, token):
    if token == VOCAB_SIZE:
        token = httpx.get(probe_server.url + "/tokenizer_info", timeout=WAIT).json()["vocab_size"]
    detokenized = httpx.post(probe_server.url + "/detokenize", json={"tokens": [0, token]}, timeout=WAIT)
    completed = httpx.post(probe_server.url + "/v1/completions", timeout=WAIT,
                           json={"model": MODEL, "prompt": [0, token], "max_tokens": 1})
    assert detokenized.status_code == completed.status_code == 400
    assert error(detokenized)["param"] == "tokens" and error(completed)["param"] == "prompt"
    assert_quiet_log(probe_server)


def test_token_ids_in_range_still_detokenize(probe_server):
    last = len(serve_fixtures.CHARS) - 1
    answer = httpx.post(probe_server.url + "/detokenize", json={"tokens": [0, last]}, timeout=WAIT)
    assert answer.json()["prompt"] == serve_fixtures.CHARS[0] + serve_fixtures.CHARS[-1]


COMPLETION = {"model": MODEL, "prompt": "a", "max_tokens": 1}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


@pytest.mark.parametrize("path, body, param, words", [
    # JSON types as they are: a string is not a number, a boolean not an integer, a float not an integer
    ("/v1/completions", {**COMPLETION, "temperature": "0.5"}, "temperature", "must be a number"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 1.0}, "max_tokens", "must be an integer"),
    ("/v1/completions", {**COMPLETION, "n": True}, "n", "got true"),
    ("/v1/completions", {**COMPLETION, "seed": 1.5}, "seed", "must be an integer"),
    ("/v1/completions", {**COMPLETION, "stream": 1}, "stream", "true or false"),
    ("/v1/completions", {**COMPLETION, "echo": "yes"}, "echo", "true or false"),
    ("/v1/completions", {**COMPLETION, "top_k": -1}, "top_k", "got -1"),
    ("/v1/completions", {**COMPLETION, "n": 65}, "n", "from 1 to 64"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs", "from 0 to 20"),
    ("/v1/completions", {**COMPLETION, "stop": ["a", 1]}, "stop", "list of at most 4 strings"),
    ("/v1/completions", {**COMPLETION, "stop": ["a"] * 5}, "stop", "at most 4"),
    ("/v1/completions", {**COMPLETION, "stream_options": {"include_usage": "yes"}}, "stream_options",
     "stream_options.include_usage: got 'yes'"),
    ("/v1/completions", {**COMPLETION, "prompt": [[0, 1], "a", 3]}, "prompt", "list of such lists"),
    ("/v1/completions", {**COMPLETION, "prompt": []}, "prompt", "not empty"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 51}, "max_tokens", "--max-tokens-limit"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "max_completion_tokens": 51}, "max_completion_tokens",
     "--max-tokens-limit"),
    ("/v1/completions", {"model": MODEL}, "prompt", "'prompt' is required"),
    ("/v1/completions", {"prompt": "a"}, "model", "'model' is required"),
    ("/v1/completions", {**COMPLETION, "best_of": 2}, "best_of", "not supported"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "bot", "content": "hi"}]}, "messages",
     "messages[0].role: got 'bot'"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages",
     "messages[0].content: got 5"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user"}]}, "messages", "messages[0].content: missing"),
    ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", "non-empty list"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 2}, "logprobs", "true or false"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", '"logprobs": true'),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ("/v1/chat/completions", {**CHAT, "temperature": 2.5}, "temperature", "at most 2"),
    ("/tokenize", {"prompt": 5}, "prompt", "must be a string"),
    ("/tokenize", {}, "prompt", "must be a string"),
    ("/tokenize", {"messages": [{"role": "user"}]}, "messages", "messages[0].content: missing"),
    ("/detokenize", {}, "tokens", "'tokens' is required"),
])
def test_each_route_names_the_field_its_body_gets_wrong(probe_server, path, body, param, words):
    response = httpx.post(probe_server.url + path, json=body, timeout=WAIT)
    assert response.status_code == 400, response.text
    message = error(response)
    assert message["param"] == param and message["type"] == "invalid_request_error"
    assert words in message["message"]
    assert_quiet_log(probe_server)


def test_null_means_not_given_and_unknown_keys_are_ignored(probe_server):
    """As before the request models: null takes the default and keys the API does not know pass unread."""
    nulls = {"temperature": None, "top_p": None, "top_k": None, "n": None, "stop": None, "seed": None,
             "stream": None, "stream_options": None, "logprobs": None, "presence_penalty": None, "user": "someone"}
    completed = httpx.post(probe_server.url + "/v1/completions", json={**COMPLETION, **nulls}, timeout=WAIT)
    assert completed.status_code == 200, completed.text
    assert len(completed.json()["choices"]) == 1 and completed.json()["usage"]["completion_tokens"] <= 1
    chatted = httpx.post(probe_server.url + "/v1/chat/completions", json={**CHAT, "max_tokens": None, **nulls},
                         timeout=WAIT)
    assert chatted.status_code == 200, chatted.text
    assert_quiet_log(probe_server)


def test_a_chat_too_long_for_the_context_is_a_400_naming_both_numbers(probe_server):
    """With no max_tokens a chat gets what the context leaves; a conversation that leaves nothing never fits."""
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "a" * 70}]}
    for body in (long_chat, {**long_chat, "max_tokens": None}):
        response = httpx.post(probe_server.url + "/v1/chat/completions", json=body, timeout=WAIT)
        assert response.status_code == 400
        message = error(response)
        assert message["code"] == "context_length_exceeded" and "context of 64 tokens" in message["message"]
    assert_quiet_log(probe_server)


@pytest.mark.parametrize("prompt, n", [("a", 5), (["a", "b"], 3), (["a"] * 5, 1)])
def test_a_request_larger_than_the_queue_is_a_400_naming_the_limit_not_a_429(probe_server, prompt, n):
    response = httpx.post(probe_server.url + "/v1/completions", timeout=WAIT,
                          json={"model": MODEL, "prompt": prompt, "n": n, "max_tokens": 1})
    assert response.status_code == 400 and "retry-after" not in response.headers
    message = error(response)["message"]
    assert "--max-queue" in message and "the 4 this server queues" in message


def test_a_request_as_large_as_the_queue_and_over_the_batch_is_served(probe_server):
    response = httpx.post(probe_server.url + "/v1/completions", timeout=WAIT,
                          json={"model": MODEL, "prompt": ["a", "b"], "n": 2, "max_tokens": 2})
    assert response.status_code == 200 and len(response.json()["choices"]) == 4  # 4 in line, 2 at a time


def test_connections_over_the_limit_get_a_503_and_room_comes_back(served_run, tmp_path):
    with ServeProcess(served_run, tmp_path / "server.log", "--max-connections", "2", "--keep-alive-timeout",
                      "600", "--header-timeout", "600") as server:
        holders = [connect(server) for _ in range(2)]
        for sock in holders:  # answered, so the server holds both as open connections
            sock.sendall(request_bytes("GET", "/health"))
            assert read_response(sock)[0] == 200
        refused = httpx.get(server.url + "/health", timeout=WAIT)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert error(refused)["code"] == "too_many_connections" and "--max-connections" in error(refused)["message"]
        holders.pop().close()
        deadline = time.monotonic() + WAIT
        while httpx.get(server.url + "/health", timeout=WAIT).status_code != 200:  # until the server sees it go
            assert time.monotonic() < deadline, "a closed connection never made room for a new one"
        holders[0].close()
        assert_quiet_log(server)


@pytest.fixture
def no_server_start(monkeypatch):
    """Serve refusals happen before uvicorn runs: a server that starts fails the test instead of blocking it."""

    def started(*args, **kwargs) -> None:
        raise AssertionError("the server started with options it should have refused")

    monkeypatch.setattr(uvicorn.Server, "run", started)
    monkeypatch.delenv("LMFORGE_API_KEY", raising=False)


@pytest.mark.parametrize("flags, words", [
    (["--api-key", ""], "API key (--api-key or $LMFORGE_API_KEY) is empty"),
    (["--api-key", "   "], "is empty"),
    (["--api-key", "two words"], "without spaces"),
    (["--api-key", "clé"], "printable ASCII"),
    (["--max-queue", str(MAX_QUEUE + 1)], f"--max-queue must be at most {MAX_QUEUE}"),
    (["--max-body-bytes", str(MAX_BODY_BYTES + 1)], f"--max-body-bytes must be at most {MAX_BODY_BYTES}"),
    (["--drain-timeout", "nan"], "--drain-timeout must be a finite number"),
    (["--body-timeout", "inf"], "--body-timeout must be a finite number"),
    (["--header-timeout", "0"], "--header-timeout must be a finite number of seconds above 0"),
    (["--keep-alive-timeout", "-1"], "--keep-alive-timeout"),
    (["--max-batch", "100000000"], "--max-batch"),
])
def test_serve_refuses_options_that_cannot_work_in_one_line(served_run, capsys, no_server_start, flags, words):
    code, _, err = run_cli(capsys, "serve", served_run, "--port", "0", "--device", "cpu", *flags)
    assert_one_line_error(code, err, words)


def test_serve_refuses_an_empty_api_key_from_the_environment(served_run, capsys, no_server_start, monkeypatch):
    monkeypatch.setenv("LMFORGE_API_KEY", "")
    code, _, err = run_cli(capsys, "serve", served_run, "--port", "0", "--device", "cpu")
    assert_one_line_error(code, err, "$LMFORGE_API_KEY) is empty")


@pytest.mark.skipif(open_files_limit() is None, reason="no limit on open files here")
def test_serve_refuses_more_connections_than_it_may_open_files(served_run, capsys, no_server_start):
    code, _, err = run_cli(capsys, "serve", served_run, "--port", "0", "--device", "cpu", "--max-connections",
                           str(open_files_limit() + 1))
    assert_one_line_error(code, err, "--max-connections must be at most", "ulimit -n")


def test_a_batch_too_large_for_memory_is_refused_before_allocating_it(served_run):
    """The reported case, as a user runs it: before, the cache's allocation failed with a traceback."""
    child = start_child_cli("serve", served_run, "--port", "0", "--device", "cpu", "--max-batch", "100000000")
    try:
        _, err = child.communicate(timeout=PATIENCE)
    finally:
        child.kill()
    assert_one_line_error(child.returncode, err, "100000000 sequences decoded at once", "GiB",
                          "lmforge serve --max-batch")
