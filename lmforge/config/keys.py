"""How one config key is declared and parsed: its type, its choices (a `Literal`) or its range (`number(...)`),
and `parse_value`, which turns a TOML, command-line (text) or Python value into that type or a one-line
UserError naming the key, the value and what is allowed. The sections that declare the keys are in
lmforge/config/sections.py.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from lmforge.errors import UserError

AUTO = "auto"  # how a key whose value is None ("decide for me") is spelled in TOML and on the command line
INT64_MAX = 2**63 - 1  # every int key ends up in a torch or NumPy int64 (the seed alone is a uint64)
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Range:
    """The values a numeric key allows: `at_least`/`at_most` are inclusive bounds, `above`/`below` exclusive."""

    at_least: float | None = None
    at_most: float | None = None
    above: float | None = None
    below: float | None = None

    def allows(self, value: float) -> bool:
        return ((self.at_least is None or value >= self.at_least) and (self.at_most is None or value <= self.at_most)
                and (self.above is None or value > self.above) and (self.below is None or value < self.below))

    def describe(self) -> str:
        low = f"[{self.at_least}" if self.at_least is not None else f"({self.above}" if self.above is not None else ""
        high = f"{self.at_most}]" if self.at_most is not None else f"{self.below})" if self.below is not None else ""
        if low and high:
            return f"in {low}, {high}"
        if self.above == 0 and not high:
            return "positive"
        if self.at_least is not None:
            return f"{self.at_least} or more"
        if self.above is not None:
            return f"above {self.above}"
        return f"at most {self.at_most}" if self.at_most is not None else f"below {self.below}"


def number(default: float, *, at_least: float | None = None, at_most: float | None = None,
           above: float | None = None, below: float | None = None) -> Any:
    """A numeric key's default and its declared range (a dataclass field)."""
    return field(default=default, metadata={"range": Range(at_least, at_most, above, below)})


@dataclass(frozen=True)
class Key:
    """One config key as declared: its dotted name, its type, and the choices or range it allows."""

    name: str
    kind: type  # bool, int, float, str (free text when it has no choices) or list (of names)
    choices: tuple[str, ...] = ()  # a str key's allowed values
    optional: bool = False  # None allowed, spelled AUTO
    range: Range | None = None

    def allowed(self) -> str:
        if self.choices:
            named = [choice for choice in self.choices if choice]
            listed = ", ".join(named[:-1]) + " or " + named[-1] if len(named) > 1 else named[0]
            return listed + (' (or "" for the default)' if "" in self.choices else "")
        if self.kind is bool:
            return f"{AUTO}, true or false" if self.optional else "true or false"
        if self.kind is list:
            return "a list of names, or one text of names separated by commas"
        if self.kind is str:
            return "any text"
        return self.range.describe() if self.range else "any value"


def declared_keys(name: str, section: type) -> dict[str, Key]:
    hints = typing.get_type_hints(section)
    keys = {}
    for item in dataclasses.fields(section):
        hint, optional = hints[item.name], False
        if isinstance(hint, types.UnionType):  # `X | None`
            (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
            optional = True
        choices = typing.get_args(hint) if typing.get_origin(hint) is Literal else ()
        hint = list if typing.get_origin(hint) is list else hint
        dotted = f"{name}.{item.name}"
        keys[dotted] = Key(dotted, str if choices else hint, choices, optional, item.metadata.get("range"))
    return keys


def _wrong_type(key: Key, value: Any, what: str) -> UserError:
    return UserError(f"{key.name} expects {what} ({key.allowed()}), got {value!r}")


def _parse_int(key: Key, value: Any) -> int:
    """A whole number in any spelling (4, 4.0, "4", "4e0", "1_000"); a fraction is refused, never truncated."""
    if isinstance(value, numbers.Integral):  # Python's or NumPy's
        return int(value)
    if isinstance(value, numbers.Real):
        if math.isfinite(value) and float(value).is_integer():
            return int(value)
        raise _wrong_type(key, value, "int")
    try:
        return int(value)
    except ValueError:
        pass
    try:
        exact = Decimal(value.strip().replace("_", ""))
    except InvalidOperation:
        raise _wrong_type(key, value, "int") from None
    # adjusted() < 40: int() of 1e999999999 would build a billion-digit number before the range check
    if exact.is_finite() and exact.adjusted() < 40 and exact == exact.to_integral_value():
        return int(exact)
    raise _wrong_type(key, value, "int")


def _parse_float(key: Key, value: Any) -> float:
    try:
        parsed = float(value)  # int, float, or text such as "3e-4"
    except (ValueError, OverflowError):
        raise _wrong_type(key, value, "a finite float") from None
    if not math.isfinite(parsed):
        raise _wrong_type(key, value, "a finite float")
    return parsed


def _parse_bool(key: Key, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    raise UserError(f"{key.name} expects {key.allowed()}, got {value!r}")


def parse_value(key: Key, value: Any) -> Any:
    """A TOML, command-line (text) or Python value as the key's type, checked against its choices or range."""
    if key.optional and (value is None or (isinstance(value, str) and value.strip().lower() == AUTO)):
        return None
    if key.choices:
        if isinstance(value, str) and value in key.choices:
            return value
        raise UserError(f"unknown {key.name} {value!r}; choose {key.allowed()}")
    if key.kind is bool:
        return _parse_bool(key, value)
    if key.kind is list:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list | tuple) and all(isinstance(part, str) for part in value):
            return list(value)
        raise _wrong_type(key, value, "a list of names")
    if key.kind is str:
        if isinstance(value, str):
            return value
        raise _wrong_type(key, value, "text")
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):  # True is an int to Python, not here
        raise _wrong_type(key, value, key.kind.__name__)
    parsed = _parse_int(key, value) if key.kind is int else _parse_float(key, value)
    if key.range and not key.range.allows(parsed):
        raise UserError(f"{key.name} must be {key.range.describe()}, got {parsed}")
    if key.kind is int and key.range and key.range.at_most is None and parsed > INT64_MAX:
        raise UserError(f"{key.name} must be at most 2**63 - 1 (a 64-bit integer), got {parsed}")
    return parsed
