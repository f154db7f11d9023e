"""The transformer: causal masking, KV-cache equivalence, invisible vocabulary padding, init, sampling."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge.config.sections import ModelConfig
from lmforge.errors import UserError
from lmforge.infer.generate import generate, sample_next
from lmforge.model.gpt import GPT, KVCache, padded_vocab_size

VOCAB = 50  # pads to 64: 14 padding rows that must never show

GPT2_STYLE = dict()
MODERN = dict(position="rope", norm="rmsnorm", mlp="swiglu", n_head=4, n_kv_head=2, qk_norm=True,
              tie_embeddings=False, bias=False, logit_softcap=15.0)
RELU2_GQA_ONE_KV = dict(mlp="relu2", n_head=4, n_kv_head=1, position="rope", norm="rmsnorm")
CONFIGS = {"gpt2": GPT2_STYLE, "modern": MODERN, "relu2-mqa": RELU2_GQA_ONE_KV}


def tiny_model(seed: int = 0, **options) -> GPT:
    fields = dict(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32, init_std=0.1)
    fields.update(options)
    torch.manual_seed(seed)
    return GPT(ModelConfig(**fields)).eval()


def random_ids(length: int, seed: int = 1, batch: int = 2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- causality and the KV cache ----


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_changing_a_future_token_never_changes_earlier_logits(name):
    model = tiny_model(**CONFIGS[name])
    ids = random_ids(16)
    logits, _ = model(ids)
    for position in (0, 5, 15):
        changed = ids.clone()
        changed[:, position] = (changed[:, position] + 1) % VOCAB
        new_logits, _ = model(changed)
        torch.testing.assert_close(new_logits[:, :position], logits[:, :position], rtol=0, atol=1e-6)
        # ...while the changed position itself (and so everything after it) does see the change
        assert (new_logits[:, position] - logits[:, position]).abs().max() > 1e-3


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_prefill_then_steps_with_a_kv_cache_equals_the_full_forward(name):
    model = tiny_model(**CONFIGS[name])
    ids = random_ids(16)
    full, _ = model(ids)
    for chunks in ([5] + [1] * 11, [1] * 16, [3, 4, 2, 7]):  # prefill, then one or several tokens at a time
        cache = KVCache.empty(model.config, ids.size(0), ids.device, torch.float32)
        pieces, start = [], 0
        for size in chunks:
            logits, _ = model(ids[:, start : start + size], cache=cache)
            pieces.append(logits)
            start += size
        assert cache.lengths == [16] * ids.size(0)
        torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_rows_of_one_cache_at_different_lengths_each_equal_their_sequence_alone(name):
    """The batched engine's case: rows prefilled one at a time (in an order unlike their slots), then stepped
    together, each at its own position, and in a subset of rows."""
    model = tiny_model(**CONFIGS[name])
    ids = random_ids(16, batch=3)
    full, _ = model(ids)
    cache = model.new_cache(3, ids.device, torch.float32)
    starts = {2: 9, 0: 3, 1: 6}  # row: prompt length
    for row, length in starts.items():
        logits, _ = model(ids[row : row + 1, :length], cache=cache.select([row]))
        torch.testing.assert_close(logits[0], full[row, :length], rtol=1e-5, atol=1e-5)
    assert cache.lengths == [3, 6, 9]
    for _ in range(4):  # all three rows, one token each at its own position
        positions = list(cache.lengths)
        logits, _ = model(ids[[0, 1, 2], positions][:, None], cache=cache)
        torch.testing.assert_close(logits[:, 0], full[[0, 1, 2], positions], rtol=1e-5, atol=1e-5)
    rows = [2, 0]  # a subset, out of order
    positions = [cache.lengths[row] for row in rows]
    logits, _ = model(ids[rows, positions][:, None], cache=cache.select(rows))
    torch.testing.assert_close(logits[:, 0], full[rows, positions], rtol=1e-5, atol=1e-5)
    assert cache.lengths == [8, 10, 14]
    cache.reset(1)  # a slot taken by a new sequence starts over
    logits, _ = model(ids[1:2, :5], cache=cache.select([1]))
    torch.testing.assert_close(logits[0], full[1, :5], rtol=1e-5, atol=1e-5)
    assert cache.lengths == [8, 5, 14]


def test_cache_past_block_size_is_refused():
    model = tiny_model()
    cache = KVCache.empty(model.config, 1, torch.device("cpu"), torch.float32)
    model(random_ids(16, batch=1), cache=cache)
    with pytest.raises(ValueError, match="block_size"):
        model(random_ids(1, batch=1), cache=cache)
    ragged = model.new_cache(2, torch.device("cpu"), torch.float32)  # one full row refuses the batch's step
    model(random_ids(16, batch=1), cache=ragged.select([0]))
    model(random_ids(3, batch=1), cache=ragged.select([1]))
    with pytest.raises(ValueError, match="17 tokens exceeds block_size 16"):
        model(random_ids(1, batch=2), cache=ragged)
    assert ragged.lengths == [16, 3]
    model(random_ids(1, batch=1), cache=ragged.select([1]))  # the other row alone still has room
    assert ragged.lengths == [16, 4]


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_generation_is_the_same_with_and_without_the_cache_past_block_size(name):
    model = tiny_model(**CONFIGS[name])
    prompt = random_ids(5, batch=1)[0].tolist()
    cached = list(generate(model, prompt, 40, temperature=0, use_cache=True))
    uncached = list(generate(model, prompt, 40, temperature=0, use_cache=False))
    assert len(cached) == 40 > model.config.block_size  # the window slid many times
    assert cached == uncached
    # and each token is the argmax of a plain forward over the last block_size tokens
    tokens = list(prompt)
    with torch.no_grad():
        for token in cached:
            logits, _ = model(torch.tensor([tokens[-16:]]))
            assert token == int(logits[0, -1].argmax())
            tokens.append(token)
    # Greedy output of a random model can settle on one token; seeded sampling cannot, and it also agrees.
    sampled = [list(generate(model, prompt, 40, temperature=1.0, use_cache=use_cache,
                             generator=torch.Generator().manual_seed(7))) for use_cache in (True, False)]
    assert sampled[0] == sampled[1]
    assert len(set(sampled[0][16:])) > 5


def test_generation_restores_training_mode_and_stops_at_the_stop_token():
    model = tiny_model().train()
    prompt = random_ids(4, batch=1)[0].tolist()
    greedy = list(generate(model, prompt, 20, temperature=0))
    assert model.training
    stop = greedy[3]
    first = greedy.index(stop)
    assert list(generate(model, prompt, 20, temperature=0, stop_token=stop)) == greedy[:first]


# ---- vocabulary padding ----


@pytest.mark.parametrize("name", CONFIGS)
def test_vocabulary_padding_is_invisible(name):
    model = tiny_model(**CONFIGS[name])
    assert padded_vocab_size(VOCAB) == 64 and model.wte.weight.shape[0] == 64
    targets = random_ids(16, seed=2)
    logits, loss = model(random_ids(16), targets)
    assert logits.shape == (2, 16, VOCAB)
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    assert loss.item() == pytest.approx(reference.item())
    # The padding rows start at zero, so their logits would be 0: with small random weights they would be
    # drawn often if they leaked into the distribution.
    generator = torch.Generator().manual_seed(0)
    sampled = list(generate(model, [1, 2, 3], 300, temperature=2.0, generator=generator))
    assert max(sampled) < VOCAB
    assert len(set(sampled)) > 10  # a real spread of samples, so the bound above means something


@pytest.mark.parametrize("name", CONFIGS)
def test_num_params_does_not_count_padding_rows(name):
    model = tiny_model(**CONFIGS[name])
    expected = 0
    for param_name, param in model.named_parameters():
        if param_name in ("wte.weight", "lm_head.weight"):
            expected += VOCAB * param.shape[1]  # only the real vocabulary's rows
        else:
            expected += param.numel()
    assert model.num_params() == expected
    embeddings = VOCAB * 32 + (model.wpe.weight.numel() if model.wpe is not None else 0)
    assert model.num_params(include_embeddings=False) == expected - embeddings


def test_padding_rows_get_no_gradient():
    model = tiny_model(**MODERN).train()
    _, loss = model(random_ids(16), random_ids(16, seed=2))
    loss.backward()
    assert model.wte.weight.grad[VOCAB:].abs().max() == 0
    assert model.lm_head.weight.grad[VOCAB:].abs().max() == 0
    assert model.lm_head.weight.grad[:VOCAB].abs().max() > 0


# ---- initialization ----


def init_model(init: str, n_layer: int = 4, n_embd: int = 256, **options) -> GPT:
    fields = {"n_head": 4, "block_size": 8, **options}
    return tiny_model(init=init, init_std=0.02, n_layer=n_layer, n_embd=n_embd, **fields)


def test_normal_init_scales_down_the_residual_projections():
    model = init_model("normal")
    residual_std = 0.02 / math.sqrt(2 * 4)
    for name, param in model.named_parameters():
        if param.dim() == 2 and name.startswith("blocks."):
            expected = residual_std if name.endswith(("attn.proj.weight", "mlp.proj.weight")) else 0.02
            assert param.std().item() == pytest.approx(expected, rel=0.1), name
    assert model.wte.weight[:VOCAB].std().item() == pytest.approx(0.02, rel=0.1)
    assert model.wpe.weight.std().item() == pytest.approx(0.02, rel=0.1)


@pytest.mark.parametrize("init", ["xavier", "kaiming"])
def test_xavier_and_kaiming_give_their_theoretical_std(init):
    model = init_model(init, n_layer=1, **MODERN)  # untied head: a linear layer of its own
    checked = 0
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            fan_out, fan_in = module.weight.shape
            expected = math.sqrt(2 / (fan_in + fan_out)) if init == "xavier" else math.sqrt(2 / fan_in)
            weight = module.weight[:VOCAB] if module_name == "lm_head" else module.weight
            assert weight.std().item() == pytest.approx(expected, rel=0.1), module_name
            checked += 1
    assert checked == 5  # qkv, attn.proj, mlp.fc, mlp.proj, lm_head
    # under every scheme embeddings stay N(0, init_std), norm gains 1, padding rows 0
    assert model.wte.weight[:VOCAB].std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.equal(model.blocks[0].norm_1.weight, torch.ones(256))
    assert model.wte.weight[VOCAB:].abs().max() == 0 and model.lm_head.weight[VOCAB:].abs().max() == 0


def test_biases_start_at_zero():
    model = init_model("normal", n_layer=1, n_embd=64)
    biases = [p for name, p in model.named_parameters() if name.endswith(".bias")]
    assert biases and all(bias.abs().max() == 0 for bias in biases)


# ---- sampling ----


def test_top_k_1_is_greedy():
    generator = torch.Generator().manual_seed(0)
    for seed in range(50):
        logits = torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed))
        token = sample_next(logits, temperature=1.5, top_k=1, top_p=None, generator=generator)
        assert token == int(logits.argmax())
    model = tiny_model(**MODERN)
    greedy = list(generate(model, [3, 1, 4], 24, temperature=0))
    sampled = list(generate(model, [3, 1, 4], 24, temperature=1.0, top_k=1,
                            generator=torch.Generator().manual_seed(1)))
    assert sampled == greedy


def test_top_k_keeps_the_k_likeliest():
    probabilities = torch.tensor([0.05, 0.3, 0.05, 0.2, 0.1, 0.3])
    generator = torch.Generator().manual_seed(0)
    seen = {sample_next(probabilities.log(), temperature=1.0, top_k=3, top_p=None, generator=generator)
            for _ in range(500)}
    assert seen == {1, 3, 5}


@pytest.mark.parametrize(("top_p", "allowed"), [(0.55, {2, 4}), (0.75, {2, 4, 0}), (0.3, {2})])
def test_top_p_keeps_the_nucleus(top_p, allowed):
    # sorted: id 2 (0.4), id 4 (0.25), id 0 (0.2), id 1 (0.1), id 3 (0.05)
    probabilities = torch.tensor([0.2, 0.1, 0.4, 0.05, 0.25])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    draws = 3000
    for _ in range(draws):
        counts[sample_next(probabilities.log(), temperature=1.0, top_k=None, top_p=top_p,
                           generator=generator)] += 1
    assert {i for i in range(5) if counts[i] > 0} == allowed
    # inside the nucleus the probabilities are renormalized, not flattened
    kept = torch.tensor(sorted(allowed))
    expected = probabilities[kept] / probabilities[kept].sum()
    torch.testing.assert_close(counts[kept] / draws, expected, rtol=0, atol=0.03)


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([2.0, 1.0, 0.0])
    generator = torch.Generator().manual_seed(0)

    def share_of_top(temperature):
        draws = [sample_next(logits, temperature=temperature, top_k=None, top_p=None, generator=generator)
                 for _ in range(2000)]
        return draws.count(0) / len(draws)

    assert share_of_top(0.25) > share_of_top(1.0) + 0.2
    assert share_of_top(1.0) == pytest.approx(logits.softmax(-1)[0].item(), abs=0.04)


# ---- sanity relations and bad configs ----


def test_flops_per_token_is_about_six_per_parameter_when_attention_is_small():
    model = tiny_model(n_embd=128, n_head=4, n_layer=2, block_size=8, position="rope")
    ratio = model.flops_per_token() / (6 * model.num_params())
    assert 0.9 < ratio < 1.1
    # the attention term grows with the context: 12 * layers * width per extra position
    longer = tiny_model(n_embd=128, n_head=4, n_layer=2, block_size=16, position="rope")
    assert longer.flops_per_token() - model.flops_per_token() == 12 * 2 * 128 * 8


@pytest.mark.parametrize(("options", "message"), [
    (dict(n_embd=30, n_head=4), "multiple of model.n_head"),
    (dict(mlp="geglu"), "unknown model.mlp"),
    (dict(norm="batchnorm"), "unknown model.norm"),
    (dict(n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(n_embd=20, n_head=4, position="rope"), "even head size"),
    (dict(n_layer=0), r"model.n_layer must be in \(0, 1024\]"),
    (dict(dropout=1.0), "model.dropout"),
])
def test_bad_config_is_a_user_error(options, message):
    with pytest.raises(UserError, match=message):
        tiny_model(**options)
