"""Flags of the commands around runs: gradcheck, import, export, report, compare, plot, tasks."""

from __future__ import annotations

import argparse

from lmforge.arguments.flags import POSITIVE_INT, PROBABILITY, SEED, TOP_K, add_allow_unknown

Commands = argparse._SubParsersAction


def add_gradcheck(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("gradcheck", help="check the scratch engine's gradients (finite differences, torch)")
    p.add_argument("--layers", action="store_true", help="every layer, float64")
    p.add_argument("--model", choices=("tiny",), help="the whole tiny model, float64 and float32")
    return p


def add_import(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("import", help="make a run from a Hugging Face model or an llm.c model file")
    p.add_argument("source", help="a Hugging Face model directory, a hub name such as gpt2 (needs network), "
                                  "or an llm.c model .bin file")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--tokenizer", help="an lmforge tokenizer.json (or a run or data directory holding one) "
                                       "instead of the source's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def add_export(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("export", help="write a run's model for Hugging Face transformers, llama.cpp (gguf) "
                                           "or llm.c")
    p.add_argument("run", help="run directory or a checkpoint directory inside one (with --check: also a "
                               "config TOML)")
    p.add_argument("--format", choices=("hf", "gguf", "llmc"), help="required unless --check")
    p.add_argument("--out", help="hf: a directory; gguf: the .gguf file; llmc: the model file (its tokenizer file "
                                 "goes beside it as NAME_tokenizer.bin); required unless --check")
    p.add_argument("--check", action="store_true",
                   help="write nothing: print, per format (hf, gguf), the architecture the model exports to or "
                        "why it cannot")
    # One flag for every format; each format checks its own choices, with one line naming them.
    p.add_argument("--dtype", default=None, help="hf, llmc: fp32 (default) or bf16; gguf: f32 (default), f16 or "
                                                 "q8_0")
    p.add_argument("--ollama", action="store_true", help="gguf: also write an Ollama Modelfile beside the file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def add_report(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("report", help="write RUN/report/report.md with plots")
    p.add_argument("run", help="run directory")
    p.add_argument("--attention-layer", type=int, default=-1,
                   help="transformer layer whose attention maps are drawn (default -1: the last)")
    return p


def add_compare(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("compare", help="runs side by side: a Markdown table and overlaid val-loss curves")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", required=True, help="directory for compare.md and the PNG curves")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")
    return p


def add_plot(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("plot", help="teaching plots")
    p.add_argument("what", choices=("activations", "derivative", "landscape", "next-token"),
                   help="activations: the functions and their derivatives; derivative: finite-difference error "
                        "against h; landscape: the loss around RUN's weights; next-token: RUN's next-token "
                        "distribution after --prompt")
    p.add_argument("run", nargs="?", metavar="RUN", help="run directory (landscape, next-token)")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--prompt", help="next-token: the text before the token (default: none, end-of-text)")
    add_allow_unknown(p)
    p.add_argument("--top-k", type=TOP_K, default=10, help="next-token: the top-k cut-off to mark (default 10)")
    p.add_argument("--top-p", type=PROBABILITY, default=0.9,
                   help="next-token: the top-p cut-off to mark (default 0.9)")
    p.add_argument("--data", help="landscape: data directory (default: the one the run's log records)")
    p.add_argument("--points", type=int, default=21, help="landscape: points per axis (default 21)")
    p.add_argument("--span", type=float, default=1.0, help="landscape: offsets from -SPAN to SPAN (default 1)")
    p.add_argument("--windows", type=POSITIVE_INT, default=8, help="landscape: validation windows (default 8)")
    p.add_argument("--seed", type=SEED, default=0, help="landscape: seed of the random directions")
    return p


def add_tasks(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("tasks", help="built-in fine-tuning tasks: list them, or make one's data files")
    p.add_argument("action", choices=("list", "make"))
    p.add_argument("name", nargs="?", help="make: genre, folio, next-line or modernize")
    p.add_argument("--out", help="make: the directory for train/val/test .jsonl")
    p.add_argument("--overwrite", action="store_true", help="make: replace a non-empty --out")
    return p
