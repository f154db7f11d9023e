"""The speedrun: held-out Shakespeare bits per character after a fixed wall-time budget and after a fixed token
budget, several seeds each; with --ablation, each variant against the baseline at equal time and equal tokens.

    python benchmarks/speedrun.py [--seconds 100] [--tokens 1638400] [--seeds 3] [--ablation NAME ...]
                                  [--config configs/shakespeare-char.toml] [--set KEY=VALUE ...] [--work DIR]
    python benchmarks/speedrun.py --list            (the ablations and what each changes)

Run it alone on the machine, holding the CPU lock every benchmark takes:
    /work/shared/tools/alone python benchmarks/speedrun.py ...     (or: flock /tmp/lmforge-cpu.lock python ...)

The split is benchmarks/shakespeare_demo.py's (the 42 modern-spelling works in file-name order, the first 90% of
the characters for training, the rest held out), char tokenizer, unless --data names a prepared directory. Each
run is `lmforge train` in a fresh process: `--max-time SECONDS` for the wall-time budget, `--max-steps` of
TOKENS / tokens-per-step for the token budget (so a variant with another batch size still reads the same
tokens); evaluations and checkpoints during training are off for every arm (train.eval_every = 0,
train.checkpoint_every = 0), so the budget is spent training. The score is the trainer's final evaluation on
the whole held-out split, in bits per character as `lmforge eval` reports them (`bpc`: the loss in nats per
token / ln 2, times the split's tokens per character; with the char tokenizer, one token per character but for
the end-of-text token between documents).

The machine: the 1-minute load average is printed before and after every run. The script refuses to start when
the load says something else is running (at least one busy core: load >= 1.0; --ignore-load runs anyway and
marks the output), and marks a run "shared" when, as /work/shared/tools/alone judges a whole command, the load
after it exceeds the core count + 1.5, or when its tokens/s is below 85% of the best run of the same arm and
budget. Shared runs are printed and left out of the means.

The test of a difference: Welch's two-sided t-test (unequal variances, Welch-Satterthwaite degrees of freedom);
the p-value comes from the t distribution's CDF through the regularized incomplete beta function, computed here
(no scipy needed). With 3 seeds per arm it has 2-4 degrees of freedom: it sees large, steady differences only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from lmforge.config.load import load_config
from lmforge.infer.evaluate import bits_per_character

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shakespeare_demo import build_split, lmforge  # noqa: E402  (a sibling script, not a package)

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "configs" / "shakespeare-char.toml"
DEMO_TOKENS = 800 * 16 * 128  # what the demo preset reads in `make demo`'s 800 steps (about 100 s, 2 cores)
FIRST_SEED = 1337  # the preset's train.seed; seed i of a run is FIRST_SEED + i
# Every arm, time and token budgets alike: the budget is spent training (the score is the final evaluation).
COMMON = {"train.eval_every": "0", "train.checkpoint_every": "0", "train.sample_every": "0"}
# /work/shared/tools/alone's rule: a load this far above the core count means another process shared the cores.
LOAD_MARGIN = 1.5
SLOW_RUN = 0.85  # a run below this fraction of its arm's best tokens/s lost time to something else

# Each ablation: what it changes against the baseline config (`--section.key value` overrides), and why it is
# a candidate at CPU scale (issue 20). Document-aligned windows are not an option: the built-in corpus's 42
# documents make 0.12% of the windows straddle two (benchmarks/RESULTS.md). A batch warmup reads fewer tokens
# per early step: its "tokens" budget is the baseline's number of steps, not its tokens.
ABLATIONS: dict[str, tuple[dict[str, str], str]] = {
    "untied": ({"model.tie_embeddings": "false"}, "an output head of its own instead of the embedding's"),
    "softcap": ({"model.logit_softcap": "15"}, "logits = 15 tanh(logits / 15)"),
    "zero-init": ({"model.zero_init_proj": "true"}, "attn.proj and mlp.proj start at zero"),
    "qk-norm": ({"model.qk_norm": "true"}, "RMSNorm on queries and keys"),
    "swiglu": ({"model.mlp": "swiglu"}, "SwiGLU MLP (parameter-matched) instead of ReLU²"),
    "wsd": ({"train.schedule": "wsd", "train.cooldown_fraction": "0.4", "train.min_lr_ratio": "0.1"},
            "warmup-stable-decay: the peak rate, then a linear cooldown over the last 40% to 0.1x"),
    "wsd-to-zero": ({"train.schedule": "wsd", "train.cooldown_fraction": "0.4", "train.min_lr_ratio": "0"},
                    "warmup-stable-decay with a 40% cooldown to 0"),
    "batch8": ({"train.batch_size": "8"}, "8 sequences per step instead of 16: twice the updates"),
    "batch32": ({"train.batch_size": "32"}, "32 sequences per step"),
    "block256": ({"model.block_size": "256", "train.batch_size": "8"}, "context 256, batch 8 (same tokens/step)"),
    "ema": ({"train.ema_decay": "0.99"}, "evaluate a moving average of the weights (decay 0.99, ramped)"),
    "threads1": ({"train.threads": "1"}, "one intra-op thread instead of one per core"),
    "compile": ({"train.compile": "true"}, "torch.compile on the CPU"),
    "muon-lr-high": ({"optim.muon_lr": "0.03"}, "Muon's rate 0.03 instead of 0.02"),
    "value-embeds": ({"model.value_embeddings": "true"}, "a token embedding per layer added to its attention values"),
    "multi-token": ({"model.multi_token": "2"}, "two extra heads learn the tokens 2 and 3 places ahead (weight 0.5)"),
    "batch-warmup": ({"train.batch_warmup": "0.3"}, "batches of 4, then 8 sequences over the first 30% of the run"),
    "context-warmup": ({"train.context_warmup": "0.3"},
                       "sequences of 32, then 64 tokens over the first 30% of the run (same tokens per step)"),
}


@dataclass
class Run:
    arm: str  # "baseline" or an ablation's name
    budget: str  # "time" or "tokens"
    seed: int
    steps: int
    tokens: int
    train_s: float
    tokens_per_s: float
    bits_per_char: float
    load_before: float
    load_after: float
    shared: bool = False


# ----- statistics -----
def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function, by the modified Lentz method (Numerical Recipes
    6.4): converges fast for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 500):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return fraction


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the CDF of a Beta(a, b) variable at x."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_continued_fraction(a, b, x) / a
    return 1.0 - front * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df / (df + t²)}(df / 2, 1 / 2)."""
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def welch(first: list[float], second: list[float]) -> tuple[float, float, float]:
    """Welch's t statistic of mean(first) - mean(second), its degrees of freedom and the two-sided p-value;
    NaNs where a side has fewer than two values, or neither varies."""
    if len(first) < 2 or len(second) < 2:
        return math.nan, math.nan, math.nan
    v1, v2 = statistics.variance(first) / len(first), statistics.variance(second) / len(second)
    if v1 + v2 == 0:
        return math.nan, math.nan, math.nan
    t = (statistics.fmean(first) - statistics.fmean(second)) / math.sqrt(v1 + v2)
    df = (v1 + v2) ** 2 / (v1**2 / (len(first) - 1) + v2**2 / (len(second) - 1))
    return t, df, t_two_sided_p(t, df)


