"""The three transformer families side by side, for the learner's course (docs/learn/11-bert-gpt-t5.md): what each
position of a GPT-style decoder, a BERT-style encoder and a T5-style encoder-decoder can see, measured on the
models themselves, and the picture of it.

What a position can see is measured, not read from a flag: change one input token at a time and record which
outputs move. In a model of one layer that is exactly the mask its attention applies, since everything else in a
block works on each position alone; with more layers it is what the masks let through together, which for these
masks has the same shape. Everything here is a seeded tiny model on a CPU, so the course's printed maps are exact.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lmforge.config.sections import ModelConfig
from lmforge.lab.learn import check_png_out, write_png
from lmforge.model.factory import build_model
from lmforge.model.spans import corrupt_spans, first_sentinel, reserved_ids, start_token
from lmforge.plots import new_figure

SEEN, HIDDEN = "■", "·"


def tiny_model(arch: str, vocab_size: int, block_size: int, seed: int = 0) -> nn.Module:
    """A seeded one-layer model of `arch`, two heads of 8, in eval mode (no dropout): big enough to have a mask."""
    torch.manual_seed(seed)
    config = ModelConfig(arch=arch, vocab_size=vocab_size, block_size=block_size, n_layer=1, n_head=2, n_embd=16,
                         dropout=0.0)
    return build_model(config).eval()


@torch.no_grad()
def what_changes(outputs_of: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
                 change: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """(output positions, input positions), True where changing that one input changed that output: the inputs
    (1, T, ...) as they are, then `change(inputs, position)` for each position in turn."""
    before = outputs_of(inputs)[0]
    changed = torch.zeros(before.size(0), inputs.size(1), dtype=torch.bool)
    for position in range(inputs.size(1)):
        changed[:, position] = (outputs_of(change(inputs, position))[0] != before).any(-1)
    return changed


def another_token(vocab_size: int) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """A change for token ids (1, T): the position's token becomes the next id (mod vocab_size)."""
    def change(ids: torch.Tensor, position: int) -> torch.Tensor:
        other = ids.clone()
        other[:, position] = (other[:, position] + 1) % vocab_size
        return other
    return change


def another_state(states: torch.Tensor, position: int) -> torch.Tensor:
    """A change for states (1, T, C): 1 added to every number of the position's vector."""
    other = states.clone()
    other[:, position] += 1.0
    return other


@dataclass
class Visibility:
    """One attention's measured mask: rows are the outputs (queries), columns the inputs (keys) they can see."""

    title: str
    seen: torch.Tensor  # (rows, columns) bool
    rows: list[str]  # a label per output position
    columns: list[str]

    def text(self) -> str:
        """The mask as lines of ■ (seen) and · (hidden), one line per output position."""
        return "\n".join("".join(SEEN if cell else HIDDEN for cell in row) for row in self.seen.tolist())


def line_vocabulary(text: str) -> list[str]:
    """The text's characters, sorted: a character-level vocabulary of one line, ids 0 .. len - 1."""
    return sorted(set(text))


def family_masks(text: str, span_seed: int = 0) -> list[Visibility]:
    """The measured masks of the three families on `text` (characters): the decoder's and the encoder's
    self-attention, and the encoder-decoder's three (its encoder's, its decoder's, and the cross-attention from
    the target to the encoder's states of the source), the encoder-decoder reading `text` span-corrupted by a
    generator seeded with `span_seed`."""
    characters = line_vocabulary(text)
    ids = torch.tensor([[characters.index(character) for character in text]])
    size, length = len(characters), len(text)
    labels, change = list(text), another_token(len(characters))
    masks = []
    for arch, title in (("gpt", "GPT (decoder): causal"), ("encoder", "BERT (encoder): full")):
        model = tiny_model(arch, size + 1, length)  # + the encoder's mask id (the decoder has one unused)
        masks.append(Visibility(title, what_changes(lambda idx, model=model: model(idx)[0], ids, change), labels,
                                labels))

    config = ModelConfig(arch="encoder-decoder", vocab_size=size + reserved_ids(length), block_size=length)
    (source, decoder_input), _ = corrupt_spans(ids, config, torch.Generator().manual_seed(span_seed))
    model = tiny_model("encoder-decoder", config.vocab_size, length)
    names = span_token_names(characters, config)
    source_labels = [names[i] for i in source[0].tolist()]
    target_labels = [names[i] for i in decoder_input[0].tolist()]
    masks.append(Visibility("T5 encoder: full", what_changes(model.encode, source, change), source_labels,
                            source_labels))
    masks.append(Visibility("T5 decoder: causal", what_changes(lambda idx: model((source, idx))[0], decoder_input,
                                                               change), target_labels, target_labels))

    # The cross-attention's own mask: change one of the encoder's final states, not a source token (which reaches
    # every state through the encoder's full attention). A forward hook swaps the states the decoder reads.
    def decoder_reading(states: torch.Tensor) -> torch.Tensor:
        hook = model.norm_encoder.register_forward_hook(lambda module, args, output: states)
        try:
            return model((source, decoder_input))[0]
        finally:
            hook.remove()

    masks.append(Visibility("T5 cross-attention: target → source states, full",
                            what_changes(decoder_reading, model.encode(source), another_state), target_labels,
                            source_labels))
    return masks


def span_token_names(characters: list[str], config: ModelConfig) -> dict[int, str]:
    """Every id of an encoder-decoder over `characters` as shown: the character, a sentinel <0>, <1>, ..., or
    the decoder's start token <s>."""
    names = dict(enumerate(characters))
    first = first_sentinel(config)
    names.update({first + span: f"<{span}>" for span in range(start_token(config) - first)})
    names[start_token(config)] = "<s>"
    return names


def plot_family_masks(out: str | Path, text: str, span_seed: int = 0, overwrite: bool = False) -> Path:
    """The five measured masks of `family_masks` side by side: dark where an output position sees an input."""
    out = check_png_out(out, overwrite)
    masks = family_masks(text, span_seed)
    figure = new_figure(13, 13)
    top, bottom = figure.subfigures(2, 1, height_ratios=[1, 1.1])
    top.suptitle("One stack of blocks: the decoder and the encoder", fontsize=11)
    bottom.suptitle("Two stacks joined by cross-attention: the encoder-decoder", fontsize=11)
    rows = ((top, masks[:2]), (bottom, masks[2:]))
    for subfigure, shown in rows:
        panels = subfigure.subplots(1, len(shown), width_ratios=[mask.seen.size(1) for mask in shown])
        for axes, mask in zip(panels, shown, strict=True):
            axes.imshow(mask.seen.float().numpy(), cmap="Greys", vmin=0, vmax=1.25)
            axes.set_title(mask.title, fontsize=10)
            axes.set_xticks(range(len(mask.columns)), [label.replace(" ", "␣") for label in mask.columns],
                            fontsize=7)
            axes.set_yticks(range(len(mask.rows)), [label.replace(" ", "␣") for label in mask.rows], fontsize=7)
            axes.set_xlabel("input position (key)", fontsize=9)
        panels[0].set_ylabel("output position (query)", fontsize=9)
    figure.suptitle("What each position can see, measured on one-layer models: dark where changing that input "
                    "token changes that output", fontsize=12)
    return write_png(figure, out)
