"""Config: TOML presets load, dotted overrides win and are type-checked, unknown keys name the closest."""

from pathlib import Path

import pytest

from lmforge.config import Config, dumps_config, from_dict, load_config, parse_overrides
from lmforge.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_preset_loads_and_round_trips(path):
    config = load_config(path)
    assert from_dict(__import__("tomllib").loads(dumps_config(config))) == config


def test_overrides_win_over_file_and_are_typed(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = 1e-3\n[model]\nn_layer = 2\n")
    config = load_config(path, parse_overrides(["--optim.lr", "3e-3", "--model.n_layer=4", "--model.bias", "false"]))
    assert config.optim.lr == 3e-3 and config.model.n_layer == 4 and config.model.bias is False
    assert isinstance(config.model.n_layer, int)


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(UserError, match="did you mean 'optim.lr'"):
        load_config(None, {"optim.lrr": "1"})
    with pytest.raises(UserError, match="did you mean 'model.n_layer'"):
        load_config(None, {"model.nlayer": "1"})


def test_wrong_type_is_a_user_error():
    with pytest.raises(UserError, match="expects int"):
        load_config(None, {"model.n_layer": "four"})
    with pytest.raises(UserError, match="expects int"):
        load_config(None, {"model.n_layer": "2.5"})


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "missing.toml")


def test_defaults_are_consistent():
    config = Config()
    assert config.model.n_embd % config.model.n_head == 0
