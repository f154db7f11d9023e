"""The `lmforge` command line: parse arguments, call one function per command, map user errors to exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge import __version__
from lmforge.errors import UserError


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.prepare import prepare

    prepare(args.source, args.out, args.tokenizer, val_sources=args.val_source, val_fraction=args.val_fraction,
            vocab_size=args.vocab_size, text_field=args.text_field, lowercase=args.lowercase, seed=args.seed,
            shard_tokens=args.shard_tokens, workers=args.workers, overwrite=args.overwrite, quiet=args.quiet)


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    from lmforge.config import load_config
    from lmforge.train.trainer import Trainer

    config_path = args.config
    if config_path is None:
        if not args.resume:
            raise UserError("train needs --config FILE (or --resume to continue the run in --out)")
        config_path = Path(args.out) / "config.toml"
    if args.max_steps is not None:
        overrides["train.max_steps"] = str(args.max_steps)
    if args.max_time is not None:
        overrides["train.max_time"] = str(args.max_time)
    if args.compile:
        overrides["train.compile"] = "true"
    config = load_config(config_path, overrides)
    Trainer(config, args.data, args.out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet).run()


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from lmforge.infer.generate import generate
    from lmforge.train.checkpoint import load_model
    from lmforge.train.hardware import resolve_device

    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give either --prompt or --prompt-file, not both")
    prompt = args.prompt or ""
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise UserError(f"cannot read --prompt-file: {err}") from None
    if args.temperature < 0:
        raise UserError("--temperature must be 0 (greedy) or positive")
    device = resolve_device(args.device, "--device")
    model, _, tokenizer, _ = load_model(args.run, device)
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for index in range(args.num_samples):
        if args.num_samples > 1:
            print(f"--- sample {index + 1} ---")
        sys.stdout.write(prompt)
        ids: list[int] = []
        shown = 0
        for token in generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, generator=generator,
                              stop_token=tokenizer.eot_id):
            ids.append(token)
            text = tokenizer.decode(ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
        sys.stdout.write(tokenizer.decode(ids)[shown:] + "\n")


def cmd_eval(args: argparse.Namespace) -> None:
    from lmforge.data.loader import TokenWindows
    from lmforge.data.prepare import load_meta
    from lmforge.data.tokenizer import load_tokenizer
    from lmforge.train.checkpoint import load_model
    from lmforge.train.evaluate import evaluate
    from lmforge.train.hardware import resolve_device, resolve_precision

    device = resolve_device(args.device, "--device")
    model, config, tokenizer, checkpoint = load_model(args.run, device)
    meta = load_meta(args.data)
    if load_tokenizer(Path(args.data) / "tokenizer.json").to_dict() != tokenizer.to_dict():
        raise UserError(f"{args.data} was tokenized with another tokenizer than the run {args.run}; "
                        "prepare the data with the run's tokenizer")
    if args.split not in meta["splits"]:
        raise UserError(f"unknown split '{args.split}'; {args.data} has {', '.join(meta['splits'])}")
    split = meta["splits"][args.split]
    windows = TokenWindows(args.data, args.split, config.model.block_size)
    result = evaluate(model, windows, batch_size=args.batch_size, max_windows=None, device=device,
                      precision=resolve_precision("fp32" if device.type == "cpu" else config.train.precision,
                                                  device),
                      bytes_per_token=split["bytes"] / split["tokens"])
    # Bits per character, for character-level comparisons (equal to bits per byte on ASCII text).
    result["bpc"] = result["bpb"] * split["bytes"] / split["chars"]
    result["checkpoint"] = str(checkpoint)
    print(json.dumps(result))


def cmd_bench(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    from lmforge.bench import bench
    from lmforge.config import load_config

    if args.steps <= 0:
        raise UserError("--steps must be positive")
    result = bench(load_config(args.config, overrides), steps=args.steps)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['device']} {result['precision']}, compile {result['compile']}, "
          f"{result['params']:,} parameters, {result['tokens_per_step']:,} tokens per step")
    print(f"{result['ms_per_step']:.1f} ms/step | {result['tokens_per_s']:,.0f} tokens/s | "
          f"{result['tflops']:.3f} TFLOP/s | MFU {result['mfu']:.1%} of {result['peak_tflops']:.2f} TFLOP/s | "
          f"peak memory {result['peak_mem_mb']:,.0f} MB")


def cmd_report(args: argparse.Namespace) -> None:
    from lmforge.report import write_report

    print(f"report written to {write_report(args.run)}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="Train language models from scratch.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("prepare", help="clean and tokenize text into token shards")
    p.add_argument("--source", action="append", required=True,
                   help="'shakespeare', a .txt/.md file or directory, .jsonl or .parquet (repeatable)")
    p.add_argument("--val-source", action="append", help="held-out validation text (repeatable)")
    p.add_argument("--val-fraction", type=float, help="fraction of documents held out (default 0.1)")
    p.add_argument("--tokenizer", required=True, help="char, bpe or gpt2")
    p.add_argument("--vocab-size", type=int, help="bpe vocabulary size")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl/.parquet")
    p.add_argument("--lowercase", action="store_true")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--workers", type=int, help="encoding processes (default: all cores)")
    p.add_argument("--out", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace a different dataset in --out")
    p.add_argument("--quiet", action="store_true")

    p = commands.add_parser("train", help="train a model (extra --section.key value flags override the config)")
    p.add_argument("--config", help="TOML config (configs/*.toml); optional with --resume")
    p.add_argument("--data", required=True, help="directory written by lmforge prepare")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-time", type=float, help="seconds of training")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default on CUDA)")
    p.add_argument("--quiet", action="store_true")

    p = commands.add_parser("sample", help="generate text from a trained run")
    p.add_argument("run", help="run directory or a checkpoint directory inside one")
    p.add_argument("--prompt")
    p.add_argument("--prompt-file")
    p.add_argument("--max-new-tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy decoding")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--device", default="auto")

    p = commands.add_parser("eval", help="loss, perplexity and bits per byte on a split")
    p.add_argument("run", help="run directory or a checkpoint directory inside one")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")

    p = commands.add_parser("bench", help="time training steps on random tokens (extra flags override config)")
    p.add_argument("--config", help="TOML config (default: built-in defaults)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = commands.add_parser("report", help="write RUN/report/report.md with plots")
    p.add_argument("run")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command in ("train", "bench"):
            from lmforge.config import parse_overrides

            {"train": cmd_train, "bench": cmd_bench}[args.command](args, parse_overrides(extra))
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            {"prepare": cmd_prepare, "sample": cmd_sample, "eval": cmd_eval, "report": cmd_report}[
                args.command](args)
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
