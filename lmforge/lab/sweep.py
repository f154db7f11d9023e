"""`lmforge sweep`: hyperparameter search, step 9 of the recipe, on Optuna.

Each trial is an ordinary training run in OUT/trial_000, OUT/trial_001, ... with the swept config keys set
from `--param` specs: `KEY=a,b,c` (these values), `KEY=log:LOW:HIGH` (log-uniform) or `KEY=lin:LOW:HIGH`
(uniform; integers for integer keys). The grid sampler tries every combination of value lists once; random
and TPE sample the ranges. A median pruner stops a trial whose intermediate validation loss is worse than
the median of earlier trials at the same step. The study lives in OUT/sweep.db (SQLite), so running the same
command again after an interruption continues it: finished trials are kept, not repeated.

Outputs: OUT/results.md (trials sorted by val loss), OUT/param_KEY.png (val loss against each swept key) and
OUT/best.toml (the config with the best trial's values, ready for `lmforge train`).

`--finetune BASE_RUN --task T` searches fine-tuning instead: each trial is `lmforge finetune BASE_RUN --task T
--data DATA` (lmforge/tasks/finetune.py, on the same trainer) with the swept keys set, e.g. `optim.lr`,
`lora.rank` (with `--finetune-method lora`) or `finetune.train_blocks`; a trial's result is the validation loss
of its last evaluation (for classify, the cross-entropy over the labels; its accuracy is kept beside it).
Fine-tuning trials are not pruned. A swept key the method ignores (`lora.*` with full fine-tuning,
`finetune.train_blocks` with LoRA) is refused before the first trial, and a fine-tuning study is keyed on its base
run, task, method and data besides the swept keys: an OUT holding another sweep is refused, never continued as
this one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from lmforge.config.load import canonical_key, dumps_config, load_config, set_value
from lmforge.config.sections import SECTIONS, Config, check_config
from lmforge.errors import TrainingDiverged, UserError
from lmforge.files import WriteError, check_output_place, write_atomic, writing
from lmforge.plots import new_figure, png_bytes
from lmforge.run.log import EvalRecord
from lmforge.tasks.finetune import finetune_trainer
from lmforge.tasks.finetune_config import check_method_keys
from lmforge.train.trainer import Trainer

METHODS = ("grid", "random", "tpe")
DEFAULT_TRIALS = 10  # random and tpe; a grid's default is its size
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
SPEC_HELP = "KEY=v1,v2,... (values), KEY=log:LOW:HIGH (log-uniform) or KEY=lin:LOW:HIGH (uniform)"


@dataclass
class Param:
    """One swept config key: a list of values, or a range [low, high] (log-spaced or not)."""

    key: str
    values: list[Any] | None = None
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.values is not None:
            return trial.suggest_categorical(self.key, self.values)
        if self.integer:
            return trial.suggest_int(self.key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.key, self.low, self.high, log=self.log)


def parse_param(spec: str) -> Param:
    """A `--param` spec as a Param, or a UserError saying what is wrong with it."""
    key, sep, text = spec.partition("=")
    if not sep or not key or not text:
        raise UserError(f"--param '{spec}': expected {SPEC_HELP}")
    try:
        set_value(Config(), key, _default(key))  # an unknown key names the closest valid one
    except UserError as err:
        raise UserError(f"--param '{spec}': {err}") from None
    if text.startswith(("log:", "lin:")):
        parts = text.split(":")
        kind = type(_default(key))
        if kind not in (int, float):
            raise UserError(f"--param '{spec}': a range needs a numeric key; {key} is {kind.__name__}")
        try:
            low, high = float(parts[1]), float(parts[2])
            if len(parts) != 3:
                raise ValueError
        except (ValueError, IndexError):
            raise UserError(f"--param '{spec}': a range is {parts[0]}:LOW:HIGH with two numbers") from None
        if not low < high:
            raise UserError(f"--param '{spec}': LOW must be below HIGH")
        if parts[0] == "log" and low <= 0:
            raise UserError(f"--param '{spec}': a log range needs LOW > 0")
        if kind is int and not (low.is_integer() and high.is_integer()):
            whole = (math.ceil(low), math.floor(high))
            hint = f"{parts[0]}:{whole[0]}:{whole[1]}" if whole[0] < whole[1] else "a range holding two integers"
            raise UserError(f"--param '{spec}': {key} is an integer, so the range needs whole-number ends "
                            f"(try {hint})")
        for end in (low, high):  # the ends must be values the key allows, or every trial would fail alike
            try:
                set_value(Config(), key, int(end) if kind is int else end)
            except UserError as err:
                raise UserError(f"--param '{spec}': {err}") from None
        return Param(key, low=low, high=high, log=parts[0] == "log", integer=kind is int)
    values = []
    for text_value in text.split(","):
        config = Config()
        try:
            set_value(config, key, text_value.strip())
        except UserError as err:
            raise UserError(f"--param '{spec}': {err}") from None
        values.append(_default(key, config))
    if len(set(values)) != len(values):
        raise UserError(f"--param '{spec}': a value is listed twice")
    return Param(key, values=values)


def _default(key: str, config: Config | None = None) -> Any:
    section, _, name = canonical_key(key).partition(".")
    part = getattr(config or Config(), section, None)
    if part is None and section in SECTIONS:  # an optional section ([finetune]) the config does not have
        part = SECTIONS[section]()
    return getattr(part, name, None)


@dataclass
class FinetuneSearch:
    """What a fine-tuning sweep's trials fine-tune: `lmforge finetune BASE_RUN --task TASK --method METHOD`."""

    base_run: str
    task: str
    method: str | None = None


