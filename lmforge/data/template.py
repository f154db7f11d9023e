"""The chat template: how a conversation becomes token ids, and which of them a fine-tuning loss trains on.

One template serves `finetune --task sft` (masking), `sample`, `chat` and the server, so a model is always
prompted the way it was trained. It is plain text with role markers in capitals, in the style of a play's
speech headings, so that a character-level tokenizer trained on English text can encode it:

    USER:
    What is the genre of this passage?

    ASSISTANT:
    tragedy<end-of-text>

Each turn is `MARKER + content + "\\n\\n"`, except that an assistant turn ends with the tokenizer's end-of-text
token instead: a model fine-tuned on this template learns to stop there, which the server reports as
`finish_reason: "stop"`. A base model (not fine-tuned) gets the same rendering, documented in docs/serve.md: it
has never seen the markers, so it continues the text as it would any play.

A run fine-tuned with the sft task stores its template as `chat_template.json` in the run directory
(`ChatTemplate.save`); `load_chat_template(run_dir)` returns it, or the default for a run without one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import UserError
from lmforge.files import write_atomic

TEMPLATE_FILE = "chat_template.json"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    markers: dict[str, str] = field(default_factory=lambda: {
        "system": "SYSTEM:\n", "user": "USER:\n", "assistant": "ASSISTANT:\n"})
    turn_end: str = "\n\n"  # after a system or user turn; an assistant turn ends with end-of-text instead

    def encode(self, messages: Sequence[dict], tokenizer: Tokenizer, *,
               add_generation_prompt: bool = False) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation, and for each id whether a fine-tuning loss trains on it (the content of
        assistant turns and their end-of-text; never a marker or a system/user turn). With
        `add_generation_prompt`, the ids end with the assistant marker, where a reply begins."""
        ids: list[int] = []
        trained: list[bool] = []

        def add(text_or_id: str | int, train: bool) -> None:
            new = [text_or_id] if isinstance(text_or_id, int) else tokenizer.encode(text_or_id)
            ids.extend(new)
            trained.extend([train] * len(new))

        for index, message in enumerate(messages):
            role, content = check_message(message, index)
            add(self.markers[role], False)
            if role == "assistant":
                add(content, True)
                add(tokenizer.eot_id, True)
                add(self.turn_end, False)
            else:
                add(content + self.turn_end, False)
        if add_generation_prompt:
            add(self.markers["assistant"], False)
        return ids, trained

    def stop_texts(self) -> list[str]:
        """Text at which generation stops besides end-of-text: the start of another turn (a base model that
        never learned end-of-text writes the next speaker's marker instead)."""
        return [self.turn_end + self.markers[role] for role in ("user", "system")]

    def save(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / TEMPLATE_FILE
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n")
        return path


def check_message(message: object, index: int) -> tuple[str, str]:
    """(role, content) of one chat message, or a UserError naming what is wrong with it."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise UserError(f"message {index} must be an object with a string 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise UserError(f"message {index} has role {role!r}; roles are {', '.join(ROLES)}")
    return role, message["content"]


def load_chat_template(run_dir: str | Path) -> ChatTemplate:
    """The run's stored template (written by an sft fine-tuning run), else the default one."""
    path = Path(run_dir) / TEMPLATE_FILE
    if not path.is_file():
        return ChatTemplate()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        template = ChatTemplate(markers=dict(data["markers"]), turn_end=str(data["turn_end"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path} is not a valid chat template ({err})") from None
    if set(template.markers) != set(ROLES) or not all(isinstance(v, str) for v in template.markers.values()):
        raise UserError(f"{path} must give a string marker for each of the roles {', '.join(ROLES)}")
    return template
