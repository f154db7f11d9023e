"""Pretraining an encoder-decoder (`model.arch = "encoder-decoder"`) as the trainer's task: span corruption.

The same data, loader, checkpoints and run files as next-token pretraining (lmforge/train/language.py); each
batch is the loader's windows corrupted as T5 does (lmforge/model/spans.py): the encoder reads a window with
its noise spans replaced by sentinels, the decoder writes the spans. The spans are drawn from torch's global
generator, which the trainer seeds and checkpoints, so a resumed run continues exactly (under torchrun each
rank keeps its own rows of the global batch's spans). The evaluation is the loss on the val split's targets,
each window's spans seeded by its own index (the same at every evaluation), never by the training generator.
Samples during training are written as next-token pretraining writes them (from an end-of-text source: the
encoder-decoder writes from it as lmforge/infer/generate.py says).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from lmforge.config.sections import Config
from lmforge.infer.evaluate import check_no_reserved_ids, evaluate, span_windows
from lmforge.model.spans import corrupt_spans, first_sentinel
from lmforge.run.log import EvalRecord
from lmforge.train.language import LanguageModelling


class SpanCorruption(LanguageModelling):
    """The trainer's task for pretraining an encoder-decoder (see the module docstring)."""

    def __init__(self, config: Config, data_dir: str | Path, run_dir: Path, *, resume: bool,
                 init_from: str | Path | None):
        super().__init__(config, data_dir, run_dir, resume=resume, init_from=init_from)
        check_no_reserved_ids(self.data_dir, first_sentinel(self.config.model),
                              "the encoder-decoder's sentinel and start tokens")

    def next_batch(self) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The next windows, corrupted: ((source, decoder input), target)."""
        tokens, _ = self.loader.next_batch()  # the next-token targets are not this task's
        world, rank, rows = self.cluster.world_size, self.cluster.rank, tokens.size(0)
        if world == 1:
            return corrupt_spans(tokens, self.config.model)
        # As masked LM's (lmforge/train/masked.py): every rank draws the global batch's spans, keeps its rows.
        (source, decoder_input), target = corrupt_spans(tokens.repeat(world, 1), self.config.model)
        mine = slice(rank * rows, (rank + 1) * rows)
        return (source[mine], decoder_input[mine]), target[mine]

    def evaluate(self, forward: nn.Module, *, final: bool, step: int, tokens: int, elapsed: float
                 ) -> tuple[EvalRecord, str]:
        """The span-corruption validation record (val_ppl: exp of the loss per target token; no bits per byte)."""
        config = self.config
        max_windows = None if final else max(1, config.train.eval_tokens // config.model.block_size)
        result = evaluate(forward, self.val_windows, batch_size=config.train.batch_size, max_windows=max_windows,
                          device=self.device, precision=self.precision, bytes_per_token=None,
                          rank=self.cluster.rank, world_size=self.cluster.world_size,
                          corrupt=partial(span_windows, config=config.model))
        record = EvalRecord(step=step, tokens=tokens, val_loss=result["loss"], val_ppl=result["perplexity"],
                            elapsed=elapsed, final=final)
        message = (f"step {step}: val span-corruption loss {result['loss']:.4f} (exp: {result['perplexity']:.2f})"
                   + (" (full validation split)" if final else ""))
        return record, message
