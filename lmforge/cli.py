"""The `lmforge` command line: parse arguments, call one function per command, map user errors to exit 2.

Every command's function takes the parsed arguments; `train`, `bench` and `sweep` also take config overrides.
An override is `--section.key VALUE` for any config key; a few common keys have a short flag of their own
(`--max-steps`, `--engine`, ...), which writes the same override, so both spellings take one path.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import typing
from pathlib import Path

from lmforge import __version__
from lmforge.config import ENGINES, MAX_BATCH, MAX_VOCAB
from lmforge.errors import UserError
from lmforge.infer.sampling import SamplingError, SamplingParams, check_temperature, check_top_k, check_top_p
from lmforge.serve.cli import add_serve_parser

if typing.TYPE_CHECKING:  # the CLI imports torch only inside the commands that need it
    from torch import nn

    from lmforge.data.tokenizer import Tokenizer

OVERRIDES_EPILOG = ("Any config key can be set with --section.key VALUE (or --section.key=VALUE), e.g. "
                    "--optim.lr 3e-3 --model.n_layer 4 --train.tokens_per_step 8192; see configs/*.toml for the keys.")


class SetConfig(argparse.Action):
    """A short flag for one config key: stores `--section.key VALUE` in `args.overrides` (a flag without a
    value stores `const`), so a short flag and the dotted spelling are one setting."""

    def __init__(self, option_strings, dest, key: str, **kwargs):
        self.key = key
        super().__init__(option_strings, dest=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        namespace.config_flags = {**getattr(namespace, "config_flags", {}), self.key: str(value)}


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.prepare import prepare

    prepare(args.source, args.out, args.tokenizer, val_sources=args.val_source, val_fraction=args.val_fraction,
            vocab_size=args.vocab_size, text_field=args.text_field, lowercase=args.lowercase, seed=args.seed,
            shard_tokens=args.shard_tokens, workers=args.workers, overwrite=args.overwrite, quiet=args.quiet)


def cmd_train(args: argparse.Namespace) -> int:
    from lmforge.config import canonical_key, load_config
    from lmforge.run import CONFIG_FILE, resolve_checkpoint
    from lmforge.train.trainer import Trainer

    config_path = args.config
    if args.init_from is not None and args.resume:
        raise UserError("--init-from starts a new run from another run's weights; --resume continues --out: "
                        "give one of them")
    if config_path is None and args.init_from is not None:  # the pretrained run's settings, overridable
        config_path = resolve_checkpoint(args.init_from)[0] / CONFIG_FILE
    if config_path is None:
        if not args.resume:
            raise UserError("train needs --config FILE (or --resume to continue the run in --out, or "
                            "--init-from RUN to start from a run's weights and settings)")
        config_path = Path(args.out) / CONFIG_FILE
        if not config_path.is_file():
            raise UserError(f"no run to resume in {args.out} (it has no {CONFIG_FILE})")
    config = load_config(config_path, args.overrides)
    if config.finetune is not None:
        if args.init_from is None or any(canonical_key(key).startswith("finetune.") for key in args.overrides):
            raise UserError("[finetune] settings (--finetune.KEY, --lora.KEY) are for lmforge finetune, not train")
        config.finetune = None  # training on from a fine-tuned run's weights is plain training
    result = Trainer(config, args.data, args.out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
                     init_from=args.init_from).run()
    # Stopped by a signal (after saving): exit as the signal would have, so `train && export` stops here.
    return 128 + result["signal"] if result["signal"] else 0


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from lmforge.infer.decode import stream_text
    from lmforge.infer.generate import generate
    from lmforge.infer.load import load_run

    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give either --prompt or --prompt-file, not both")
    prompt = args.prompt or ""
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise UserError(f"cannot read --prompt-file: {err}") from None
    loaded = load_run(args.run, device=args.device, engine=args.engine)
    model, tokenizer = loaded.model, loaded.tokenizer
    note_unknown("sample", tokenizer, tokenizer.check_known(prompt, allow_unknown=args.allow_unknown))
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    # The batched engine keeps each row's whole context in its cache and cannot slide it as `generate` does:
    # samples longer than the context run one at a time.
    if (args.num_samples > 1 and args.engine == "torch"
            and len(prompt_ids) + args.max_new_tokens <= model.config.block_size):
        print_batched_samples(model, tokenizer, prompt, prompt_ids, args)
        return
    generator = torch.Generator(device=loaded.device).manual_seed(args.seed)
    for index in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {index + 1} ---")
        sys.stdout.write(prompt)
        tokens = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, generator=generator, stop_token=tokenizer.eot_id,
                          use_cache=args.engine == "torch")
        for piece in stream_text(tokenizer, tokens):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")


def note_unknown(command: str, tokenizer: Tokenizer, allowed: list[str]) -> None:
    """With --allow-unknown: say on stderr which characters were read as the unknown token."""
    if allowed:
        from lmforge.data.tokenizer import name_characters

        print(f"lmforge {command}: note: characters outside the vocabulary read as the unknown token: "
              f"{name_characters(allowed)}", file=sys.stderr)


def print_batched_samples(model: nn.Module, tokenizer: Tokenizer, prompt: str, prompt_ids: list[int],
                          args: argparse.Namespace) -> None:
    """All --num-samples in one batch on the batched engine (sample i seeded with --seed + i), each printed
    under its header once the batch is done."""
    from lmforge.infer.batched import generate_batch

    samples = generate_batch(model, tokenizer, [prompt_ids] * args.num_samples, args.max_new_tokens,
                             max_batch=args.num_samples, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seeds=[args.seed + index for index in range(args.num_samples)],
                             stop_token=tokenizer.eot_id)
    for index, sample in enumerate(samples):
        print(f"--- sample {index + 1} ---")
        sys.stdout.write(prompt + sample.text + "\n")
        sys.stdout.flush()


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.infer.chat import chat

    chat(args.run, SamplingParams(args.temperature, args.top_k, args.top_p), max_new_tokens=args.max_new_tokens,
         device=args.device, seed=args.seed, allow_unknown=args.allow_unknown)


def cmd_eval(args: argparse.Namespace) -> None:
    if args.task is not None or args.predictions is not None:
        from lmforge.tasks.evaluate import eval_command

        eval_command(args.run, args.task, args.data, split=args.split, predictions=args.predictions,
                     overwrite=args.overwrite, batch_size=args.batch_size, device=args.device, engine=args.engine,
                     allow_unknown=args.allow_unknown)
        return
    if args.allow_unknown:
        raise UserError("--allow-unknown is for eval --task (token shards hold no characters)")
    args.split = args.split or "val"
    from lmforge.data.datadir import check_token_ids, describe_data
    from lmforge.data.loader import TokenWindows
    from lmforge.hardware import resolve_precision
    from lmforge.infer.evaluate import bits_per_character, evaluate
    from lmforge.infer.load import load_run

    loaded = load_run(args.run, device=args.device, engine=args.engine)
    config, device = loaded.config, loaded.device
    meta, _ = describe_data(args.data, loaded.tokenizer)  # a prepared directory, or bare llm.c shards (no byte counts)
    if args.split not in meta["splits"]:
        raise UserError(f"unknown split '{args.split}'; {args.data} has {', '.join(meta['splits'])}")
    split = meta["splits"][args.split]
    check_token_ids(args.data, config.model.vocab_size, (args.split,))
    windows = TokenWindows(args.data, args.split, config.model.block_size)
    result = evaluate(loaded.model, windows, batch_size=args.batch_size, max_windows=None, device=device,
                      precision=resolve_precision("fp32" if device.type == "cpu" else config.train.precision,
                                                  device),
                      bytes_per_token=split["bytes"] / split["tokens"] if split["bytes"] else None)
    result["bpc"] = bits_per_character(result["bpb"], split)
    result["checkpoint"] = str(loaded.checkpoint)
    print(json.dumps(result))


def cmd_finetune(args: argparse.Namespace) -> int:
    from lmforge.tasks.finetune import finetune_command

    result = finetune_command(args.base_run, task=args.task, data=args.data, out=args.out, method=args.method,
                              train_blocks=args.train_blocks, overrides=args.overrides, resume=args.resume,
                              overwrite=args.overwrite, quiet=args.quiet)
    return 128 + result["signal"] if result["signal"] else 0  # stopped by a signal, after saving


def cmd_predict(args: argparse.Namespace) -> None:
    from lmforge.hardware import resolve_device
    from lmforge.tasks.predict import predict

    print(json.dumps(predict(args.run, args.text, context=args.context, max_new_tokens=args.max_new_tokens,
                             device=resolve_device(args.device, "--device"), allow_unknown=args.allow_unknown)))


def cmd_bench(args: argparse.Namespace) -> None:
    from lmforge.bench import bench
    from lmforge.config import load_config

    # The plan and the estimate come first; with --json they go to stderr, so stdout stays one JSON object.
    say = (lambda line: print(line, file=sys.stderr)) if args.json else print
    result = bench(load_config(args.config, args.overrides), steps=args.steps, say=say, measure_peak=args.measure_peak)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['engine']} engine, {result['device']} {result['precision']}, compile {result['compile']}, "
          f"{result['params']:,} parameters, {result['tokens_per_step']:,} tokens per step")
    print(f"{result['ms_per_step']:.1f} ms/step | {result['tokens_per_s']:,.0f} tokens/s | "
          f"{result['tflops']:.3f} TFLOP/s | {mfu_text(result['mfu'], result['peak_tflops'])} | "
          f"peak memory {result['peak_mem_mb']:,.0f} MB")


def mfu_text(mfu: float | None, peak_tflops: float) -> str:
    if mfu is None:  # even measured again, the peak was below what the steps achieved
        return (f"MFU unknown (the steps beat the measured peak of {peak_tflops:.2f} TFLOP/s; "
                "lmforge bench --measure-peak on a quiet machine measures it again)")
    return f"MFU {mfu:.1%} of {peak_tflops:.2f} TFLOP/s"


def cmd_gradcheck(args: argparse.Namespace) -> None:
    from lmforge.scratch.gradcheck import check_layers, check_model

    both = not args.layers and args.model is None
    results = (check_layers() if args.layers or both else []) + (check_model() if args.model or both else [])
    print(f"{'case':<14} {'tensor':<28} {'reference':<26} {'worst rel. error':>16} {'tolerance':>10}")
    for r in results:
        print(f"{r.case:<14} {r.tensor:<28} {r.reference:<26} {r.error:>16.2e} {r.tolerance:>10.0e}"
              + ("" if r.passed else "  FAIL"))
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} of {len(results)} checks within tolerance")
    if failed:
        raise SystemExit(1)  # a wrong gradient is a bug, not a user error: exit 1, not 2


def cmd_import(args: argparse.Namespace) -> None:
    if args.source.endswith(".bin"):
        from lmforge.interop.llmc import import_llmc

        run = import_llmc(args.source, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
    else:
        from lmforge.interop.hf import import_hf

        run = import_hf(args.source, args.out, tokenizer=args.tokenizer, overwrite=args.overwrite)
    print(f"imported {args.source} into {run}")


def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "hf":
        from lmforge.interop.hf import export_hf

        print(f"wrote {export_hf(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite)}")
    else:
        from lmforge.interop.llmc import export_llmc

        model_file, tokenizer_file = export_llmc(args.run, args.out, dtype=args.dtype, overwrite=args.overwrite)
        print(f"wrote {model_file} and {tokenizer_file}")


def cmd_report(args: argparse.Namespace) -> None:
    from lmforge.report import write_report

    print(f"report written to {write_report(args.run, attention_layer=args.attention_layer)}")


def cmd_compare(args: argparse.Namespace) -> None:
    from lmforge.lab.compare import compare

    print(f"comparison written to {compare(args.runs, args.out, overwrite=args.overwrite)}")


def cmd_sweep(args: argparse.Namespace) -> None:
    from lmforge.lab.sweep import FinetuneSearch, sweep

    if (args.task is None) != (args.finetune is None) or args.finetune_method and args.finetune is None:
        raise UserError("a fine-tuning sweep needs both --finetune BASE_RUN and --task (--finetune-method too "
                        "applies to it only)")
    search = FinetuneSearch(args.finetune, args.task, args.finetune_method) if args.finetune else None
    sweep(args.config, args.data, args.out, args.param or [], method=args.method, trials=args.trials,
          budget_time=args.budget_time, overrides=args.overrides, quiet=args.quiet, finetune=search)


def cmd_plot(args: argparse.Namespace) -> None:
    if args.what in ("activations", "derivative") and args.run is not None:
        raise UserError(f"plot {args.what} draws no run; drop {args.run}")
    if args.what in ("landscape", "next-token") and args.run is None:
        raise UserError(f"plot {args.what} needs a run directory: lmforge plot {args.what} RUN --out FILE.png")
    if (args.prompt is not None or args.allow_unknown) and args.what != "next-token":
        raise UserError("--prompt and --allow-unknown are for plot next-token")
    if args.what == "activations":
        from lmforge.lab.activations import plot_activations

        written = plot_activations(args.out, overwrite=args.overwrite)
    elif args.what == "derivative":
        from lmforge.lab.learn import plot_difference_errors

        written = plot_difference_errors(args.out, overwrite=args.overwrite)
    elif args.what == "landscape":
        from lmforge.lab.landscape import plot_landscape

        written = plot_landscape(args.run, args.out, data=args.data, points=args.points, span=args.span,
                                 seed=args.seed, windows=args.windows, overwrite=args.overwrite)
    else:
        from lmforge.lab.next_token import plot_next_token

        written = plot_next_token(args.run, args.out, prompt=args.prompt or "", top_k=args.top_k, top_p=args.top_p,
                                  allow_unknown=args.allow_unknown, overwrite=args.overwrite)
    print(f"wrote {written}")


def cmd_tasks(args: argparse.Namespace) -> None:
    from lmforge.tasks.builtin import tasks_command

    tasks_command(args.action, args.name, args.out, overwrite=args.overwrite)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """A command that takes a config: it accepts --section.key VALUE overrides, and its help says so."""
    parser.epilog = OVERRIDES_EPILOG
    parser.set_defaults(takes_overrides=True)


def add_allow_unknown(parser: argparse.ArgumentParser) -> None:
    """The one opt-in, named the same in every command that reads text for a run's model (and `allow_unknown`
    in a server request): without it, characters a char tokenizer never saw are refused by name."""
    parser.add_argument("--allow-unknown", action="store_true",
                        help="read characters outside a char tokenizer's vocabulary as the unknown token "
                             "(default: refuse them, naming them)")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="lmforge", description="Train language models from scratch.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("prepare", help="clean and tokenize text into token shards")
    p.set_defaults(func=cmd_prepare)
    p.add_argument("--source", action="append", required=True,
                   help="'shakespeare', a .txt/.md file or directory, .jsonl or .parquet (repeatable)")
    p.add_argument("--val-source", action="append", help="held-out validation text (repeatable)")
    p.add_argument("--val-fraction", type=float, help="fraction of documents held out (default 0.1)")
    p.add_argument("--tokenizer", required=True, help="char, bpe or gpt2")
    p.add_argument("--vocab-size", type=size_flag(MAX_VOCAB), help="bpe vocabulary size")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet")
    p.add_argument("--lowercase", action="store_true")
    p.add_argument("--seed", type=SEED, default=1337)
    p.add_argument("--shard-tokens", type=size_flag(2**31), default=100_000_000)
    p.add_argument("--workers", type=size_flag(1024), help="encoding processes (default: all cores)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in --out")
    p.add_argument("--quiet", action="store_true")

    p = commands.add_parser("train", help="train a model (extra --section.key value flags override the config)")
    p.set_defaults(func=cmd_train)
    add_config_options(p)
    p.add_argument("--config", help="TOML config (configs/*.toml); optional with --resume")
    p.add_argument("--data", required=True, help="directory written by lmforge prepare, or of llm.c shards")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--max-steps", action=SetConfig, key="train.max_steps", metavar="N",
                   help="sets train.max_steps: optimizer steps to train for")
    p.add_argument("--max-time", action=SetConfig, key="train.max_time", metavar="SECONDS",
                   help="sets train.max_time: seconds of training")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--compile", action=SetConfig, key="train.compile", nargs=0, const="true",
                   help="sets train.compile = true: torch.compile the model (default: on CUDA only)")
    p.add_argument("--no-compile", action=SetConfig, key="train.compile", nargs=0, const="false",
                   help="sets train.compile = false")
    p.add_argument("--engine", action=SetConfig, key="train.engine", choices=ENGINES,
                   help="sets train.engine: torch (default) or scratch (NumPy)")
    p.add_argument("--init-from", help="start from this run's weights (and its config unless --config is given)")
    p.add_argument("--parallel", action=SetConfig, key="train.parallel", choices=("ddp", "fsdp"),
                   help="sets train.parallel, under torchrun: ddp (default) or fsdp (shards parameters and "
                        "optimizer state)")
    p.add_argument("--quiet", action="store_true")

    p = commands.add_parser("sample", help="generate text from a trained run")
    p.set_defaults(func=cmd_sample)
    p.add_argument("run", help="run directory or a checkpoint directory inside one")
    p.add_argument("--prompt", help="text the samples continue (default: none, start from end-of-text)")
    p.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    p.add_argument("--max-new-tokens", type=NEW_TOKENS, default=500)
    p.add_argument("--temperature", type=TEMPERATURE, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=TOP_K, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=PROBABILITY, help="sample among the most likely tokens that make up this "
                                                      "probability, in (0, 1]")
    p.add_argument("--num-samples", type=size_flag(MAX_SAMPLES), default=1,
                   help=f"samples to generate (at most {MAX_SAMPLES})")
    p.add_argument("--seed", type=SEED, default=1337)
    add_allow_unknown(p)
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--engine", choices=ENGINES, default="torch", help="scratch: the NumPy engine (CPU)")

    p = commands.add_parser("chat", help="talk with a run's model in the terminal (multi-turn, streamed)")
    p.set_defaults(func=cmd_chat)
    p.add_argument("run", help="run directory or a checkpoint directory inside one")
    p.add_argument("--temperature", type=TEMPERATURE, default=0.8, help="0 means greedy decoding (/temp X changes it)")
    p.add_argument("--top-k", type=TOP_K, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=PROBABILITY, help="sample among the most likely tokens that make up this "
                                                      "probability, in (0, 1]")
    p.add_argument("--max-new-tokens", type=size_flag(MAX_NEW_TOKENS), default=256, help="longest reply, in tokens")
    p.add_argument("--seed", type=SEED, default=1337)
    add_allow_unknown(p)
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")

    p = commands.add_parser("eval", help="loss, perplexity and bits per byte on a split; or --task metrics")
    p.set_defaults(func=cmd_eval)
    p.add_argument("run", help="run directory or a checkpoint directory inside one")
    p.add_argument("--data", required=True, help="a data directory tokenized with the run's tokenizer; with "
                                                 "--task, a task file or a directory of train/val/test files")
    p.add_argument("--split", help="val by default; with --task and a directory, test by default")
    p.add_argument("--task", help="classify, translate, qa, choice or sft: the task's metrics as JSON")
    p.add_argument("--predictions", help="with --task: write each record's prediction and reference (JSON lines)")
    add_allow_unknown(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --predictions file")
    p.add_argument("--batch-size", type=size_flag(MAX_BATCH), default=16)
    p.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps")
    p.add_argument("--engine", choices=ENGINES, default="torch", help="scratch: the NumPy engine (CPU)")

    p = commands.add_parser("finetune", help="fine-tune a run on task data (extra --section.key value flags, "
                                             "--lora.rank/alpha/dropout/targets, --finetune.patience)")
    p.set_defaults(func=cmd_finetune)
    add_config_options(p)
    p.add_argument("base_run", help="run (or checkpoint) to start from: trained or imported here")
    p.add_argument("--task", choices=("classify", "sft", "translate", "qa"), help="optional with --resume")
    p.add_argument("--data", required=True, help="directory with train and val files (.jsonl, .csv, .parquet)")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--method", choices=("full", "lora"), help="full (default) or lora (PEFT adapters)")
    p.add_argument("--train-blocks", type=int, help="full: train only the last N blocks (+ final norm, heads)")
    p.add_argument("--lr", action=SetConfig, key="optim.lr", metavar="LR",
                   help="sets optim.lr (default 1e-4 full, 1e-3 lora)")
    p.add_argument("--max-steps", action=SetConfig, key="train.max_steps", metavar="N", help="sets train.max_steps")
    p.add_argument("--max-time", action=SetConfig, key="train.max_time", metavar="SECONDS",
                   help="sets train.max_time: seconds of training")
    p.add_argument("--resume", action="store_true", help="continue the fine-tuning run in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--quiet", action="store_true")

    p = commands.add_parser("predict", help="a fine-tuned run on one text: label and probabilities (classify) "
                                            "or its reply, as JSON")
    p.set_defaults(func=cmd_predict)
    p.add_argument("run", help="run directory or a checkpoint directory inside one")
    p.add_argument("--text", required=True)
    p.add_argument("--context", help="qa runs: the passage the --text question is about")
    p.add_argument("--max-new-tokens", type=NEW_TOKENS,
                   help="runs that reply with text: reply length (default 200, at most the run's context)")
    p.add_argument("--device", default="auto")
    add_allow_unknown(p)

    p = commands.add_parser("bench", help="time training steps on random tokens (extra flags override config)")
    p.set_defaults(func=cmd_bench)
    add_config_options(p)
    p.add_argument("--config", help="TOML config (default: built-in defaults)")
    p.add_argument("--steps", type=size_flag(MAX_BENCH_STEPS), default=10,
                   help="timed optimizer steps (after 2 untimed warm-up steps)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--measure-peak", action="store_true",
                   help="measure the peak FLOP rate MFU is reported against again (run it on a quiet machine), "
                        "replacing the cached one")
    p.add_argument("--engine", action=SetConfig, key="train.engine", choices=ENGINES,
                   help="sets train.engine: torch (default) or scratch (NumPy)")

    p = commands.add_parser("gradcheck", help="check the scratch engine's gradients (finite differences, torch)")
    p.set_defaults(func=cmd_gradcheck)
    p.add_argument("--layers", action="store_true", help="every layer, float64")
    p.add_argument("--model", choices=("tiny",), help="the whole tiny model, float64 and float32")

    p = commands.add_parser("import", help="make a run from a Hugging Face model or an llm.c model file")
    p.set_defaults(func=cmd_import)
    p.add_argument("source", help="a Hugging Face model directory, a hub name such as gpt2 (needs network), "
                                  "or an llm.c model .bin file")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--tokenizer", help="an lmforge tokenizer.json (or a run or data directory holding one) "
                                       "instead of the source's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = commands.add_parser("export", help="write a run's model for Hugging Face transformers or llm.c")
    p.set_defaults(func=cmd_export)
    p.add_argument("run", help="run directory or a checkpoint directory inside one")
    p.add_argument("--format", required=True, choices=("hf", "llmc"))
    p.add_argument("--out", required=True, help="hf: a directory; llmc: the model file (its tokenizer file "
                                                "goes beside it as NAME_tokenizer.bin)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = commands.add_parser("report", help="write RUN/report/report.md with plots")
    p.set_defaults(func=cmd_report)
    p.add_argument("run", help="run directory")
    p.add_argument("--attention-layer", type=int, default=-1,
                   help="transformer layer whose attention maps are drawn (default -1: the last)")

    p = commands.add_parser("compare", help="runs side by side: a Markdown table and overlaid val-loss curves")
    p.set_defaults(func=cmd_compare)
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", required=True, help="directory for compare.md and the PNG curves")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier comparison in --out")

    p = commands.add_parser("sweep", help="hyperparameter search with Optuna (extra --section.key value flags "
                                          "override the config)")
    p.set_defaults(func=cmd_sweep)
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
    p.add_argument("--task", choices=("classify", "sft", "translate", "qa"), help="with --finetune: the task")
    p.add_argument("--finetune-method", choices=("full", "lora"), help="with --finetune: full (default) or lora")
    p.add_argument("--quiet", action="store_true")

    add_serve_parser(commands)

    p = commands.add_parser("plot", help="teaching plots")
    p.set_defaults(func=cmd_plot)
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

    p = commands.add_parser("tasks", help="built-in fine-tuning tasks: list them, or make one's data files")
    p.set_defaults(func=cmd_tasks)
    p.add_argument("action", choices=("list", "make"))
    p.add_argument("name", nargs="?", help="make: genre, folio, next-line or modernize")
    p.add_argument("--out", help="make: the directory for train/val/test .jsonl")
    p.add_argument("--overwrite", action="store_true", help="make: replace a non-empty --out")
    return parser


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as every other user error: one line on stderr and exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def checked(kind: type, *, low: float | None = None, high: float | None = None, above: float | None = None,
            text: str) -> typing.Callable[[str], typing.Any]:
    """An argparse type: a finite `kind` within the bounds, else an error saying what is allowed (`text`)."""

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {text}, got {value!r}") from None
        if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high) \
                or (above is not None and number <= above):
            raise argparse.ArgumentTypeError(f"expected {text}, got {value}")
        return number

    return parse


def sampling_value(kind: type, check: typing.Callable[[typing.Any], typing.Any], text: str
                   ) -> typing.Callable[[str], typing.Any]:
    """An argparse type for a sampling flag: the value parsed as `kind`, then SamplingParams' own check of it
    (lmforge/infer/sampling.py), so the flags, chat's /temp and the server accept the same values."""

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {text}, got {value!r}") from None
        try:
            return check(number)
        except SamplingError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def size_flag(most: int) -> typing.Callable[[str], int]:
    """An argparse type for a size: a positive integer up to `most`, a bound far above any real use that keeps
    a typo from running for hours or failing in the allocator."""
    return checked(int, low=1, high=most, text=f"a positive integer of at most {most:,}")


