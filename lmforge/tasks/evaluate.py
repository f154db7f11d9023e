"""`lmforge eval RUN --task T --data FILE`: a run's task metrics on task records, as one JSON object.

    classify   accuracy, macro_precision, macro_recall, macro_f1, per_class, confusion   (the run's head)
    translate  bleu, chrf, copy_bleu, copy_chrf   (greedy decoding after source + TRANSLATE_SEPARATOR; a run
               fine-tuned on chat is asked CHAT_TRANSLATE_PROMPT, the built-in modernize task's request)
    qa         exact_match, f1   (greedy reply to the QA_PROMPT chat turn, SQuAD v1.1 normalisation)
    choice     acc, acc_norm, acc_centered, acc_pmi   (zero-shot: each choice's summed log-probability given the
               context; acc_pmi: minus its log-probability after the context's last token alone)
    sft        loss, perplexity   (next-token loss on the assistant turns only, per token)

Models are prompted exactly as fine-tuning trained them (each kind's `prompt_ids`: lmforge/tasks/kinds.py). A
text longer than the context keeps its last tokens; how many were cut is said on stderr, not in the metrics.
With a predictions file, one JSON object per record, in input order: {"prediction", "reference"} (the label, the
target text, the answers, the correct choice index; choice adds "prediction_norm" and "prediction_pmi", the picks
of acc_norm and acc_pmi).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.files import check_output, write_atomic
from lmforge.infer.load import LoadedRun
from lmforge.tasks import metrics
from lmforge.tasks.kinds import TASKS, TaskKind, task_kind
from lmforge.tasks.records import data_file, read_records, split_files


def evaluate_task(loaded: LoadedRun, task: str, data: str | Path, *, split: str | None = None,
                  predictions: str | Path | None = None, overwrite: bool = False, batch_size: int = 16,
                  max_new_tokens: int | None = None, allow_unknown: bool = False) -> dict:
    """The task metrics of a loaded run (`load_run(..., language_model=False, chat_template=True)`) on the
    records of `data` (a file, or a directory's `split` file, test by default); with `predictions`, also write
    that file (checked first: an existing file only with `overwrite`, never an input, never inside a run).
    Records with characters the run's tokenizer does not know are refused unless `allow_unknown` reads them as
    the unknown token."""
    from lmforge.tasks.examples import check_template_encodable

    kind = task_kind(task)
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if split is not None and Path(data).is_file():
        raise UserError(f"--split {split} chooses a file in a data directory; --data {data} is a file: drop --split")
    path = data_file(data, split or "test")
    if predictions is not None:
        task_files = split_files(data).values() if Path(data).is_dir() else ()
        check_output(Path(predictions), overwrite, directory=False, inputs=(path, *task_files, loaded.run_dir))
    records = read_records(path, task)
    finetune = loaded.config.finetune
    kind.check_run(loaded.run_dir, finetune)
    kind.check_arch(loaded.config.model.arch)
    tokenizer = loaded.tokenizer
    tokenizer.check_known_data(record_texts(records, kind, path), str(path), allow_unknown=allow_unknown,
                               advice="; fix the data, or pass --allow-unknown to read each as the unknown token")
    chat = finetune is not None and finetune.template == "chat"
    check_template_encodable(tokenizer, kind.asked_as(chat), loaded.chat_template)
    scores, rows = kind.score(loaded.model, tokenizer, records, template=loaded.chat_template,
                              batch_size=batch_size, device=loaded.device, origin=path, chat=chat,
                              with_replies=predictions is not None, max_new_tokens=max_new_tokens)
    if predictions is not None:
        write_atomic(Path(predictions), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return scores


def record_texts(records: Sequence[dict], kind: TaskKind, origin: Path) -> list[tuple[str, str]]:
    """The texts of the records that the model reads or is scored on (not a translate target or qa answers,
    which are only compared with its replies), each with where its record was read."""
    return [(text, getattr(record, "where", str(origin))) for record in records for text in kind.read_texts(record)]


def note_truncated(count: int, total: int, what: str) -> None:
    if count:
        print(f"note: {count} of {total} {what} were longer than the context and kept their last tokens",
              file=sys.stderr)


def evaluate_classify(model: nn.Module, tokenizer: Tokenizer, records: Sequence[dict], batch_size: int,
                      device: str | torch.device, origin: Path) -> tuple[dict, list[dict]]:
    from lmforge.tasks.kinds import predict_labels

    references = [record["label"] for record in records]
    unseen = sorted(set(references) - set(model.labels))
    if unseen:
        first = next(record for record in records if record["label"] in unseen)
        raise UserError(f"{getattr(first, 'where', origin)}: label {', '.join(repr(u) for u in unseen)} never "
                        f"appeared in the run's training data (its labels: {', '.join(model.labels)})")
    texts = [record["text"] for record in records]
    block_size = model.body.config.block_size
    note_truncated(sum(len(ids) > block_size for ids in tokenizer.encode_batch(texts)), len(texts), "texts")
    predicted, _ = predict_labels(model, tokenizer, texts, batch_size, device)
    scores = metrics.classification_scores(predicted, references, labels=model.labels)
    return scores, [{"prediction": p, "reference": r} for p, r in zip(predicted, references, strict=True)]


def completion_sequences(tokenizer: Tokenizer, context: str, choices: Sequence[str], block_size: int, *,
                         premise_only: bool = False) -> tuple[list[list[int]], list[int], int]:
    """For each choice, the token ids context + choice (each encoded alone, as llm.c's HellaSwag does; an
    empty context is the end-of-text token) cut to their last block_size + 1, and how many of the last ids are
    the choice's (scored). Also how many sequences were cut. premise_only: the context's last token alone
    stands before each choice (what every choice follows: acc_pmi's baseline)."""
    context_ids = tokenizer.encode(context) or [tokenizer.eot_id]
    if premise_only:
        context_ids = context_ids[-1:]
    sequences, scored, cut = [], [], 0
    for choice in choices:
        choice_ids = tokenizer.encode(choice)
        if not choice_ids:
            raise UserError("a choice is empty: it has no tokens to score")
        ids = context_ids + choice_ids
        if len(ids) > block_size + 1:
            ids, cut = ids[-(block_size + 1):], cut + 1
        sequences.append(ids)
        scored.append(min(len(choice_ids), len(ids) - 1))
    return sequences, scored, cut


@torch.no_grad()
def sequence_log_likelihoods(model: nn.Module, sequences: Sequence[Sequence[int]], scored: Sequence[int],
                             pad_id: int, batch_size: int, device: str | torch.device) -> list[float]:
    """For each sequence, the summed log-probability of its last `scored` tokens given the tokens before them
    (batches right-padded: a causal model's logits at a position never see later positions)."""
    totals = []
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start : start + batch_size]
        longest = max(len(ids) for ids in batch) - 1
        inputs = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        for row, ids in enumerate(batch):
            inputs[row, : len(ids) - 1] = torch.as_tensor(ids[:-1])
        logits, _ = model(inputs.to(device))
        log_probs = F.log_softmax(logits.float(), dim=-1).cpu()
        for row, ids in enumerate(batch):
            count = scored[start + row]
            positions = torch.arange(len(ids) - 1 - count, len(ids) - 1)
            targets = torch.as_tensor(ids[-count:])
            totals.append(float(log_probs[row, positions, targets].sum()))
    return totals


def evaluate_choice(model: nn.Module, tokenizer: Tokenizer, records: Sequence[dict], batch_size: int,
                    device: str | torch.device) -> tuple[dict, list[dict]]:
    def per_record(premise_only: bool) -> tuple[list[list[float]], list[list[int]], int]:
        sequences, scored, owners, cut = [], [], [], 0
        for index, record in enumerate(records):
            ids, counts, cut_here = completion_sequences(tokenizer, record["context"], record["choices"],
                                                         model.config.block_size, premise_only=premise_only)
            sequences += ids
            scored += counts
            owners += [index] * len(ids)
            cut += cut_here
        totals = sequence_log_likelihoods(model, sequences, scored, tokenizer.eot_id, batch_size, device)
        log_likelihoods: list[list[float]] = [[] for _ in records]
        token_counts: list[list[int]] = [[] for _ in records]
        for owner, total, count in zip(owners, totals, scored, strict=True):
            log_likelihoods[owner].append(total)
            token_counts[owner].append(count)
        return log_likelihoods, token_counts, cut

    log_likelihoods, token_counts, cut = per_record(premise_only=False)
    note_truncated(cut, sum(len(record["choices"]) for record in records), "context + choice sequences")
    premise_log_likelihoods, _, _ = per_record(premise_only=True)
    labels = [record["label"] for record in records]
    by_sum, by_mean = metrics.best_choices(log_likelihoods, token_counts)
    by_pmi = metrics.pmi_choices(log_likelihoods, premise_log_likelihoods)
    rows = [{"prediction": s, "prediction_norm": m, "prediction_pmi": p, "reference": label}
            for s, m, p, label in zip(by_sum, by_mean, by_pmi, labels, strict=True)]
    return metrics.choice_scores(log_likelihoods, token_counts, premise_log_likelihoods, labels), rows


def evaluate_sft(model: nn.Module, tokenizer: Tokenizer, records: Sequence[dict], template, batch_size: int,
                 device: str | torch.device, *, with_replies: bool, max_new_tokens: int | None
                 ) -> tuple[dict, list[dict]]:
    """Mean next-token loss over the assistant turns' tokens, encoded exactly as fine-tuning encodes them
    (`examples.task_loss`), and its exponential; with_replies: also each conversation's greedy reply to its
    turns before the last assistant turn."""
    from lmforge.infer.generate import greedy_batch
    from lmforge.tasks.examples import task_loss

    sft = task_kind("sft")
    result = task_loss(model, tokenizer, list(records), "sft", template=template, batch_size=batch_size,
                       device=device)
    note_truncated(result["truncated"], len(records), "conversations")
    if result["untrainable"]:
        print(f"note: {result['untrainable']} conversations kept no reply within the context and were not scored",
              file=sys.stderr)
    references = [[m for m in sft.messages(record) if m["role"] == "assistant"][-1]["content"] for record in records]
    replies: list[str | None] = [None] * len(records)
    if with_replies:
        prompts = [sft.prompt_ids(record, tokenizer, template) for record in records]
        limit = max_new_tokens or model.config.block_size
        written = greedy_batch(model, prompts, [limit] * len(prompts), stop_token=tokenizer.eot_id,
                               batch_size=batch_size)
        replies = [tokenizer.decode(ids) for ids in written]
    rows = [{"prediction": reply, "reference": reference} for reply, reference in zip(replies, references, strict=True)]
    return {"loss": result["loss"], "perplexity": result["perplexity"]}, rows


def evaluate_generation(model: nn.Module, tokenizer: Tokenizer, records: Sequence[dict], kind: TaskKind, template,
                        max_new_tokens: int | None, *, chat: bool = False, batch_size: int = 1
                        ) -> tuple[dict, list[dict]]:
    """translate and qa: each record's greedy reply (without surrounding whitespace), scored by the kind against
    its target (BLEU, chrF, beside the score of copying the source) or its answers (SQuAD exact match and F1).
    `chat`: the run was fine-tuned on chat (sft), so a translate source is asked as CHAT_TRANSLATE_PROMPT. The
    replies are written `batch_size` records at a time (`greedy_batch`: each the reply `generate` writes alone)."""
    from lmforge.infer.generate import greedy_batch

    asked = kind.asked_as(chat)
    block_size = model.config.block_size
    prompts = [asked.prompt_ids(record, tokenizer, template) for record in records]
    limits = [kind.reply_tokens(record, tokenizer) if max_new_tokens is None else max_new_tokens
              for record in records]
    note_truncated(sum(len(prompt) > block_size for prompt in prompts), len(records), "prompts")
    written = greedy_batch(model, prompts, limits, stop_token=tokenizer.eot_id, batch_size=batch_size)
    replies = [tokenizer.decode(ids).strip() for ids in written]
    scores, references = kind.generation_scores(replies, records)
    return scores, [{"prediction": p, "reference": r} for p, r in zip(replies, references, strict=True)]


def eval_command(run: str, task: str | None, data: str, *, split: str | None, predictions: str | None,
                 overwrite: bool, batch_size: int, device: str, engine: str, allow_unknown: bool = False) -> None:
    """`lmforge eval RUN --task T --data FILE [--predictions OUT]`: print the metrics as one JSON object."""
    from lmforge.infer.load import load_run

    if task is None:
        raise UserError("--predictions needs --task (the records' task: " + ", ".join(TASKS) + ")")
    if engine != "torch":
        raise UserError("--task evaluation runs on the torch engine; drop --engine scratch")
    loaded = load_run(run, device=device, language_model=False, chat_template=True)
    scores = evaluate_task(loaded, task, data, split=split, predictions=predictions, overwrite=overwrite,
                           batch_size=batch_size, allow_unknown=allow_unknown)
    print(json.dumps(scores))
