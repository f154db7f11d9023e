"""`lmforge predict`: one input through a fine-tuned run, as the task it was trained for.

A classify run prints the likeliest label and every label's probability; an sft, qa or translate run prints
its greedy reply to the text, prompted exactly as it was trained (`prompt_ids`, which evaluation uses too).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lmforge.data.tokenizer import Tokenizer, name_characters
from lmforge.errors import UserError
from lmforge.infer.generate import generate
from lmforge.infer.load import load_model
from lmforge.run import read_config, resolve_checkpoint
from lmforge.tasks.heads import predict_labels
from lmforge.tasks.model import check_task
from lmforge.tasks.records import as_messages, translate_prompt
from lmforge.tasks.template import ChatTemplate, load_chat_template


def prompt_ids(task: str, record: dict, tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
    """The token ids a model fine-tuned for `task` continues with its answer: a translate record's source and
    separator; an sft or qa record's turns before its last assistant turn, then the assistant marker."""
    if task == "translate":
        return tokenizer.encode(translate_prompt(record["source"]))
    messages = as_messages(record, task)
    while messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return template.encode(messages, tokenizer, add_generation_prompt=True)[0]


def generate_reply(model: nn.Module, tokenizer: Tokenizer, prompt: list[int], max_new_tokens: int) -> str:
    """The greedy continuation of `prompt` up to end-of-text."""
    return tokenizer.decode(generate(model, prompt, max_new_tokens, temperature=0.0, stop_token=tokenizer.eot_id))


DEFAULT_MAX_NEW_TOKENS = 200


def predict(run: str, text: str, *, context: str | None = None, max_new_tokens: int | None = None,
            device: str | torch.device = "cpu", allow_unknown: bool = False) -> dict:
    """{"label", "probabilities"} for a classify run; {"reply"} for the others (qa: `text` is the question,
    `context` its passage), of up to `max_new_tokens` tokens (default DEFAULT_MAX_NEW_TOKENS). Characters the
    run's tokenizer does not know are refused by name unless `allow_unknown` reads them as the unknown token
    (then a note on stderr names them)."""
    if not text:
        raise UserError("--text is empty")
    finetune = read_config(resolve_checkpoint(run)[0]).finetune
    task = finetune.task if finetune else "sft"
    check_task(run, finetune, task)
    if context is not None and task != "qa":
        raise UserError(f"--context is for qa runs; {run} was fine-tuned for {task}")
    if max_new_tokens is not None and task == "classify":
        raise UserError(f"--max-new-tokens is for runs that reply with text; {run} was fine-tuned for classify "
                        "(it predicts a label): drop --max-new-tokens")
    model, config, tokenizer, checkpoint = load_model(run, device)
    if max_new_tokens is not None and max_new_tokens > config.model.block_size:
        # A fine-tuned reply is learned within the context; past it, generation slides its window for as long
        # as asked (a billion tokens is days of silent work before the JSON is printed).
        raise UserError(f"--max-new-tokens is {max_new_tokens}, more than the run's {config.model.block_size}-token "
                        f"context; a reply can be at most {config.model.block_size} tokens")
    allowed = [char for field, value in (("--text", text), ("--context", context or ""))
               for char in tokenizer.check_known(value, what=field, allow_unknown=allow_unknown)]
    if allowed:
        print(f"note: characters outside the vocabulary read as the unknown token: "
              f"{name_characters(list(dict.fromkeys(allowed)))}", file=sys.stderr)
    if task == "classify":
        labels, probabilities = predict_labels(model, tokenizer, [text], batch_size=1, device=device)
        return {"label": labels[0],
                "probabilities": dict(zip(model.labels, probabilities[0].tolist(), strict=True)),
                "checkpoint": str(checkpoint)}
    if task == "qa":
        if context is None:
            raise UserError("a qa run answers a --text question about a --context passage: give --context")
        record = {"context": context, "question": text, "answers": [""]}
    else:
        record = {"source": text, "target": ""} if task == "translate" else {"prompt": text, "response": ""}
    template = load_chat_template(resolve_checkpoint(run)[0])
    reply = generate_reply(model, tokenizer, prompt_ids(task, record, tokenizer, template),
                           DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens)
    return {"reply": reply, "checkpoint": str(checkpoint)}
