"""The continuous-batching engine: a request's tokens do not depend on what else is in the batch."""

from __future__ import annotations

import pytest
import torch

from lmforge.data.tokenizer import BPETokenizer, CharTokenizer
from lmforge.infer.batched import BatchedEngine, GenerationRequest, generate_batch
from lmforge.infer.decode import TextStream
from lmforge.infer.generate import generate, sample_next, sample_rows
from lmforge.model.factory import build_model

TOKENIZER = CharTokenizer("abcdefghijklmnopqrstuvwxyz .,")
# Prompts of mixed lengths, so the rows of one batch sit at different positions of their caches.
PROMPTS = ["a", "the cat", "we read books", "you drink tea and the", "xyz"]
MAX_TOKENS = 12

# Every transformer option is in at least one of the "gpt-" entries: positions (learned, rope), norms
# (layernorm, rmsnorm, a set epsilon), MLPs (gelu, swiglu, relu2), QK-norm, grouped-query attention (two
# and one key/value heads), the logit soft-cap, an untied head, biases on and off.
GPT_OPTIONS = {
    "gpt-learned": {"model.position": "learned"},
    "gpt-rope-gqa": {"model.position": "rope", "model.n_head": "4", "model.n_kv_head": "2", "model.qk_norm": "true",
                     "model.norm": "rmsnorm", "model.mlp": "swiglu", "model.tie_embeddings": "false"},
    "gpt-softcap-relu2-mqa": {"model.logit_softcap": "2.5", "model.mlp": "relu2", "model.bias": "false",
                              "model.n_head": "4", "model.n_kv_head": "1", "model.norm_eps": "0.001"},
    "gpt-rope-untied-nobias": {"model.position": "rope", "model.tie_embeddings": "false", "model.bias": "false",
                               "model.mlp_hidden": "48", "model.rope_theta": "500"},
}
ARCHS = {
    **GPT_OPTIONS,
    "gru": {"model.arch": "gru"},
    "lstm": {"model.arch": "lstm", "model.n_layer": "2"},
    "rnn": {"model.arch": "rnn"},
    "mlp": {"model.arch": "mlp"},
}


def tiny_model(tiny_config, overrides: dict[str, str]):
    torch.manual_seed(0)
    # A wide initialization makes a random model's choices depend on every token and position, so that a
    # batching mistake changes the greedy output instead of hiding behind near-uniform logits.
    config = tiny_config(**{"model.block_size": "32", "model.vocab_size": str(TOKENIZER.vocab_size),
                            "model.init_std": "0.3", **overrides})
    return build_model(config.model).eval()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_tokens_are_the_same_alone_and_batched(arch, tiny_config):
    model = tiny_model(tiny_config, ARCHS[arch])
    prompts = [TOKENIZER.encode(p) for p in PROMPTS]
    alone = [list(generate(model, p, MAX_TOKENS, temperature=0)) for p in prompts]
    assert len({tuple(tokens) for tokens in alone}) > 1  # the model's output does depend on the prompt
    for max_batch in (len(prompts), 2):  # all at once; and two slots, so requests join as others leave
        batched = generate_batch(model, TOKENIZER, prompts, MAX_TOKENS, max_batch=max_batch, temperature=0)
        assert [c.tokens for c in batched] == alone
        assert [c.finish_reason for c in batched] == ["length"] * len(prompts)
        assert [c.text for c in batched] == [TOKENIZER.decode(tokens) for tokens in alone]


@pytest.mark.parametrize("options", GPT_OPTIONS)
def test_each_rows_logprobs_are_the_models_own_over_its_whole_sequence(options, tiny_config):
    """Every step of every row, batched beside rows at other positions, gives the distribution the model gives
    that row's whole sequence alone without a cache (its soft-cap and head included)."""
    model = tiny_model(tiny_config, GPT_OPTIONS[options])
    vocab = TOKENIZER.vocab_size
    engine = BatchedEngine(model, TOKENIZER, max_batch=3)
    events: list[list] = [[] for _ in PROMPTS]
    for prompt, received in zip(PROMPTS, events, strict=True):
        engine.submit(GenerationRequest(TOKENIZER.encode(prompt), 6, received.append, temperature=0, logprobs=vocab))
    while engine.has_work():
        engine.step()
    assert max(engine.counters.rows_per_step) == 3  # rows really were decoded together
    for prompt, received in zip(PROMPTS, events, strict=True):
        sequence = TOKENIZER.encode(prompt)
        for event in received:
            batched = torch.full((vocab,), float("nan"))
            for token, logprob in event.top_logprobs:
                batched[token] = logprob
            with torch.no_grad():
                alone = torch.log_softmax(model(torch.tensor([sequence]))[0][0, -1].float(), -1)
            torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
            assert event.token == int(alone.argmax())
            sequence.append(event.token)
        assert len(sequence) == len(TOKENIZER.encode(prompt)) + 6


