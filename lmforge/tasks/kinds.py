"""The task kinds, one class each, and the registry that names them: the one place that knows what a task is.

A kind knows its records' shape (`fields`, `check_record`), the texts a model reads of a record and the text
the task wraps around it, how a record becomes token ids and trained positions (`encode`) or the prompt the
model continues (`prompt_ids`), the validation metric that picks the best checkpoint (`metric`), what
fine-tuning for it writes ([finetune] template, a classifier head) and how `eval --task` scores it (`score`).
Every other module asks the kind (`task_kind(name)`) instead of comparing task names:

    classify   {"text": str, "label": str}            a classifier head over the labels; accuracy picks the best
    sft        {"prompt": str, "response": str}  or  {"messages": [{"role", "content"}, ...]}   (chat template)
    translate  {"source": str, "target": str}          source + TRANSLATE_SEPARATOR, then target + end-of-text
    qa         {"context": str, "question": str, "answers": [str, ...]}   the QA_PROMPT user turn, first answer
    choice     {"context": str, "choices": [str, ...], "label": int}     evaluation only (zero-shot)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config.sections import FinetuneConfig
from lmforge.data.template import ChatTemplate, check_message
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.model.heads import Classifier, check_classify_arch, classify_ids

# A translate record as a model reads it: source, this separator, then the target (ended by end-of-text). Its
# characters are ones the built-in corpus has, so a char run pretrained on it (the demo's) can fine-tune for
# translate; a line of two dashes alone is not in that corpus.
TRANSLATE_SEPARATOR = "\n--\n"
# A qa record as the user turn of a chat; its first answer is the assistant turn.
QA_PROMPT = "Context: {context}\nQuestion: {question}"
# A translate record put to a chat (sft) run, as `eval --task translate` does: the request the built-in
# `modernize` task trains, so a run fine-tuned on it is scored on `folio` records in its own format.
CHAT_TRANSLATE_PROMPT = "Modernize: {source}"


def translate_prompt(source: str) -> str:
    """The text a translate model continues with the target."""
    return source + TRANSLATE_SEPARATOR


def refuse_encoder_decoder(kind: TaskKind, arch: str) -> None:
    """An encoder-decoder does a kind whose record is a prompt and a reply (the prompt to the encoder, the reply
    to the decoder: lmforge/tasks/examples.py); the others are refused by name."""
    if arch == "encoder-decoder" and not kind.encoder_decoder:
        raise UserError(f"the {kind.name} task: model.arch = encoder-decoder is fine-tuned and asked for translate and "
                        f"sft only (its encoder reads a prompt, its decoder writes the reply); use a decoder "
                        f"(model.arch = gpt){' or an encoder (model.arch = encoder)' if kind.labelled else ''} "
                        f"for {kind.name}")


class TaskKind:
    """What every task kind answers; the defaults are a chat task's (sft, qa)."""

    name: ClassVar[str]
    fields: ClassVar[tuple[str, ...]]  # the record's fields (in every format)
    trainable: ClassVar[bool] = True  # `lmforge finetune --task` accepts it
    template: ClassVar[str] = "chat"  # the [finetune] template a run of this kind writes (chat_template.json)
    labelled: ClassVar[bool] = False  # predicts labels through a classifier head, not text
    takes_context: ClassVar[bool] = False  # `predict` reads a --context passage besides --text
    accepts_messages: ClassVar[bool] = False  # a record may be {"messages": [...]} instead of its fields
    metric: ClassVar[tuple[str, bool]] = ("val_loss", False)  # the log key that picks the best checkpoint, higher?
    metric_words: ClassVar[str] = "loss on the trained tokens"
    encoder_decoder: ClassVar[bool] = False  # an encoder-decoder does it (the prompt its source, the reply its target)

    # ----- records -----
    def shape(self) -> str:
        return ", ".join(self.fields)

    def check_record(self, record: dict) -> None:
        """Checks of a record beyond each field's type (which records.check_record does); may normalise it."""

    def check_label(self, value: object) -> object:
        raise UserError(f"{self.name} records have no 'label'")

    def messages(self, record: dict) -> list[dict]:
        raise ValueError(f"{self.name} records are not chat messages")

    def read_texts(self, record: dict) -> list[str]:
        """The texts of a record the model reads or is scored on (a reference it is only compared with is not)."""
        return [message["content"] for message in self.messages(record)]

    def data_texts(self, record: dict) -> list[str]:
        """Every text of a record that training encodes."""
        if "messages" in record:
            return [message["content"] for message in record["messages"]]
        return [text for name in self.fields for text in (record[name] if isinstance(record[name], list)
                                                          else [record[name]])]

    # ----- encoding -----
    def wrapper_texts(self, template: ChatTemplate) -> dict[str, str]:
        """The text the task puts around every record, by what it is (to check that the tokenizer knows it)."""
        texts = {f"the chat template's {role} marker": marker for role, marker in template.markers.items()}
        texts["the chat template's turn end"] = template.turn_end
        return texts

    def encode(self, record: dict, tokenizer: Tokenizer, template: ChatTemplate) -> tuple[list[int], list[bool]]:
        """Token ids of a record and, per id, whether the loss trains on predicting it."""
        return template.encode(self.messages(record), tokenizer)

    def prompt_ids(self, record: dict, tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
        """The token ids a model fine-tuned for this kind continues with its answer: the turns before the last
        assistant turn, then the assistant marker."""
        messages = self.messages(record)
        while messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        return template.encode(messages, tokenizer, add_generation_prompt=True)[0]

    def request(self, text: str, context: str | None) -> dict:
        """The record `lmforge predict --text TEXT [--context C]` asks a run of this kind."""
        return {"prompt": text, "response": ""}

    # ----- training -----
    def check_arch(self, arch: str) -> None:
        """Refuse a base model this kind cannot fine-tune or be asked: the text kinds need one that writes."""
        refuse_encoder_decoder(self, arch)
        if arch == "encoder":
            raise UserError(f"the {self.name} task needs a model that writes text; model.arch = encoder does not "
                            "generate (it reads a passage both ways): use --task classify on it, or a decoder "
                            "(model.arch = gpt) for this task")

    def loss(self, model: nn.Module, inputs, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of a batch as `examples.next_batch` makes it: next-token loss on trained targets."""
        from lmforge.tasks.examples import lm_loss

        return lm_loss(model, inputs, targets)

    # ----- evaluation -----
    def asked_as(self, chat: bool) -> TaskKind:
        """The kind whose format a run is asked in: its own, or chat's for a chat run (`chat`)."""
        return self

    def reply_tokens(self, record: dict, tokenizer: Tokenizer) -> int:
        """The default length of a generated reply to this record."""
        return 64

    def check_run(self, run_dir: str | Path, finetune: FinetuneConfig | None) -> None:
        """A UserError unless the run can do this kind (a classify run predicts labels, not text)."""
        if finetune is not None and task_kind(finetune.task).labelled:
            raise UserError(f"{run_dir} was fine-tuned for classify: it predicts labels, not text, so it cannot "
                            f"do {self.name}")

    def score(self, model: nn.Module, tokenizer: Tokenizer, records: Sequence[dict], *, template: ChatTemplate,
              batch_size: int, device: str | torch.device, origin: Path, chat: bool, with_replies: bool,
              max_new_tokens: int | None) -> tuple[dict, list[dict]]:
        """`eval --task`'s metrics on the records, and one prediction row per record."""
        from lmforge.tasks.evaluate import evaluate_generation

        return evaluate_generation(model, tokenizer, records, self, template, max_new_tokens, chat=chat,
                                   batch_size=batch_size)

    def generation_scores(self, replies: list[str], records: Sequence[dict]) -> tuple[dict, list]:
        """The metrics of greedy replies against the records' references, and those references."""
        raise NotImplementedError


class Classify(TaskKind):
    name, fields = "classify", ("text", "label")
    template, labelled = "", True
    metric, metric_words = ("val_accuracy", True), "accuracy"

    def check_label(self, value: object) -> object:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str) or not value:
            raise UserError(f"'label' must be a non-empty string (or an integer), not {value!r}")
        return value

    def check_record(self, record: dict) -> None:
        if not record["text"]:
            raise UserError("'text' is empty")

    def read_texts(self, record: dict) -> list[str]:
        return [record["text"]]

    def data_texts(self, record: dict) -> list[str]:
        return [record["text"]]

    def wrapper_texts(self, template: ChatTemplate) -> dict[str, str]:
        return {}

    def check_arch(self, arch: str) -> None:
        refuse_encoder_decoder(self, arch)
        check_classify_arch(arch)

    def loss(self, model: nn.Module, inputs, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(*inputs).float(), targets)

    def check_run(self, run_dir: str | Path, finetune: FinetuneConfig | None) -> None:
        trained = finetune.task if finetune else None
        if trained is None or not task_kind(trained).labelled:
            raise UserError(f"{run_dir} was not fine-tuned for classify (it was "
                            f"{'fine-tuned for ' + trained if trained else 'never fine-tuned'}); it has no "
                            "classification head: lmforge finetune RUN --task classify ...")

    def score(self, model, tokenizer, records, *, template, batch_size, device, origin, chat, with_replies,
              max_new_tokens):
        from lmforge.tasks.evaluate import evaluate_classify

        return evaluate_classify(model, tokenizer, records, batch_size, device, origin)


class Sft(TaskKind):
    name, fields = "sft", ("prompt", "response")
    accepts_messages, encoder_decoder = True, True

    def shape(self) -> str:
        return "prompt, response (or messages)"

    def messages(self, record: dict) -> list[dict]:
        """A prompt/response pair is one user and one assistant turn."""
        if "messages" in record:
            return record["messages"]
        return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]

    def score(self, model, tokenizer, records, *, template, batch_size, device, origin, chat, with_replies,
              max_new_tokens):
        from lmforge.tasks.evaluate import evaluate_sft

        return evaluate_sft(model, tokenizer, records, template, batch_size, device, with_replies=with_replies,
                            max_new_tokens=max_new_tokens)