def finetune_settings(chosen: dict[str, Any], overrides: dict[str, str] | None, budget_time: float | None
                      ) -> dict[str, str]:
    """A fine-tuning trial's --section.key flags: the sweep's overrides, the trial's values, the time budget."""
    settings = dict(overrides or {})
    settings.update({key: ",".join(value) if isinstance(value, list) else str(value) for key, value in chosen.items()})
    if budget_time is not None:
        settings["train.max_time"] = str(budget_time)
    return settings


class TrialTrainer(Trainer):
    """A Trainer that reports each evaluation to its Optuna trial and stops early when the pruner says so."""

    def __init__(self, trial: optuna.Trial, *args, **kwargs):
        self.trial = trial
        self.pruned = False
        super().__init__(*args, **kwargs)

    def run_eval(self, *, final: bool = False, bar=None) -> EvalRecord:
        record = super().run_eval(final=final, bar=bar)
        if not final and math.isfinite(record.val_loss):
            self.trial.report(record.val_loss, self.progress.step)
            self.pruned = self.trial.should_prune()
        return record

    def stop_reason(self, elapsed: float) -> str | None:
        return "pruned" if self.pruned else super().stop_reason(elapsed)


def checked_request(config_path: str | Path | None, specs: list[str], method: str, trials: int | None,
                    budget_time: float | None, overrides: dict[str, str] | None,
                    finetune: FinetuneSearch | None) -> tuple[list[Param], int]:
    """The swept parameters and the number of trials, after every check of the request (before any trial)."""
    if finetune is not None and config_path is not None:
        raise UserError("--config sets up training from scratch; a --finetune sweep starts from the base run's "
                        "model (set other keys with --section.key flags)")
    if method not in METHODS:
        raise UserError(f"unknown --method '{method}'; choose one of {', '.join(METHODS)}")
    if not specs:
        raise UserError(f"sweep needs at least one --param ({SPEC_HELP})")
    params = [parse_param(spec) for spec in specs]
    keys = [param.key for param in params]
    tuning_keys = [key for key in keys if canonical_key(key).startswith("finetune.")]
    if tuning_keys and finetune is None:
        raise UserError(f"--param {', '.join(tuning_keys)}: fine-tuning settings; sweep fine-tuning with "
                        "--finetune BASE_RUN --task TASK")
    if len(set(keys)) != len(keys):
        raise UserError("each config key may be swept by one --param only")
    if finetune is not None:  # a swept key the trials' method ignores would make identical trials
        check_method_keys(finetune.method or "full", keys + list(overrides or {}))
    if method == "grid":
        ranges = [param.key for param in params if param.values is None]
        if ranges:
            raise UserError(f"--method grid needs value lists (KEY=a,b,c), not ranges: {', '.join(ranges)}")
        size = math.prod(len(param.values) for param in params)
        trials = size if trials is None else min(trials, size)
    trials = DEFAULT_TRIALS if trials is None else trials
    if trials <= 0:
        raise UserError("--trials must be positive")
    if budget_time is not None and budget_time <= 0:
        raise UserError("--budget-time must be positive (seconds of training per trial)")
    return params, trials


