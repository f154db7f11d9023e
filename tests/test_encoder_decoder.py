"""The encoder-decoder (`model.arch = "encoder-decoder"`): span corruption, the two attention masks and the
bridge between them, pretraining through the one trainer, generating from a source (cached and batched, each
equal to a full recompute), and what it refuses."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmforge.config.load import load_config
from lmforge.infer.generate import generate, greedy_batch
from lmforge.infer.load import load_run
from lmforge.interop.architectures import architecture_for
from lmforge.model.factory import build_model
from lmforge.model.spans import corrupt_spans, first_sentinel, reserved_ids, span_counts, start_token
from lmforge.run import directory as rundir
from lmforge.train.trainer import Trainer
from tests.conftest import TINY_OVERRIDES, assert_one_line_error, records, run_cli, train_losses


def seq2seq_config(**overrides: object):
    dotted = {key.replace("__", "."): str(value) for key, value in overrides.items()}
    return load_config(None, {**TINY_OVERRIDES, "model.arch": "encoder-decoder", "model.vocab_size": "40", **dotted})


def uncorrupt(source: list[int], target: list[int], sentinel: int) -> list[int]:
    """The window back from its source and target: each sentinel in the source replaced by its span."""
    spans, current = {}, None
    for token in target:
        if token >= sentinel:
            current = spans.setdefault(token, [])
        else:
            current.append(token)
    return [piece for token in source for piece in (spans[token] if token >= sentinel else [token])]


def test_span_corruption_hides_fifteen_percent_in_spans_the_decoder_writes():
    config = seq2seq_config(model__block_size=64).model
    noise, spans = span_counts(64)
    assert (noise, spans) == (10, 3) and reserved_ids(64) == 4
    tokens = torch.randint(0, first_sentinel(config), (50, 64), generator=torch.Generator().manual_seed(0))
    (source, decoder_input), target = corrupt_spans(tokens, config, torch.Generator().manual_seed(1))
    assert source.shape == (50, 64 - noise + spans) and target.shape == (50, noise + spans)
    assert torch.equal(decoder_input[:, 1:], target[:, :-1]) and (decoder_input[:, 0] == start_token(config)).all()
    sentinels = list(range(first_sentinel(config), first_sentinel(config) + spans))
    starts = set()
    for row in range(50):
        assert [t for t in target[row].tolist() if t >= first_sentinel(config)] == sentinels  # in order, each once
        assert uncorrupt(source[row].tolist(), target[row].tolist(), first_sentinel(config)) == tokens[row].tolist()
        starts.add(source[row].tolist().index(sentinels[0]))
    assert len(starts) > 5  # the spans fall in different places


def test_the_encoder_reads_both_ways_and_the_decoder_writes_causally():
    torch.manual_seed(0)
    model = build_model(seq2seq_config().model).eval()
    source, decoder_input = torch.randint(0, 30, (1, 12)), torch.randint(0, 30, (1, 8))
    with torch.no_grad():
        logits = model((source, decoder_input))[0]
        later_target = decoder_input.clone()
        later_target[0, 6] += 1
        moved_target = model((source, later_target))[0]
        last_source = source.clone()
        last_source[0, -1] += 1
        moved_source = model((last_source, decoder_input))[0]
    torch.testing.assert_close(moved_target[0, :6], logits[0, :6], rtol=0, atol=0)  # no peeking ahead
    assert not torch.allclose(moved_target[0, 6:], logits[0, 6:])
    assert not torch.allclose(moved_source[0, 0], logits[0, 0])  # the first target position reads the whole source
    encoder_first = model.encode(source)[0, 0]
    assert not torch.allclose(model.encode(last_source)[0, 0], encoder_first)  # and the encoder reads both ways


@pytest.mark.parametrize("options", [{}, {"model__position": "rope", "model__norm": "rmsnorm", "model__mlp": "swiglu",
                                          "model__qk_norm": True, "model__n_kv_head": 1}], ids=["gpt2", "modern"])
def test_an_encoder_decoder_trains_resumes_exactly_and_loads(tiny_data, tmp_path, options):
    options = dict(train__schedule="constant", train__checkpoint_every=4, model__dropout=0.1, model__vocab_size=0,
                   **options)
    Trainer(seq2seq_config(train__max_steps=8, **options), tiny_data, tmp_path / "whole", quiet=True).run()
    Trainer(seq2seq_config(train__max_steps=4, **options), tiny_data, tmp_path / "halves", quiet=True).run()
    Trainer(seq2seq_config(train__max_steps=8, **options), tiny_data, tmp_path / "halves", resume=True,
            quiet=True).run()
    whole, halves = train_losses(tmp_path / "whole"), train_losses(tmp_path / "halves")
    assert [halves[step] for step in range(5, 9)] == [whole[step] for step in range(5, 9)]  # bit for bit
    assert len(set(whole.values())) == 8
    weights = load_file(rundir.checkpoint_dir(tmp_path / "whole", 8) / "model.safetensors")
    loaded = load_run(tmp_path / "whole")
    tokenizer = rundir.read_tokenizer(tmp_path / "whole")
    assert loaded.config.model.vocab_size == tokenizer.vocab_size + reserved_ids(16)
    for name, value in loaded.model.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    assert records(tmp_path / "whole", "eval")[-1]["val_bpb"] is None


@pytest.fixture(scope="module")
def seq2seq_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("seq2seq") / "run"
    Trainer(seq2seq_config(model__vocab_size=0), tiny_data, run, quiet=True).run()
    return run


def test_eval_reports_the_span_loss_of_the_final_evaluation(seq2seq_run, tiny_data, capsys):
    code, out, err = run_cli(capsys, "eval", seq2seq_run, "--data", tiny_data, "--device", "cpu", "--batch-size", "3")
    assert code == 0, err
    result = json.loads(out)
    assert "loss" not in result and "not comparable to a decoder" in err
    final = [r for r in records(seq2seq_run, "eval") if r["final"]][-1]
    assert result["span_loss"] == pytest.approx(final["val_loss"], rel=1e-5)  # same spans, another batch size


def lively_model(**options):
    """A tiny random encoder-decoder whose weights are large enough that greedy decoding varies (at the usual
    init's small weights every source gives one repeated token, which would prove little)."""
    torch.manual_seed(0)
    model = build_model(seq2seq_config(**options).model).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0, 0.5)
    return model