# ----- the runs -----
def load_average() -> float:
    return os.getloadavg()[0]


def overrides_flags(overrides: dict[str, str]) -> list[str]:
    return [item for key, value in overrides.items() for item in (f"--{key}", value)]


def tokens_per_step(config: Path, overrides: dict[str, str]) -> int:
    train, model = (settled := load_config(config, overrides)).train, settled.model
    return train.tokens_per_step or train.batch_size * model.block_size


def train_and_score(data: Path, run: Path, config: Path, overrides: dict[str, str], budget_flags: list[str]
                    ) -> tuple[int, int, float, float]:
    """One `lmforge train` in its own process: (steps, tokens, training seconds, held-out bits per character)."""
    lmforge("train", "--config", str(config), "--data", str(data), "--out", str(run), "--overwrite", "--quiet",
            *overrides_flags(overrides), *budget_flags)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    end = [r for r in records if r["kind"] == "end"][-1]
    final = [r for r in records if r["kind"] == "eval" and r["final"]][-1]
    val_split = json.loads((data / "meta.json").read_text())["splits"]["val"]
    return end["step"], end["tokens"], end["elapsed"], bits_per_character(final["val_bpb"], val_split)


def run_arm(arm: str, overrides: dict[str, str], args: argparse.Namespace, data: Path, work: Path,
            say=print) -> list[Run]:
    """Every seed of one arm at both budgets; shared runs marked."""
    runs = []
    steps_for_tokens = max(1, args.tokens // tokens_per_step(args.config, overrides))
    budgets = {"time": ["--max-time", str(args.seconds), "--max-steps", "100000000"],
               "tokens": ["--max-steps", str(steps_for_tokens), "--max-time", "0"]}
    for budget, flags in budgets.items():
        for index in range(args.seeds):
            seed = FIRST_SEED + index
            before = load_average()
            try:
                steps, tokens, seconds, bpc = train_and_score(
                    data, work / f"{arm}-{budget}-{seed}", args.config, {**overrides, "train.seed": str(seed)},
                    flags)
            except SystemExit as failure:  # one arm's failure (torch.compile without a compiler) ends no other
                say(f"  {arm:>14} {budget:>6} seed {seed}: FAILED, left out: {failure}")
                continue
            run = Run(arm, budget, seed, steps, tokens, seconds, tokens / max(seconds, 1e-9), bpc, before,
                      load_average())
            run.shared = run.load_after > os.cpu_count() + LOAD_MARGIN
            runs.append(run)
            say(f"  {arm:>14} {budget:>6} seed {seed}: {steps:,} steps, {tokens:,} tokens, {seconds:.0f} s, "
                f"{bpc:.4f} bits/char, load {before:.2f} -> {run.load_after:.2f}" + (" SHARED" if run.shared else ""))
        fastest = max((run.tokens_per_s for run in runs if run.budget == budget), default=0.0)
        for run in runs:
            if run.budget == budget and run.tokens_per_s < SLOW_RUN * fastest:
                run.shared = True
    return runs


# ----- the tables -----
def summary_rows(runs: list[Run]) -> list[dict]:
    """Per arm and budget: mean, spread and n of the runs alone on the machine, and Welch's test against the
    baseline at the same budget."""
    kept: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        kept.setdefault((run.arm, run.budget), [])
        if not run.shared:
            kept[(run.arm, run.budget)].append(run)
    rows = []
    for (arm, budget), arm_runs in kept.items():
        scores = [run.bits_per_char for run in arm_runs]
        baseline = [run.bits_per_char for run in kept.get(("baseline", budget), [])]
        t, df, p = welch(scores, baseline) if arm != "baseline" else (math.nan,) * 3
        rows.append({"arm": arm, "budget": budget, "n": len(scores), "shared": sum(
            1 for run in runs if run.arm == arm and run.budget == budget and run.shared),
            "mean": statistics.fmean(scores) if scores else math.nan,
            "sd": statistics.stdev(scores) if len(scores) > 1 else math.nan,
            "steps": statistics.fmean(run.steps for run in arm_runs) if arm_runs else math.nan,
            "tokens_per_s": statistics.fmean(run.tokens_per_s for run in arm_runs) if arm_runs else math.nan,
            "difference": statistics.fmean(scores) - statistics.fmean(baseline) if scores and baseline else math.nan,
            "t": t, "df": df, "p": p})
    return rows


def number(value: float, form: str) -> str:
    return "–" if math.isnan(value) else format(value, form)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| arm | budget | runs (shared) | steps | tokens/s | bits/char mean ± sd | − baseline | Welch t (df) "
             "| p |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in sorted(rows, key=lambda row: (row["budget"] != "time", row["arm"] != "baseline", row["arm"])):
        cells = [row["arm"], row["budget"], f"{row['n']} ({row['shared']})", number(row["steps"], ",.0f"),
                 number(row["tokens_per_s"], ",.0f"), f"{number(row['mean'], '.4f')} ± {number(row['sd'], '.4f')}",
                 number(row["difference"], "+.4f"), f"{number(row['t'], '.2f')} ({number(row['df'], '.1f')})",
                 number(row["p"], ".3f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator:
            sys.exit(f"--set {pair}: expected SECTION.KEY=VALUE, e.g. --set train.batch_size=8")
        settings[key] = value
    return settings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=100.0, help="the wall-time budget of each run")
    parser.add_argument("--tokens", type=int, default=DEMO_TOKENS, help="the token budget of each run "
                        "(default: what the demo reads in make demo's 800 steps)")
    parser.add_argument("--seeds", type=int, default=3, help="runs per arm and budget (seeds 1337, 1338, ...)")
    parser.add_argument("--ablation", action="append", default=[], choices=sorted(ABLATIONS), metavar="NAME",
                        help="a variant run against the baseline (repeatable; --list names them)")
    parser.add_argument("--config", type=Path, default=DEMO_CONFIG, help="the baseline (default: the demo preset)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an override for every arm, baseline included (repeatable)")
    parser.add_argument("--data", type=Path, help="a prepared data directory (default: the split, prepared here)")
    parser.add_argument("--work", type=Path, help="working directory (default: a temporary one)")
    parser.add_argument("--ignore-load", action="store_true",
                        help="run although the machine is busy (the output says so; do not record it)")
    parser.add_argument("--list", action="store_true", help="list the ablations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for name, (overrides, what) in ABLATIONS.items():
            print(f"{name:>14}: {what} ({' '.join(overrides_flags(overrides))})")
        return
    if args.seeds < 1 or args.seconds <= 0 or args.tokens <= 0:
        sys.exit("--seeds, --seconds and --tokens must be positive")
    start_load = load_average()
    if start_load >= 1.0 and not args.ignore_load:
        sys.exit(f"the 1-minute load average is {start_load:.2f}: something else is running. Run this alone "
                 "(/work/shared/tools/alone waits for a quiet machine), or pass --ignore-load for a trial whose "
                 "figures are not to be recorded")
    common = {**COMMON, **parse_settings(args.set)}
    arms = {"baseline": common, **{name: {**common, **ABLATIONS[name][0]} for name in dict.fromkeys(args.ablation)}}
    for overrides in arms.values():  # a bad --set or ablation fails now, not after an hour of runs
        load_config(args.config, overrides)
    started = datetime.now(timezone.utc)
    with tempfile.TemporaryDirectory() as temporary:
        work = args.work or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        data = args.data or build_split(work)
        runs = []
        for arm, overrides in arms.items():
            print(f"{arm}: {' '.join(overrides_flags(overrides))}", flush=True)
            runs += run_arm(arm, overrides, args, data, work, say=lambda line: print(line, flush=True))
            (work / "speedrun.json").write_text(json.dumps([asdict(run) for run in runs], indent=1))
    end_load = load_average()
    rows = summary_rows(runs)
    command = " ".join(["python", "benchmarks/speedrun.py", *(sys.argv[1:] if argv is None else argv)])
    print(f"\n# {started:%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}, torch {torch.__version__}")
    print(f"# {command}")
    print(f"# load average {start_load:.2f} at the start, {end_load:.2f} at the end; "
          f"{sum(run.shared for run in runs)} of {len(runs)} runs shared the CPU (left out of the means)"
          + ("; STARTED ON A BUSY MACHINE (--ignore-load): do not record" if start_load >= 1.0 else ""))
    print(f"# budgets: {args.seconds:g} s of training; {args.tokens:,} tokens. Bits per character on the held-out "
          "split; p: Welch's two-sided t-test of the arm against the baseline at the same budget")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
