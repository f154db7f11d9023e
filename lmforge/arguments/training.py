"""Flags of the commands that make data and train: prepare, train, bench, finetune, sweep."""

from __future__ import annotations

import argparse

from lmforge.arguments.flags import (
    MAX_BENCH_STEPS,
    SEED,
    add_config_flag,
    add_config_options,
    choices_of,
    size_flag,
)

Commands = argparse._SubParsersAction


def add_prepare(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("prepare", help="clean and tokenize text into token shards")
    p.add_argument("--source", action="append", required=True,
                   help="'shakespeare', a .txt/.md file or directory, .jsonl or .parquet (repeatable)")
    p.add_argument("--val-source", action="append", help="held-out validation text (repeatable)")
    p.add_argument("--val-fraction", type=float, help="fraction of documents held out (default 0.1)")
    p.add_argument("--tokenizer", required=True, help="char, bpe or gpt2")
    p.add_argument("--vocab-size", type=int, help="bpe vocabulary size, 257 to 2**20 (checked by prepare)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet")
    p.add_argument("--lowercase", action="store_true")
    p.add_argument("--seed", type=SEED, default=1337)
    p.add_argument("--shard-tokens", type=size_flag(2**31), default=100_000_000)
    p.add_argument("--workers", type=size_flag(1024), help="encoding processes (default and most: all cores)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in --out")
    p.add_argument("--quiet", action="store_true")
    return p


def add_train(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("train", help="train a model (extra --section.key value flags override the config)")
    add_config_options(p)
    p.add_argument("--config", help="TOML config (configs/*.toml); optional with --resume")
    p.add_argument("--data", required=True, help="directory written by lmforge prepare, or of llm.c shards")
    p.add_argument("--out", required=True, help="run directory")
    add_config_flag(p, "--max-steps", "train.max_steps", metavar="N",
                    help="sets train.max_steps: optimizer steps to train for")
    add_config_flag(p, "--max-time", "train.max_time", metavar="SECONDS",
                    help="sets train.max_time: seconds of training")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    add_config_flag(p, "--compile", "train.compile", nargs=0, const="true",
                    help="sets train.compile = true: torch.compile the model (default: on CUDA only)")
    add_config_flag(p, "--no-compile", "train.compile", nargs=0, const="false", help="sets train.compile = false")
    add_config_flag(p, "--engine", "train.engine", help="sets train.engine: torch (default) or scratch (NumPy)")
    p.add_argument("--init-from", help="start from this run's weights (and its config unless --config is given)")
    add_config_flag(p, "--parallel", "train.parallel",
                    help="sets train.parallel, under torchrun: ddp (default) or fsdp (shards parameters and "
                         "optimizer state)")
    p.add_argument("--check-export", action="store_true",
                   help="first print, per export format (hf, gguf), the architecture the model will export to "
                        "or why it cannot (as export --check does)")
    p.add_argument("--quiet", action="store_true")
    return p


def add_bench(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("bench", help="time training steps on random tokens (extra flags override config)")
    add_config_options(p)
    p.add_argument("--config", help="TOML config (default: built-in defaults)")
    p.add_argument("--steps", type=size_flag(MAX_BENCH_STEPS), default=10,
                   help="timed optimizer steps (after 2 untimed warm-up steps)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--measure-peak", action="store_true",
                   help="measure the peak FLOP rate MFU is reported against again (run it on a quiet machine), "
                        "replacing the cached one")
    add_config_flag(p, "--engine", "train.engine", help="sets train.engine: torch (default) or scratch (NumPy)")
    return p


def add_finetune(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("finetune", help="fine-tune a run on task data (extra --section.key value flags, "
                                             "--lora.rank/alpha/dropout/targets, --finetune.patience)")
    add_config_options(p)
    p.add_argument("base_run", help="run (or checkpoint) to start from: trained or imported here")
    p.add_argument("--task", choices=choices_of("finetune.task"), help="optional with --resume")
    p.add_argument("--data", required=True, help="directory with train and val files (.jsonl, .csv, .parquet)")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--method", choices=choices_of("finetune.method"),
                   help="full (default) or lora (PEFT adapters)")
    p.add_argument("--train-blocks", type=int, help="full: train only the last N blocks (+ final norm, heads)")
    add_config_flag(p, "--lr", "optim.lr", metavar="LR", help="sets optim.lr (default 1e-4 full, 1e-3 lora)")
    add_config_flag(p, "--max-steps", "train.max_steps", metavar="N", help="sets train.max_steps")
    add_config_flag(p, "--max-time", "train.max_time", metavar="SECONDS",
                    help="sets train.max_time: seconds of training")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true")
    return p


def add_sweep(commands: Commands) -> argparse.ArgumentParser:
    p = commands.add_parser("sweep", help="hyperparameter search with Optuna (extra --section.key value flags "
                                          "override the config)")
    add_config_options(p)
    p.add_argument("--config", help="TOML config every trial starts from")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="sweep directory: sweep.db, trial_000/, ..., results, best.toml")
    p.add_argument("--param", action="append", help="KEY=a,b,c or KEY=log:LOW:HIGH or KEY=lin:LOW:HIGH "
                                                    "(repeatable)")
    p.add_argument("--method", default="tpe", help="grid, random or tpe (default)")
    p.add_argument("--trials", type=int, help="trials in all, counting finished ones (default: the grid's "
                                              "size, else 10)")
    p.add_argument("--budget-time", type=float, help="seconds of training per trial")
    p.add_argument("--finetune", metavar="BASE_RUN", help="search fine-tuning of this run instead of training "
                   "(with --task; --data is then the task data: e.g. --param optim.lr=log:1e-4:1e-2 "
                   "--param lora.rank=4,8,16 --param finetune.train_blocks=1,2,4)")
    p.add_argument("--task", choices=choices_of("finetune.task"), help="with --finetune: the task")
    p.add_argument("--finetune-method", choices=choices_of("finetune.method"),
                   help="with --finetune: full (default) or lora")
    p.add_argument("--quiet", action="store_true")
    return p
