"""Fine-tuning measured (issue 12): does pretraining transfer to tasks, and what does LoRA cost and give?

    python benchmarks/finetune.py [--base RUN | --config PRESET] [--pretrain-seconds 300] [--finetune-seconds 120]
                                  [--long-pretrain-seconds 0] [--work DIR]
                                  [--only genre,folio,next-line,lora,encoder,encoder-decoder]
                                  [--pretrain-args '--model.block_size 320 --train.batch_size 6' (the default)]
                                  [--finetune-args '--lr 1e-3 --finetune.patience 0' (the default)]

Run it alone on the machine (two cores): every figure is a time budget. The base is `--base RUN` (e.g. the
run `make demo` trains), or else --config (the demo's preset, configs/shakespeare-char.toml) trained here for
--pretrain-seconds on the built-in corpus. Then, with the built-in tasks (`lmforge tasks make`):

1. genre: test accuracy and macro F1 of the pretrained model fine-tuned (full) for --finetune-seconds, of the
   same architecture from random initialisation fine-tuned for the same time, of TF-IDF + logistic regression
   trained on the same train split, and of the majority class.
2. folio: test BLEU and chrF of the pretrained model fine-tuned (translate) against copying the source.
3. next-line: zero-shot acc, acc_norm and acc_pmi of the pretrained model against chance (25%), each with its
   one-sided exact binomial p-value over the test split, and of a model pretrained 10x longer when
   --long-pretrain-seconds is given.
4. LoRA against full fine-tuning on genre (classify) and modernize (sft): trainable parameters, median step
   time, peak resident memory of the fine-tuning process, and the task metric on the test split.
5. The families (issue 23), each pretrained for --pretrain-seconds from the same preset with only model.arch
   changed (and the decoder's data warmups, train.context_warmup and train.batch_warmup, off): genre with a
   BERT-style encoder (masked-LM pretraining, the classifier pools the whole passage), folio with a T5-style
   encoder-decoder (span corruption; the source to the encoder, the target to the decoder), beside the
   decoder's rows of 1 and 2.

--pretrain-args are extra `lmforge train` flags for every base (the default gives the model a context of 320
characters, so that a genre passage, 200-320 characters, is read whole rather than cut to its last 128).

Prints one Markdown table with the command, date and machine, for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Runs one lmforge command in this process and reports the process's peak resident memory on stderr.
MEASURED = """\
import resource, sys
from lmforge.cli import main
code = main(sys.argv[1:])
print(f"PEAK_RSS_MB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.1f}", file=sys.stderr)
sys.exit(code)
"""


def lmforge(*args: str) -> tuple[str, float]:
    """stdout of `lmforge ARGS` and the command's peak resident memory in MiB."""
    done = subprocess.run([sys.executable, "-c", MEASURED, *args], capture_output=True, text=True, cwd=ROOT)
    if done.returncode:
        sys.exit(f"lmforge {' '.join(args)} failed:\n{done.stderr}")
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_MB=")]
    return done.stdout, float(peak[-1].split("=")[1]) if peak else float("nan")


def pretrain(work: Path, config: Path, name: str, seconds: float, *extra: str) -> Path:
    """The preset `config` trained `seconds` on the built-in corpus, with `extra` train flags."""
    data = work / "data"
    if not data.exists():
        lmforge("prepare", "--source", "shakespeare", "--tokenizer", "char", "--val-fraction", "0.1",
                "--out", str(data), "--quiet")
    run = work / name
    lmforge("train", "--config", str(config), "--data", str(data),
            "--out", str(run), "--max-time", str(seconds), "--overwrite", "--quiet", *extra)
    return run


def pretrained_result(run: Path) -> str:
    """Steps and final validation loss of a base `pretrain` trained (a masked-LM or span loss for the encoder
    and the encoder-decoder: each family's own objective, not comparable with the others')."""
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    final = [r for r in records if r["kind"] == "eval"][-1]
    return f"{final['step']} steps; final val loss {final['val_loss']:.3f} nats per predicted token"


def random_init_copy(base: Path, out: Path) -> Path:
    """A run with the base's config and tokenizer and freshly initialised weights (the no-pretraining arm)."""
    import torch

    from lmforge.config.load import load_config
    from lmforge.model.factory import build_model
    from lmforge.run.checkpoints import resolve_checkpoint, save_checkpoint

    run_dir, _ = resolve_checkpoint(base)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for name in ("config.toml", "tokenizer.json"):
        shutil.copy(run_dir / name, out / name)
    torch.manual_seed(0)
    save_checkpoint(out, 0, build_model(load_config(run_dir / "config.toml").model).state_dict(), [], {})
    return out


