"""The README and the manual (docs/*.md) stay true to the code: every `lmforge` command line in their fenced
blocks parses with the real parser (its `--section.key` overrides naming real config keys), every `make`
target they run exists, every relative link and #anchor points at something that exists, and the README stays
an entry page. docs/learn/ is left to tests/test_learn.py, which runs its commands.

A command line that must not be checked says so where the reader sees it, with a reason in parentheses:
`# docs: refused (why)` for a line shown failing (the test then asserts that the parser or the config refuses
it), `# docs: not-checked (why)` for one that cannot be checked here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from lmforge.cli import build_parser
from lmforge.config.load import parse_overrides, set_value
from lmforge.config.sections import Config
from lmforge.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MOST_LINES = 220
# Pages the README links to before they exist, each with why; an entry whose page has appeared must go.
MARKER = re.compile(r"#\s*docs:\s*(?P<kind>[\w-]+)\s*(?:\((?P<reason>[^)]*)\))?")
MARKER_KINDS = ("refused", "not-checked")
LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")
FENCE = re.compile(r"^\s*```")
SHELL_SEPARATORS = {"&&", "||", "|", ";"}


@dataclass(frozen=True)
class DocCommand:
    where: str  # FILE:LINE, for the test's id and its failure message
    args: tuple[str, ...]  # the arguments after `lmforge`
    marker: str | None  # "refused", "not-checked" or None


def relative(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(path: Path) -> list[tuple[int, list[str]]]:
    """Each fenced block of a Markdown file: the line number of its first line, and its lines."""
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] | None = None
    start = 0
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if FENCE.match(line):
            if current is None:
                current, start = [], number + 1
            else:
                blocks.append((start, current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def prose(markdown: str) -> str:
    """Markdown text without its fenced blocks (code there is not a link)."""
    text, inside = [], False
    for line in markdown.splitlines():
        if FENCE.match(line):
            inside = not inside
        elif not inside:
            text.append(line)
    return "\n".join(text)


def logical_lines(start: int, lines: list[str]) -> list[tuple[int, str]]:
    """A block's shell lines with backslash continuations joined; in a console block (lines starting with
    `$ `), only the typed lines, without the prompt."""
    if any(line.startswith("$ ") for line in lines):
        return [(start + i, line[2:]) for i, line in enumerate(lines) if line.startswith("$ ")]
    joined: list[tuple[int, str]] = []
    pending, first = "", 0
    for i, line in enumerate(lines):
        if not pending:
            first = start + i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            joined.append((first, pending + line))
            pending = ""
    return joined


def lmforge_arguments(tokens: list[str]) -> list[str] | None:
    """The arguments of an lmforge invocation in one simple shell command (`lmforge ...`, `.venv/bin/lmforge
    ...`, `python -m lmforge ...`, `torchrun ... -m lmforge ...`), or None if it runs something else."""
    if tokens and (tokens[0] == "lmforge" or tokens[0].endswith("/lmforge")):
        return tokens[1:]
    for i in range(len(tokens) - 1):
        if tokens[i] == "-m" and tokens[i + 1] == "lmforge":
            return tokens[i + 2:]
    return None


def doc_commands() -> tuple[list[DocCommand], list[str]]:
    """Every lmforge command line in the docs' fenced blocks, and the problems with their markers."""
    commands, problems = [], []
    for path in DOCS:
        for start, lines in fenced_blocks(path):
            for number, line in logical_lines(start, lines):
                where = f"{relative(path)}:{number}"
                marker = MARKER.search(line)
                kind = None
                if marker:
                    kind = marker["kind"]
                    if kind not in MARKER_KINDS or not (marker["reason"] or "").strip():
                        problems.append(f"{where}: a docs marker is '# docs: {'|'.join(MARKER_KINDS)} (reason)', "
                                        f"got {marker.group(0)!r}")
                tokens = shlex.split(line, comments=True)
                segment: list[str] = []
                for token in [*tokens, ";"]:
                    if token not in SHELL_SEPARATORS:
                        segment.append(token)
                        continue
                    arguments = lmforge_arguments(segment)
                    if arguments is not None:
                        commands.append(DocCommand(where, tuple(arguments), kind))
                    segment = []
    return commands, problems


def shell_lines() -> list[tuple[str, list[str]]]:
    """(FILE:LINE, words) for every shell line in the docs' fenced blocks."""
    return [(f"{relative(path)}:{number}", shlex.split(line, comments=True))
            for path in DOCS for start, lines in fenced_blocks(path) for number, line in logical_lines(start, lines)]


def make_commands() -> list[tuple[str, str]]:
    """(FILE:LINE, target) for every `make TARGET` in the docs' fenced blocks."""
    return [(where, word) for where, words in shell_lines() if words[:1] == ["make"]
            for word in words[1:] if "=" not in word]