def open_study(out: Path, method: str, specs: list[str], params: list[Param], seed: int,
               finetune: FinetuneSearch | None, data_dir: str | Path) -> tuple[optuna.Study, Any]:
    """The study in OUT/sweep.db (created, or continued if it is this sweep's), and the function that puts a
    failed trial's grid point back among those to run."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{(out / 'sweep.db').resolve()}")
    except Exception as err:  # SQLAlchemy's errors: a read-only directory, a file that is not a database
        reason = str(getattr(err, "orig", None) or err).splitlines()[0]
        raise UserError(f"could not open the study {out / 'sweep.db'}: {reason}") from None
    # What the trials are: the searched keys and, for a fine-tuning sweep, what each trial fine-tunes on what
    # data, so that another sweep's trials are never reported as this one's.
    space: dict[str, Any] = {"method": method, "params": specs}
    if finetune is not None:
        space["finetune"] = {"base_run": str(Path(finetune.base_run).resolve()), "task": finetune.task,
                             "method": finetune.method or "full", "data": str(Path(data_dir).resolve())}
    existing = optuna.load_study(study_name="sweep", storage=storage) if _has_study(storage) else None
    if existing is not None and existing.user_attrs.get("space") != space:
        held = existing.user_attrs.get("space") or {}
        what = ", ".join(f"{key} {held.get(key)!r}" for key in sorted(set(held) | set(space))
                         if held.get(key) != space.get(key))
        raise UserError(f"{out} holds another sweep ({what}); use another --out, or the same --method, --param, "
                        "--finetune, --task, --finetune-method and --data to continue it")
    started = len(existing.trials) if existing is not None else 0
    sampler_seed = seed + started  # a resumed random search draws new points, not the first ones again
    # The grid's seed shuffles the order of its points, which its trials refer to by number: it must not change.
    sampler = {"grid": lambda: optuna.samplers.GridSampler({p.key: p.values for p in params}, seed=seed),
               "random": lambda: optuna.samplers.RandomSampler(seed=sampler_seed),
               "tpe": lambda: optuna.samplers.TPESampler(seed=sampler_seed)}[method]()
    study = optuna.create_study(storage=storage, sampler=sampler, study_name="sweep", direction="minimize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=2), load_if_exists=True)
    study.set_user_attr("space", space)
    study_id = storage.get_study_id_from_name("sweep")

    # Trials are changed through the storage's own (public) interface, by trial number.
    def forget_grid_point(trial_number: int) -> None:
        """Optuna's grid sampler counts a failed trial's grid point as visited; detaching the point from the
        trial (the sampler's "search_space" system attribute) puts it back among those still to run."""
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial_number)
        storage.set_trial_system_attr(trial_id, "search_space", {})

    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        # Left running by a killed sweep: it never finished, so it runs again (as a new trial). Not
        # study.tell: that runs the grid sampler's after_trial, which may call study.stop() outside optimize.
        forget_grid_point(trial.number)
        storage.set_trial_state_values(
            storage.get_trial_id_from_study_id_trial_number(study_id, trial.number), optuna.trial.TrialState.FAIL)
    return study, forget_grid_point


