"""`lmforge predict`: one input through a fine-tuned run, as the task it was trained for.

A classify run prints the likeliest label and every label's probability; an sft, qa or translate run prints
its greedy reply to the text, prompted exactly as it was trained (its kind's `prompt_ids`, which evaluation
uses too).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from lmforge.data.tokenizer import Tokenizer, name_characters
from lmforge.errors import UserError
from lmforge.infer.generate import generate
from lmforge.infer.load import load_run
from lmforge.tasks.kinds import predict_labels, task_kind


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
    loaded = load_run(run, device=device, language_model=False, chat_template=True)
    model, tokenizer, checkpoint, finetune = loaded.model, loaded.tokenizer, loaded.checkpoint, loaded.config.finetune
    kind = task_kind(finetune.task if finetune else "sft")
    kind.check_run(run, finetune)
    kind.check_arch(loaded.config.model.arch)
    if context is not None and not kind.takes_context:
        raise UserError(f"--context is for qa runs; {run} was fine-tuned for {kind.name}")
    if max_new_tokens is not None and kind.labelled:
        raise UserError(f"--max-new-tokens is for runs that reply with text; {run} was fine-tuned for classify "
                        "(it predicts a label): drop --max-new-tokens")
    block_size = loaded.config.model.block_size
    if max_new_tokens is not None and max_new_tokens > block_size:
        # A fine-tuned reply is learned within the context; past it, generation slides its window for as long
        # as asked (a billion tokens is days of silent work before the JSON is printed).
        raise UserError(f"--max-new-tokens is {max_new_tokens}, more than the run's {block_size}-token "
                        f"context; a reply can be at most {block_size} tokens")
    allowed = [char for field, value in (("--text", text), ("--context", context or ""))
               for char in tokenizer.check_known(value, what=field, allow_unknown=allow_unknown)]
    if allowed:
        print(f"note: characters outside the vocabulary read as the unknown token: "
              f"{name_characters(list(dict.fromkeys(allowed)))}", file=sys.stderr)
    if kind.labelled:
        labels, probabilities = predict_labels(model, tokenizer, [text], batch_size=1, device=loaded.device)
        return {"label": labels[0],
                "probabilities": dict(zip(model.labels, probabilities[0].tolist(), strict=True)),
                "checkpoint": str(checkpoint)}
    record = kind.request(text, context)
    reply = generate_reply(model, tokenizer, kind.prompt_ids(record, tokenizer, loaded.chat_template),
                           DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens)
    return {"reply": reply, "checkpoint": str(checkpoint)}
