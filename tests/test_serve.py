"""The OpenAI-compatible server, live on a free port: the official client, SSE framing, batching through the
API, disconnects, every error status and shape, auth, and lm-eval scoring over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from functools import partial

import httpx
import pytest
import serve_fixtures
import torch
from openai import OpenAI
from serve_fixtures import LiveServer, http

from lmforge.cli import main
from lmforge.data.template import ChatTemplate
from lmforge.infer.generate import generate
from lmforge.infer.load import load_run
from lmforge.serve.cli import build_app
from tests.conftest import PATIENCE

served_run = serve_fixtures.served_run
live_server = serve_fixtures.live_server
PROMPTS = ["the cat", "a", "we read books and", "you drink tea, they write code."]


def client(server: LiveServer, key: str = "unused") -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)


def greedy(run, prompt_ids: list[int], max_tokens: int) -> list[int]:
    loaded = load_run(run)
    model, tokenizer = loaded.model, loaded.tokenizer
    return list(generate(model, prompt_ids, max_tokens, temperature=0, stop_token=tokenizer.eot_id))


def test_models_lists_the_run_with_context_and_batching(live_server):
    [card] = client(live_server).models.list().data
    assert card.id == "tiny-served"
    assert card.context_length == 64
    assert card.batching == {"continuous": True, "batched_decoding": True, "cache": "kv", "max_batch": 4}
    assert http.get(live_server.url + "/health").json()["status"] == "ok"
    info = http.get(live_server.url + "/tokenizer_info").json()
    eot = http.post(live_server.url + "/tokenize", json={"prompt": info["eos_token"]}).json()["tokens"]
    assert eot == [len(serve_fixtures.CHARS)]  # the char tokenizer's end-of-text id
    assert http.post(live_server.url + "/detokenize", json={"tokens": [0, 1]}).json()["prompt"] == \
        serve_fixtures.CHARS[:2]


def test_completion_through_the_openai_client_is_the_greedy_continuation(live_server, served_run):
    tokenizer = load_run(served_run).tokenizer
    result = client(live_server).completions.create(model="tiny-served", prompt="the cat", max_tokens=20,
                                                     temperature=0)
    expected = greedy(served_run, tokenizer.encode("the cat"), 20)
    [choice] = result.choices
    assert choice.text == tokenizer.decode(expected)
    assert choice.finish_reason == ("length" if len(expected) == 20 else "stop")
    assert result.usage.prompt_tokens == 7
    assert result.usage.completion_tokens == len(expected) + (choice.finish_reason == "stop")


def test_chat_streamed_and_not_give_the_same_reply_through_the_template(live_server, served_run):
    tokenizer = load_run(served_run).tokenizer
    messages = [{"role": "user", "content": "Hello there"}]
    api = client(live_server)
    reply = api.chat.completions.create(model="tiny-served", messages=messages, max_tokens=12, temperature=0)
    chunks = list(api.chat.completions.create(model="tiny-served", messages=messages, max_tokens=12,
                                              temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    prompt, _ = ChatTemplate().encode(messages, tokenizer, add_generation_prompt=True)
    expected = tokenizer.decode(greedy(served_run, prompt, 12))
    for stop in ChatTemplate().stop_texts():
        expected = expected.split(stop)[0]
    assert reply.choices[0].message.content == streamed == expected
    assert reply.choices[0].message.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    assert reply.usage.prompt_tokens == len(prompt)


def test_sse_framing_is_data_events_ending_with_done(live_server):
    body = {"model": "tiny-served", "prompt": "we read", "max_tokens": 15, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", live_server.url + "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") and "\n" not in e for e in events[:-1])
    whole = http.post(live_server.url + "/v1/completions", json={**body, "stream": False}).json()
    assert "".join(c["text"] for p in payloads for c in p["choices"]) == whole["choices"][0]["text"]
    assert payloads[-1]["usage"] == whole["usage"] and payloads[-1]["choices"] == []
    assert payloads[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_concurrent_requests_are_batched_and_match_alone(live_server, served_run):
    tokenizer = load_run(served_run).tokenizer
    engine = live_server.engine
    engine.counters.rows_per_step.clear()
    results: dict[int, str] = {}

    def ask(index: int) -> None:
        answer = http.post(live_server.url + "/v1/completions", timeout=PATIENCE, json={
            "model": "tiny-served", "prompt": PROMPTS[index], "max_tokens": 25, "temperature": 0})
        results[index] = answer.json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for index, prompt in enumerate(PROMPTS):
        assert results[index] == tokenizer.decode(greedy(served_run, tokenizer.encode(prompt), 25))
    assert max(engine.counters.rows_per_step) > 1  # some decode steps ran several requests in one pass


def test_echo_with_max_tokens_0_returns_the_prompts_logprobs(live_server, served_run):
    loaded = load_run(served_run)
    model, tokenizer = loaded.model, loaded.tokenizer
    answer = http.post(live_server.url + "/v1/completions", json={
        "model": "tiny-served", "prompt": "the cat", "max_tokens": 0, "echo": True, "logprobs": 2}).json()
    logprobs = answer["choices"][0]["logprobs"]
    ids = tokenizer.encode("the cat")
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids]))[0][0], -1)
    assert answer["choices"][0]["text"] == "the cat"
    assert logprobs["tokens"] == list("the cat") and logprobs["text_offset"] == list(range(7))
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert logprobs["token_logprobs"][1:] == pytest.approx([float(expected[i, t]) for i, t in enumerate(ids[1:])],
                                                           abs=1e-5)
    assert all(len(top) == 2 for top in logprobs["top_logprobs"][1:])
    assert answer["usage"]["completion_tokens"] == 0


def test_chat_logprobs_are_the_completion_logprobs_of_its_prompt_streamed_or_not(live_server, served_run):
    tokenizer = load_run(served_run).tokenizer
    messages = [{"role": "user", "content": "Hello there"}]
    prompt, _ = ChatTemplate().encode(messages, tokenizer, add_generation_prompt=True)
    api = client(live_server)
    asked = dict(model="tiny-served", messages=messages, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3)
    chat = api.chat.completions.create(**asked).choices[0]
    chunks = list(api.chat.completions.create(**asked, stream=True))
    streamed = [entry for chunk in chunks if chunk.choices and chunk.choices[0].logprobs
                for entry in chunk.choices[0].logprobs.content]
    completion = api.completions.create(model="tiny-served", prompt=prompt, max_tokens=12, temperature=0,
                                        logprobs=3, stop=ChatTemplate().stop_texts()).choices[0]
    expected = completion.logprobs
    for content in (chat.logprobs.content, streamed):
        assert [entry.token for entry in content] == expected.tokens
        assert [entry.logprob for entry in content] == pytest.approx(expected.token_logprobs, abs=1e-5)
        for entry, top in zip(content, expected.top_logprobs, strict=True):
            assert entry.bytes == list(entry.token.encode())
            assert {alternative.token: alternative.logprob for alternative in entry.top_logprobs} == \
                pytest.approx(top, abs=1e-5)
    assert chat.message.content == completion.text
    plain = api.chat.completions.create(**{**asked, "top_logprobs": None}).choices[0]
    assert [entry.token for entry in plain.logprobs.content] == expected.tokens
    assert all(entry.top_logprobs == [] for entry in plain.logprobs.content)
    assert api.chat.completions.create(**{**asked, "logprobs": False, "top_logprobs": None}).choices[0].logprobs \
        is None


@pytest.fixture(scope="module")
def held_server(served_run):
    """A server whose engine process waits for `held_server.gate` in every forward pass (set: it runs) and sleeps
    20 ms before each step, so that a client can leave mid-answer."""
    gate = serve_fixtures.new_gate()
    app = build_app(served_run, device="cpu", max_batch=4,
                    engine_loader=partial(serve_fixtures.held_engine, gate, 0.02))
    with LiveServer(app) as server:
        server.gate = gate
        yield server


def test_a_client_leaving_mid_stream_frees_its_slot(held_server):
    engine = held_server.engine
    cancelled = engine.counters.cancelled
    body = {"model": "tiny-served", "prompt": "a", "max_tokens": 60, "temperature": 0, "stream": True}
    with http.stream("POST", held_server.url + "/v1/completions", json=body) as response:
        next(response.iter_lines())  # the first event: the request holds a slot
        assert engine.active_count() == 1
    wait_until(lambda: engine.active_count() == 0 and engine.counters.cancelled == cancelled + 1,
               "the engine to drop the request of the client that left")


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"waited {PATIENCE} s for {what}"
        time.sleep(0.01)


@pytest.mark.parametrize("route, body", [
    ("/v1/completions", {"prompt": "a"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a"}]}),
    ("/v1/completions", {"prompt": "a", "stream": True}),  # gone before its first token: no stream started yet
])
def test_a_client_leaving_before_its_whole_answer_frees_its_slot(held_server, route, body):
    engine, gate = held_server.engine, held_server.gate
    gate.clear()  # the engine stops in the request's first forward pass until the client has left
    cancelled = engine.counters.cancelled
    payload = json.dumps({"model": "tiny-served", "max_tokens": 20, "temperature": 0, **body}).encode()
    host, port = held_server.url.removeprefix("http://").split(":")
    closed = f'lmforge_requests_total{{endpoint="{route}",status="499"}}'
    closed_before = _counted(held_server, closed)
    try:
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            wait_until(engine.has_work, "the request to reach the engine")
        # The 499 is counted after the server has sent the engine the cancel.
        wait_until(lambda: _counted(held_server, closed) == closed_before + 1, "the server to see the client leave")
    finally:
        gate.set()
    wait_until(lambda: engine.active_count() == 0 and not engine.has_work(), "the slot to be freed")
    wait_until(lambda: engine.counters.cancelled == cancelled + 1, "the engine to count the cancel")


def _counted(server: LiveServer, line: str) -> float:
    """The value of a metrics line (0 when it is not there yet)."""
    for row in http.get(server.url + "/metrics").text.splitlines():
        if row.startswith(line):
            return float(row.split()[-1])
    return 0.0


def error(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("body, status, param, words", [
    (b"{not json", 400, None, "not valid JSON"),
    ({"model": "tiny-served", "prompt": "a", "temperature": "hot"}, 400, "temperature", "must be a number"),
    ({"model": "tiny-served", "prompt": 7}, 400, "prompt", "must be a string"),
    ({"model": "tiny-served", "prompt": "a" * 60, "max_tokens": 10}, 400, "prompt", "60 tokens"),
    ({"model": "tiny-served", "prompt": "a", "max_tokens": 201}, 400, "max_tokens", "limit of 200"),
    ({"model": "tiny-served", "prompt": "a" * 30_000}, 413, None, "limit of 20000"),
    ({"model": "gpt-4", "prompt": "a"}, 404, "model", "does not exist"),
    ({"model": "tiny-served", "prompt": "a", "presence_penalty": 1}, 400, "presence_penalty", "not supported"),
])
def test_bad_requests_get_their_status_in_openai_shape(live_server, body, status, param, words):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(live_server.url + "/v1/completions", content=content,
                          headers={"content-type": "application/json"})
    assert response.status_code == status
    message = error(response)
    assert message["param"] == param and words in message["message"]


def test_prompt_too_long_names_both_numbers(live_server):
    message = error(http.post(live_server.url + "/v1/completions", json={
        "model": "tiny-served", "prompt": "a" * 60, "max_tokens": 10}))["message"]
    assert "60 tokens" in message and "more than the 54" in message and "context of 64" in message


def test_a_full_queue_answers_429_with_retry_after(served_run):
    gate = serve_fixtures.new_gate(open_=False)  # the engine holds still until the test lets it go
    app = build_app(served_run, device="cpu", max_batch=1, max_queue=1,
                    engine_loader=partial(serve_fixtures.held_engine, gate, 0))
    engine = app.state.server.engine
    with LiveServer(app) as server:
        body = {"model": "tiny-served", "prompt": "a", "max_tokens": 5}
        waiting = threading.Thread(target=httpx.post, args=(server.url + "/v1/completions",),
                                   kwargs={"json": body, "timeout": PATIENCE})
        waiting.start()
        wait_until(lambda: engine.waiting_count() >= 1, "the first request to wait")
        response = http.post(server.url + "/v1/completions", json=body)
        gate.set()
        waiting.join()
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert error(response)["type"] == "rate_limit_error"
        assert http.post(server.url + "/v1/completions", json=body).status_code == 200  # room again
        metrics = http.get(server.url + "/metrics").text
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="429"} 1.0' in metrics
    assert 'lmforge_requests_total{endpoint="/v1/completions",status="200"} 2.0' in metrics
    assert "lmforge_time_to_first_token_seconds_count 2.0" in metrics


def test_stopping_the_server_ends_its_engine_process(served_run):
    app = build_app(served_run, device="cpu")
    pid = app.state.server.engine.pid
    assert pid in serve_fixtures.child_pids(os.getpid())
    with LiveServer(app) as server:
        assert http.post(server.url + "/v1/completions", json={"model": "tiny-served", "prompt": "a",
                                                                "max_tokens": 3}).status_code == 200
    assert serve_fixtures.gone(pid)


def test_an_engine_process_that_dies_fails_its_requests_and_says_so(served_run, caplog):
    """The engine process killed mid-answer: the stream in flight ends with an error event, later requests get a
    503 and /health says so, in OpenAI's shape; the log says it in one line; nothing hangs."""
    gate = serve_fixtures.new_gate(open_=False)
    app = build_app(served_run, device="cpu", engine_loader=partial(serve_fixtures.held_engine, gate, 0))
    engine = app.state.server.engine
    body = {"model": "tiny-served", "prompt": "a", "max_tokens": 10}
    with LiveServer(app) as server, caplog.at_level("ERROR", logger="lmforge.serve"):
        waiting = {}
        thread = threading.Thread(target=lambda: waiting.update(answer=http.post(
            server.url + "/v1/completions", json=body)))
        thread.start()
        wait_until(engine.has_work, "the request to reach the engine")
        os.kill(engine.pid, signal.SIGKILL)
        thread.join(PATIENCE)
        failed = waiting["answer"]
        assert failed.status_code == 500 and "stopped unexpectedly" in error(failed)["message"]
        refused = http.post(server.url + "/v1/completions", json={**body, "stream": True})
        assert refused.status_code == 503 and error(refused)["code"] == "engine_stopped"
        assert http.get(server.url + "/health").status_code == 503
    said = [record.getMessage() for record in caplog.records if "stopped unexpectedly" in record.getMessage()]
    assert len(said) == 1 and "\n" not in said[0] and str(engine.pid) in said[0]
    assert serve_fixtures.gone(engine.pid)


