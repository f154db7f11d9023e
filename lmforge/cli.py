"""The `lmforge` command line: parse arguments, call one function per command, map user errors to exit 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lmforge import __version__
from lmforge.config import ENGINES
from lmforge.errors import UserError
from lmforge.serve.cli import add_serve_parser, run_server


def cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.prepare import prepare

    prepare(args.source, args.out, args.tokenizer, val_sources=args.val_source, val_fraction=args.val_fraction,
            vocab_size=args.vocab_size, text_field=args.text_field, lowercase=args.lowercase, seed=args.seed,
            shard_tokens=args.shard_tokens, workers=args.workers, overwrite=args.overwrite, quiet=args.quiet)


def cmd_train(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    from lmforge.config import load_config
    from lmforge.train.trainer import Trainer

    config_path = args.config
    if args.init_from is not None and args.resume:
        raise UserError("--init-from starts a new run from another run's weights; --resume continues --out: "
                        "give one of them")
    if config_path is None and args.init_from is not None:  # the pretrained run's settings, overridable
        from lmforge.train.checkpoint import resolve_checkpoint

        config_path = resolve_checkpoint(args.init_from)[0] / "config.toml"
    if config_path is None:
        if not args.resume:
            raise UserError("train needs --config FILE (or --resume to continue the run in --out, or "
                            "--init-from RUN to start from a run's weights and settings)")
        config_path = Path(args.out) / "config.toml"
    if args.max_steps is not None:
        overrides["train.max_steps"] = str(args.max_steps)
    if args.max_time is not None:
        overrides["train.max_time"] = str(args.max_time)
    if args.compile:
        overrides["train.compile"] = "true"
    if args.engine is not None:
        overrides["train.engine"] = args.engine
    if args.parallel is not None:
        overrides["train.parallel"] = args.parallel
    config = load_config(config_path, overrides)
    Trainer(config, args.data, args.out, resume=args.resume, overwrite=args.overwrite, quiet=args.quiet,
            init_from=args.init_from).run()


def load_for_inference(args: argparse.Namespace):
    """The run's model on --device (the scratch engine: its NumPy forward, on the CPU), config, tokenizer,
    checkpoint used, and the device."""
    import torch

    from lmforge.train.checkpoint import load_model
    from lmforge.train.hardware import resolve_device

    device = torch.device("cpu") if args.engine == "scratch" else resolve_device(args.device, "--device")
    model, config, tokenizer, checkpoint = load_model(args.run, device)
    if args.engine == "scratch":
        from lmforge.train.engine import ScratchForward

        model = ScratchForward(model)
    return model, config, tokenizer, checkpoint, device


def cmd_sample(args: argparse.Namespace) -> None:
    import torch

    from lmforge.infer.generate import generate

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
    model, _, tokenizer, _, device = load_for_inference(args)
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
                              stop_token=tokenizer.eot_id, use_cache=args.engine == "torch"):
            ids.append(token)
            text = tokenizer.decode(ids)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[shown:])
                sys.stdout.flush()
                shown = len(text)
        sys.stdout.write(tokenizer.decode(ids)[shown:] + "\n")


def cmd_eval(args: argparse.Namespace) -> None:

    from lmforge.data.datadir import describe_data
    from lmforge.data.loader import TokenWindows
    from lmforge.train.evaluate import evaluate
    from lmforge.train.hardware import resolve_precision

    model, config, tokenizer, checkpoint, device = load_for_inference(args)
    meta, _ = describe_data(args.data, tokenizer)  # a prepared directory, or bare llm.c shards (no byte counts)
    if args.split not in meta["splits"]:
        raise UserError(f"unknown split '{args.split}'; {args.data} has {', '.join(meta['splits'])}")
    split = meta["splits"][args.split]
    windows = TokenWindows(args.data, args.split, config.model.block_size)
    result = evaluate(model, windows, batch_size=args.batch_size, max_windows=None, device=device,
                      precision=resolve_precision("fp32" if device.type == "cpu" else config.train.precision,
                                                  device),
                      bytes_per_token=split["bytes"] / split["tokens"] if split["bytes"] else None)
    # Bits per character, for character-level comparisons (equal to bits per byte on ASCII text).
    result["bpc"] = result["bpb"] * split["bytes"] / split["chars"] if result["bpb"] is not None else None
    result["checkpoint"] = str(checkpoint)
    print(json.dumps(result))


def cmd_bench(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    from lmforge.bench import bench
    from lmforge.config import load_config

    if args.steps <= 0:
        raise UserError("--steps must be positive")
    if args.engine is not None:
        overrides["train.engine"] = args.engine
    result = bench(load_config(args.config, overrides), steps=args.steps)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['engine']} engine, {result['device']} {result['precision']}, compile {result['compile']}, "
          f"{result['params']:,} parameters, {result['tokens_per_step']:,} tokens per step")
    print(f"{result['ms_per_step']:.1f} ms/step | {result['tokens_per_s']:,.0f} tokens/s | "
          f"{result['tflops']:.3f} TFLOP/s | MFU {result['mfu']:.1%} of {result['peak_tflops']:.2f} TFLOP/s | "
          f"peak memory {result['peak_mem_mb']:,.0f} MB")


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

    print(f"comparison written to {compare(args.runs, args.out)}")


def cmd_sweep(args: argparse.Namespace, overrides: dict[str, str]) -> None:
    from lmforge.lab.sweep import sweep

    sweep(args.config, args.data, args.out, args.param or [], method=args.method, trials=args.trials,
          budget_time=args.budget_time, overrides=overrides, quiet=args.quiet)


def cmd_plot(args: argparse.Namespace) -> None:
    from lmforge.lab.activations import plot_activations

    print(f"wrote {plot_activations(args.out)}")


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
    p.add_argument("--data", required=True, help="directory written by lmforge prepare, or of llm.c shards")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--max-steps", type=int)
    p.add_argument("--max-time", type=float, help="seconds of training")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (default on CUDA)")
    p.add_argument("--engine", choices=ENGINES, help="sets train.engine: torch (default) or scratch (NumPy)")
    p.add_argument("--init-from", help="start from this run's weights (and its config unless --config is given)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), help="sets train.parallel, under torchrun: ddp (default) "
                                                               "or fsdp (shards parameters and optimizer state)")
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
    p.add_argument("--engine", choices=ENGINES, default="torch", help="scratch: the NumPy engine (CPU)")

    p = commands.add_parser("eval", help="loss, perplexity and bits per byte on a split")
    p.add_argument("run", help="run directory or a checkpoint directory inside one")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.add_argument("--engine", choices=ENGINES, default="torch", help="scratch: the NumPy engine (CPU)")

    p = commands.add_parser("bench", help="time training steps on random tokens (extra flags override config)")
    p.add_argument("--config", help="TOML config (default: built-in defaults)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--engine", choices=ENGINES, help="sets train.engine: torch (default) or scratch (NumPy)")

    p = commands.add_parser("gradcheck", help="check the scratch engine's gradients (finite differences, torch)")
    p.add_argument("--layers", action="store_true", help="every layer, float64")
    p.add_argument("--model", choices=("tiny",), help="the whole tiny model, float64 and float32")

    p = commands.add_parser("import", help="make a run from a Hugging Face model or an llm.c model file")
    p.add_argument("source", help="a Hugging Face model directory, a hub name such as gpt2 (needs network), "
                                  "or an llm.c model .bin file")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument("--tokenizer", help="an lmforge tokenizer.json (or a run or data directory holding one) "
                                       "instead of the source's")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = commands.add_parser("export", help="write a run's model for Hugging Face transformers or llm.c")
    p.add_argument("run", help="run directory or a checkpoint directory inside one")
    p.add_argument("--format", required=True, choices=("hf", "llmc"))
    p.add_argument("--out", required=True, help="hf: a directory; llmc: the model file (its tokenizer file "
                                                "goes beside it as NAME_tokenizer.bin)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")

    p = commands.add_parser("report", help="write RUN/report/report.md with plots")
    p.add_argument("run")
    p.add_argument("--attention-layer", type=int, default=-1,
                   help="transformer layer whose attention maps are drawn (default -1: the last)")

    p = commands.add_parser("compare", help="runs side by side: a Markdown table and overlaid val-loss curves")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    p.add_argument("--out", required=True, help="directory for compare.md and the PNG curves")

    p = commands.add_parser("sweep", help="hyperparameter search with Optuna (extra --section.key value flags "
                                          "override the config)")
    p.add_argument("--config", help="TOML config every trial starts from")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="sweep directory: sweep.db, trial_000/, ..., results, best.toml")
    p.add_argument("--param", action="append", help="KEY=a,b,c or KEY=log:LOW:HIGH or KEY=lin:LOW:HIGH "
                                                    "(repeatable)")
    p.add_argument("--method", default="tpe", help="grid, random or tpe (default)")
    p.add_argument("--trials", type=int, help="trials in all, counting finished ones (default: the grid's "
                                              "size, else 10)")
    p.add_argument("--budget-time", type=float, help="seconds of training per trial")
    p.add_argument("--quiet", action="store_true")

    add_serve_parser(commands)

    p = commands.add_parser("plot", help="teaching plots")
    p.add_argument("what", choices=("activations",), help="activations: the functions and their derivatives")
    p.add_argument("--out", required=True, help="PNG file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        if args.command in ("train", "bench", "sweep"):
            from lmforge.config import parse_overrides

            {"train": cmd_train, "bench": cmd_bench, "sweep": cmd_sweep}[args.command](args, parse_overrides(extra))
        else:
            if extra:
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            {"prepare": cmd_prepare, "sample": cmd_sample, "eval": cmd_eval, "report": cmd_report,
             "gradcheck": cmd_gradcheck, "import": cmd_import, "export": cmd_export, "compare": cmd_compare,
             "plot": cmd_plot, "serve": run_server}[
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
