"""The server's engine process: how its events reach the event loop, and the threads it decodes with."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lmforge.errors import UserError
from lmforge.hardware import SMALL_DECODE_WIDTH, decoding_threads
from lmforge.infer.batched import GenerationRequest
from tests.conftest import PATIENCE, assert_one_line_error, run_cli
from tests.test_batched import PROMPTS


def test_each_engine_step_reaches_the_event_loop_in_one_message_and_stop_ends_the_process(tmp_path):
    """Four requests decoded together in the engine process: every step's four tokens come in one message (read
    by the event loop when the pipe is readable), none is lost, and stopping ends the process."""
    import serve_fixtures

    from lmforge.serve.cli import build_app

    run = serve_fixtures.make_run(tmp_path / "tiny-steps")
    scheduler = build_app(run, device="cpu", max_batch=4).state.server.scheduler
    tokens_each = 5

    async def serve() -> tuple[int, list]:
        scheduler.start()
        queue: asyncio.Queue = asyncio.Queue()
        scheduler.submit([GenerationRequest(scheduler.tokenizer.encode(prompt),
                                            tokens_each, None, temperature=0) for prompt in PROMPTS[:4]], queue)
        events, finished = [], 0
        while finished < 4:
            index, event = await asyncio.wait_for(queue.get(), PATIENCE)
            events.append((index, event))
            finished += event.finish_reason is not None
        messages = scheduler.messages
        scheduler.stop(drain_timeout=0)
        return messages, events

    messages, events = asyncio.run(serve())
    assert sorted(index for index, event in events) == [i for i in range(4) for _ in range(tokens_each)]
    assert max(scheduler.counters.rows_per_step) == 4
    assert messages == scheduler.counters.steps == tokens_each - 1  # the first tokens came with the first step's
    assert serve_fixtures.gone(scheduler.pid)


def test_a_small_model_decodes_on_one_thread_unless_told_and_the_count_comes_back_after():
    before = torch.get_num_threads()
    cpu = torch.device("cpu")
    with decoding_threads(None, SMALL_DECODE_WIDTH, cpu) as threads:
        assert threads == torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with decoding_threads(2, SMALL_DECODE_WIDTH, cpu) as threads:
        assert threads == torch.get_num_threads() == 2
    with decoding_threads(None, SMALL_DECODE_WIDTH + 1, cpu) as threads:
        assert threads == before
    with pytest.raises(UserError, match="--threads"), decoding_threads(0, 64, cpu):
        pass
    assert torch.get_num_threads() == before


def test_threads_flag_refuses_a_count_below_one(capsys, tmp_path):
    for command in ("sample", "serve"):
        code, _, err = run_cli(capsys, command, tmp_path, "--threads", "0")
        assert_one_line_error(code, err, "--threads")


def test_seeded_choices_served_together_are_the_answers_each_seed_gets_alone(tmp_path):
    """Over HTTP: eight seeded choices of one request (choice i draws with seed + i), decoded in one batch, are
    the texts that eight requests with those seeds get one at a time."""
    import serve_fixtures

    from lmforge.serve.cli import build_app

    run = serve_fixtures.make_run(tmp_path / "tiny-seeded", **{"model.init_std": "0.3"})
    app = build_app(run, device="cpu", max_batch=8)
    body = {"model": "tiny-seeded", "prompt": "we read", "max_tokens": 20, "temperature": 1.0, "top_p": 0.9,
            "top_k": 20}
    with serve_fixtures.LiveServer(app) as server:
        url = f"{server.url}/v1/completions"
        together = serve_fixtures.http.post(url, json={**body, "n": 8, "seed": 40}).json()["choices"]
        batch_sizes = list(server.engine.counters.rows_per_step)
        alone = [serve_fixtures.http.post(url, json={**body, "seed": 40 + i}).json()["choices"][0]["text"]
                 for i in range(8)]
    assert max(batch_sizes) == 8  # the choices really shared their steps
    assert len(set(alone)) > 4  # the seeds give different answers
    assert [choice["text"] for choice in sorted(together, key=lambda choice: choice["index"])] == alone


def report_ctrl_c_disposition(conn) -> None:
    """A spawned process's first act: whether Ctrl-C is ignored in it (before anything of its own could set it)."""
    import signal

    conn.send(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_the_engine_process_ignores_ctrl_c_from_its_first_instruction_and_the_server_keeps_its_own():
    """Ctrl-C while the engine process still imports torch must not print a traceback from it: the process starts
    with SIGINT ignored (set in the server around the start, inherited across exec), and the server's own
    handler is back once it has started."""
    import multiprocessing
    import signal

    from lmforge.serve.scheduler import start_ignoring_ctrl_c

    before = signal.getsignal(signal.SIGINT)
    context = multiprocessing.get_context("spawn")
    conn, child_conn = context.Pipe()
    process = context.Process(target=report_ctrl_c_disposition, args=(child_conn,))
    start_ignoring_ctrl_c(process)
    assert conn.poll(PATIENCE) and conn.recv() is True
    process.join(PATIENCE)
    assert signal.getsignal(signal.SIGINT) is before