class Trials:
    """The sweep's objective: each trial's run, pretraining from the config or fine-tuning the base run (both on
    the one Trainer), and its result, the validation loss of its last evaluation."""

    def __init__(self, *, config_path: str | Path | None, data_dir: str | Path, out: Path, params: list[Param],
                 overrides: dict[str, str] | None, budget_time: float | None, finetune: FinetuneSearch | None,
                 forget_grid_point, quiet: bool):
        self.config_path, self.data_dir, self.out, self.params = config_path, data_dir, out, params
        self.overrides, self.budget_time, self.finetune = overrides, budget_time, finetune
        self.forget_grid_point, self.quiet = forget_grid_point, quiet

    def trainer(self, trial: optuna.Trial, run_dir: Path, chosen: dict[str, Any]) -> Trainer:
        """The trial's run: pretraining from the config (pruned by the median rule), or a fine-tuning run."""
        if self.finetune is not None:
            search = self.finetune
            return finetune_trainer(search.base_run, task=search.task, data=str(self.data_dir), out=str(run_dir),
                                    method=search.method, train_blocks=None,
                                    overrides=finetune_settings(chosen, self.overrides, self.budget_time),
                                    resume=False, overwrite=True, quiet=True)
        config = load_config(self.config_path, self.overrides)
        for key, value in chosen.items():
            set_value(config, key, value)
        check_config(config)  # the rules between keys, now that the trial's values are all set
        if self.budget_time is not None:
            config.train.max_time = self.budget_time
        return TrialTrainer(trial, config, self.data_dir, run_dir, overwrite=True, quiet=True)

    def __call__(self, trial: optuna.Trial) -> float:
        chosen = {param.key: param.suggest(trial) for param in self.params}
        run_dir = self.out / f"trial_{trial.number:03d}"
        self.say(f"trial {trial.number}: " + ", ".join(f"{key}={_show(value)}" for key, value in chosen.items()))
        try:
            trainer = self.trainer(trial, run_dir, chosen)
            result = trainer.run()
            if result["reason"] == "interrupted":
                raise KeyboardInterrupt
        except TrainingDiverged:
            self.say(f"trial {trial.number}: diverged (non-finite loss)")  # a result of the search, not an error
            for name, value in {"run": run_dir.name, "val_loss": math.inf, "val_bpb": None,
                                "steps": trainer.progress.step, "elapsed": trainer.progress.elapsed}.items():
                trial.set_user_attr(name, value)
            return math.inf
        except BaseException as err:  # interrupted or crashed: the trial fails, a resumed grid runs it again
            self.forget_grid_point(trial.number)
            if not isinstance(err, UserError) or isinstance(err, WriteError):  # a mistake would fail again
                self.say(f"sweep stopped; run the same command again to continue it ({self.out / 'sweep.db'})")
            raise
        val = result["val"]  # the last evaluation (pretraining: the final one, on the whole split)
        pruned = getattr(trainer, "pruned", False)
        accuracy = val["val_accuracy"]
        for name, value in {"run": run_dir.name, "val_loss": val["val_loss"], "val_bpb": val["val_bpb"],
                            "steps": result["step"], "elapsed": trainer.progress.elapsed,
                            **({"val_accuracy": accuracy} if accuracy is not None else {})}.items():
            trial.set_user_attr(name, value)
        self.say(f"trial {trial.number}: val loss {val['val_loss']:.4f}"
                 + (f", val accuracy {accuracy:.4f}" if accuracy is not None else "") + (" (pruned)" if pruned else ""))
        if pruned:
            raise optuna.TrialPruned()
        return val["val_loss"]

    def say(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)