def test_an_api_key_is_required_on_the_api_but_not_on_health(served_run):
    with LiveServer(build_app(served_run, device="cpu", api_key="sesame")) as server:
        assert http.get(server.url + "/v1/models").status_code == 401
        wrong = http.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and error(wrong)["type"] == "authentication_error"
        assert client(server, "sesame").models.list().data[0].id == "tiny-served"
        assert http.get(server.url + "/health").status_code == 200


def lmforge_eval_choice(capsys, run, records: list[dict], folder) -> tuple[float, list[int]]:
    """`lmforge eval RUN --task choice` on the same questions: lm-eval puts a space between the question and
    each choice, so the choice records carry it. Its accuracy and its pick for each record."""
    data, predictions = folder / "choice.jsonl", folder / "predictions.jsonl"
    data.write_text("".join(json.dumps({"context": r["question"], "choices": [" " + c for c in r["choices"]],
                                        "label": r["answer"]}) + "\n" for r in records))
    capsys.readouterr()
    code = main(["eval", str(run), "--task", "choice", "--data", str(data), "--predictions", str(predictions),
                 "--device", "cpu"])
    scores = json.loads(capsys.readouterr().out)
    assert code == 0
    return scores["acc"], [json.loads(line)["prediction"] for line in predictions.read_text().splitlines()]


