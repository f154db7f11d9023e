"""Making a config: from a TOML file, a dict or dotted `--section.key value` overrides, every value and every rule
between keys checked (an unknown key names the closest valid one in any section), and writing it back as TOML
that loads equal.
"""

from __future__ import annotations

import difflib
import sys
from pathlib import Path
from typing import Any

import tomli_w

from lmforge.config.keys import AUTO, parse_value
from lmforge.config.sections import ALIASES, KEYS, SECTIONS, Config, check_config
from lmforge.errors import UserError
from lmforge.inputs import refuse_special_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _unknown(dotted: str) -> UserError:
    """Name the closest key in any section: `train.n_layer` is most likely `model.n_layer`."""
    section, _, name = dotted.rpartition(".")

    def likeness(candidate: str) -> float:
        their_section, their_name = candidate.split(".")
        return (difflib.SequenceMatcher(None, name, their_name).ratio()
                + 0.5 * difflib.SequenceMatcher(None, section, their_section).ratio())

    best = max(KEYS, key=likeness)
    if difflib.SequenceMatcher(None, name, best.split(".")[1]).ratio() >= 0.6:
        hint = f"; did you mean '{best}'?"
    else:
        hint = f"; valid sections: {', '.join(SECTIONS)}"
    return UserError(f"unknown config key '{dotted}'{hint}")


def canonical_key(dotted: str) -> str:
    """The declared name of a key given in any spelling (`lora.rank` is `finetune.lora_rank`)."""
    section, _, name = dotted.partition(".")
    return ALIASES[section] + name if section in ALIASES and name else dotted


def set_value(config: Config, dotted: str, value: Any) -> None:
    """Set `section.key` on a config, checking the value's type and range; an unknown key names the closest.
    Setting a key of an absent optional section ([finetune]) adds that section with its defaults."""
    dotted = canonical_key(dotted)
    if dotted not in KEYS:
        raise _unknown(dotted)
    section, name = dotted.split(".")
    parsed = parse_value(KEYS[dotted], value)
    if getattr(config, section) is None:
        setattr(config, section, SECTIONS[section]())
    setattr(getattr(config, section), name, parsed)


def _set_all(config: Config, data: dict[str, Any]) -> None:
    for section, values in data.items():
        if not isinstance(values, dict):
            if section in SECTIONS:
                raise UserError(f"config section '{section}' must be a table ([{section}]), got {values!r}")
            raise _unknown(section)
        for key, value in values.items():
            set_value(config, f"{section}.{key}", value)


def from_dict(data: dict[str, Any]) -> Config:
    """A config from parsed TOML: {section: {key: value}} over the defaults, every value and rule checked."""
    config = Config()
    _set_all(config, data)
    check_config(config)
    return config


def _read_text(path: Path) -> str:
    refuse_special_file(path, "config file")
    if path.is_dir():
        raise UserError(f"config path {path} is a directory; pass a TOML file such as configs/gpt.toml")
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"config file {path} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                        f"{err.start}); save it as UTF-8") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None


def load_config(path: str | Path | None, overrides: dict[str, str] | None = None) -> Config:
    """Defaults, then the TOML file (if any), then `section.key` overrides; every value and rule checked."""
    config = Config()
    if path is not None:
        path = Path(path)
        try:
            data = tomllib.loads(_read_text(path))
        except tomllib.TOMLDecodeError as err:
            raise UserError(f"config file {path} is not valid TOML: {err}") from None
        _set_all(config, data)  # the rules between keys are checked once the overrides are in too
    for dotted, value in (overrides or {}).items():
        set_value(config, dotted, value)
    check_config(config)
    return config


def dumps_config(config: Config) -> str:
    """The config as TOML; `load_config` reads it back equal. TOML has no null: None is written as AUTO."""
    data = config.to_dict()
    for dotted, key in KEYS.items():
        section, name = dotted.split(".")
        if section in data and key.optional and data[section][name] is None:
            data[section][name] = AUTO
    return tomli_w.dumps(data)


def parse_overrides(args: list[str]) -> dict[str, str]:
    """Turn ['--optim.lr', '3e-3', '--model.n_layer=4'] into {'optim.lr': '3e-3', 'model.n_layer': '4'}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise UserError(f"unexpected argument '{arg}' (config overrides look like --section.key value)")
        name = arg[2:]
        if "=" in name:
            name, value = name.split("=", 1)
        elif i + 1 < len(args):
            i += 1
            value = args[i]
        else:
            raise UserError(f"option '{arg}' needs a value")
        if "." not in name:
            raise UserError(f"unknown option '{arg}'")
        overrides[name] = value
        i += 1
    return overrides