def sweep(config_path: str | Path | None, data_dir: str | Path, out: str | Path, specs: list[str], *,
          method: str = "tpe", trials: int | None = None, budget_time: float | None = None,
          overrides: dict[str, str] | None = None, seed: int = 1337, quiet: bool = False,
          finetune: FinetuneSearch | None = None) -> dict:
    """Run (or continue) the study in `out`; write its results; return the best finished trial's row. With
    `finetune`, each trial fine-tunes its base run on `data_dir` instead of training from `config_path`."""
    params, trials = checked_request(config_path, specs, method, trials, budget_time, overrides, finetune)
    keys = [param.key for param in params]
    base = load_config(config_path, overrides)  # a bad config fails here, before any trial
    out = Path(out)
    # An existing sweep directory is continued; the place itself is checked as every output's is.
    check_output_place(out, directory=True, inputs=[path for path in (config_path, data_dir) if path is not None])
    with writing(out):
        out.mkdir(parents=True, exist_ok=True)
    study, forget_grid_point = open_study(out, method, specs, params, seed, finetune, data_dir)
    objective = Trials(config_path=config_path, data_dir=data_dir, out=out, params=params, overrides=overrides,
                       budget_time=budget_time, finetune=finetune, forget_grid_point=forget_grid_point, quiet=quiet)
    say = objective.say
    finished = len(study.get_trials(deepcopy=False, states=FINISHED))
    if finished < trials:
        say(f"sweep: {trials - finished} trial(s) to run into {out}, one line as each starts and ends")
        # Optuna logs each trial's result (INFO) and a failed trial's traceback (WARNING) before re-raising
        # the error: lmforge reports the error itself, in one line, and each trial's result when not quiet.
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        try:
            study.optimize(objective, n_trials=trials - finished)
        finally:
            optuna.logging.set_verbosity(verbosity)
    rows = result_rows(study)
    complete = [row for row in rows if row["state"] == "complete"]
    if not complete:
        raise UserError(f"no trial of the sweep in {out} completed (all were pruned or failed)")
    best = complete[0]
    for key in keys:
        set_value(base, key, best[key])
    write_atomic(out / "best.toml", dumps_config(base))
    write_atomic(out / "results.md", results_markdown(rows, keys))
    for param in params:
        write_atomic(out / f"param_{param.key}.png", _param_plot(rows, param))
    say(f"best: {best['run']}, val loss {best['val_loss']:.4f}: "
        + ", ".join(f"{key}={_show(best[key])}" for key in keys) + f"; config in {out / 'best.toml'}")
    return best


def _has_study(storage: optuna.storages.BaseStorage) -> bool:
    return any(summary.study_name == "sweep" for summary in optuna.get_all_study_summaries(storage))


def result_rows(study: optuna.Study) -> list[dict]:
    """The finished trials, best val loss first: number, run dir, state, swept values and results."""
    rows = []
    for trial in study.get_trials(deepcopy=False, states=FINISHED):
        if "val_loss" not in trial.user_attrs:
            continue
        state = "complete" if trial.state == optuna.trial.TrialState.COMPLETE else "pruned"
        rows.append({"trial": trial.number, "state": state, **trial.params, **trial.user_attrs})
    return sorted(rows, key=lambda row: (not math.isfinite(row["val_loss"]), row["val_loss"]))


def results_markdown(rows: list[dict], keys: list[str]) -> str:
    header = ["trial", "run", "state", *keys, "val loss", "val bits/byte", "steps", "wall time (s)"]
    lines = ["# Sweep results", "", "Sorted by validation loss (the final evaluation, on the whole split).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        bpb = "n/a" if row["val_bpb"] is None else f"{row['val_bpb']:.4f}"
        cells = [str(row["trial"]), row["run"], row["state"], *(_show(row[key]) for key in keys),
                 f"{row['val_loss']:.4f}", bpb, str(row["steps"]), f"{row['elapsed']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _show(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _param_plot(rows: list[dict], param: Param) -> bytes:
    figure = new_figure(6, 4)
    axes = figure.subplots()
    for state, marker in (("complete", "o"), ("pruned", "x")):
        chosen = [row for row in rows if row["state"] == state]
        values = [row[param.key] for row in chosen]
        if param.values is not None and not all(isinstance(v, int | float) for v in param.values):
            values = [param.values.index(value) for value in values]  # categories at positions 0, 1, ...
        # A pruned trial's loss is that of the evaluation that stopped it, early in its run: not a final loss.
        label = "complete (final loss)" if state == "complete" else "pruned (loss when stopped early)"
        axes.plot(values, [row["val_loss"] for row in chosen], marker, linestyle="none", label=label)
    if param.values is not None and not all(isinstance(v, int | float) for v in param.values):
        axes.set_xticks(range(len(param.values)), [str(v) for v in param.values])
    elif param.log:
        axes.set_xscale("log")
    axes.set_xlabel(param.key)
    axes.set_ylabel("val loss (nats per token)")
    axes.set_title(f"Validation loss against {param.key}")
    axes.grid(alpha=0.3)
    axes.legend()
    return png_bytes(figure)