def parse_problem(arguments: tuple[str, ...]) -> str | None:
    """Why the CLI would refuse these arguments before doing any work, or None. As `lmforge.cli.main` does: the
    parser, then the extra `--section.key value` flags of the commands that take them, each a real config key."""
    parser = build_parser()
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            namespace, extra = parser.parse_known_args(list(arguments))
    except SystemExit:
        return errors.getvalue().strip() or "the parser exited"
    if extra and not getattr(namespace, "takes_overrides", False):
        return f"unrecognized arguments: {' '.join(extra)}"
    try:  # each key must exist and each value be one it takes (set_value checks both, as loading a config does)
        overrides = {**parse_overrides(extra), **getattr(namespace, "config_flags", {})}
        for key, value in overrides.items():
            set_value(Config(), key, value)
    except UserError as err:
        return str(err)
    for argument in arguments:  # a preset the docs name must exist
        if argument.startswith("configs/") and not (ROOT / argument).is_file():
            return f"no preset {argument}"
    return None


COMMANDS, MARKER_PROBLEMS = doc_commands()


def test_markers_are_well_formed():
    assert not MARKER_PROBLEMS, "\n".join(MARKER_PROBLEMS)


def test_the_docs_hold_commands():
    """The extraction finds the commands (a change of fence or prompt style cannot silently skip them all)."""
    assert len(COMMANDS) >= 30, [c.where for c in COMMANDS]
    assert any(c.where.startswith("README.md:") for c in COMMANDS)


def test_every_command_has_an_example():
    """Each subcommand of the parser appears in at least one checked command line of the docs."""
    parser = build_parser()
    subcommands = next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    documented = {c.args[0] for c in COMMANDS if c.args and c.marker is None}
    assert sorted(set(subcommands) - documented) == []


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.marker != "not-checked"], ids=lambda c: c.where)
def test_command_parses(command: DocCommand):
    problem = parse_problem(command.args)
    if command.marker == "refused":
        assert problem is not None, f"{command.where} is marked refused but parses: lmforge {' '.join(command.args)}"
    else:
        assert problem is None, f"{command.where}: lmforge {' '.join(command.args)}\n{problem}"


def test_refused_commands_are_told_apart():
    """The check can fail: a misspelt key, an unknown flag and a missing argument are all caught."""
    assert "optim.lr" in parse_problem(("train", "--data", "D", "--out", "R", "--optim.lrr", "3e-3"))
    assert parse_problem(("sample", "RUN", "--tempreature", "0.5")) is not None
    assert parse_problem(("import", "gpt2")) is not None  # --out is required
    assert parse_problem(("train", "--config", "configs/no-such-preset.toml", "--data", "D", "--out", "R"))
    assert parse_problem(("sample", "RUN", "--temperature", "0.5")) is None


def test_make_targets_exist():
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    missing = [f"{where}: make {target}" for where, target in make_commands()
               if not re.search(rf"^{re.escape(target)}\s*:", makefile, re.MULTILINE)]
    assert make_commands() and not missing, missing


def test_scripts_exist():
    """`python SCRIPT.py ...` lines in the docs name scripts of the repository."""
    scripts = [(where, words[1]) for where, words in shell_lines()
               if words[:1] in (["python"], ["python3"]) and len(words) > 1 and words[1].endswith(".py")]
    missing = [f"{where}: {script}" for where, script in scripts if not (ROOT / script).is_file()]
    assert scripts and not missing, missing


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces as hyphens."""
    found = set()
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        if heading:
            text = re.sub(r"[^\w\- ]", "", heading[1].strip().lower())
            found.add(text.replace(" ", "-"))
    return found


def broken_links(path: Path, text: str | None = None) -> list[str]:
    """The relative links of a Markdown file (or of `text`, read as if it were that file) that lead nowhere."""
    broken = []
    markdown = path.read_text(encoding="utf-8") if text is None else text
    for match in LINK.finditer(prose(markdown)):
        target = match["target"]
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (path.parent / file_part).resolve() if file_part else path
        if not destination.exists():
            broken.append(f"{relative(path)}: {target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in anchors(destination):
            broken.append(f"{relative(path)}: {target} (no such heading)")
    return broken


@pytest.mark.parametrize("path", DOCS, ids=relative)
def test_relative_links_resolve(path: Path):
    assert broken_links(path) == []


def test_a_broken_link_is_found():
    """The link check can fail: a missing file and a missing heading are reported, a good link is not."""
    assert "the-demo-measured" in anchors(ROOT / "docs" / "train.md")
    text = ("[a](docs/nowhere.md) [b](docs/train.md#no-such-heading) [c](docs/train.md#the-demo-measured) "
            "[d](https://example.com/x.md)\n```\n[e](inside/a/code/block.md)\n```\n")
    assert [problem.split(" (")[1] for problem in broken_links(ROOT / "README.md", text)] == [
        "no such file)", "no such heading)"]


def test_readme_is_an_entry_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MOST_LINES, f"README.md has {len(lines)} lines; the manual's place is docs/"