def test_every_decode_step_is_one_forward_pass_over_all_active_rows(tiny_config):
    model = tiny_model(tiny_config, ARCHS["gpt-rope-gqa"])
    engine = BatchedEngine(model, TOKENIZER, max_batch=4)
    calls = []
    model.blocks[0].attn.qkv.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    for prompt in PROMPTS[:4]:
        engine.submit(GenerationRequest(TOKENIZER.encode(prompt), 5, lambda event: None, temperature=0))
    engine.step()
    assert calls == [1, 1, 1, 1, 4]  # four prefills, then one decode step of all four rows
    assert engine.batches_decoding and engine.cache_kind == "kv"


def test_seeded_sampling_matches_generate_with_the_same_seed(tiny_config):
    model = tiny_model(tiny_config, ARCHS["gpt-learned"])
    prompts = [TOKENIZER.encode(p) for p in PROMPTS]
    seeds = [11, 22, 33, 44, 55]
    alone = [list(generate(model, p, MAX_TOKENS, temperature=0.9, top_k=10, top_p=0.9,
                           generator=torch.Generator().manual_seed(seed)))
             for p, seed in zip(prompts, seeds, strict=True)]
    batched = generate_batch(model, TOKENIZER, prompts, MAX_TOKENS, temperature=0.9, top_k=10, top_p=0.9,
                             seeds=seeds)
    assert [c.tokens for c in batched] == alone


