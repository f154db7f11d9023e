"""Pretraining as the trainer's task: next-token prediction on a prepared data directory's token shards.

The trainer (lmforge/train/trainer.py) runs every kind of training; this is what it trains on when it
pretrains: the model the config describes (or another run's weights, `init_from`), the shards' training windows
in the loader's order (a recurrent model reading sequentially carries its hidden state from batch to batch), and
the validation loss, perplexity and bits per byte on the val split (the first `train.eval_tokens` during
training, the whole split at the end). Fine-tuning's task is lmforge/tasks/finetune.py's.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from lmforge.config.sections import Config
from lmforge.data.datadir import check_token_ids, describe_data
from lmforge.data.loader import TokenWindows, TrainLoader
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.infer.evaluate import evaluate
from lmforge.infer.generate import generate
from lmforge.infer.load import load_run
from lmforge.model.factory import build_model
from lmforge.model.recurrent import RECURRENT_ARCHS
from lmforge.model.spans import reserved_ids
from lmforge.run import checkpoints as run_checkpoints
from lmforge.run import directory as rundir
from lmforge.run.log import EvalRecord, SampleRecord, StartRecord
from lmforge.train.distributed import Cluster
from lmforge.train.schedule import DATA_WARMUPS, warmup_divisor


def accumulation_steps(config: Config, world_size: int = 1) -> int:
    """Micro-steps per optimizer step so that every step sees exactly `tokens_per_step` tokens."""
    micro_tokens = config.train.batch_size * config.model.block_size * world_size
    tokens_per_step = config.train.tokens_per_step or micro_tokens
    if tokens_per_step % micro_tokens:
        raise UserError(
            f"train.tokens_per_step ({tokens_per_step}) must be a multiple of batch_size x block_size x ranks "
            f"= {micro_tokens}"
        )
    return tokens_per_step // micro_tokens


def settle_config(config: Config, tokenizer: Tokenizer) -> Config:
    """A copy of the config with the values the data decides filled in (model.vocab_size = 0: the tokenizer's),
    and checked against the tokenizer; the caller's config is left as it was."""
    config = copy.deepcopy(config)
    model = config.model
    # ids after the tokenizer's: the encoder's mask (model/masking.py), the encoder-decoder's sentinels and start
    # token (model/spans.py)
    reserved, what = {"encoder": (1, "the encoder's mask token"),
                      "encoder-decoder": (reserved_ids(model.block_size), "the encoder-decoder's sentinel and start "
                                          "tokens")}.get(model.arch, (0, ""))
    needed = tokenizer.vocab_size + reserved
    if model.vocab_size == 0:
        model.vocab_size = needed
    elif model.vocab_size < needed:
        raise UserError(f"model.vocab_size {model.vocab_size} is smaller than the data's tokenizer "
                        f"({tokenizer.vocab_size}" + (f" + {reserved} for {what}" if reserved else "")
                        + "); leave it at 0 to take the tokenizer's")
    return config


def check_data_warmups(config: Config) -> None:
    """train.batch_warmup and train.context_warmup reshape a decoder's next-token batches: refused elsewhere."""
    train, model = config.train, config.model
    for option in DATA_WARMUPS:
        if getattr(train, option) and (model.arch != "gpt" or config.data.sequential):
            raise UserError(f"train.{option} is implemented for pretraining the decoder transformer (model.arch = "
                            f"gpt, data.sequential = false), not model.arch = {model.arch}"
                            + (" with data.sequential = true" if config.data.sequential else "")
                            + f": leave train.{option} = 0")
    if train.context_warmup and model.block_size % 4:
        raise UserError(f"train.context_warmup cuts each window into four sequences, then two: model.block_size "
                        f"({model.block_size}) must be a multiple of 4")
    if train.context_warmup and model.multi_token >= model.block_size // 4:
        raise UserError(f"train.context_warmup trains on sequences of model.block_size / 4 = {model.block_size // 4} "
                        f"tokens first, too short for model.multi_token = {model.multi_token}'s last head; use a "
                        "smaller model.multi_token")


class LanguageModelling:
    """The trainer's task for pretraining (see the module docstring): a `TrainingTask` (lmforge/train/task.py)."""

    metric = ("val_loss", False)  # the log key that picks the best checkpoint, and whether higher is better
    patience = 0  # pretraining never stops early
    save_at_eval = False  # checkpoints follow train.checkpoint_every
    evaluate_when_interrupted = True  # a stopped run still gets its full evaluation
    final_eval_is_wider = True  # the final evaluation reads the whole split, the others its first eval_tokens

    accumulation: int  # set with the data, as are tokens_per_step and (at the start record) flops_per_token

    def __init__(self, config: Config, data_dir: str | Path, run_dir: Path, *, resume: bool,
                 init_from: str | Path | None):
        self.data_dir = Path(data_dir)
        self.init_from = init_from
        self.inputs = [self.data_dir, *([init_from] if init_from is not None else [])]
        # Starting from another run's weights, or continuing this one, means using its tokenizer: the data must
        # have been tokenized with it (bare llm.c shards have none of their own).
        if init_from is not None:
            run_tokenizer = run_checkpoints.run_tokenizer(init_from)
        elif resume and (run_dir / rundir.TOKENIZER_FILE).is_file():
            run_tokenizer = rundir.read_tokenizer(run_dir)
        else:
            run_tokenizer = None
        self.meta, self.tokenizer = describe_data(self.data_dir, run_tokenizer)
        self.config = config = settle_config(config, self.tokenizer)
        if resume:
            run_checkpoints.check_same_model(run_dir, config.model, "--resume")
        check_token_ids(self.data_dir, config.model.vocab_size)
        # Truncated BPTT: a recurrent model reading sequentially carries its hidden state from batch to batch.
        self.carries_state = config.model.arch in RECURRENT_ARCHS and config.data.sequential
        check_data_warmups(config)
        self.rows, self.pieces = config.train.batch_size, 1  # this step's micro-batch rows, sequences per window

    def build_model(self, device: torch.device) -> nn.Module:
        """The model (right after the trainer seeds the RNG, so its initial weights follow train.seed)."""
        model = build_model(self.config.model).to(device)
        if self.config.model.arch in RECURRENT_ARCHS:
            model.carry_state(self.carries_state)
        if self.init_from is not None:  # a fine-tuning run's weights are its language model's, LoRA merged
            tuned = rundir.read_config(run_checkpoints.resolve_checkpoint(self.init_from)[0]).finetune is not None
            run_checkpoints.init_from_run(model, self.init_from,
                                          load_run(self.init_from).model.state_dict() if tuned else None)
        self.model = model
        return model

    def objective(self, model: nn.Module) -> nn.Module:
        """What the engine steps: the model itself, (inputs, targets) -> (logits, loss)."""
        return model

    def start_data(self, cluster: Cluster, device: torch.device, precision: str) -> None:
        config, train = self.config, self.config.train
        self.cluster, self.device, self.precision = cluster, device, precision
        self.loader = TrainLoader(self.data_dir, config.model.block_size, train.batch_size,
                                  shuffle=config.data.shuffle, seed=train.seed, rank=cluster.rank,
                                  world_size=cluster.world_size, device=device, sequential=config.data.sequential)
        self.val_windows = TokenWindows(self.data_dir, "val", config.model.block_size)
        self.accumulation = accumulation_steps(config, cluster.world_size)
        self.tokens_per_step = self.accumulation * train.batch_size * config.model.block_size * cluster.world_size

    def set_progress(self, progress: float) -> None:
        """The data warmups' stage for the next step, from where the run is (0 to 1, as the lr schedule has it)."""
        train = self.config.train
        if train.batch_warmup:
            self.rows = max(1, train.batch_size // warmup_divisor(progress, train.batch_warmup))
        if train.context_warmup:
            self.pieces = warmup_divisor(progress, train.context_warmup)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = self.loader.next_batch(self.rows)
        if self.pieces > 1:  # each window's inputs and their targets cut into shorter sequences, side by side
            length = inputs.size(1) // self.pieces
            inputs, targets = inputs.reshape(-1, length), targets.reshape(-1, length)
        return inputs, targets

    def tokens_read(self) -> int:
        """Training tokens of the step just taken."""
        return self.accumulation * self.rows * self.config.model.block_size * self.cluster.world_size

    @property
    def epoch(self) -> float:
        return self.loader.epoch

    # ----- checkpoints -----
    def weights(self) -> dict[str, torch.Tensor]:
        """What a checkpoint's model.safetensors holds (every rank takes part in gathering FSDP's shards)."""
        return self.cluster.gather_full(self.model.state_dict())

    def load_weights(self, weights: dict[str, torch.Tensor], path: Path) -> None:
        run_checkpoints.load_weights(self.model, self.cluster.shard_like(weights, self.model.state_dict()), path)

    def data_state(self) -> dict:
        return self.loader.state_dict()

    def load_data_state(self, state: dict) -> None:
        self.loader.load_state_dict(state)

    def carried_state(self) -> dict[str, torch.Tensor]:
        carried = self.model.carried_state() if self.carries_state else {}
        return {name: self.cluster.gather_rows(value) for name, value in carried.items()}

    def restore_carried_state(self, hidden: dict[str, torch.Tensor], say) -> None:
        """Continue every stream from the hidden state the checkpoint carried (zeros if it has none, or if the
        global batch has another number of rows now: those are other streams)."""
        if not self.carries_state:
            return
        saved_rows, rows = next(iter(hidden.values())).size(1) if hidden else 0, self.loader.streams
        if hidden and saved_rows != rows:
            say(f"the checkpoint's hidden state has {saved_rows} rows, this run's global batch {rows}: "
                "the recurrent state starts again from zeros")
            hidden = {}
        self.model.restore_carried_state({name: self.cluster.own_rows(value).to(self.device)
                                          for name, value in hidden.items()})

    def create_run(self, run_dir: Path, replace: bool) -> None:
        rundir.create_run(run_dir, self.config, self.tokenizer, replace=replace)

    # ----- what the run says -----
    def data_order(self) -> dict:
        """How the loader reads the windows, and so whether a recurrent model carries its hidden state."""
        data = self.config.data
        order = "sequential" if data.sequential else "shuffled" if data.shuffle else "corpus"
        state = None
        if self.config.model.arch in RECURRENT_ARCHS:
            state = "carried" if self.carries_state else "reset"
        return {"data_order": order, "recurrent_state": state}

    def start_record(self, *, engine: str, device: str, precision: str, resumed_from_step: int,
                     **common) -> StartRecord:
        config, train_tokens = self.config, self.meta["splits"]["train"]["tokens"]
        self.flops_per_token = self.model.flops_per_token()
        return StartRecord(
            params=self.model.num_params(), params_non_embedding=self.model.num_params(include_embeddings=False),
            flops_per_token=self.flops_per_token, train_tokens=train_tokens,
            val_tokens=self.meta["splits"]["val"]["tokens"], tokens_per_step=self.tokens_per_step,
            iters_per_epoch=train_tokens / self.tokens_per_step, device=device, precision=precision, engine=engine,
            resumed_from_step=resumed_from_step, **common, **self.data_order(), arch=config.model.arch,
            data=str(self.data_dir.resolve()))

    def announce(self, start: StartRecord, say) -> None:
        """What the run is about to do, in words."""
        config, train = self.config, self.config.train
        say(f"model: {start.params:,} parameters, {self.flops_per_token / 1e6:.1f} MFLOPs per token; "
            f"device {start.device}, {start.precision}")
        say(f"data: {start.train_tokens:,} training tokens / {self.tokens_per_step:,} tokens per step "
            f"({train.batch_size} x {config.model.block_size} x {self.accumulation} accumulation) = "
            f"{start.iters_per_epoch:.1f} iterations per epoch"
            + (f"; resuming at step {start.resumed_from_step}" if start.resumed_from_step else ""))
        state = {"carried": "carried from batch to batch (truncated BPTT)",
                 "reset": "reset to zeros for every window (data.sequential = true carries it)"}
        say(f"data order: {start.data_order}" + (f"; {config.model.arch} hidden state "
            f"{state[start.recurrent_state]}" if start.recurrent_state else ""))
        warmups = [f"{what} over the first {fraction:.0%} of the run" for what, fraction in (
            ("batches of a quarter, then half the rows", train.batch_warmup),
            ("sequences a quarter, then half the context long", train.context_warmup)) if fraction]
        if warmups:
            say("data warmup: " + "; ".join(warmups))

    def resume_hint(self, run_dir: Path) -> str:
        return f"lmforge train --resume --data {self.data_dir} --out {run_dir}"

    # ----- evaluation and samples -----
    def evaluate(self, forward: nn.Module, *, final: bool, step: int, tokens: int, elapsed: float
                 ) -> tuple[EvalRecord, str]:
        """The validation record and what to say about it."""
        config, val = self.config, self.meta["splits"]["val"]
        max_windows = None if final else max(1, config.train.eval_tokens // config.model.block_size)
        result = evaluate(forward, self.val_windows, batch_size=config.train.batch_size, max_windows=max_windows,
                          device=self.device, precision=self.precision,
                          bytes_per_token=val["bytes"] / val["tokens"] if val["bytes"] else None,
                          rank=self.cluster.rank, world_size=self.cluster.world_size)
        record = EvalRecord(step=step, tokens=tokens, val_loss=result["loss"], val_ppl=result["perplexity"],
                            val_bpb=result["bpb"], elapsed=elapsed, final=final)
        message = (f"step {step}: val loss {result['loss']:.4f}, perplexity {result['perplexity']:.2f}, "
                   + (f"{result['bpb']:.4f} bits/byte" if result["bpb"] is not None else "bits/byte unknown (no byte "
                      "counts: not a prepared data directory)") + (" (full validation split)" if final else ""))
        return record, message

    def sample(self, step: int) -> SampleRecord | None:
        """A short sample from the model, or None where this rank takes no part."""
        if not (self.cluster.is_main or self.cluster.sharded):  # a sharded forward needs every rank
            return None
        tokenizer = self.tokenizer
        # A generator of its own: sampling must not move the training RNG (dropout, resume).
        generator = torch.Generator(self.device).manual_seed((self.config.train.seed + step) % 2**64)
        ids = list(generate(self.model, [tokenizer.eot_id], self.config.train.sample_tokens, temperature=0.8,
                            top_k=200, generator=generator, stop_token=tokenizer.eot_id))
        return SampleRecord(step=step, prompt="", text=tokenizer.decode(ids))