def finetune(base: Path, task: str, data: Path, out: Path, seconds: float, *extra: str) -> dict:
    """Fine-tune for a time budget; trainable parameters, median step time (s) and peak memory (MiB)."""
    _, peak = lmforge("finetune", str(base), "--task", task, "--data", str(data), "--out", str(out),
                      "--max-time", str(seconds), "--max-steps", "1000000", "--overwrite", "--quiet", *extra)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    start = [r for r in records if r["kind"] == "start"][-1]
    train = [r for r in records if r["kind"] == "train"]
    step_times = [(b["elapsed"] - a["elapsed"]) / (b["step"] - a["step"])
                  for a, b in zip(train, train[1:], strict=False) if b["step"] > a["step"]]
    return {"trainable": start.get("trainable_params"), "params": start.get("params"),
            "step_s": statistics.median(step_times) if step_times else float("nan"), "peak_mb": peak,
            "steps": train[-1]["step"] if train else 0}


def evaluate(run: Path, task: str, data: Path) -> dict:
    printed, _ = lmforge("eval", str(run), "--task", task, "--data", str(data), "--device", "cpu")
    return json.loads(printed)


def above_chance_p(accuracy: float, questions: int, chance: float) -> float:
    """The one-sided p-value of `accuracy` over `questions` against guessing: P(X >= correct) for X ~
    Binomial(questions, chance), exactly (each term in log space, so that 500 questions do not underflow)."""
    correct = round(accuracy * questions)
    terms = [math.lgamma(questions + 1) - math.lgamma(k + 1) - math.lgamma(questions - k + 1)
             + k * math.log(chance) + (questions - k) * math.log(1 - chance) for k in range(correct, questions + 1)]
    return sum(math.exp(term) for term in terms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="a pretrained run (default: train the demo preset here)")
    parser.add_argument("--pretrain-seconds", type=float, default=300)
    parser.add_argument("--finetune-seconds", type=float, default=120)
    parser.add_argument("--long-pretrain-seconds", type=float, default=0, help="e.g. 3000: next-line after 10x")
    parser.add_argument("--work", help="keep runs and data here (default: a temporary directory)")
    parser.add_argument("--only", default="genre,folio,next-line,lora,encoder,encoder-decoder")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "shakespeare-char.toml",
                        help="the preset every base is pretrained from (default: the demo's; --base replaces the "
                             "decoder's)")
    parser.add_argument("--pretrain-args", default="--model.block_size 320 --train.batch_size 6",
                        help="extra train flags for every pretrained base")
    # The fine-tuning default for full runs (lr 1e-4) is gentle for these tiny models: measured here, a 60 s
    # char model fine-tuned 90 s on folio reached BLEU 57 at 1e-3 (copy: 42), and stayed near 0 at 1e-4.
    # Early stopping is off so that every arm trains for the whole budget (with the default patience, genre's
    # noisy 300-passage validation accuracy stopped a run after 13 s); the best checkpoint is still evaluated.
    parser.add_argument("--finetune-args", default="--lr 1e-3 --finetune.patience 0",
                        help="extra finetune flags for every run")
    args = parser.parse_args()
    parts = set(args.only.split(","))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="lmforge-finetune-"))
    work.mkdir(parents=True, exist_ok=True)
    pretrain_args = args.pretrain_args.split()
    decoder_parts = {"genre", "folio", "next-line", "lora"}

    def pretrained(name: str, *extra: str) -> Path:
        return pretrain(work, args.config, name, args.pretrain_seconds, *pretrain_args, *extra)

    base = Path(args.base) if args.base else pretrained("pretrained") if parts & decoder_parts else None
    # The data warmups reshape a decoder's next-token windows; the other families' objectives take them whole.
    whole_windows = ("--train.context_warmup", "0", "--train.batch_warmup", "0")
    encoder = pretrained("pretrained-encoder", "--model.arch", "encoder", *whole_windows) \
        if "encoder" in parts else None
    t5 = pretrained("pretrained-encoder-decoder", "--model.arch", "encoder-decoder", *whole_windows) \
        if "encoder-decoder" in parts else None
    tasks = work / "tasks"
    for name in ("genre", "folio", "next-line", "modernize"):
        if not (tasks / name).exists():
            lmforge("tasks", "make", name, "--out", str(tasks / name))
    seconds = args.finetune_seconds
    extra = args.finetune_args.split()
    rows: list[tuple[str, str, str]] = []

    def add(measure: str, model: str, result: str) -> None:
        rows.append((measure, model, result))
        print(f"{measure} | {model} | {result}", file=sys.stderr, flush=True)

    for run in (base, encoder, t5):
        if run is not None and not (run is base and args.base):
            add("pretraining", f"{run.name}, {args.pretrain_seconds:.0f} s", pretrained_result(run))

    def classify_result(scores: dict) -> str:
        return f"accuracy {scores['accuracy']:.3f}, macro F1 {scores['macro_f1']:.3f}"

    if "genre" in parts:
        genre = tasks / "genre"
        finetune(base, "classify", genre, work / "genre-pretrained", seconds, *extra)
        add("genre", f"pretrained, fine-tuned {seconds:.0f} s",
            classify_result(evaluate(work / "genre-pretrained", "classify", genre / "test.jsonl")))
        scratch = random_init_copy(base, work / "random-init")
        finetune(scratch, "classify", genre, work / "genre-random", seconds, *extra)
        add("genre", f"random init, trained {seconds:.0f} s",
            classify_result(evaluate(work / "genre-random", "classify", genre / "test.jsonl")))
        from lmforge.tasks.records import read_records, split_files
        from lmforge.tasks.task_readme import baseline_scores

        splits = {split: read_records(path, "classify") for split, path in split_files(genre).items()}
        baselines = baseline_scores("genre", splits)
        add("genre", "TF-IDF + logistic regression",
            f"accuracy {baselines['tfidf_accuracy']:.3f}, macro F1 {baselines['tfidf_macro_f1']:.3f}")
        add("genre", "majority class",
            f"accuracy {baselines['majority_accuracy']:.3f}, macro F1 {baselines['majority_macro_f1']:.3f}")
    if "folio" in parts:
        folio = tasks / "folio"
        finetune(base, "translate", folio, work / "folio-pretrained", seconds, *extra)
        scores = evaluate(work / "folio-pretrained", "translate", folio / "test.jsonl")
        add("folio", f"pretrained, fine-tuned {seconds:.0f} s", f"BLEU {scores['bleu']:.1f}, chrF {scores['chrf']:.1f}")
        add("folio", "copy the source", f"BLEU {scores['copy_bleu']:.1f}, chrF {scores['copy_chrf']:.1f}")
    if "next-line" in parts:
        test = tasks / "next-line" / "test.jsonl"
        questions = sum(1 for line in test.read_text().splitlines() if line.strip())

        def choice_result(scores: dict) -> str:
            return ", ".join(f"{name} {scores[name]:.3f} (p {above_chance_p(scores[name], questions, 0.25):.2g})"
                             for name in ("acc", "acc_norm", "acc_pmi")) + f", {questions} questions"

        add("next-line", "pretrained, zero-shot", choice_result(evaluate(base, "choice", test)))
        if args.long_pretrain_seconds:
            longer = pretrain(work, args.config, "pretrained-long", args.long_pretrain_seconds, *pretrain_args)
            add("next-line", f"pretrained {args.long_pretrain_seconds:.0f} s, zero-shot",
                choice_result(evaluate(longer, "choice", test)))
        add("next-line", "chance", "0.250")
    if "lora" in parts:
        for name, task in (("genre", "classify"), ("modernize", "sft")):
            for method in ("full", "lora"):
                out = work / f"{name}-{method}"
                cost = finetune(base, task, tasks / name, out, seconds, "--method", method, *extra)
                scores = evaluate(out, task, tasks / name / "test.jsonl")
                metric = classify_result(scores) if task == "classify" else \
                    f"loss {scores['loss']:.3f}, perplexity {scores['perplexity']:.2f}"
                add(f"{name} {method}", f"{cost['steps']} steps in {seconds:.0f} s",
                    f"{cost['trainable']:,} of {cost['params']:,} parameters train; "
                    f"step {cost['step_s'] * 1000:.0f} ms; peak RSS {cost['peak_mb']:.0f} MiB; {metric}")

    if "encoder" in parts:
        genre = tasks / "genre"
        finetune(encoder, "classify", genre, work / "genre-encoder", seconds, *extra)
        add("genre", f"encoder (masked LM) pretrained, fine-tuned {seconds:.0f} s",
            classify_result(evaluate(work / "genre-encoder", "classify", genre / "test.jsonl")))
    if "encoder-decoder" in parts:
        folio = tasks / "folio"
        finetune(t5, "translate", folio, work / "folio-encoder-decoder", seconds, *extra)
        scores = evaluate(work / "folio-encoder-decoder", "translate", folio / "test.jsonl")
        add("folio", f"encoder-decoder (span corruption) pretrained, fine-tuned {seconds:.0f} s",
            f"BLEU {scores['bleu']:.1f}, chrF {scores['chrf']:.1f}")

    print(f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}")
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: {platform.platform()}, "
          f"{platform.processor() or platform.machine()}; base: {base}")
    print()
    print("| measure | model | result (test split) |")
    print("|---|---|---|")
    for measure, model, result in rows:
        print(f"| {measure} | {model} | {result} |")


if __name__ == "__main__":
    main()