# Twenty prompts of mixed lengths for the seeded-invariance test: more than one batch of 16, so requests join
# as others leave.
SEEDED_PROMPTS = [" ".join(PROMPTS[i % 5].split()[: 1 + i % 3]) + "," * (i // 5) for i in range(20)]
SEEDED_SAMPLING = {"temperature": 1.0, "top_k": 12, "top_p": 0.95}


def run_engine(model, requests: list[dict], max_batch: int = 16) -> tuple[list[list], BatchedEngine]:
    """Each request's events (every token's log-probabilities over the whole vocabulary included)."""
    engine = BatchedEngine(model, TOKENIZER, max_batch=max_batch)
    events: list[list] = [[] for _ in requests]
    for request, received in zip(requests, events, strict=True):
        engine.submit(GenerationRequest(emit=received.append, logprobs=TOKENIZER.vocab_size, **request))
    while engine.has_work():
        engine.step()
    return events, engine


def tokens_and_logprobs(events: list) -> tuple[list[int], list[list]]:
    return [event.token for event in events], [sorted(event.top_logprobs) for event in events]


@pytest.mark.parametrize("arch", ARCHS)
def test_seeded_sampled_tokens_are_the_same_alone_and_among_fifteen_others(arch, tiny_config):
    """A seeded request at temperature 1 with top-k and top-p gets the same tokens, and bit for bit the same
    log-probabilities, alone and decoded beside 15 others (seeded ones, or unseeded and greedy ones)."""
    model = tiny_model(tiny_config, ARCHS[arch])
    requests = [{"prompt": TOKENIZER.encode(prompt), "max_tokens": MAX_TOKENS, "seed": 1000 + index,
                 **SEEDED_SAMPLING} for index, prompt in enumerate(SEEDED_PROMPTS)]
    alone = [tokens_and_logprobs(run_engine(model, [request])[0][0]) for request in requests]
    assert len({tuple(tokens) for tokens, _ in alone}) > 10  # the draws differ from request to request

    together, engine = run_engine(model, requests)
    assert max(engine.counters.rows_per_step) == 16
    assert [tokens_and_logprobs(events) for events in together] == alone

    unseeded_neighbours = [{**request, "seed": None, "temperature": index % 2} for index, request in
                           enumerate(requests[1:16])]  # half greedy, half sampled without a seed
    among_others, _ = run_engine(model, [requests[0], *unseeded_neighbours])
    assert tokens_and_logprobs(among_others[0]) == alone[0]


def test_sampling_rows_together_draws_what_each_row_draws_alone():
    """The batched sampler gives each row the token it gets sampled alone (as `generate` samples), whatever the
    other rows' temperature, top-k and top-p."""
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    params = [(1.0, None, None), (0.7, 5, None), (1.3, None, 0.8), (0.0, None, None), (1.0, 3, 0.5), (2.0, 40, 1.0)]
    drawn = set()
    for trial in range(40):
        seeds = [100 * trial + row for row in range(len(params))]
        alone = [sample_next(row_logits, temperature=t, top_k=k, top_p=p, generator=torch.Generator().manual_seed(seed))
                 for row_logits, (t, k, p), seed in zip(logits, params, seeds, strict=True)]
        together = sample_rows(logits, *zip(*params, strict=True), [torch.Generator().manual_seed(s) for s in seeds])
        assert together == alone
        drawn.update(enumerate(together))
    assert len(drawn) > 3 * len(params)  # the draws really vary


def test_cancelled_and_finished_rows_free_their_slots_for_waiting_requests(tiny_config):
    model = tiny_model(tiny_config, ARCHS["gpt-learned"])
    engine = BatchedEngine(model, TOKENIZER, max_batch=1)
    events: dict[str, list] = {"first": [], "second": []}
    first = GenerationRequest(TOKENIZER.encode("the"), 20, events["first"].append, temperature=0)
    second = GenerationRequest(TOKENIZER.encode("a"), 3, events["second"].append, temperature=0)
    engine.submit(first)
    engine.submit(second)
    engine.step()
    assert engine.active_count() == 1 and engine.waiting_count() == 1
    engine.cancel(first)
    engine.step()  # the cancelled row leaves and the waiting request takes its slot in the same step
    assert events["first"][-1].finish_reason == "cancelled"
    assert events["second"] and engine.waiting_count() == 0
    while engine.has_work():
        engine.step()
    assert events["second"][-1].finish_reason == "length"
    assert sum(e.token is not None for e in events["second"]) == 3


def test_stop_token_and_stop_strings_end_a_request_with_stop(tiny_config):
    model = tiny_model(tiny_config, ARCHS["gpt-learned"])
    prompt = TOKENIZER.encode("the cat")
    free = list(generate(model, prompt, MAX_TOKENS, temperature=0))
    text = TOKENIZER.decode(free)
    stop = text[3:5]  # a stop string the greedy continuation will write
    [stopped] = generate_batch(model, TOKENIZER, [prompt], MAX_TOKENS, temperature=0, stop=[stop])
    assert stopped.finish_reason == "stop" and stopped.text == text[: text.find(stop)]
    [ended] = generate_batch(model, TOKENIZER, [prompt], MAX_TOKENS, temperature=0, stop_token=free[2])
    assert ended.finish_reason == "stop" and ended.tokens == free[: free.index(free[2])]


def test_echo_prompt_logprobs_are_the_models_log_softmax(tiny_config):
    model = tiny_model(tiny_config, ARCHS["gpt-learned"])
    prompt = TOKENIZER.encode("we read")
    events = []
    engine = BatchedEngine(model, TOKENIZER)
    engine.submit(GenerationRequest(prompt, 0, events.append, prompt_logprobs=True, logprobs=2))
    engine.step()
    [event] = events
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([prompt]))[0][0].float(), -1)
    assert event.finish_reason == "length" and event.token is None
    assert [lp for lp, _ in event.prompt_logprobs] == pytest.approx(
        [float(expected[i, t]) for i, t in enumerate(prompt[1:])], abs=1e-5)
    assert all(len(top) == 2 and top[0][1] >= top[1][1] for _, top in event.prompt_logprobs)


def test_text_stream_never_splits_a_character_or_shows_a_possible_stop_string():
    tokenizer = BPETokenizer.train(["plain ascii text only"], vocab_size=260)
    text = "naïve € ✓ end"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text)  # multi-byte characters span several tokens
    tracker = TextStream(tokenizer)
    deltas = [tracker.add(token) for token in ids]
    assert "".join(deltas) + tracker.flush() == text
    assert not any("\ufffd" in delta for delta in deltas)

    tracker = TextStream(TOKENIZER, stop=["cat!"])
    shown = [tracker.add(token) for token in TOKENIZER.encode("a ca")]
    assert "".join(shown) == "a " and not tracker.stopped  # "ca" could begin "cat!": held back
    assert tracker.add(TOKENIZER.encode("b")[0]) == "cab" and not tracker.stopped  # no longer a prefix
