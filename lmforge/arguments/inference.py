"""Flags of the commands that run a trained model: sample, chat, eval, predict, serve."""

from __future__ import annotations

import argparse

from lmforge.arguments.flags import (
    DEVICE_HELP,
    MAX_NEW_TOKENS,
    MAX_SAMPLES,
    NEW_TOKENS,
    POSITIVE_INT,
    PROBABILITY,
    SEED,
    TEMPERATURE,
    TOP_K,
    add_allow_unknown,
    choices_of,
    size_flag,
)
from lmforge.config.sections import MAX_BATCH
from lmforge.serve.cli import API_KEY_ENV, DEFAULT_MAX_CONNECTIONS, MAX_BODY_BYTES, MAX_QUEUE

Commands = argparse._SubParsersAction
RUN_HELP = "run directory or a checkpoint directory inside one"
THREADS_HELP = ("torch intra-op threads for decoding (default: 1 on a CPU for a model at most 512 wide, "
                "else one per core; see docs/serve.md)")
TOP_P_HELP = "sample among the most likely tokens that make up this probability, in (0, 1]"


def add_output_format(parser: argparse.ArgumentParser) -> None:
    """Structured outputs (lmforge/infer/constrained.py): every answer follows a JSON schema or a regex."""
    parser.add_argument("--json-schema", metavar="FILE",
                        help="answer with JSON that validates against the JSON schema in FILE (the 'serve' extra)")
    parser.add_argument("--regex", metavar="PATTERN",
                        help="answer with text that matches PATTERN in full (the 'serve' extra)")


def add_sample(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("sample", help="generate text from a trained run")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--prompt", help="text the samples continue (an encoder-decoder: the source it writes "
                   "from; default: none, start from end-of-text)")
    p.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=NEW_TOKENS, default=500)
    p.add_argument("--temperature", type=TEMPERATURE, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=TOP_K, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=PROBABILITY, help=TOP_P_HELP)
    p.add_argument("--num-samples", type=size_flag(MAX_SAMPLES), default=1,
                   help=f"samples to generate (at most {MAX_SAMPLES})")
    p.add_argument("--seed", type=SEED, default=1337)
    p.add_argument("--threads", type=POSITIVE_INT, help=THREADS_HELP)
    add_allow_unknown(p)
    add_output_format(p)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--engine", choices=choices_of("train.engine"), default="torch",
                   help="scratch: the NumPy engine (CPU)")
    return p


def add_chat(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("chat", help="talk with a run's model in the terminal (multi-turn, streamed)")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--temperature", type=TEMPERATURE, default=0.8, help="0 means greedy decoding (/temp X changes it)")
    p.add_argument("--top-k", type=TOP_K, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=PROBABILITY, help=TOP_P_HELP)
    p.add_argument("--max-new-tokens", type=size_flag(MAX_NEW_TOKENS), default=256, help="longest reply, in tokens")
    p.add_argument("--seed", type=SEED, default=1337)
    add_allow_unknown(p)
    add_output_format(p)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    return p


def add_eval(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("eval", help="loss, perplexity and bits per byte on a split; or --task metrics")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--data", required=True, help="a data directory tokenized with the run's tokenizer; with "
                                                 "--task, a task file or a directory of train/val/test files")
    p.add_argument("--split", help="val by default; with --task and a directory, test by default")
    p.add_argument("--task", help="classify, translate, qa, choice or sft: the task's metrics as JSON")
    p.add_argument("--predictions", help="with --task: write each record's prediction and reference (JSON lines)")
    add_allow_unknown(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --predictions file")
    p.add_argument("--batch-size", type=size_flag(MAX_BATCH), default=16)
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--engine", choices=choices_of("train.engine"), default="torch",
                   help="scratch: the NumPy engine (CPU)")
    return p


def add_predict(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("predict", help="a fine-tuned run on one text: label and probabilities (classify) "
                                            "or its reply, as JSON")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--text", required=True)
    p.add_argument("--context", help="qa runs: the passage the --text question is about")
    p.add_argument("--max-new-tokens", type=NEW_TOKENS,
                   help="runs that reply with text: reply length (default 200, at most the run's context)")
    p.add_argument("--device", default="auto")
    add_allow_unknown(p)
    return p


def add_serve(commands: Commands) -> argparse.ArgumentParser:
    """The server's flags; their values are checked by lmforge/serve/cli.py, which also serves Python callers."""
    p = commands.add_parser("serve", help="serve a run over an OpenAI-compatible HTTP API with a playground page "
                                          "(a classify run: its labels at /v1/classify)")
    p.add_argument("run", help=RUN_HELP)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on the API (default: ${API_KEY_ENV})")
    p.add_argument("--max-batch", type=int, default=16,
                   help="requests decoded (or texts classified) together in one forward pass")
    p.add_argument("--max-queue", type=int, default=256,
                   help=f"requests (or texts to classify) waiting for a slot before 429 (at most {MAX_QUEUE})")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000,
                   help=f"largest request body (else 413; at most {MAX_BODY_BYTES})")
    p.add_argument("--max-connections", type=int, default=None,
                   help=f"open connections served at once, beyond that 503 (default {DEFAULT_MAX_CONNECTIONS}, "
                        "or fewer if ulimit -n is low)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a client has to send a request's head (else 408 and closed)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client has to send a request's body (else 408 and closed)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0,
                   help="seconds an idle connection stays open between requests")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds SIGTERM waits for requests")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=POSITIVE_INT, help=THREADS_HELP)
    return p
