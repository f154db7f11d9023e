"""Pretraining an encoder (`model.arch = "encoder"`) as the trainer's task: masked-language modelling.

The same data, loader, checkpoints and run files as next-token pretraining (lmforge/train/language.py); what
differs is each batch and the evaluation. A batch is the loader's windows with 15% of the positions masked
(lmforge/model/masking.py) and the original tokens as targets at those positions only. The masks are drawn
from torch's global generator, which the trainer seeds with train.seed and saves in every checkpoint, so a
resumed run draws exactly the masks the uninterrupted one would have. The evaluation is the masked-LM loss on
the val split under masks of its own fixed seed (the same at every evaluation), never the training generator.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lmforge.config.sections import Config
from lmforge.data.datadir import check_token_ids
from lmforge.errors import UserError
from lmforge.infer.evaluate import evaluate
from lmforge.model.masking import mask_token_id, mask_tokens
from lmforge.run.log import EvalRecord, SampleRecord
from lmforge.train.language import LanguageModelling

NOT_COMPARABLE = ("a masked-LM loss predicts 15% of the tokens from both sides, so it is not comparable to a "
                  "decoder's next-token loss")


def check_no_mask_token(data_dir: str | Path, config: Config, splits: tuple[str, ...] | None = None) -> None:
    """The data's ids must all come before the encoder's reserved mask id: a shard that holds it (made with a
    larger vocabulary, or corrupt) would be read as masks the model is asked to fill in."""
    mask_id = mask_token_id(config.model)
    try:
        check_token_ids(data_dir, mask_id, *(() if splits is None else (splits,)))
    except UserError:
        raise UserError(f"{data_dir} holds token id {mask_id} or beyond, which the encoder reserves for its mask "
                        "token (the tokenizer's ids come before it): prepare the data with the run's tokenizer, "
                        "or leave model.vocab_size at 0") from None


class MaskedLanguageModelling(LanguageModelling):
    """The trainer's task for pretraining an encoder (see the module docstring)."""

    def __init__(self, config: Config, data_dir: str | Path, run_dir: Path, *, resume: bool,
                 init_from: str | Path | None):
        super().__init__(config, data_dir, run_dir, resume=resume, init_from=init_from)
        check_no_mask_token(self.data_dir, self.config)
        self.mask_id = mask_token_id(self.config.model)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next windows, masked: (inputs, targets), the targets IGNORE outside the chosen positions."""
        tokens, _ = self.loader.next_batch()  # the next-token targets are not this task's
        return mask_tokens(tokens, self.mask_id)

    def evaluate(self, forward: nn.Module, *, final: bool, step: int, tokens: int, elapsed: float
                 ) -> tuple[EvalRecord, str]:
        """The masked-LM validation record (val_ppl: exp of the masked loss; no bits per byte)."""
        config = self.config
        max_windows = None if final else max(1, config.train.eval_tokens // config.model.block_size)
        result = evaluate(forward, self.val_windows, batch_size=config.train.batch_size, max_windows=max_windows,
                          device=self.device, precision=self.precision, bytes_per_token=None,
                          rank=self.cluster.rank, world_size=self.cluster.world_size, mask_id=self.mask_id)
        record = EvalRecord(step=step, tokens=tokens, val_loss=result["loss"], val_ppl=result["perplexity"],
                            elapsed=elapsed, final=final)
        message = (f"step {step}: val masked-LM loss {result['loss']:.4f} (exp: {result['perplexity']:.2f})"
                   + (" (full validation split)" if final else ""))
        return record, message

    def sample(self, step: int) -> SampleRecord | None:
        """An encoder does not generate: train.sample_every writes no samples."""
        return None