MC_RECORDS = [{"question": q, "choices": c, "answer": a} for q, c, a in [
    ("the cat sat on the", ["mat", "sky", "tea"], 0), ("we read", ["books", "code", "trees"], 1),
    ("a dog ran to the", ["park", "tree", "cat"], 2), ("you drink", ["tea", "mat", "books"], 0),
    ("they write", ["code", "tea", "park"], 1), ("the bird sang in a", ["tree", "book", "cup"], 2)]]


def test_lm_eval_over_http_scores_as_lmforge_eval_does(live_server, served_run, tmp_path, monkeypatch, capsys):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[api]')")
    pytest.importorskip("tenacity", reason="lm-eval's API models need lm-eval[api]")
    for name, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                        "HF_DATASETS_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(name, value)
    from lm_eval.tasks import TaskManager

    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_RECORDS))
    (tmp_path / "tiny_choice.yaml").write_text(
        f"task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'mc.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
        "    aggregation: mean\n    higher_is_better: true\n")
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["tiny_choice"], log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        model_args={"base_url": live_server.url + "/v1/completions", "model": "tiny-served",
                    "tokenizer_backend": "remote", "max_length": 64, "num_concurrent": 1, "max_retries": 1})
    accuracy, picks = lmforge_eval_choice(capsys, served_run, MC_RECORDS, tmp_path)
    assert out["results"]["tiny_choice"]["acc,none"] == pytest.approx(accuracy)
    harness_picks = {s["doc_id"]: max(range(3), key=lambda i: s["resps"][i][0][0])
                     for s in out["samples"]["tiny_choice"]}
    assert [harness_picks[i] for i in range(len(MC_RECORDS))] == picks


