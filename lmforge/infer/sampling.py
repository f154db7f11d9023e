"""Sampling parameters: one typed object and its one check, for every command that samples and for the server.

`lmforge sample`, `chat` (and its `/temp`), `plot next-token`, the batched engine and the server's requests all
build a `SamplingParams` (or call its per-field checks, as the command line's argument types do), so a value is
accepted or refused the same way everywhere. The sampler (lmforge.infer.generate.sample_next) is numerically
defined for every value allowed here: it divides the logits by the temperature after subtracting their
maximum, in float64, so even a temperature of 5e-324 picks the likeliest token rather than NaN, and top-p
always keeps the likeliest token, so a top_p of 1e-300 is greedy rather than an empty set.

No torch import here: the command line checks its flags with these functions before it loads torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lmforge.errors import UserError


class SamplingError(UserError):
    """A sampling value out of range; `param` names it (temperature, top_k or top_p) for the server's 400."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def check_temperature(value: float) -> float:
    """0 (greedy) or a finite positive number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise SamplingError("temperature", f"temperature must be 0 (greedy) or a finite positive number, got {value}")
    return float(value)


def check_top_k(value: int | None) -> int | None:
    """None (no cut-off) or a positive number of tokens."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise SamplingError("top_k", f"top_k must be a positive number of tokens, got {value}")
    return value


def check_top_p(value: float | None) -> float | None:
    """None (no cut-off) or a probability in (0, 1]."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                              or not math.isfinite(value) or not 0 < value <= 1):
        raise SamplingError("top_p", f"top_p must be a probability in (0, 1], got {value}")
    return None if value is None else float(value)


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is drawn: temperature 0 is greedy; top_k and top_p (None: off) cut the distribution
    to the k likeliest tokens and to the smallest set of likeliest tokens whose probability reaches top_p."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "temperature", check_temperature(self.temperature))
        object.__setattr__(self, "top_k", check_top_k(self.top_k))
        object.__setattr__(self, "top_p", check_top_p(self.top_p))
