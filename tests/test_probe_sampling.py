"""The hostile probe of issue 17 on sampling values, sizes, unknown characters and the peak FLOP rate: each bad
value ends in one line and exit 2 (or an OpenAI-shaped 400 naming the parameter), each extreme but allowed value
samples without NaN, and MFU is never above 1."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import serve_fixtures
import torch
from serve_fixtures import http

from lmforge import hardware
from lmforge.errors import UserError
from lmforge.infer.generate import sample_next
from lmforge.infer.sampling import SamplingParams
from tests.conftest import PATIENCE, assert_one_line_error, checksums, prepare_and_train, run_cli

served_run = serve_fixtures.served_run
live_server = serve_fixtures.live_server

EXTREME_BUT_ALLOWED = [
    {"temperature": 5e-324}, {"temperature": 1e-310}, {"temperature": 1e-300, "top_k": 1},
    {"temperature": 1.0, "top_p": 1e-300}, {"temperature": 1e300}, {"temperature": 1e-310, "top_p": 1e-300},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_corpus) -> SimpleNamespace:
    return prepare_and_train(tmp_path_factory.mktemp("probe"), tiny_corpus)


# ---- D5, D9: sampling values ----


@pytest.mark.parametrize("params", EXTREME_BUT_ALLOWED)
def test_the_sampler_is_defined_for_extreme_allowed_values(params):
    """No NaN, a valid token; a vanishing temperature or top_p is the greedy token."""
    logits = torch.tensor([1.0, 3.0, -2.0, 2.999, float("-inf")])
    generator = torch.Generator().manual_seed(0)
    SamplingParams(**params)  # allowed
    tokens = {sample_next(logits, temperature=params["temperature"], top_k=params.get("top_k"),
                          top_p=params.get("top_p"), generator=generator) for _ in range(50)}
    assert tokens <= {0, 1, 2, 3}
    if params["temperature"] < 1e-200 or params.get("top_p", 1) < 1e-200:
        assert tokens == {1}


@pytest.mark.parametrize("field, value", [
    ("temperature", math.nan), ("temperature", math.inf), ("temperature", -1e-9), ("top_p", math.nan),
    ("top_p", 0.0), ("top_p", 1.5), ("top_p", math.inf), ("top_k", 0),
])
def test_sampling_params_refuse_what_the_sampler_cannot_do(field, value):
    with pytest.raises(UserError, match=field):
        SamplingParams(**{field: value})


def greedy_text(capsys, base, *extra) -> str:
    code, out, err = run_cli(capsys, "sample", base.run, "--prompt", "the ", "--max-new-tokens", "12", "--device",
                             "cpu", *extra)
    assert code == 0 and "Traceback" not in err, err
    return out


@pytest.mark.parametrize("flags", [("--temperature", "5e-324"), ("--temperature", "1e-310"),
                                   ("--top-p", "1e-300")])
@pytest.mark.parametrize("samples", ["1", "3"])
def test_sample_at_a_vanishing_temperature_or_top_p_is_greedy(flags, samples, base, capsys):
    greedy = greedy_text(capsys, base, "--temperature", "0", "--num-samples", samples)
    assert greedy_text(capsys, base, *flags, "--num-samples", samples) == greedy


@pytest.mark.parametrize("flag, value", [("--temperature", "inf"), ("--temperature", "nan"), ("--top-p", "nan"),
                                         ("--top-p", "inf"), ("--top-p", "1e-400"), ("--num-samples", "100000"),
                                         ("--max-new-tokens", "1000000000")])
def test_sample_refuses_non_finite_and_oversized_values_by_flag(flag, value, base, capsys):
    code, _, err = run_cli(capsys, "sample", base.run, "--prompt", "the", "--device", "cpu", flag, value)
    assert_one_line_error(code, err, flag)


@pytest.mark.parametrize("body", [b'{"model": "tiny-served", "prompt": "a", "temperature": NaN}',
                                  b'{"model": "tiny-served", "prompt": "a", "temperature": Infinity}',
                                  b'{"model": "tiny-served", "prompt": "a", "top_p": NaN}',
                                  b'{"model": "tiny-served", "prompt": "a", "top_p": 0}',
                                  b'{"model": "tiny-served", "prompt": "a", "temperature": 2.5}'])
def test_the_server_refuses_non_finite_and_out_of_range_sampling_values(live_server, body):
    response = http.post(live_server.url + "/v1/completions", content=body,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] in ("temperature", "top_p") and error["param"] in body.decode()


@pytest.mark.parametrize("extreme", [{"temperature": 5e-324}, {"temperature": 1e-310}, {"top_p": 1e-300},
                                     {"temperature": 5e-324, "top_p": 1e-300, "n": 3}])
def test_the_server_samples_extreme_allowed_values_as_greedy(live_server, extreme):
    body = {"model": "tiny-served", "prompt": "The cat", "max_tokens": 8}
    greedy = http.post(live_server.url + "/v1/completions", json={**body, "temperature": 0}, timeout=PATIENCE)
    response = http.post(live_server.url + "/v1/completions", json={**body, **extreme}, timeout=PATIENCE)
    assert response.status_code == 200, response.text
    texts = {choice["text"] for choice in response.json()["choices"]}
    assert texts == {greedy.json()["choices"][0]["text"]}


# ---- D15: characters the tokenizer does not know ----


@pytest.mark.parametrize("route, body, param", [
    ("/v1/completions", {"model": "tiny-served", "prompt": "a Ω b", "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"model": "tiny-served", "prompt": ["ok", "a Ω b"], "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"model": "tiny-served", "messages": [{"role": "user", "content": "a Ω b"}],
                              "max_tokens": 2}, "messages"),
    ("/tokenize", {"prompt": "a Ω b"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a Ω b"}]}, "messages"),
])
def test_the_server_refuses_unknown_characters_by_name_unless_allowed(live_server, route, body, param):
    response = http.post(live_server.url + route, json=body, timeout=PATIENCE)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and "'Ω'" in error["message"] and "allow_unknown" in error["message"]
    allowed = http.post(live_server.url + route, json={**body, "allow_unknown": True}, timeout=PATIENCE)
    assert allowed.status_code == 200, allowed.text


@pytest.mark.parametrize("argv", [
    ["sample", "{run}", "--prompt", "the Ωmega", "--device", "cpu", "--max-new-tokens", "3"],
    ["predict", "{run}", "--text", "the Ωmega", "--device", "cpu", "--max-new-tokens", "3"],
    ["plot", "next-token", "{run}", "--prompt", "the Ωmega", "--out", "{tmp}/next.png"],
])
def test_commands_refuse_unknown_characters_by_name_unless_allowed(argv, base, tmp_path, capsys):
    argv = [arg.format(run=base.run, tmp=tmp_path) for arg in argv]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "'Ω'", "--allow-unknown")
    code, _, err = run_cli(capsys, *argv, "--allow-unknown")
    assert code == 0 and "Traceback" not in err, err


def test_eval_task_refuses_unknown_characters_unless_allowed(base, tmp_path, capsys):
    data = tmp_path / "choice.jsonl"
    data.write_text(json.dumps({"context": "the Ωcat", "choices": [" sat", " ran"], "label": 0}) + "\n")
    argv = ["eval", base.run, "--task", "choice", "--data", data, "--device", "cpu"]
    code, _, err = run_cli(capsys, *argv)
    assert_one_line_error(code, err, "'Ω'", "--allow-unknown")
    code, out, err = run_cli(capsys, *argv, "--allow-unknown")
    assert code == 0 and json.loads(out)["acc"] in (0.0, 1.0), err


# ---- D6, D10: sizes ----


@pytest.mark.parametrize("override", [("--model.block_size", "1000000000"), ("--model.n_embd", "100000000"),
                                      ("--model.vocab_size", "1000000000"), ("--model.n_layer", "100000"),
                                      ("--train.batch_size", "100000000")])
def test_absurd_model_sizes_are_refused_by_name(override, base, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", "--config", base.config, "--data", base.data, "--out", out, *override)
    assert_one_line_error(code, err, override[0][2:])
    assert not out.exists()


@pytest.mark.parametrize("rank, fragment", [("100000000", "finetune.lora_rank"), ("100000", "lora_rank"),
                                            ("33", "--lora.rank 33")])
def test_a_lora_rank_above_the_layers_width_is_refused(rank, fragment, base, tmp_path, capsys):
    """The tiny model is 32 wide: a rank above that spans nothing more and would write a run of gigabytes."""
    (tmp_path / "task").mkdir()
    for split in ("train", "val"):
        (tmp_path / "task" / f"{split}.jsonl").write_text(
            "".join(json.dumps({"text": f"the cat {i}", "label": "ab"[i % 2]}) + "\n" for i in range(8)))
    before = checksums(base.run)
    code, _, err = run_cli(capsys, "finetune", base.run, "--task", "classify", "--data", tmp_path / "task", "--out",
                           tmp_path / "ft", "--method", "lora", "--lora.rank", rank, "--max-steps", "1", "--quiet")
    assert_one_line_error(code, err, fragment)
    assert checksums(base.run) == before
    assert not (tmp_path / "ft" / "checkpoints").exists() or not any((tmp_path / "ft" / "checkpoints").iterdir())


def test_landscape_points_are_bounded(base, tmp_path, capsys):
    code, _, err = run_cli(capsys, "plot", "landscape", base.run, "--out", tmp_path / "l.png", "--points", "100000")
    assert_one_line_error(code, err, "--points", "101")
    assert not (tmp_path / "l.png").exists()


def test_predict_refuses_more_new_tokens_than_the_context(base, capsys):
    code, _, err = run_cli(capsys, "predict", base.run, "--text", "the cat", "--device", "cpu", "--max-new-tokens",
                           "1000000000")
    assert_one_line_error(code, err, "--max-new-tokens")
    code, _, err = run_cli(capsys, "predict", base.run, "--text", "the cat", "--device", "cpu", "--max-new-tokens",
                           "100")
    assert_one_line_error(code, err, "--max-new-tokens", "16-token context")


# ---- D18: the peak FLOP rate behind MFU ----

BENCH = ["bench", "--json", "--steps", "1", "--model.n_layer", "1", "--model.n_embd", "16", "--model.n_head", "2",
         "--model.block_size", "8", "--model.vocab_size", "32", "--train.batch_size", "2", "--train.device", "cpu",
         "--train.precision", "fp32", "--train.compile", "false"]


def cached_peak(cache_dir: Path) -> float:
    (value,) = json.loads((cache_dir / hardware.FLOPS_CACHE).read_text()).values()
    return value


def seed_cache(cache_dir: Path, monkeypatch, peak: float) -> None:
    """The cache as a busy (or a lucky) machine left it: `peak` FLOP/s for this device, precision and threads."""
    monkeypatch.setenv("LMFORGE_CACHE_DIR", str(cache_dir))
    with monkeypatch.context() as patch:
        patch.setattr(hardware, "measure_matmul_flops", lambda device, dtype, size: peak)
        hardware.peak_flops(torch.device("cpu"), "fp32")
    assert cached_peak(cache_dir) == peak


def test_a_cached_peak_below_the_achieved_rate_never_gives_mfu_above_one(tmp_path, monkeypatch, capsys):
    seed_cache(tmp_path, monkeypatch, 1.0)  # 1 FLOP/s: any step beats it
    code, out, err = run_cli(capsys, *BENCH)
    assert code == 0, err
    result = json.loads(out)
    assert result["mfu"] is not None and 0 < result["mfu"] <= 1
    assert cached_peak(tmp_path) > 1.0  # measured again, and the better value kept


def test_measure_peak_replaces_the_cached_peak(tmp_path, monkeypatch, capsys):
    seed_cache(tmp_path, monkeypatch, 1e30)  # absurdly high: only --measure-peak may lower it
    code, out, _ = run_cli(capsys, *BENCH)
    assert code == 0 and json.loads(out)["peak_tflops"] == 1e18
    code, out, _ = run_cli(capsys, *BENCH, "--measure-peak")
    assert code == 0 and json.loads(out)["peak_tflops"] < 1e6
    assert cached_peak(tmp_path) < 1e18


def test_the_trainer_reports_no_mfu_above_one(tmp_path, monkeypatch, tiny_data, tiny_config):
    from lmforge.train.trainer import Trainer
    from tests.conftest import records

    seed_cache(tmp_path / "cache", monkeypatch, 1.0)
    Trainer(tiny_config(train__max_steps=3), tiny_data, tmp_path / "run", quiet=True).run()
    mfus = [record["mfu"] for record in records(tmp_path / "run", "train")]
    assert mfus and all(mfu is None or 0 < mfu <= 1 for mfu in mfus)
    assert cached_peak(tmp_path / "cache") > 1.0
