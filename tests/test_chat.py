"""`lmforge chat`: history through the chat template, truncation, and the terminal session through a pty."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.config.load import load_config
from lmforge.data.template import ChatTemplate
from lmforge.data.tokenizer import CharTokenizer
from lmforge.infer.chat import fit_history, stream_reply
from lmforge.infer.decode import TextStream
from lmforge.train.trainer import Trainer
from tests.conftest import PATIENCE
from tests.test_decode import ScriptedModel, Writes

pexpect = pytest.importorskip("pexpect", reason="pexpect is not installed (pip install pexpect, or the dev extra)")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, tiny_data) -> Path:
    """A tiny run with a 64-token context: room for a short conversation through the template."""
    from conftest import TINY_OVERRIDES

    import lmforge.hardware as hardware

    run = tmp_path_factory.mktemp("chat") / "run"
    with pytest.MonkeyPatch.context() as patch:  # MFU's FLOP-rate probe: not under test
        patch.setattr(hardware, "peak_flops", lambda device, precision, **_: 1e12)
        config = load_config(None, {**TINY_OVERRIDES, "model.block_size": "64", "train.max_steps": "2"})
        Trainer(config, tiny_data, run, quiet=True).run()
    return run


def spawn_chat(run: Path, *options: str):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    # Ctrl-C reaches the chat as it would from a terminal: a test run started in the background (a job in a
    # non-interactive shell, as CI may) inherits SIGINT ignored, and a child would inherit that too.
    return pexpect.spawn(sys.executable, ["-m", "lmforge", "chat", str(run), "--device", "cpu", *options],
                         env=env, encoding="utf-8", timeout=PATIENCE, dimensions=(24, 200),
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_fit_history_drops_the_oldest_turns_until_the_prompt_fits():
    tokenizer, template = CharTokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :\n"), ChatTemplate()
    messages = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "an answer"},
                {"role": "user", "content": "second"}]
    whole, _ = template.encode(messages, tokenizer, add_generation_prompt=True)
    newest, _ = template.encode(messages[2:], tokenizer, add_generation_prompt=True)
    assert fit_history(messages, template, tokenizer, len(whole)) == (whole, 0)
    assert fit_history(messages, template, tokenizer, len(whole) - 1) == (newest, 2)
    assert fit_history(messages, template, tokenizer, 3) == (newest, 2)  # the newest message always stays


@pytest.mark.parametrize("text, held", [("the end\n\nUS", 4), ("the end\n", 1), ("the end", 0), ("the end\n\nUX", 0)])
def test_a_possible_start_of_a_stop_text_is_held_back_unshown(text, held):
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :\n")
    stream = TextStream(tokenizer, ChatTemplate().stop_texts())  # "\n\nUSER:\n", "\n\nSYSTEM:\n"
    shown = "".join(stream.add(token) for token in tokenizer.encode(text))
    assert shown == stream.shown == text[: len(text) - held] and not stream.stopped


@pytest.mark.parametrize("ending, reason", [("\n\nUSER:\nmore", "stop"), ("<eot>", "stop"), ("", "length")])
def test_a_reply_ends_at_a_stop_text_or_end_of_text_and_never_shows_a_marker(ending, reason):
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :\n")
    script = tokenizer.encode("a reply") + ([tokenizer.eot_id] if ending == "<eot>" else tokenizer.encode(ending))
    out = Writes()
    reply, why = stream_reply(ScriptedModel(script + [0] * 8, tokenizer.vocab_size), tokenizer, [0],
                              ChatTemplate().stop_texts(), out, max_new_tokens=len(script) if reason == "stop" else 7,
                              temperature=0.0, top_k=None, top_p=None, generator=None)
    assert (reply, why) == ("a reply", reason)
    assert out.getvalue() == "a reply"
    assert all("\n" not in piece for piece in out.pieces)  # "\n\nUSER:" was held back, then dropped


def test_chat_session_streams_replies_and_obeys_commands(chat_run):
    child = spawn_chat(chat_run, "--max-new-tokens", "8", "--temperature", "0")
    child.expect("64-token context")
    child.expect_exact("you> ")
    child.sendline("the cat sat on the mat")
    child.expect(r"model> (.*)\r\n")  # a reply of at most 8 tokens, then the prompt again
    assert child.match.group(1).strip() != ""
    child.expect_exact("you> ")
    child.sendline("/temp 0.5")
    child.expect_exact("(temperature 0.5)")
    child.sendline("/temp hot")
    child.expect_exact("(usage: /temp X")
    # The history (two turns above) and this message no longer fit beside the reply: the oldest turns go.
    child.sendline("a dog ran to the park and the bird sang")
    child.expect_exact("(context full: dropped the 2 oldest messages)")
    child.expect_exact("you> ")
    child.sendline("/reset")
    child.expect_exact("(conversation forgotten)")
    child.expect_exact("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_c_stops_the_answer_not_the_program_and_ctrl_d_exits(chat_run):
    child = spawn_chat(chat_run, "--max-new-tokens", "1000000", "--temperature", "0")
    child.expect_exact("you> ")
    child.sendline("the cat")
    child.expect(r"model> [^\r\n]{10}")  # the (greedy, endless) answer is streaming
    child.sendintr()
    child.expect_exact("[stopped]")
    child.expect_exact("you> ")
    child.sendline("/temp 0")  # still alive and listening
    child.expect_exact("(temperature 0)")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_chat_without_a_run_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["chat", str(tmp_path / "missing")]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"lmforge chat: error: run directory not found: {tmp_path / 'missing'}\n"


def test_temp_takes_what_temperature_takes_and_unknown_characters_are_refused_by_name(chat_run):
    """/temp accepts the tiny temperatures the sampler is defined for and refuses nan and inf (as --temperature
    does); a message with characters the tokenizer never saw is refused, naming them, and the chat goes on."""
    child = spawn_chat(chat_run, "--max-new-tokens", "4", "--temperature", "0")
    child.expect_exact("you> ")
    for bad in ("nan", "inf", "-1"):
        child.sendline(f"/temp {bad}")
        child.expect_exact("(usage: /temp X")
    child.sendline("/temp 5e-324")
    child.expect_exact("(temperature 4.94066e-324)")
    child.sendline("the cat Ω sat")
    child.expect_exact("your message has characters the run's tokenizer does not know ('Ω')")
    child.expect_exact("you> ")
    child.sendline("the cat sat")
    child.expect(r"model> (.*)\r\n")  # at a temperature of 5e-324 the reply is drawn without NaN
    child.expect_exact("you> ")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_allow_unknown_reads_unknown_characters_as_the_unknown_token(chat_run):
    child = spawn_chat(chat_run, "--max-new-tokens", "4", "--temperature", "0", "--allow-unknown")
    child.expect_exact("you> ")
    child.sendline("the cat Ω sat")
    child.expect_exact("(read as the unknown token: 'Ω')")
    child.expect(r"model> (.*)\r\n")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