class Translate(TaskKind):
    name, fields = "translate", ("source", "target")
    template, encoder_decoder = "translate", True

    def check_record(self, record: dict) -> None:
        if not record["source"]:
            raise UserError("'source' is empty")
        if not record["target"]:  # nothing to learn but to stop at once, nothing to score a reply against
            raise UserError("'target' is empty")

    def read_texts(self, record: dict) -> list[str]:
        return [record["source"]]

    def wrapper_texts(self, template: ChatTemplate) -> dict[str, str]:
        return {"the translate separator": TRANSLATE_SEPARATOR}

    def encode(self, record: dict, tokenizer: Tokenizer, template: ChatTemplate) -> tuple[list[int], list[bool]]:
        prompt = tokenizer.encode(translate_prompt(record["source"]))
        target = tokenizer.encode(record["target"]) + [tokenizer.eot_id]
        return prompt + target, [False] * len(prompt) + [True] * len(target)

    def prompt_ids(self, record: dict, tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
        return tokenizer.encode(translate_prompt(record["source"]))

    def request(self, text: str, context: str | None) -> dict:
        return {"source": text, "target": ""}

    def asked_as(self, chat: bool) -> TaskKind:
        """A chat run is asked to translate in its own format: CHAT_TRANSLATE_PROMPT as an sft turn."""
        return ChatTranslate() if chat else self

    def reply_tokens(self, record: dict, tokenizer: Tokenizer) -> int:
        return 2 * len(tokenizer.encode(record["source"])) + 16  # room for a target about as long as the source

    def generation_scores(self, replies: list[str], records: Sequence[dict]) -> tuple[dict, list]:
        from lmforge.tasks import metrics

        sources = [record["source"] for record in records]
        targets = [record["target"] for record in records]
        return {"bleu": metrics.bleu(replies, targets), "chrf": metrics.chrf(replies, targets),
                "copy_bleu": metrics.bleu(sources, targets), "copy_chrf": metrics.chrf(sources, targets)}, targets


class ChatTranslate(Translate):
    """Translate records put to a chat (sft) run: the source as a CHAT_TRANSLATE_PROMPT user turn, in sft's
    format (so its name, in messages about that format)."""

    name = "sft"

    def wrapper_texts(self, template: ChatTemplate) -> dict[str, str]:
        return TaskKind.wrapper_texts(self, template)

    def prompt_ids(self, record: dict, tokenizer: Tokenizer, template: ChatTemplate) -> list[int]:
        request = {"prompt": CHAT_TRANSLATE_PROMPT.format(source=record["source"]), "response": ""}
        return Sft().prompt_ids(request, tokenizer, template)


class Qa(TaskKind):
    name, fields = "qa", ("context", "question", "answers")
    takes_context = True

    def messages(self, record: dict) -> list[dict]:
        """The QA_PROMPT user turn and the first answer as the assistant turn."""
        return [{"role": "user", "content": QA_PROMPT.format(context=record["context"], question=record["question"])},
                {"role": "assistant", "content": record["answers"][0]}]

    def read_texts(self, record: dict) -> list[str]:
        return [record["context"], record["question"]]

    def wrapper_texts(self, template: ChatTemplate) -> dict[str, str]:
        return {**super().wrapper_texts(template),
                "the qa prompt": QA_PROMPT.replace("{context}", "").replace("{question}", "")}

    def request(self, text: str, context: str | None) -> dict:
        if context is None:
            raise UserError("a qa run answers a --text question about a --context passage: give --context")
        return {"context": context, "question": text, "answers": [""]}

    def generation_scores(self, replies: list[str], records: Sequence[dict]) -> tuple[dict, list]:
        from lmforge.tasks import metrics

        references = [record["answers"] for record in records]
        return metrics.qa_scores(replies, references), references


class Choice(TaskKind):
    name, fields = "choice", ("context", "choices", "label")
    trainable, template = False, ""

    def check_label(self, value: object) -> object:
        if isinstance(value, str) and re.fullmatch("[0-9]+", value.strip()):  # a CSV cell (ASCII digits:
            value = int(value)  # str.isdigit also accepts '²', which int() refuses)
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"'label' must be an integer index into choices, not {value!r}")
        return value

    def check_record(self, record: dict) -> None:
        if len(record["choices"]) < 2:
            raise UserError("'choices' needs at least two choices")
        if not all(record["choices"]):  # an empty choice has no tokens to score
            raise UserError(f"choice {record['choices'].index('')} is empty; every choice needs text to score")
        if not 0 <= record["label"] < len(record["choices"]):
            raise UserError(f"'label' {record['label']} is not an index into {len(record['choices'])} choices")

    def read_texts(self, record: dict) -> list[str]:
        return [record["context"], *record["choices"]]

    def wrapper_texts(self, template: ChatTemplate) -> dict[str, str]:
        return {}

    def score(self, model, tokenizer, records, *, template, batch_size, device, origin, chat, with_replies,
              max_new_tokens):
        from lmforge.tasks.evaluate import evaluate_choice

        return evaluate_choice(model, tokenizer, records, batch_size, device)


