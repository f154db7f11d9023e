"""The `lmforge` command line: one parser for every command, one function per command, user errors to exit 2.

Each command's flags are declared in lmforge/arguments/ (choices a config key declares come from lmforge/config/);
the functions here run the commands. Every command's function takes the parsed arguments; `train`, `finetune`,
`bench` and `sweep` also take config overrides. An override is `--section.key VALUE` for any config key, checked
by the config; a few common keys have a short flag of their own (`--max-steps`, `--engine`, ...), which writes the
same override, so both spellings take one path. A command whose optional packages are missing (serve, finetune,
sweep: see lmforge/extras.py) says in one line which extra to install.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import typing
from pathlib import Path

from lmforge import __version__
from lmforge.arguments import inference, tools, training
from lmforge.arguments.flags import ArgumentParser
from lmforge.errors import UserError
from lmforge.extras import extra_of, require_extra
from lmforge.infer.sampling import SamplingParams
from lmforge.serve.cli import run_server

if typing.TYPE_CHECKING:  # the CLI imports torch only inside the commands that need it
    from torch import nn

    from lmforge.data.tokenizer import Tokenizer
    from lmforge.infer.constrained import GrammarConstraint

def cmd_prepare(args: argparse.Namespace) -> None:
    from lmforge.data.prepare import prepare

    prepare(args.source, args.out, args.tokenizer, val_sources=args.val_source, val_fraction=args.val_fraction,
            vocab_size=args.vocab_size, text_field=args.text_field, lowercase=args.lowercase, seed=args.seed,
            shard_tokens=args.shard_tokens, workers=args.workers, overwrite=args.overwrite, quiet=args.quiet)


def cmd_train(args: argparse.Namespace) -> int:
    from lmforge.config.load import canonical_key, load_config
    from lmforge.run.checkpoints import resolve_checkpoint
    from lmforge.run.directory import CONFIG_FILE
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
    if args.check_export:
        from lmforge.interop.architectures import export_report

        for fmt, verdict in export_report(config.model).items():
            print(f"export --format {fmt}: {verdict}")
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

    from lmforge.hardware import decoding_threads
    from lmforge.infer.constrained import compile_format, format_from_flags
    from lmforge.infer.decode import stream_text
    from lmforge.infer.generate import check_generates, generate
    from lmforge.infer.load import load_run

    if args.prompt is not None and args.prompt_file is not None:
        raise UserError("give either --prompt or --prompt-file, not both")
    prompt = args.prompt or ""
    if args.prompt_file is not None:
        from lmforge.inputs import refuse_special_file

        refuse_special_file(args.prompt_file, "--prompt-file")
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise UserError(f"cannot read --prompt-file: {err}") from None
    output_format = format_from_flags(args.json_schema, args.regex)
    loaded = load_run(args.run, device=args.device, engine=args.engine)
    check_generates(loaded.config.model, from_source=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    note_unknown("sample", tokenizer, tokenizer.check_known(prompt, allow_unknown=args.allow_unknown))
    prompt_ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    from_source = loaded.config.model.arch == "encoder-decoder"
    if from_source:
        note_source_limits(len(prompt_ids), args.max_new_tokens, model.config.block_size)
    output = None if output_format is None else compile_format(tokenizer, output_format)
    constraints = [None if output is None else output.constraint() for _ in range(args.num_samples)]
    with decoding_threads(args.threads, loaded.config.model.n_embd, loaded.device):
        # The batched engine keeps each row's whole context in its cache and cannot slide it as `generate` does:
        # samples longer than the context run one at a time.
        if (args.num_samples > 1 and args.engine == "torch" and not from_source
                and len(prompt_ids) + args.max_new_tokens <= model.config.block_size):
            print_batched_samples(model, tokenizer, prompt, prompt_ids, args, constraints)
            return
        generator = torch.Generator(device=loaded.device).manual_seed(args.seed)
        for index, constraint in enumerate(constraints):
            if args.num_samples > 1:
                print(f"--- sample {index + 1} ---")
            if not from_source:  # a decoder continues the prompt; an encoder-decoder writes a target from it
                sys.stdout.write(prompt)
            tokens = generate(model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, generator=generator, stop_token=tokenizer.eot_id,
                              use_cache=args.engine == "torch", constraint=constraint)
            for piece in stream_text(tokenizer, tokens):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            note_unfinished(index, constraint)


def note_source_limits(source_tokens: int, max_new_tokens: int, block_size: int) -> None:
    """An encoder-decoder reads its prompt as the source, at most its context; its decoder writes at most its
    context: say on stderr what a longer prompt or --max-new-tokens meets."""
    if source_tokens > block_size:
        print(f"lmforge sample: note: the prompt is {source_tokens} tokens; the encoder reads its last "
              f"{block_size} (its context)", file=sys.stderr)
    if max_new_tokens > block_size:
        print(f"lmforge sample: note: an encoder-decoder writes at most {block_size} tokens (its decoder's context), "
              f"fewer than --max-new-tokens {max_new_tokens}", file=sys.stderr)


def note_unfinished(index: int, constraint: GrammarConstraint | None) -> None:
    """Say on stderr when --max-new-tokens (or the context) ended a constrained sample before its format did."""
    if constraint is not None and not constraint.finished:
        print(f"lmforge sample: note: sample {index + 1} reached --max-new-tokens before its "
              f"{constraint.format.param} format was complete, so it does not match it; raise --max-new-tokens",
              file=sys.stderr)


def note_unknown(command: str, tokenizer: Tokenizer, allowed: list[str]) -> None:
    """With --allow-unknown: say on stderr which characters were read as the unknown token."""
    if allowed:
        from lmforge.data.tokenizer import name_characters

        print(f"lmforge {command}: note: characters outside the vocabulary read as the unknown token: "
              f"{name_characters(allowed)}", file=sys.stderr)


def print_batched_samples(model: nn.Module, tokenizer: Tokenizer, prompt: str, prompt_ids: list[int],
                          args: argparse.Namespace, constraints: list[GrammarConstraint | None]) -> None:
    """All --num-samples in one batch on the batched engine (sample i seeded with --seed + i), each printed
    under its header once the batch is done."""
    from lmforge.infer.batched import generate_batch

    samples = generate_batch(model, tokenizer, [prompt_ids] * args.num_samples, args.max_new_tokens,
                             max_batch=args.num_samples, temperature=args.temperature, top_k=args.top_k,
                             top_p=args.top_p, seeds=[args.seed + index for index in range(args.num_samples)],
                             stop_token=tokenizer.eot_id, constraints=constraints)
    for index, sample in enumerate(samples):
        print(f"--- sample {index + 1} ---")
        sys.stdout.write(prompt + sample.text + "\n")
        sys.stdout.flush()
        note_unfinished(index, constraints[index])


def cmd_chat(args: argparse.Namespace) -> None:
    from lmforge.infer.chat import chat
    from lmforge.infer.constrained import format_from_flags

    chat(args.run, SamplingParams(args.temperature, args.top_k, args.top_p), max_new_tokens=args.max_new_tokens,
         device=args.device, seed=args.seed, allow_unknown=args.allow_unknown,
         output_format=format_from_flags(args.json_schema, args.regex))


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
    precision = resolve_precision("fp32" if device.type == "cpu" else config.train.precision, device)
    if config.model.arch == "encoder":
        from lmforge.infer.evaluate import MASKED_LM_NOTE, check_no_reserved_ids, evaluate_masked_lm
        from lmforge.model.masking import MASK_WORDS, mask_token_id

        check_no_reserved_ids(args.data, mask_token_id(config.model), MASK_WORDS, (args.split,))
        result = evaluate_masked_lm(loaded.model, windows, mask_id=mask_token_id(config.model),
                                    batch_size=args.batch_size, device=device, precision=precision)
        print(f"lmforge eval: note: {MASKED_LM_NOTE}", file=sys.stderr)
        print(json.dumps({**result, "checkpoint": str(loaded.checkpoint)}))
        return
    if config.model.arch == "encoder-decoder":
        from functools import partial

        from lmforge.infer.evaluate import SPAN_NOTE, check_no_reserved_ids, span_windows
        from lmforge.model.spans import first_sentinel

        check_no_reserved_ids(args.data, first_sentinel(config.model), "the encoder-decoder's sentinel and start "
                              "tokens", (args.split,))
        result = evaluate(loaded.model, windows, batch_size=args.batch_size, max_windows=None, device=device,
                          precision=precision, bytes_per_token=None,
                          corrupt=partial(span_windows, config=config.model))
        print(f"lmforge eval: note: {SPAN_NOTE}", file=sys.stderr)
        print(json.dumps({"span_loss": result["loss"], "span_tokens": result["tokens"],
                          "checkpoint": str(loaded.checkpoint)}))
        return
    result = evaluate(loaded.model, windows, batch_size=args.batch_size, max_windows=None, device=device,
                      precision=precision, bytes_per_token=split["bytes"] / split["tokens"] if split["bytes"] else None)
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
    from lmforge.config.load import load_config

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
    from lmforge.scratch.gradcheck import check_layers, check_model, tiny_model_config

    both = not args.layers and args.model is None
    models = [check_model(), check_model(tiny_model_config("encoder"))] if args.model or both else []
    results = (check_layers() if args.layers or both else []) + [check for model in models for check in model]
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
    if args.check:
        print_export_check(args)
        return
    if args.format is None or args.out is None:
        raise UserError("export needs --format and --out (or --check, to see which formats the model exports to)")
    if args.ollama and args.format != "gguf":
        raise UserError(f"--ollama writes a Modelfile for a GGUF file; it needs --format gguf, not {args.format}")
    if args.format == "gguf":
        print_gguf_export(args)
    elif args.format == "hf":
        from lmforge.interop.hf import export_hf

        print(f"wrote {export_hf(args.run, args.out, dtype=args.dtype or 'fp32', overwrite=args.overwrite)}")
    else:
        from lmforge.interop.llmc import export_llmc

        model_file, tokenizer_file = export_llmc(args.run, args.out, dtype=args.dtype or "fp32",
                                                 overwrite=args.overwrite)
        print(f"wrote {model_file} and {tokenizer_file}")


def print_export_check(args: argparse.Namespace) -> None:
    """export --check: one line per format (only --format's, if given), the architecture or the refusal."""
    from lmforge.interop.architectures import FORMATS, check_export

    if args.out is not None:
        raise UserError("export --check writes nothing; drop --out (or drop --check to export)")
    if args.format is not None and args.format not in FORMATS:
        raise UserError(f"export --check covers {' and '.join(FORMATS)}, not --format {args.format}")
    for fmt, verdict in check_export(args.run).items():
        if args.format in (None, fmt):
            print(f"{fmt}: {verdict}")


def print_gguf_export(args: argparse.Namespace) -> None:
    from lmforge.extras import require_extra

    require_extra("gguf")
    from lmforge.interop.gguf import export_gguf

    done = export_gguf(args.run, args.out, dtype=args.dtype or "f32", ollama=args.ollama, overwrite=args.overwrite)
    print(f"wrote {done.path}" + (f" and {done.modelfile}" if done.modelfile else ""))
    if done.kept_f32:
        print(f"kept in f32 (rows not a multiple of 32, Q8_0's block): {', '.join(done.kept_f32)}")


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
    from lmforge.tasks.make import tasks_command

    tasks_command(args.action, args.name, args.out, overwrite=args.overwrite)


def build_parser() -> ArgumentParser:
    """The one parser: each command's flags (lmforge/arguments/), the function that runs it, and the extra it
    needs beyond the core install (checked before it starts)."""
    parser = ArgumentParser(prog="lmforge", description="Train language models from scratch.")
    parser.add_argument("--version", action="version", version=f"lmforge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # Looked up when the parser is built, so a test may stand in for a command's function.
    for add, func, extra in (
            (training.add_prepare, cmd_prepare, None), (training.add_train, cmd_train, None),
            (inference.add_sample, cmd_sample, None), (inference.add_chat, cmd_chat, None),
            (inference.add_eval, cmd_eval, None), (training.add_finetune, cmd_finetune, "tasks"),
            (inference.add_predict, cmd_predict, None), (training.add_bench, cmd_bench, None),
            (tools.add_gradcheck, cmd_gradcheck, None), (tools.add_import, cmd_import, None),
            (tools.add_export, cmd_export, None), (tools.add_report, cmd_report, None),
            (tools.add_compare, cmd_compare, None), (training.add_sweep, cmd_sweep, "lab"),
            (inference.add_serve, run_server, "serve"), (tools.add_plot, cmd_plot, None),
            (tools.add_tasks, cmd_tasks, None)):
        add(commands).set_defaults(func=func, extra=extra)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised where the command is, so that its clean-up runs as for Ctrl-C: half-written outputs and
    temporary files are removed (the default action would kill the process on the spot and leave them)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    # The training loops and the server install handlers of their own while they run, and restore this one.
    on_sigterm = threading.current_thread() is threading.main_thread() \
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if on_sigterm:
        signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return _run(argv)
    finally:
        if on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except SystemExit as exit_:  # --help, --version, or a bad argument (already reported in one line)
        return exit_.code if isinstance(exit_.code, int) else 2
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.extra is not None:
            require_extra(args.extra)
        if getattr(args, "takes_overrides", False):
            from lmforge.config.load import parse_overrides

            # A short flag is the same setting as its dotted spelling; given both, the short flag wins.
            args.overrides = {**parse_overrides(extra), **getattr(args, "config_flags", {})}
        return args.func(args) or 0
    except UserError as err:
        print(f"lmforge {args.command}: error: {err}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as err:  # an optional package a command reached without its extra installed
        missing = extra_of(err)
        if missing is None:
            raise
        print(f"lmforge {args.command}: error: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lmforge {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"lmforge {args.command}: terminated", file=sys.stderr)
        return 128 + signal.SIGTERM
    except BrokenPipeError:  # `lmforge sample ... | head`: the reader left, which is fine
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