def naive_greedy(model, source: list[int], count: int) -> list[int]:
    """The reference: the whole decoder input run afresh for each token, reserved ids left out of the argmax."""
    written = [start_token(model.config)]
    with torch.no_grad():
        for _ in range(count):
            logits = model((torch.tensor([source]), torch.tensor([written])))[0][0, -1]
            written.append(int(logits[: first_sentinel(model.config)].argmax()))
    return written[1:]


@pytest.mark.parametrize("options", [{}, {"model__position": "rope", "model__norm": "rmsnorm", "model__mlp": "swiglu",
                                      "model__qk_norm": True, "model__n_kv_head": 1}],
                         ids=["gpt2", "modern"])
def test_cached_generation_equals_a_full_recompute_and_never_writes_a_reserved_id(options):
    model = lively_model(**options)
    source = torch.randint(0, 30, (11,), generator=torch.Generator().manual_seed(2)).tolist()
    reference = naive_greedy(model, source, 16)
    assert len(set(reference)) > 3
    assert list(generate(model, source, 40, temperature=0.0)) == reference  # stops at the decoder's 16 positions
    assert list(generate(model, source, 40, temperature=0.0, use_cache=False)) == reference
    with torch.no_grad():  # make the sentinels and the start token the likeliest: they are still never written
        model.wte.weight[first_sentinel(model.config) : model.vocab_size] *= 50
    for temperature in (0.0, 1.0):
        written = list(generate(model, source, 16, temperature=temperature, generator=torch.Generator().manual_seed(1)))
        assert len(written) == 16 and max(written) < first_sentinel(model.config)


def test_the_source_changes_what_the_decoder_writes_and_sampling_is_seeded():
    model = lively_model()
    source = torch.randint(0, 30, (10,), generator=torch.Generator().manual_seed(2)).tolist()
    draws = [list(generate(model, source, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed)))
             for seed in (5, 5, 6)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    other = [token + 1 for token in source]
    with torch.no_grad():
        first = [model((torch.tensor([s]), torch.tensor([[start_token(model.config)]])))[0][0, -1].softmax(-1)
                 for s in (source, other)]
    assert (first[0] - first[1]).abs().sum() > 1e-3  # the decoder reads the encoder
    long_source = [7] * 9 + source  # 19 tokens: the encoder reads the last 16, as the decoder's window keeps its last
    assert list(generate(model, long_source, 8, temperature=0.0)) == list(generate(model, long_source[-16:], 8,
                                                                                    temperature=0.0))
    assert greedy_batch(model, [long_source], [8], stop_token=None, batch_size=1) == \
        [list(generate(model, long_source[-16:], 8, temperature=0.0))]


def test_batched_greedy_equals_each_source_alone():
    model = lively_model()
    generator = torch.Generator().manual_seed(2)
    sources = [torch.randint(0, 30, (length,), generator=generator).tolist()
               for length in (3, 16, 9, 1, 22)]  # the last one is cut to its last 16
    limits = [16, 4, 0, 9, 16]
    written = list(generate(model, sources[0], 16, temperature=0.0))
    stop = next(token for token in written if written.index(token) >= 2)  # the first row stops there
    alone = [list(generate(model, source, limit, temperature=0.0, stop_token=stop))
             for source, limit in zip(sources, limits, strict=True)]
    for batch_size in (1, 2, 5):
        assert greedy_batch(model, sources, limits, stop_token=stop, batch_size=batch_size) == alone
    assert alone[2] == [] and any(0 < len(reply) < limit for reply, limit in zip(alone, limits, strict=True))