def test_sigterm_drains_a_streaming_request_and_exits_0(served_run):
    import signal
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(served_run), "--port", "0",
                                "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = process.stderr.readline()
        url = line.split(" on ")[1].split()[0]
        children = serve_fixtures.child_pids(process.pid)  # the engine process and multiprocessing's helper
        engine = serve_fixtures.engine_pid(process.pid)
        body = {"model": "tiny-served", "prompt": "a", "max_tokens": 50, "temperature": 1, "stream": True,
                "stop": None}
        with http.stream("POST", url + "/v1/completions", json=body, timeout=PATIENCE) as response:
            lines = response.iter_lines()
            next(lines)
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)  # it finished
        assert process.wait(timeout=PATIENCE) == 0
        assert "did not stop" not in process.stderr.read()  # the engine process stopped when told, not killed
        assert serve_fixtures.gone(engine)  # it stopped with the server
        wait_until(lambda: all(serve_fixtures.gone(child) for child in children), "no process of the server left")
    finally:
        process.kill()


def test_ctrl_c_in_a_terminal_stops_the_server_and_its_engine_process(served_run):
    """Ctrl-C reaches every process of the terminal's group: the engine process ignores it, the server drains,
    stops it and exits 130 (as every command does after Ctrl-C)."""
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # SIGINT at its default, as in a terminal: a test run started in the background (a job in a non-interactive
    # shell) inherits it ignored, and the server would inherit that and rightly keep running through Ctrl-C.
    process = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", str(served_run), "--port", "0",
                                "--device", "cpu"], stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        url = process.stderr.readline().split(" on ")[1].split()[0]
        children = serve_fixtures.child_pids(process.pid)
        engine = serve_fixtures.engine_pid(process.pid)
        assert http.post(url + "/v1/completions", json={"model": "tiny-served", "prompt": "a",
                                                         "max_tokens": 3}).status_code == 200
        os.killpg(process.pid, signal.SIGINT)
        assert process.wait(timeout=PATIENCE) == 130
        assert serve_fixtures.gone(engine)
        wait_until(lambda: all(serve_fixtures.gone(child) for child in children), "no process of the server left")
        assert "Traceback" not in process.stderr.read()
    finally:
        process.kill()


