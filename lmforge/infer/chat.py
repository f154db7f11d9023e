"""`lmforge chat RUN`: a multi-turn conversation with a run's model in the terminal, streamed as it is written.

The history goes through the run's chat template (lmforge/data/template.py) every turn, so the model sees
the conversation the way a fine-tuned run was trained on it. The context window is the model's block size:
when the conversation no longer fits beside room for the reply, the oldest turns are dropped, and the chat
says so. A reply ends at the end-of-text token, at the start of another turn (a base model writes the next
speaker's marker instead), at --max-new-tokens, or at Ctrl-C, which stops the answer and keeps the program.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import torch

from lmforge.data.template import ChatTemplate
from lmforge.data.tokenizer import name_characters
from lmforge.errors import UserError
from lmforge.infer.constrained import CompiledFormat, OutputFormat, compile_format
from lmforge.infer.decode import TextStream
from lmforge.infer.generate import check_generates, generate
from lmforge.infer.load import load_run
from lmforge.infer.sampling import SamplingError, SamplingParams

HELP = ("/reset forgets the conversation, /temp X sets the temperature (0 is greedy), /quit or Ctrl-D exits; "
        "Ctrl-C stops an answer")
USER_PROMPT = "you> "
MODEL_PROMPT = "model> "
DEFAULT_SAMPLING = SamplingParams(temperature=0.8)


def fit_history(messages: list[dict], template: ChatTemplate, tokenizer, budget: int
                ) -> tuple[list[int], int]:
    """The prompt ids of the newest turns that fit in `budget` tokens, and how many messages were dropped
    from the front to get there. A kept history starts with a user message (never a reply without its
    question), and the newest user message is always kept; if it alone is too long, its beginning falls
    outside the window (generate keeps the last block_size tokens)."""
    dropped = 0
    while True:
        ids, _ = template.encode(messages[dropped:], tokenizer, add_generation_prompt=True)
        if len(ids) <= budget or dropped == len(messages) - 1:
            return ids, dropped
        dropped += 1
        while dropped < len(messages) - 1 and messages[dropped]["role"] != "user":
            dropped += 1


def stream_reply(model: torch.nn.Module, tokenizer, prompt_ids: list[int], stop_texts: list[str], out: TextIO,
                 output: CompiledFormat | None = None, **sampling) -> tuple[str, str]:
    """Write the model's reply to `out` as it is generated (through a TextStream, which holds back what may
    still become a stop text or a multi-byte character); return (reply text, why it ended: "stop", "length" or
    "interrupted"). A reply in an `output` format ends where the format does (never at a stop text, which could
    be inside it)."""
    stream = TextStream(tokenizer, stop_texts if output is None else [])
    reason = "length"
    tokens = generate(model, prompt_ids, stop_token=tokenizer.eot_id,
                      constraint=None if output is None else output.constraint(), **sampling)
    try:
        for token in tokens:
            piece = stream.add(token)
            if piece:
                out.write(piece)
                out.flush()
            if stream.stopped:
                reason = "stop"
                break
        else:
            if len(stream.ids) < sampling["max_new_tokens"]:
                reason = "stop"  # generate ended early: the model wrote end-of-text
    except KeyboardInterrupt:
        return stream.shown, "interrupted"  # what the user saw is what the history keeps
    finally:
        tokens.close()
    out.write(stream.flush())
    return stream.text, reason


def chat(run: str | Path, sampling: SamplingParams = DEFAULT_SAMPLING, *, max_new_tokens: int = 256,
         device: str = "auto", seed: int = 1337, allow_unknown: bool = False,
         output_format: OutputFormat | None = None, read_line: Callable[[str], str] = input,
         out: TextIO = sys.stdout) -> None:
    """Talk with a run's model until /quit or end of input. A message with characters the run's tokenizer
    does not know is refused (the chat goes on) unless `allow_unknown` reads them as the unknown token. With an
    `output_format` (--json-schema, --regex), every reply follows it."""
    if max_new_tokens <= 0:
        raise UserError("--max-new-tokens must be positive")
    loaded = load_run(run, device=device, chat_template=True)
    check_generates(loaded.config.model)
    model, tokenizer, template = loaded.model, loaded.tokenizer, loaded.chat_template
    output = None if output_format is None else compile_format(tokenizer, output_format)
    stop_texts = template.stop_texts()
    block_size = loaded.config.model.block_size
    # Room for the reply: the whole of it when it fits in half the window, else half the window (the
    # window then slides as the reply grows, as in `lmforge sample`).
    prompt_budget = block_size - min(max_new_tokens, block_size // 2)
    generator = torch.Generator(device=loaded.device).manual_seed(seed)
    messages: list[dict] = []
    if read_line is input and sys.stdin.isatty():
        import readline  # noqa: F401  (importing it gives input() line editing and arrow-key history)
    out.write(f"lmforge chat: {loaded.checkpoint} ({block_size}-token context)\n{HELP}\n")
    while True:
        try:
            line = read_line(USER_PROMPT)
        except EOFError:
            out.write("\n")
            return
        except KeyboardInterrupt:  # at the prompt, Ctrl-C clears the line, as in a shell
            out.write("\n")
            continue
        command, _, argument = line.strip().partition(" ")
        if command == "/quit":
            return
        if command == "/reset":
            messages.clear()
            out.write("(conversation forgotten)\n")
            continue
        if command == "/temp":
            try:
                sampling = dataclasses.replace(sampling, temperature=float(argument))
            except (ValueError, SamplingError):
                out.write("(usage: /temp X, with X = 0 for greedy or a finite positive number)\n")
                continue
            out.write(f"(temperature {sampling.temperature:g})\n")
            continue
        if command.startswith("/"):
            out.write(f"(unknown command {command}; {HELP})\n")
            continue
        if not line.strip():
            continue
        try:
            allowed = tokenizer.check_known(line, what="your message", allow_unknown=allow_unknown,
                                            allow_hint="start lmforge chat with --allow-unknown to read each as "
                                                       "the unknown token")
        except UserError as err:
            out.write(f"({err})\n")
            continue
        if allowed:
            out.write(f"(read as the unknown token: {name_characters(allowed)})\n")
        messages.append({"role": "user", "content": line})
        prompt_ids, dropped = fit_history(messages, template, tokenizer, prompt_budget)
        if dropped:
            del messages[:dropped]
            out.write(f"(context full: dropped the {dropped} oldest message{'s' * (dropped > 1)})\n")
        if len(prompt_ids) > block_size:
            out.write(f"(your message is longer than the {block_size}-token context; the model sees its end)\n")
        out.write(MODEL_PROMPT)
        out.flush()
        reply, reason = stream_reply(model, tokenizer, prompt_ids, stop_texts, out, output,
                                     max_new_tokens=max_new_tokens,
                                     temperature=sampling.temperature, top_k=sampling.top_k,
                                     top_p=sampling.top_p, generator=generator)
        out.write({"stop": "\n", "length": " [max tokens]\n", "interrupted": " [stopped]\n"}[reason])
        messages.append({"role": "assistant", "content": reply})
