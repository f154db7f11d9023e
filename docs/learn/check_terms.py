"""Does the course explain every term before it uses it? `python docs/learn/check_terms.py` lists, for each term of
the glossary (docs/learn/glossary.md), where the chapters first use it and where they first explain it, in
reading order, and exits 1 naming every term used before it is explained. tests/test_learn.py runs it.

A term is one `### Name` heading of the glossary's "Terms" section; the line under it that starts with
"*Also:*" lists its other forms (plurals of every form match too). In a chapter (headings, code and inline code
left out: a title announces a topic, code names things), a *use* is any occurrence of a form, and an
*explanation* is one where the chapter explains it in place, in bold or italics (`**softmax**`, `*epoch*`), or
links it to its glossary entry (`[embedding](glossary.md#embedding)`). The first use must not come before the
first explanation.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

COURSE = Path(__file__).resolve().parent
GLOSSARY = COURSE / "glossary.md"
FENCE = re.compile(r"^```.*?^```[ \t]*$", re.M | re.S)


@dataclass
class Term:
    name: str
    anchor: str
    forms: list[str]


@dataclass
class Place:
    chapter: int  # position in reading order
    offset: int  # characters into the chapter
    where: str  # "NN-chapter.md line L"


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def glossary_terms(text: str) -> list[Term]:
    terms = []
    section = text.split("\n## Terms", 1)[1].split("\n## ", 1)[0]
    for block in re.split(r"^### ", section, flags=re.M)[1:]:
        name, _, body = block.partition("\n")
        forms = [name.strip()]
        also = re.search(r"^\*Also:\* (.+)$", body, re.M)
        if also:
            forms += [form.strip() for form in also.group(1).rstrip(".").split(",")]
        terms.append(Term(name.strip(), slug(name), forms))
    return terms


def prose(text: str) -> str:
    """The chapter with code blocks, inline code and headings blanked (offsets kept, so lines still count)."""
    blank = lambda match: re.sub(r"[^\n]", " ", match.group(0))  # noqa: E731
    text = FENCE.sub(blank, text)
    text = re.sub(r"`[^`\n]*`", blank, text)
    return re.sub(r"^#.*$", blank, text, flags=re.M)


def form_pattern(forms: list[str]) -> re.Pattern:
    """Any of the forms as whole words, plural or not, case ignored; a space matches any run of whitespace (a
    term can break across lines)."""
    alternatives = "|".join(re.escape(form).replace(r"\ ", r"\s+")
                            for form in sorted(forms, key=len, reverse=True))
    return re.compile(rf"(?<![\w-])(?:{alternatives})(?:s|es)?(?![\w-])", re.I)


def longer_terms(term: Term, terms: list[Term]) -> re.Pattern | None:
    """The other terms' forms that contain one of this term's forms ("gradient descent" for "gradient"): their
    occurrences are uses of the longer term, not of this one."""
    mine = form_pattern(term.forms)
    longer = [form for other in terms if other is not term for form in other.forms
              if mine.search(form) and len(form) > len(mine.search(form).group(0))]
    return form_pattern(longer) if longer else None


def first_places(term: Term, chapters: list[Path], terms: list[Term]) -> tuple[Place | None, Place | None]:
    """(first use, first explanation) of a term across the chapters in reading order."""
    pattern, longer = form_pattern(term.forms), longer_terms(term, terms)
    use = explanation = None
    for index, chapter in enumerate(chapters):
        raw = chapter.read_text(encoding="utf-8")
        text = prose(raw)
        if longer is not None:
            text = longer.sub(lambda match: " " * len(match.group(0)), text)
        spots = []
        for match in pattern.finditer(text):
            start, end = match.span()
            emphasised = (text[start - 1 : start] == "*" and text[end : end + 1] == "*")
            linked = re.match(rf"\]\(glossary\.md#{re.escape(term.anchor)}\)", text[end:]) is not None \
                and text.rfind("[", 0, start) > text.rfind("]", 0, start)
            spots.append((start, emphasised or linked))
        # a link whose text is another word than the term's forms still explains it
        for match in re.finditer(rf"\[[^\]]+\]\(glossary\.md#{re.escape(term.anchor)}\)", text):
            spots.append((match.start(), True))
        for offset, explains in sorted(spots):
            place = Place(index, offset, f"{chapter.name} line {raw.count(chr(10), 0, offset) + 1}")
            if use is None:
                use = place
            if explains and explanation is None:
                explanation = place
        if use is not None and explanation is not None:
            break
    return use, explanation


def report(chapters: list[Path]) -> tuple[list[str], list[str]]:
    """(one line per term, the problems: terms used before they are explained, links to no glossary entry)."""
    lines, problems = [], []
    glossary = GLOSSARY.read_text(encoding="utf-8")
    terms = glossary_terms(glossary)
    anchors = {term.anchor for term in terms} | {slug(heading) for heading in re.findall(r"^## (.+)$", glossary, re.M)}
    for chapter in chapters:
        for anchor in re.findall(r"\]\(glossary\.md#([^)]+)\)", chapter.read_text(encoding="utf-8")):
            if anchor not in anchors:
                problems.append(f"{chapter.name} links to glossary.md#{anchor}, which is no glossary entry")
    for term in terms:
        use, explanation = first_places(term, chapters, terms)
        shown = f"{term.name:28} first used {use.where if use else '-':38} explained " \
                f"{explanation.where if explanation else '-'}"
        lines.append(shown)
        if use is not None and (explanation is None or (explanation.chapter, explanation.offset)
                                > (use.chapter, use.offset)):
            problems.append(shown)
    return lines, problems


def main() -> int:
    chapters = sorted(COURSE.glob("[0-9]*.md"))
    lines, problems = report(chapters)
    print("\n".join(lines))
    if problems:
        print(f"\n{len(problems)} problem(s): explain a term in place (bold or italics) or link it to the glossary at "
              "its first use, and link only to entries the glossary has:", file=sys.stderr)
        print("\n".join(problems), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
