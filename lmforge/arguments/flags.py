"""What every command's flags share: the parser that reports a bad argument in one line, short flags for config
keys (their choices from the config's declarations), and the checked argument types."""

from __future__ import annotations

import argparse
import math
import typing

from lmforge.config.sections import KEYS
from lmforge.infer.sampling import SamplingError, check_temperature, check_top_k, check_top_p

OVERRIDES_EPILOG = ("Any config key can be set with --section.key VALUE (or --section.key=VALUE), e.g. "
                    "--optim.lr 3e-3 --model.n_layer 4 --train.tokens_per_step 8192; see configs/*.toml for the keys.")
DEVICE_HELP = "auto (CUDA, else MPS, else CPU), cpu, cuda, cuda:1, mps"


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as every other user error: one line on stderr and exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class SetConfig(argparse.Action):
    """A short flag for one config key: stores `--section.key VALUE` in `args.config_flags` (a flag without a
    value stores `const`), so a short flag and the dotted spelling are one setting."""

    def __init__(self, option_strings, dest, key: str, **kwargs):
        self.key = key
        super().__init__(option_strings, dest=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        namespace.config_flags = {**getattr(namespace, "config_flags", {}), self.key: str(value)}


def choices_of(key: str) -> tuple[str, ...]:
    """The values a config key declares (its `Literal`), for a flag that names the same choice."""
    return KEYS[key].choices


def add_config_flag(parser: argparse.ArgumentParser, flag: str, key: str, help: str, **kwargs: typing.Any) -> None:
    """A short flag for config key `key`; a key with declared choices offers exactly those."""
    parser.add_argument(flag, action=SetConfig, key=key, choices=choices_of(key) or None, help=help, **kwargs)


def add_config_options(parser: argparse.ArgumentParser) -> None:
    """A command that takes a config: it accepts --section.key VALUE overrides, and its help says so."""
    parser.epilog = OVERRIDES_EPILOG
    parser.set_defaults(takes_overrides=True)


def add_allow_unknown(parser: argparse.ArgumentParser) -> None:
    """The one opt-in, named the same in every command that reads text for a run's model (and `allow_unknown`
    in a server request): without it, characters a char tokenizer never saw are refused by name."""
    parser.add_argument("--allow-unknown", action="store_true",
                        help="read characters outside a char tokenizer's vocabulary as the unknown token "
                             "(default: refuse them, naming them)")


def checked(kind: type, *, low: float | None = None, high: float | None = None, above: float | None = None,
            text: str) -> typing.Callable[[str], typing.Any]:
    """An argparse type: a finite `kind` within the bounds, else an error saying what is allowed (`text`)."""

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {text}, got {value!r}") from None
        if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high) \
                or (above is not None and number <= above):
            raise argparse.ArgumentTypeError(f"expected {text}, got {value}")
        return number

    return parse


def sampling_value(kind: type, check: typing.Callable[[typing.Any], typing.Any], text: str
                   ) -> typing.Callable[[str], typing.Any]:
    """An argparse type for a sampling flag: the value parsed as `kind`, then SamplingParams' own check of it
    (lmforge/infer/sampling.py), so the flags, chat's /temp and the server accept the same values."""

    def parse(value: str):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {text}, got {value!r}") from None
        try:
            return check(number)
        except SamplingError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def size_flag(most: int) -> typing.Callable[[str], int]:
    """An argparse type for a size: a positive integer up to `most`, a bound far above any real use that keeps
    a typo from running for hours or failing in the allocator."""
    return checked(int, low=1, high=most, text=f"a positive integer of at most {most:,}")


POSITIVE_INT = checked(int, low=1, text="a positive integer")
MAX_NEW_TOKENS = 1_000_000
MAX_SAMPLES = 1024  # --num-samples run as one batch: one row of KV cache each
MAX_BENCH_STEPS = 100_000
NEW_TOKENS = checked(int, low=0, high=MAX_NEW_TOKENS, text=f"an integer from 0 to {MAX_NEW_TOKENS:,}")
TEMPERATURE = sampling_value(float, check_temperature, "0 (greedy) or a positive number")
TOP_K = sampling_value(int, check_top_k, "a positive number of tokens")
PROBABILITY = sampling_value(float, check_top_p, "a probability in (0, 1]")
SEED = checked(int, low=0, high=2**64 - 1, text="an integer in [0, 2**64)")
