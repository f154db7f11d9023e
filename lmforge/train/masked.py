"""Pretraining an encoder (`model.arch = "encoder"`) as the trainer's task: masked-language modelling.

The same data, loader, checkpoints and run files as next-token pretraining (lmforge/train/language.py); what
differs is each batch and the evaluation. A batch is the loader's windows with 15% of the positions masked
(lmforge/model/masking.py) and the original tokens as targets at those positions only. The masks are drawn
from torch's global generator, which the trainer seeds with train.seed and saves in every checkpoint, so a
resumed run draws exactly the masks the uninterrupted one would have (under torchrun each rank keeps its own
rows of the global batch's masks). The evaluation is the masked-LM loss on
the val split, each window under masks seeded by its own index (the same at every evaluation, whatever the
batch size), never by the training generator.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from lmforge.config.sections import Config
from lmforge.infer.evaluate import check_no_reserved_ids, evaluate, mask_windows
from lmforge.model.masking import MASK_WORDS, mask_token_id, mask_tokens
from lmforge.run.log import EvalRecord, SampleRecord
from lmforge.train.language import LanguageModelling


class MaskedLanguageModelling(LanguageModelling):
    """The trainer's task for pretraining an encoder (see the module docstring)."""

    def __init__(self, config: Config, data_dir: str | Path, run_dir: Path, *, resume: bool,
                 init_from: str | Path | None):
        super().__init__(config, data_dir, run_dir, resume=resume, init_from=init_from)
        self.mask_id = mask_token_id(self.config.model)
        check_no_reserved_ids(self.data_dir, self.mask_id, MASK_WORDS)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next windows, masked: (inputs, targets), the targets IGNORE outside the chosen positions."""
        tokens, _ = self.loader.next_batch()  # the next-token targets are not this task's
        world, rank, rows = self.cluster.world_size, self.cluster.rank, tokens.size(0)
        if world == 1:
            return mask_tokens(tokens, self.mask_id)
        # Every rank starts from the same seed: each draws the masks of the whole global batch, so the generators
        # stay in step, and keeps its own rows' (the same masks on every rank would repeat one pattern N times).
        inputs, targets = mask_tokens(tokens.repeat(world, 1), self.mask_id)
        return inputs[rank * rows : (rank + 1) * rows], targets[rank * rows : (rank + 1) * rows]

    def evaluate(self, forward: nn.Module, *, final: bool, step: int, tokens: int, elapsed: float
                 ) -> tuple[EvalRecord, str]:
        """The masked-LM validation record (val_ppl: exp of the masked loss; no bits per byte)."""
        config = self.config
        max_windows = None if final else max(1, config.train.eval_tokens // config.model.block_size)
        result = evaluate(forward, self.val_windows, batch_size=config.train.batch_size, max_windows=max_windows,
                          device=self.device, precision=self.precision, bytes_per_token=None,
                          rank=self.cluster.rank, world_size=self.cluster.world_size,
                          corrupt=partial(mask_windows, mask_id=self.mask_id))
        record = EvalRecord(step=step, tokens=tokens, val_loss=result["loss"], val_ppl=result["perplexity"],
                            elapsed=elapsed, final=final)
        message = (f"step {step}: val masked-LM loss {result['loss']:.4f} (exp: {result['perplexity']:.2f})"
                   + (" (full validation split)" if final else ""))
        return record, message

    def sample(self, step: int) -> SampleRecord | None:
        """An encoder does not generate: train.sample_every writes no samples."""
        return None
