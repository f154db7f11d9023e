"""Task records as training examples: encoded, masked, batched, and their loss and metrics on a split.

Shared by fine-tuning (lmforge/tasks/finetune.py) and `eval --task sft` (lmforge/tasks/evaluate.py), so that
evaluation scores exactly the tokens training trains on (each kind's `encode`, lmforge/tasks/kinds.py):
- classify: a text's token ids and its label's index (the head reads the last real token).
- sft, qa: the chat template's encoding, the loss on the assistant turns only (ChatTemplate.encode's mask;
  a qa record becomes a user turn "Context: ...\\nQuestion: ..." and its first answer).
- translate: `source + TRANSLATE_SEPARATOR + target + end-of-text`, the loss on the target and end-of-text.
A target not trained on is IGNORE, which cross-entropy skips: its loss and gradient are exactly zero.

An encoder-decoder (`model.arch = "encoder-decoder"`) reads the same encoding split in two: the ids before the
first trained one (the source and separator, the chat turns up to the assistant marker) are the encoder's
source, the rest the decoder's target, which it writes after its start token (teacher-forced), the loss on the
trained targets (the reply and its end). A source longer than the context keeps its last tokens, a target its
first ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.template import ChatTemplate
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.hardware import autocast
from lmforge.model.heads import classify_ids, pad_right
from lmforge.model.spans import start_token
from lmforge.tasks.kinds import TaskKind, task_kind

IGNORE = -100  # cross_entropy's ignore_index: a target that is not trained on


@dataclass
class Examples:
    """A split encoded for training: token ids per example, and per task either the label index (classify)
    or which positions' next tokens are trained on."""

    ids: list[list[int]]
    labels: list[int] = field(default_factory=list)
    trained: list[list[bool]] = field(default_factory=list)
    truncated: int = 0  # examples cut from the left to fit the context
    untrainable: int = 0  # examples left without a trained token by that cut (dropped)
    sources: list[int] = field(default_factory=list)  # an encoder-decoder's: how many of each example's ids are source
    start_id: int | None = None  # an encoder-decoder's start token (None: a decoder's examples)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.ids)


def encode_examples(records: list[dict], task: str, tokenizer: Tokenizer, block_size: int,
                    labels: list[str], template: ChatTemplate, origin: Path, start_id: int | None = None) -> Examples:
    """Encode a split, keeping each example's last tokens when it is longer than the context (classify:
    block_size tokens; the others: block_size + 1, as inputs and targets are shifted by one). `start_id`: an
    encoder-decoder's start token, its examples split into source and target (see the module docstring)."""
    kind = task_kind(task)
    examples = Examples(ids=[], start_id=start_id)
    limit = block_size if kind.labelled else block_size + 1
    index = {label: i for i, label in enumerate(labels)}
    for number, record in enumerate(records, start=1):
        if kind.labelled:
            if record["label"] not in index:
                where = getattr(record, "where", f"{origin} record {number}")
                raise UserError(f"{where}: label '{record['label']}' never appears in the "
                                f"training data (its labels: {', '.join(labels)})")
            ids, trained = tokenizer.encode(record["text"]), []
            examples.labels.append(index[record["label"]])
        else:
            ids, trained = kind.encode(record, tokenizer, template)
            # what follows the last trained token (the template's turn end) is never a target: keep the room
            end = max((i + 1 for i, keep in enumerate(trained) if keep), default=len(ids))
            ids, trained = ids[:end], trained[:end]
        if start_id is not None:
            split = trained.index(True)
            source, target = ids[:split], ids[split:]
            if len(source) > block_size or len(target) > block_size:
                examples.truncated += 1
            ids, trained = source[-block_size:] + target[:block_size], \
                [False] * len(source[-block_size:]) + trained[split:][:block_size]
            examples.sources.append(min(split, block_size))
            examples.trained.append(trained)
            examples.ids.append(ids)
            continue
        if len(ids) > limit:
            ids, trained, examples.truncated = ids[-limit:], trained[-limit:], examples.truncated + 1
        if not kind.labelled:
            # A guard: with the tail after the last reply cut above, every record keeps at least its final
            # end-of-text as a target; eval reports the count (always 0 until templates change).
            if not any(trained[1:]):
                examples.untrainable += 1
                continue
            examples.trained.append(trained)
        examples.ids.append(ids)
    if not examples.ids:
        raise UserError(f"{origin}: no record keeps a trained token within the context of {block_size} tokens")
    return examples


def check_encodable(tokenizer: Tokenizer, records: list[dict], task: str, origin: Path) -> None:
    """A character-level tokenizer maps characters it never saw to one 'unknown' id: refuse such data, naming
    the record (file and line) where the first one is."""
    kind = task_kind(task)
    texts = ((text, getattr(record, "where", str(origin))) for record in records for text in kind.data_texts(record))
    tokenizer.check_known_data(texts, str(origin), advice="; fine-tune a run whose tokenizer covers them")


def check_template_encodable(tokenizer: Tokenizer, kind: TaskKind, template: ChatTemplate) -> None:
    """The text a task adds around every record (the chat template's markers and turn end, the translate
    separator) must encode too, or every example would train on unknown ids: refuse naming its characters."""
    texts = kind.wrapper_texts(template)
    unknown = {what: tokenizer.unknown_characters(text) for what, text in texts.items()}
    if any(unknown.values()):
        characters = dict.fromkeys(char for chars in unknown.values() for char in chars)
        parts = "; ".join(f"{what} {texts[what]!r}" for what, chars in unknown.items() if chars)
        raise UserError(f"the run's character tokenizer cannot encode {', '.join(map(repr, characters))}, which "
                        f"{kind.name} wraps around every record ({parts}): its training text had no such characters "
                        "(a lower-cased corpus?); fine-tune a run whose tokenizer covers them")


