"""Config: TOML presets load and round-trip, dotted overrides win, every key's type and range is checked where
the config is made, unknown keys name the closest key in any section."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from lmforge.config.load import dumps_config, from_dict, load_config, parse_overrides, set_value
from lmforge.config.sections import KEYS, Config, ModelConfig, TrainConfig, check_config
from lmforge.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def refused(fragment: str, make) -> str:
    """The one-line message of the UserError `make()` raises; it must contain `fragment`."""
    with pytest.raises(UserError) as caught:
        make()
    message = str(caught.value)
    assert fragment in message and "\n" not in message, message
    return message


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


# ----- loading, overriding, saving -----


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.name)
def test_every_preset_loads_and_round_trips(path, tmp_path):
    config = load_config(path)
    assert config != Config()  # the preset changed something
    assert from_dict(config.to_dict()) == config
    saved = tmp_path / "config.toml"
    saved.write_text(dumps_config(config))
    assert load_config(saved) == config


@pytest.mark.parametrize("compile_setting", [None, True, False])
def test_compile_auto_round_trips_through_toml(compile_setting, tmp_path):
    config = Config(train=TrainConfig(compile=compile_setting))
    text = dumps_config(config)
    assert ('compile = "auto"' in text) == (compile_setting is None)  # TOML has no null
    assert load_config(write(tmp_path, text)) == config


@pytest.mark.parametrize(("written", "loaded"), [('"auto"', None), ('"true"', True), ('"false"', False),
                                                 ("true", True), ("false", False)])
def test_compile_as_older_runs_saved_it_still_loads(written, loaded, tmp_path):
    assert load_config(write(tmp_path, f"[train]\ncompile = {written}\n")).train.compile is loaded


def test_overrides_win_over_file_and_are_typed(tmp_path):
    path = write(tmp_path, "[optim]\nlr = 1e-3\n[model]\nn_layer = 2\n")
    config = load_config(path, parse_overrides(["--optim.lr", "3e-3", "--model.n_layer=4", "--model.bias", "false",
                                                "--train.compile", "auto", "--train.tokens_per_step", "5e5"]))
    assert config.optim.lr == 3e-3 and config.model.n_layer == 4 and config.model.bias is False
    assert config.train.compile is None and config.train.tokens_per_step == 500_000
    assert type(config.model.n_layer) is int and type(config.train.tokens_per_step) is int


# ----- bad values: one line naming the key -----

BAD_VALUES = [  # (key, command-line value, what the message says beyond the key)
    ("optim.lr", "-1", "0 or more"),
    ("optim.beta1", "1.5", "in [0, 1)"),
    ("optim.beta2", "1", "in [0, 1)"),
    ("optim.eps", "0", "positive"),
    ("optim.weight_decay", "-1", "0 or more"),
    ("optim.muon_momentum", "-0.1", "in [0, 1)"),
    ("optim.name", "sgd", "choose adamw or muon"),
    ("model.mlp_hidden", "-1", "in [0, 262144]"),
    ("model.n_layer", "0", "in (0, 1024]"),
    ("model.n_embd", "-8", "in (0, 65536]"),
    ("model.n_kv_head", "-1", "in [0, 1024]"),
    ("model.dropout", "1", "in [0, 1)"),
    ("model.init_std", "0", "positive"),
    ("model.rope_theta", "-10", "positive"),
    ("model.norm_eps", "-1e-5", "0 or more"),
    ("model.arch", "transformer", "choose gpt, bigram, mlp, rnn, lstm, gru, encoder or encoder-decoder"),
    ("model.mlp", "geglu", "unknown model.mlp 'geglu'"),
    ("model.activation", "swish", "choose tanh, relu, gelu or sigmoid (or \"\" for the default)"),
    ("model.vocab_size", str(2**63), "in [0, 1048576]"),
    ("train.seed", str(2**64), "in [0, 18446744073709551615]"),
    ("train.seed", "-1", "in [0, 18446744073709551615]"),
    ("train.batch_size", "0", "in (0, 65536]"),
    ("train.warmup_steps", "-5", "0 or more"),
    ("train.max_time", "-5", "0 or more"),
    ("train.max_epochs", "-1", "0 or more"),
    ("train.min_lr_ratio", "1.5", "in [0, 1]"),
    ("train.cooldown_fraction", "-0.5", "in [0, 1]"),
    ("train.keep_last", "0", "positive"),
    ("train.dist_timeout", "0", "positive"),
    ("train.parallel", "zero", "unknown train.parallel 'zero'; choose ddp or fsdp"),
    ("train.engine", "jax", "choose torch or scratch"),
    ("train.device", "tpu", "choose auto, cpu, cuda or mps"),
    ("train.precision", "fp8", "choose auto, fp32, bf16 or fp16"),
    ("train.schedule", "step", "choose cosine, linear, constant or wsd"),
    ("train.compile", "maybe", "expects auto, true or false"),
    ("train.tensorboard", "2", "expects true or false"),
    ("model.n_layer", "four", "expects int"),
    ("model.n_layer", "2.5", "expects int"),
    ("train.max_steps", "1e400", "expects int"),
    ("optim.lr", "fast", "expects a finite float"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), BAD_VALUES, ids=[f"{k}={v}" for k, v, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_naming_the_key_and_what_is_allowed(key, value, fragment):
    message = refused(fragment, lambda: load_config(None, {key: value}))
    assert key in message


def test_every_key_declares_what_it_allows():
    for key in KEYS.values():
        assert key.choices or key.kind in (bool, str, list) or key.range is not None, key.name


def value_of(config: Config, dotted: str):
    section, name = dotted.split(".")
    return getattr(getattr(config, section), name)


@pytest.mark.parametrize("dotted", [name for name, key in KEYS.items() if key.range], ids=str)
def test_every_numeric_key_enforces_its_declared_range(dotted):
    bound, step = KEYS[dotted].range, 1 if KEYS[dotted].kind is int else 1e-6
    edges_and_outsides = [(bound.at_least, bound.at_least - step) if bound.above is None else
                          (bound.above + step, bound.above)]
    if bound.at_most is not None:
        edges_and_outsides.append((bound.at_most, bound.at_most + step))
    if bound.below is not None:
        edges_and_outsides.append((bound.below - step, bound.below))
    # A bigram has no attention heads: a width or head count at its edge is not also refused by the
    # transformer's rule between them (tested below), so the key's own range is what is tested here. The
    # decoder's own options are tested on the decoder.
    arch = "gpt" if dotted in ("model.multi_token",) else "bigram"
    alone = {"model.arch": arch} if dotted.startswith("model.") else {}
    for edge, outside in edges_and_outsides:
        assert value_of(load_config(None, {**alone, dotted: str(edge)}), dotted) == edge
        refused(dotted, lambda outside=outside: load_config(None, {**alone, dotted: str(outside)}))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "infinity"])
@pytest.mark.parametrize("dotted", ["optim.lr", "train.max_time", "model.dropout", "model.n_layer"])
def test_nan_and_infinities_are_refused(dotted, value):
    refused(dotted, lambda: load_config(None, {dotted: value}))


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinities_in_toml_are_refused(value, tmp_path):
    refused("optim.lr", lambda: load_config(write(tmp_path, f"[optim]\nlr = {value}\n")))


# ----- types in TOML: a bool is a bool, an int an int -----


@pytest.mark.parametrize(("line", "key"), [
    ("[model]\nn_layer = true", "model.n_layer"),  # Python's True is an int; a config's is not
    ("[model]\nn_layer = 2.5", "model.n_layer"),  # a fraction is never truncated
    ("[model]\nn_layer = \"4\"\nbias = 1", "model.bias"),
    ("[optim]\nlr = true", "optim.lr"),
    ("[optim]\nlr = [0.1]", "optim.lr"),
    ("[model]\narch = 3", "model.arch"),
    ("[train]\ncompile = 1", "train.compile"),
    ("[train]\nseed = 1979-05-27", "train.seed"),
    ("model = 3", "section 'model'"),
])
def test_toml_values_of_the_wrong_type_are_refused(line, key, tmp_path):
    refused(key, lambda: load_config(write(tmp_path, line + "\n")))


def test_toml_numbers_take_the_keys_type(tmp_path):
    config = load_config(write(tmp_path, "[model]\nn_layer = 4.0\n[optim]\nlr = 1\n"))
    assert type(config.model.n_layer) is int and config.model.n_layer == 4
    assert type(config.optim.lr) is float and config.optim.lr == 1.0


def test_sections_made_directly_are_checked_and_typed():
    refused("model.n_layer must be in (0, 1024], got 0", lambda: ModelConfig(n_layer=0))
    refused("train.max_time", lambda: TrainConfig(max_time=float("nan")))
    assert type(TrainConfig(max_time=5).max_time) is float
    assert TrainConfig(compile="false").compile is False
    numpy_made = ModelConfig(n_layer=np.int32(3), dropout=np.float32(0.5), vocab_size=np.float64(64.0))
    assert [type(numpy_made.n_layer), type(numpy_made.dropout), type(numpy_made.vocab_size)] == [int, float, int]


def test_set_value_checks_one_key_and_check_config_the_rest():
    config = Config()
    set_value(config, "train.compile", None)  # None is auto
    refused("train.batch_size", lambda: set_value(config, "train.batch_size", True))
    set_value(config, "model.activation", "relu")  # legal alone; the combination is checked after all are set
    refused("model.mlp", lambda: check_config(config))


# ----- files -----


def test_bad_toml_and_missing_file(tmp_path):
    bad = write(tmp_path, "[model\n")
    refused("not valid TOML", lambda: load_config(bad))
    refused("not found", lambda: load_config(tmp_path / "missing.toml"))


def test_a_config_that_is_not_utf8_or_is_a_directory_is_one_line(tmp_path):
    latin = tmp_path / "latin1.toml"
    latin.write_bytes("[model]\n# caf\u00e9\nn_layer = 2\n".encode("latin-1"))
    refused("not UTF-8", lambda: load_config(latin))
    refused("is a directory", lambda: load_config(tmp_path))


# ----- unknown keys -----


@pytest.mark.parametrize(("typed", "meant"), [
    ("optim.lrr", "optim.lr"),
    ("model.nlayer", "model.n_layer"),
    ("train.n_layer", "model.n_layer"),  # the right key, the wrong section
    ("train.lr", "optim.lr"),
    ("optim.seed", "train.seed"),
    ("modle.n_embd", "model.n_embd"),
    ("model.dropuot", "model.dropout"),
])
def test_unknown_key_names_the_closest_key_in_any_section(typed, meant):
    refused(f"did you mean '{meant}'", lambda: load_config(None, {typed: "1"}))


def test_a_key_outside_any_section_in_toml_names_its_section(tmp_path):
    refused("did you mean 'optim.lr'", lambda: load_config(write(tmp_path, "lr = 0.1\n")))


def test_a_key_like_none_lists_the_sections():
    refused("valid sections: model, data, train, optim", lambda: load_config(None, {"zzz.qqqq": "1"}))


# ----- one key decides the nonlinearity -----


def test_gpt_refuses_model_activation_naming_model_mlp():
    refused("model.mlp", lambda: load_config(None, {"model.mlp": "gelu", "model.activation": "relu"}))
    refused("model.mlp", lambda: ModelConfig(activation="gelu"))


@pytest.mark.parametrize("arch", ["bigram", "lstm", "gru"])
def test_archs_without_a_choice_of_nonlinearity_refuse_activation(arch):
    refused("does not apply to arch", lambda: load_config(None, {"model.arch": arch, "model.activation": "relu"}))


@pytest.mark.parametrize("arch", ["mlp", "rnn"])
def test_mlp_and_rnn_take_model_activation(arch):
    assert load_config(None, {"model.arch": arch, "model.activation": "relu"}).model.activation == "relu"


def test_the_rule_between_keys_is_checked_after_every_override():
    # mlp.toml sets activation = tanh; switching to gpt works when the same command line clears it, in any order
    # (and gives a head count that divides mlp.toml's width of 32, the transformer's own rule)
    for order in (["--model.arch", "gpt", "--model.activation", ""], ["--model.activation", "", "--model.arch", "gpt"]):
        config = load_config(CONFIGS / "mlp.toml", parse_overrides([*order, "--model.n_head", "4"]))
        assert config.model.arch == "gpt" and config.model.activation == ""
    refused("model.mlp", lambda: load_config(CONFIGS / "mlp.toml", {"model.arch": "gpt"}))


# ----- the declarations agree with the code that uses them -----


def test_declared_choices_match_what_the_code_builds():
    from lmforge.model.activations import ACTIVATIONS
    from lmforge.model.factory import ARCHS
    from lmforge.train.schedule import SCHEDULES

    assert set(KEYS["model.arch"].choices) == set(ARCHS)
    assert set(KEYS["model.activation"].choices) == {"", *ACTIVATIONS}
    assert set(KEYS["train.schedule"].choices) == set(SCHEDULES)


def test_the_default_model_builds():
    from lmforge.model.factory import build_model

    model = build_model(dataclasses.replace(Config().model, vocab_size=64, n_layer=1))
    assert model.num_params() > 0


def test_the_finetune_section_is_optional_typed_and_spelled_two_ways(tmp_path):
    assert "finetune" not in dumps_config(load_config(None))  # a plain run's config.toml has no such table
    config = load_config(None, {"lora.rank": "4", "finetune.labels": "b, a", "finetune.task": "sft"})
    assert (config.finetune.lora_rank, config.finetune.labels, config.finetune.task) == (4, ["b", "a"], "sft")
    assert load_config(write(tmp_path, dumps_config(config))) == config
    refused("finetune.lora_rank", lambda: load_config(None, {"lora.rank": "0"}))
    refused("finetune.task", lambda: load_config(None, {"finetune.task": "chat"}))
    refused("--lora.targets", lambda: load_config(None, {"finetune.method": "lora", "finetune.train_blocks": "1"}))


# ----- the transformer's shape rules are the config's, met by every command that reads a config -----


@pytest.mark.parametrize(("overrides", "fragment"), [
    (["--model.n_embd", "30", "--model.n_head", "4"], "model.n_embd (30) must be a multiple of model.n_head (4)"),
    (["--model.n_head", "4", "--model.n_kv_head", "3"], "model.n_head (4) must be a multiple of model.n_kv_head (3)"),
    (["--model.n_embd", "20", "--model.n_head", "4", "--model.position", "rope"],
     "rotary positions need an even head size"),
])
@pytest.mark.parametrize("command", ["train", "bench"])
def test_a_transformer_shape_that_cannot_build_is_a_config_error(command, overrides, fragment, tmp_path, capsys):
    from tests.conftest import assert_one_line_error, run_cli

    (tmp_path / "tiny.toml").write_text("[model]\nn_layer = 1\n")
    where = ["--data", tmp_path / "data", "--out", tmp_path / "run"] if command == "train" else []
    code, _, err = run_cli(capsys, command, "--config", tmp_path / "tiny.toml", *where, "--train.device", "cpu",
                           *overrides)
    assert_one_line_error(code, err, f"lmforge {command}: error: {fragment}")
    assert not (tmp_path / "run").exists()  # refused while reading the config, before the run is made


def test_shape_rules_apply_to_the_transformer_only():
    config = load_config(None, {"model.arch": "rnn", "model.n_embd": "30", "model.n_head": "4"})
    assert (config.model.n_embd, config.model.n_head) == (30, 4)  # an rnn has no heads to divide its width
    refused("multiple of model.n_head", lambda: ModelConfig(n_embd=30, n_head=4))  # made directly: the same rule