def test_sample_writes_from_the_prompt_and_chat_and_serve_refuse_it(seq2seq_run, capsys):
    def sample(*flags):
        return run_cli(capsys, "sample", seq2seq_run, "--device", "cpu", "--temperature", "0", *flags)

    code, out, err = sample("--prompt", "to be", "--max-new-tokens", "10")
    assert code == 0 and err == "", err
    loaded = load_run(seq2seq_run)
    expected = loaded.tokenizer.decode(list(generate(loaded.model, loaded.tokenizer.encode("to be"), 10,
                                                     temperature=0.0, stop_token=loaded.tokenizer.eot_id)))
    assert out == expected + "\n"  # the target alone: the prompt is the source, not continued
    long_prompt = "the king is dead and the king is ours"
    code, out, err = sample("--prompt", long_prompt, "--max-new-tokens", "100", "--num-samples", "2")
    assert code == 0 and "encoder reads its last 16" in err and "writes at most 16 tokens" in err
    code, cut_out, _ = sample("--prompt", long_prompt[-16:], "--max-new-tokens", "100", "--num-samples", "2")
    assert out == cut_out  # a long source keeps its last tokens
    for command in ("chat", "serve"):
        code, out, err = run_cli(capsys, command, seq2seq_run, "--device", "cpu")
        assert_one_line_error(code, err, "model.arch = encoder-decoder: chat and serve are not built for it")


@pytest.mark.parametrize("flags", [["--max-new-tokens", "-1"], ["--temperature", "nan"], ["--top-p", "0"],
                                   ["--engine", "scratch"], ["--prompt", "\u2603\u2603"]])
def test_bad_sampling_input_is_one_line(seq2seq_run, capsys, flags):
    code, _, err = run_cli(capsys, "sample", seq2seq_run, "--device", "cpu", *flags)
    assert_one_line_error(code, err)


def test_export_and_the_scratch_engine_refuse_it_by_name(seq2seq_run, tiny_data, tmp_path, capsys):
    code, _, err = run_cli(capsys, "export", seq2seq_run, "--format", "hf", "--out", tmp_path / "hf")
    assert_one_line_error(code, err, "encoder-decoder")
    with pytest.raises(Exception, match="encoder-decoder"):
        architecture_for(seq2seq_config().model, "gguf")
    code, _, err = run_cli(capsys, "train", "--config", seq2seq_run / "config.toml", "--data", tiny_data, "--out",
                           tmp_path / "scratch", "--engine", "scratch")
    assert_one_line_error(code, err, "model.arch = 'encoder-decoder'", "use --engine torch")


def test_the_report_and_bench_take_an_encoder_decoder(seq2seq_run, capsys):
    code, _, err = run_cli(capsys, "report", seq2seq_run)
    assert code == 0, err
    report = (seq2seq_run / "report" / "report.md").read_text()
    assert "## Fresh sample" in report and "not implemented" not in report
    block_size = seq2seq_config().model.block_size  # the decoder writes at most its context, and the report says so
    assert "an empty source (end-of-text alone), temperature" in report and f"up to {block_size} tokens" in report
    code, out, err = run_cli(capsys, "bench", "--config", seq2seq_run / "config.toml", "--steps", "1")
    assert code == 0, err


def test_each_rank_corrupts_its_own_rows_of_the_global_batch():
    from types import SimpleNamespace

    from lmforge.train.spans import SpanCorruption

    config = seq2seq_config()
    tokens = torch.randint(0, 30, (3, 16), generator=torch.Generator().manual_seed(3))
    corrupted = {}
    for rank in (0, 1):
        task = SpanCorruption.__new__(SpanCorruption)
        task.config, task.cluster = config, SimpleNamespace(world_size=2, rank=rank)
        task.loader = SimpleNamespace(next_batch=lambda: (tokens, None))
        torch.manual_seed(7)  # every rank's generator starts the same, as the trainer seeds it
        corrupted[rank] = task.next_batch()
    torch.manual_seed(7)
    (source, decoder_input), target = corrupt_spans(tokens.repeat(2, 1), config.model)
    for rank in (0, 1):
        rows = slice(rank * 3, (rank + 1) * 3)
        (rank_source, rank_input), rank_target = corrupted[rank]
        assert torch.equal(rank_source, source[rows]) and torch.equal(rank_input, decoder_input[rows])
        assert torch.equal(rank_target, target[rows])
    assert not torch.equal(corrupted[0][0][0], corrupted[1][0][0])  # the ranks' spans fall elsewhere


def test_plot_next_token_shows_the_decoders_first_token_from_the_source(seq2seq_run, tmp_path, capsys):
    from lmforge.lab.next_token import next_token_logits

    code, _, err = run_cli(capsys, "plot", "next-token", seq2seq_run, "--prompt", "to be", "--out",
                           tmp_path / "next.png")
    assert code == 0 and (tmp_path / "next.png").is_file(), err
    model = lively_model()
    source = [3, 1, 4, 1, 5]
    logits = next_token_logits(model, source)
    assert (logits[first_sentinel(model.config):] == float("-inf")).all()
    assert int(logits.argmax()) == next(generate(model, source, 1, temperature=0.0))