POSITIVE_INT = checked(int, low=1, text="a positive integer")
MAX_NEW_TOKENS = 1_000_000
MAX_SAMPLES = 1024  # --num-samples run as one batch: one row of KV cache each
MAX_BENCH_STEPS = 100_000
NEW_TOKENS = checked(int, low=0, high=MAX_NEW_TOKENS, text=f"an integer from 0 to {MAX_NEW_TOKENS:,}")
TEMPERATURE = sampling_value(float, check_temperature, "0 (greedy) or a positive number")
TOP_K = sampling_value(int, check_top_k, "a positive number of tokens")
PROBABILITY = sampling_value(float, check_top_p, "a probability in (0, 1]")
SEED = checked(int, low=0, high=2**64 - 1, text="an integer in [0, 2**64)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exit_:  # --help, --version, or a bad argument (already reported in one line)
        return exit_.code if isinstance(exit_.code, int) else 2
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if getattr(args, "takes_overrides", False):
            from lmforge.config import parse_overrides

            # A short flag is the same setting as its dotted spelling; given both, the short flag wins.
            args.overrides = {**parse_overrides(extra), **getattr(args, "config_flags", {})}
        return args.func(args) or 0
    except UserError as err:
        print(f"lmforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lmforge sample ... | head`: the reader left, which is fine
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
