"""`lmforge plot next-token RUN --prompt TEXT`: the model's next-token distribution after a prompt, as bars at
temperature 0.5, 1 and 2, with the top-k and top-p (nucleus) cut-offs of sampling marked.

Temperature divides the logits before the softmax: below 1 it sharpens the distribution, above 1 it flattens it,
and it never changes the order of the tokens, so the same tokens are drawn in every panel. Top-k keeps the k
likeliest tokens; top-p keeps the smallest set of likeliest tokens whose probability reaches p (the rule of
lmforge.infer.generate.sample_next), so its size depends on the temperature. Each cut-off is marked on its own,
as `lmforge sample --top-k` or `--top-p` would apply it alone. An encoder-decoder's next token is the first one its
decoder writes from the prompt as its source (its reserved ids, never drawn, at probability 0).
"""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.data.tokenizer import Tokenizer
from lmforge.infer.generate import check_generates, without_reserved
from lmforge.infer.load import load_run
from lmforge.infer.sampling import SamplingParams
from lmforge.lab.learn import check_png_out, write_png
from lmforge.model.seq2seq import EncoderDecoder
from lmforge.model.spans import start_token
from lmforge.plots import new_figure

TEMPERATURES = (0.5, 1.0, 2.0)
SHOWN = 20


def prompt_ids(tokenizer: Tokenizer, prompt: str, allow_unknown: bool = False) -> list[int]:
    """The prompt's token ids (the end-of-text id for an empty prompt, as `lmforge sample` does). Characters a
    char tokenizer never saw are refused by name unless `allow_unknown` reads them as its unknown id."""
    tokenizer.check_known(prompt, what="--prompt", allow_unknown=allow_unknown)
    return tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]


@torch.no_grad()
def next_token_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits (vocab,) for the token after `ids` (its last block_size tokens: the model's context)."""
    window = ids[-model.config.block_size:]
    if isinstance(model, EncoderDecoder):
        start = torch.tensor([[start_token(model.config)]])
        return without_reserved(model, model((torch.tensor([window]), start))[0][0, -1]).float()
    logits, _ = model(torch.tensor([window]))
    return logits[0, -1].float()


def nucleus(probabilities: torch.Tensor, top_p: float) -> torch.Tensor:
    """True for the tokens top-p sampling keeps: the likeliest ones, until their sum reaches top_p (a token is
    kept if the tokens likelier than it sum to less than top_p)."""
    ordered, order = probabilities.sort(descending=True)
    kept_in_order = ordered.cumsum(0) - ordered < top_p
    return torch.zeros_like(kept_in_order).scatter(0, order, kept_in_order)


def token_label(tokenizer: Tokenizer, token: int) -> str:
    if token == tokenizer.eot_id:
        return "<eot>"
    text = tokenizer.decode([token])
    return text.replace(" ", "␣").replace("\n", "↵").replace("\t", "⇥") or "∅"


def plot_next_token(run: str | Path, out: str | Path, *, prompt: str, top_k: int = 10, top_p: float = 0.9,
                    allow_unknown: bool = False, overwrite: bool = False) -> Path:
    """Write the PNG (one panel per temperature) of the run's next-token distribution after `prompt`."""
    out = check_png_out(out, overwrite, inputs=(run,))
    SamplingParams(top_k=top_k, top_p=top_p)  # the cut-offs marked are ones `lmforge sample` accepts
    loaded = load_run(run)
    check_generates(loaded.config.model, from_source=True)
    model, tokenizer = loaded.model, loaded.tokenizer
    ids = prompt_ids(tokenizer, prompt, allow_unknown)
    logits = next_token_logits(model, ids)
    shown = logits.topk(min(SHOWN, logits.numel())).indices  # the same tokens at every temperature
    labels = [token_label(tokenizer, int(token)) for token in shown]

    # One probability scale for all panels, so that sharpening and flattening show as heights.
    tallest = max(float((logits / t).softmax(-1).max()) for t in TEMPERATURES)
    figure = new_figure(11, 9)
    figure.suptitle(f"{Path(run).name}: the next token after {prompt[-60:]!r} "
                    f"(the {len(shown)} likeliest of {logits.numel()})")
    for axes, temperature in zip(figure.subplots(len(TEMPERATURES), 1, sharex=True), TEMPERATURES, strict=True):
        probabilities = (logits / temperature).softmax(-1)
        kept = nucleus(probabilities, top_p)
        heights = probabilities[shown].numpy()
        colors = ["tab:blue" if kept[token] else "lightgray" for token in shown]
        axes.bar(range(len(shown)), heights, color=colors)
        if top_k < len(shown):
            axes.axvline(top_k - 0.5, color="tab:red", linestyle="--", label=f"top-k = {top_k}: bars left of the line")
        axes.bar([0], [0], color="tab:blue", label=f"top-p = {top_p}: blue bars ({int(kept.sum())} tokens kept)")
        axes.set_title(f"temperature {temperature:g}: softmax(logits / {temperature:g}); the likeliest token has "
                       f"p = {heights[0]:.2f}, these {len(shown)} sum to {heights.sum():.2f}", fontsize=10)
        axes.set_ylabel("probability")
        axes.set_ylim(0, min(1.0, 1.15 * tallest))
        axes.grid(axis="y", alpha=0.3)
        axes.legend(loc="upper right", fontsize=9)
    axes.set_xticks(range(len(shown)), labels, fontsize=11)
    axes.set_xlabel("next token (␣ space, ↵ newline)")
    return write_png(figure, out)
