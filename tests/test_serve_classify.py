"""Serving a classify run: POST /v1/classify answers what `lmforge predict` answers (labels and probabilities,
in input order, batched through the model), /v1/models lists the labels, the text routes refuse a classifier
and /v1/classify refuses a language model, and every bad body is a 400 in OpenAI's shape."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
import serve_fixtures
from openai import BadRequestError, OpenAI
from serve_fixtures import LiveServer, ServeProcess, http

from lmforge.serve.cli import build_app
from lmforge.tasks.predict import predict
from tests.conftest import PATIENCE

served_run = serve_fixtures.served_run
live_server = serve_fixtures.live_server
WORDS = serve_fixtures.CLASSIFY_LABELS
MAX_BATCH, MAX_QUEUE = 4, 12
# Different lengths (padding within a batch), one text longer than the 64-token context (cut to its end, as
# predict cuts it), and more texts than one batch holds.
TEXTS = ["the cat sat on a mat", "a dog", "the tree sat on a mat by the dog, and the cat saw it", "tree",
         "x" * 90 + " the dog", "the cat", "dog dog dog", "mat"]


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory) -> Path:
    return serve_fixtures.make_classify_run(tmp_path_factory.mktemp("classify"))


@pytest.fixture(scope="module")
def classifier(classify_run):
    app = build_app(classify_run, device="cpu", max_batch=MAX_BATCH, max_queue=MAX_QUEUE)
    with LiveServer(app) as server:
        yield server


def post(server: LiveServer, path: str, body: dict) -> tuple[int, dict]:
    response = http.post(server.url + path, json=body)
    return response.status_code, response.json()


def assert_refused(status: int, body: dict, *fragments: str, param: str | None = None) -> None:
    """A 400 in OpenAI's error shape naming each fragment."""
    assert status == 400, body
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == "invalid_request_error"
    for fragment in fragments:
        assert fragment in body["error"]["message"], body
    if param is not None:
        assert body["error"]["param"] == param, body