KINDS: dict[str, TaskKind] = {kind.name: kind for kind in (Classify(), Sft(), Translate(), Qa(), Choice())}
TASKS = tuple(KINDS)
TRAINABLE = tuple(name for name, kind in KINDS.items() if kind.trainable)  # what `lmforge finetune` trains


def task_kind(name: str) -> TaskKind:
    """The kind named `name`, or a UserError naming the kinds."""
    if name not in KINDS:
        raise UserError(f"unknown task '{name}'; tasks are {', '.join(TASKS)}")
    return KINDS[name]


def check_sft_messages(record: dict) -> None:
    """The {"messages": [...]} form of an sft record: a non-empty list of turns with an assistant turn."""
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise UserError("'messages' must be a non-empty list of {role, content} objects")
    for index, message in enumerate(messages):
        check_message(message, index)
    if not any(message["role"] == "assistant" for message in messages):
        raise UserError("'messages' has no assistant turn to train on")


# ----- classification through the head -----
def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], block_size: int) -> tuple[list[list[int]], int]:
    """Token ids of each text, longer ones cut to their last `block_size` tokens, and how many were cut."""
    encoded, truncated = [], 0
    for ids in tokenizer.encode_batch(list(texts)):
        if not ids:
            raise UserError("a text to classify is empty")
        if len(ids) > block_size:
            ids, truncated = ids[-block_size:], truncated + 1
        encoded.append(ids)
    return encoded, truncated


def predict_labels(model: Classifier, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int,
                   device: torch.device | str) -> tuple[list[str], torch.Tensor]:
    """The likeliest label of each text and the probabilities of all labels (N, labels; columns in the order
    of `model.labels`)."""
    if not isinstance(model, Classifier):
        raise UserError("this run has no classification head (fine-tune it with --task classify)")
    sequences, _ = encode_texts(tokenizer, texts, model.body.config.block_size)
    probabilities = classify_ids(model, sequences, tokenizer.eot_id, batch_size, device).softmax(-1)
    return [model.labels[i] for i in probabilities.argmax(-1).tolist()], probabilities