def test_a_killed_server_leaves_no_engine_process_behind(served_run, tmp_path):
    """SIGKILL gives the server no time to stop its engine: the engine process sees its pipe close and exits."""
    with serve_fixtures.ServeProcess(served_run, tmp_path / "serve.log") as server:
        engine = serve_fixtures.engine_pid(server.process.pid)
        server.process.kill()
        server.process.wait()
        wait_until(lambda: serve_fixtures.gone(engine), "the engine process to exit")


def test_serve_refuses_a_missing_run_and_a_busy_port_in_one_line(served_run, tmp_path, capsys):
    from lmforge.cli import main
    from lmforge.serve.cli import bind

    assert main(["serve", str(tmp_path / "nothing"), "--port", "0"]) == 2
    assert "run directory not found" in capsys.readouterr().err
    busy = bind("127.0.0.1", 0)
    try:
        assert main(["serve", str(served_run), "--port", str(busy.getsockname()[1])]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "cannot listen" in err
    finally:
        busy.close()
    assert main(["serve", str(served_run), "--max-batch", "0", "--port", "0"]) == 2


def test_n_choices_of_a_seeded_call_draw_with_seed_plus_index_and_stream_the_same(live_server):
    body = {"model": "tiny-served", "prompt": ["the", "we"], "n": 2, "max_tokens": 8, "seed": 7, "logprobs": 0}
    whole = http.post(live_server.url + "/v1/completions", json=body).json()["choices"]
    assert [c["index"] for c in whole] == [0, 1, 2, 3]
    second = http.post(live_server.url + "/v1/completions", json={**body, "prompt": "the", "n": 1,
                                                                  "seed": 8}).json()["choices"][0]
    assert second["text"] == whole[1]["text"]
    raw = http.post(live_server.url + "/v1/completions", json={**body, "stream": True}).text
    chunks = [json.loads(e.removeprefix("data: ")) for e in raw.split("\n\n")[:-2]]
    for choice in whole:
        parts = [c for chunk in chunks for c in chunk["choices"] if c["index"] == choice["index"]]
        assert "".join(p["text"] for p in parts) == choice["text"]
        offsets = [o for p in parts if p["logprobs"] for o in p["logprobs"]["text_offset"]]
        assert offsets == choice["logprobs"]["text_offset"]


@pytest.mark.parametrize("arch, batched, cache", [("gru", True, "recurrent"), ("mlp", False, "none")])
def test_models_metadata_says_how_each_arch_batches(arch, batched, cache, tmp_path):
    app = build_app(serve_fixtures.make_run(tmp_path / arch, **{"model.arch": arch}), device="cpu")
    card = app.state.server.model_card()
    assert card["batching"]["batched_decoding"] is batched and card["batching"]["cache"] == cache