def test_classify_equals_predict_in_input_order(classifier, classify_run):
    status, body = post(classifier, "/v1/classify", {"model": "genre", "input": TEXTS})
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == "genre" and body["id"].startswith("classify-")
    labels = sorted(WORDS)
    assert [row["index"] for row in body["data"]] == list(range(len(TEXTS)))
    for text, row in zip(TEXTS, body["data"], strict=True):
        expected = predict(str(classify_run), text)
        assert row["label"] == expected["label"]
        assert row["num_classes"] == 3
        assert row["probs"] == pytest.approx([expected["probabilities"][label] for label in labels], abs=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(min(len(text), 64) for text in TEXTS)  # char tokenizer
    assert body["usage"]["completion_tokens"] == 0
    # One string is one input; vLLM's path answers the same.
    status, single = post(classifier, "/classify", {"model": "genre", "input": TEXTS[1]})
    assert status == 200 and len(single["data"]) == 1
    assert single["data"][0]["probs"] == pytest.approx(body["data"][1]["probs"], abs=1e-5)


def test_the_inputs_of_a_request_go_through_the_model_in_batches(classifier):
    sizes = []
    hook = classifier.engine.model.register_forward_hook(lambda module, args, output: sizes.append(len(output)))
    try:
        status, body = post(classifier, "/v1/classify", {"model": "genre", "input": TEXTS + TEXTS[:2]})
    finally:
        hook.remove()
    assert status == 200 and len(body["data"]) == 10
    assert sizes == [MAX_BATCH, MAX_BATCH, 2]  # all ten queued at once: three forward passes, not ten


def test_models_lists_the_classifier_with_its_labels(classifier):
    [card] = OpenAI(base_url=classifier.url + "/v1", api_key="unused", max_retries=0).models.list().data
    assert card.id == "genre"
    assert card.task == "classifier" and card.labels == sorted(WORDS)
    assert card.batching == {"max_batch": MAX_BATCH}
    # The openai client has no classify method; its generic post reaches the route (as docs/serve.md shows).
    answer = OpenAI(base_url=classifier.url + "/v1", api_key="unused", max_retries=0).post(
        "/classify", body={"model": "genre", "input": "the cat"}, cast_to=object)
    assert answer["data"][0]["label"] in WORDS and answer["data"][0]["num_classes"] == 3


def test_the_text_routes_refuse_a_classifier(classifier):
    api = OpenAI(base_url=classifier.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(BadRequestError, match="classifier.*/v1/classify"):
        api.completions.create(model="genre", prompt="the cat", max_tokens=4)
    with pytest.raises(BadRequestError, match="classifier.*/v1/classify"):
        api.chat.completions.create(model="genre", messages=[{"role": "user", "content": "hi"}],
                                    response_format={"type": "json_object"})
    status, body = post(classifier, "/v1/classify", {"model": "genre", "input": "the cat",
                                                     "response_format": {"type": "json_object"}})
    assert_refused(status, body, "response_format", param="response_format")


def test_classify_refuses_a_language_model(live_server):
    status, body = post(live_server, "/v1/classify", {"model": "tiny-served", "input": "the cat"})
    assert_refused(status, body, "language model", "--task classify")


@pytest.mark.parametrize("body, fragments, param", [
    ({"input": []}, ["'input' must be a string or a non-empty list of strings"], "input"),
    ({"input": ["the cat", 3]}, ["'input' must be a string or a non-empty list of strings"], "input"),
    ({"input": 3}, ["'input' must be"], "input"),
    ({"input": [["the cat"]]}, ["'input' must be"], "input"),
    ({"input": ["the cat", ""]}, ["non-empty texts", "input[1]"], "input"),
    ({"input": ""}, ["non-empty texts"], "input"),
    ({}, ["'input' is required"], "input"),
    ({"input": ["the cat"] * (MAX_QUEUE + 1)}, [f"{MAX_QUEUE + 1} texts", f"the {MAX_QUEUE} this server queues",
                                               "--max-queue"], "input"),
    ({"input": ["the çat"]}, ["'input'", "allow_unknown"], "input"),
])
def test_bad_classify_bodies_are_400s_and_the_server_keeps_serving(classifier, body, fragments, param):
    status, answer = post(classifier, "/v1/classify", {"model": "genre", **body})
    assert_refused(status, answer, *fragments, param=param)
    status, answer = post(classifier, "/v1/classify", {"model": "genre", "input": "the cat"})
    assert status == 200 and len(answer["data"]) == 1


def test_a_wrong_model_name_is_404(classifier):
    status, body = post(classifier, "/v1/classify", {"model": "other", "input": "the cat"})
    assert status == 404 and "'genre'" in body["error"]["message"]


def test_lmforge_serve_serves_a_classify_run_and_logs_nothing_for_bad_bodies(tmp_path, classify_run):
    with ServeProcess(classify_run, tmp_path / "serve.log") as server:
        before = server.log()
        status = http.post(server.url + "/v1/classify", json={"model": "genre", "input": ["the dog", 5]}).status_code
        assert status == 400
        answer = http.post(server.url + "/v1/classify", json={"model": "genre", "input": ["the dog"]})
        assert answer.status_code == 200
        assert answer.json()["data"][0]["label"] == predict(str(classify_run), "the dog")["label"]
        assert server.log() == before


class HeldForward:
    """Holds the classifier's forward passes until `release` (a forward pre-hook waiting on an event), noting
    each batch's size: what arrives meanwhile waits, as it would behind a slow batch."""

    def __init__(self, server: LiveServer):
        self.engine = server.engine
        self.gate = threading.Event()
        self.sizes: list[int] = []

    def hold(self, module, args) -> None:  # a pre-hook's return value would replace the forward's arguments
        self.sizes.append(len(args[0]))
        self.gate.wait(PATIENCE)

    def __enter__(self) -> HeldForward:
        self.hook = self.engine.model.register_forward_pre_hook(self.hold)
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self.hook.remove()


def in_background(work) -> tuple[threading.Thread, list]:
    results: list = []
    thread = threading.Thread(target=lambda: results.append(work()), daemon=True)
    thread.start()
    return thread, results


def test_inputs_of_concurrent_requests_share_a_batch_and_each_gets_its_own(classifier):
    alone = [post(classifier, "/v1/classify", {"model": "genre", "input": texts})[1]["data"]
             for texts in (TEXTS[:2], TEXTS[2:4])]
    with HeldForward(classifier) as held:
        first, _ = in_background(lambda: post(classifier, "/v1/classify", {"model": "genre", "input": TEXTS[4]}))
        wait_until(lambda: held.sizes == [1], "the first request's batch")
        threads = [in_background(lambda texts=texts: post(classifier, "/v1/classify",
                                                           {"model": "genre", "input": texts}))
                   for texts in (TEXTS[:2], TEXTS[2:4])]
        wait_until(lambda: classifier.engine.waiting_count() == 4, "both requests to wait")
        held.gate.set()
        for thread, _ in [(first, None), *threads]:
            thread.join(PATIENCE)
    assert held.sizes == [1, 4]  # the two waiting requests went through the model together
    for (_, [(status, body)]), expected in zip(threads, alone, strict=True):
        assert status == 200
        assert [row["probs"] for row in body["data"]] == [pytest.approx(row["probs"], abs=1e-5) for row in expected]


def test_a_full_queue_is_a_429_and_a_client_that_leaves_has_its_waiting_inputs_dropped(classifier):
    engine = classifier.engine
    payload = json.dumps({"model": "genre", "input": ["the cat"] * MAX_QUEUE}).encode()
    host, port = classifier.url.removeprefix("http://").split(":")
    with HeldForward(classifier) as held:
        with socket.create_connection((host, int(port))) as connection:
            connection.sendall(f"POST /v1/classify HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            wait_until(lambda: held.sizes == [MAX_BATCH] and engine.waiting_count() == MAX_QUEUE - MAX_BATCH,
                       "one batch computing, the rest waiting")
            status, body = post(classifier, "/v1/classify", {"model": "genre", "input": ["the dog"] * (MAX_BATCH + 1)})
            assert status == 429 and body["error"]["code"] == "queue_full" and "--max-queue" in body["error"]["message"]
        wait_until(lambda: all(item.dropped for item in list(engine.waiting)), "the inputs of the client that left "
                                                                              "to be dropped")
    wait_until(lambda: not engine.has_work(), "the engine to be idle")
    assert held.sizes == [MAX_BATCH]  # nothing the client left behind went through the model
    assert post(classifier, "/v1/classify", {"model": "genre", "input": "the dog"})[0] == 200


def wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        assert time.monotonic() < deadline, f"waited {PATIENCE} s for {what}"
        time.sleep(0.01)


def test_a_recurrent_classifier_is_served_as_predict_reads_it(tmp_path):
    run = serve_fixtures.make_classify_run(tmp_path, **{"model.arch": "lstm"})
    with LiveServer(build_app(run, device="cpu", max_batch=MAX_BATCH)) as server:
        status, body = post(server, "/v1/classify", {"model": "genre", "input": TEXTS})
    assert status == 200
    for text, row in zip(TEXTS, body["data"], strict=True):
        expected = predict(str(run), text)
        assert row["label"] == expected["label"]
        assert row["probs"] == pytest.approx([expected["probabilities"][label] for label in sorted(WORDS)], abs=1e-5)