def lm_batch(examples: Examples, rows: list[int], pad_id: int, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (B, T), right-padded; a target not trained on (or padding) is IGNORE."""
    inputs, targets = [], []
    for row in rows:
        ids, trained = examples.ids[row], examples.trained[row]
        inputs.append(ids[:-1])
        targets.append([t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:], strict=True)])
    idx, _ = pad_right(inputs, pad_id, device)
    target, _ = pad_right(targets, IGNORE, device)
    return idx, target


def seq2seq_batch(examples: Examples, rows: list[int], pad_id: int, device: torch.device
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """An encoder-decoder's ((sources (B, S), decoder inputs (B, T), source lengths (B,)), targets (B, T)), both
    right-padded: the decoder input is the start token, then the target but its last token; a target not trained
    on (or padding) is IGNORE."""
    sources, decoder_inputs, targets = [], [], []
    for row in rows:
        ids, trained, split = examples.ids[row], examples.trained[row], examples.sources[row]
        sources.append(ids[:split])
        decoder_inputs.append([examples.start_id] + ids[split:-1])
        targets.append([t if keep else IGNORE for t, keep in zip(ids[split:], trained[split:], strict=True)])
    source, lengths = pad_right(sources, pad_id, device)
    decoder_input, _ = pad_right(decoder_inputs, pad_id, device)
    target, _ = pad_right(targets, IGNORE, device)
    return (source, decoder_input, lengths), target


def training_batch(examples: Examples, rows: list[int], pad_id: int, device: torch.device) -> tuple:
    """(inputs, targets) of these examples as the kind's `loss` takes them: labelled examples (classify) are
    ((ids, lengths), label indices); an encoder-decoder's `seq2seq_batch`'s; the others `lm_batch`'s."""
    if examples.labels:
        inputs = pad_right([examples.ids[row] for row in rows], pad_id, device)
        return inputs, torch.tensor([examples.labels[row] for row in rows], device=device)
    if examples.start_id is not None:
        return seq2seq_batch(examples, rows, pad_id, device)
    return lm_batch(examples, rows, pad_id, device)


def lm_loss(model: nn.Module, inputs, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the trained targets only (IGNORE elsewhere contributes exactly 0); inputs are
    a decoder's ids or an encoder-decoder's `seq2seq_batch` inputs."""
    logits, _ = model(inputs)
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


# ----- evaluation -----
def macro_f1(predicted: torch.Tensor, truth: torch.Tensor, classes: int) -> float:
    """The mean over classes of F1 = 2·TP / (2·TP + FP + FN) (a class never predicted nor present scores 0)."""
    scores = []
    for label in range(classes):
        true_positive = int(((predicted == label) & (truth == label)).sum())
        wrong = int(((predicted == label) != (truth == label)).sum())
        scores.append(2 * true_positive / (2 * true_positive + wrong) if true_positive + wrong else 0.0)
    return sum(scores) / classes


@torch.no_grad()
def evaluate_split(model: nn.Module, examples: Examples, task: str, batch_size: int, pad_id: int,
                   device: torch.device, precision: str) -> dict:
    """Classify: val_loss, val_accuracy, val_macro_f1 and val_ppl (the perplexity of the label distribution);
    the others: val_loss (per trained token), val_ppl."""
    was_training = model.training
    model.eval()
    try:
        with autocast(device, precision):
            if task_kind(task).labelled:
                logits = classify_ids(model, examples.ids, pad_id, batch_size, device)
                truth = torch.tensor(examples.labels)
                predicted = logits.argmax(-1)
                loss = F.cross_entropy(logits, truth).item()
                return {"val_loss": loss, "val_accuracy": (predicted == truth).float().mean().item(),
                        "val_macro_f1": macro_f1(predicted, truth, logits.size(-1)),
                        "val_ppl": math.exp(min(loss, 50.0))}
            total, count = 0.0, 0
            for start in range(0, len(examples), batch_size):
                inputs, targets = training_batch(examples, list(range(start, min(start + batch_size, len(examples)))),
                                                 pad_id, device)
                total += lm_loss(model, inputs, targets, reduction="sum").item()
                count += int((targets != IGNORE).sum())
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}


def task_loss(model: nn.Module, tokenizer: Tokenizer, records: list[dict], task: str, *, template: ChatTemplate,
              batch_size: int, device: torch.device | str, origin: Path = Path("records")) -> dict:
    """The mean loss (and perplexity) on the tokens an sft, qa or translate run trains on, over these
    records: `eval --task sft` reads this. Also how many records were cut to the context."""
    config = model.config
    start_id = start_token(config) if config.arch == "encoder-decoder" else None
    examples = encode_examples(records, task, tokenizer, config.block_size, [], template, origin, start_id)
    device = torch.device(device)
    result = evaluate_split(model, examples, task, batch_size, tokenizer.eot_id, device, "fp32")
    return {"loss": result["val_loss"], "perplexity": result["val_ppl"], "truncated": examples.truncated,
            "untrainable": examples.untrainable}
