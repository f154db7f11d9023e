"""One configurable transformer: GPT-2 by default, the modern choices as small branches.

`model.arch = "gpt"` is the decoder (causal attention: a position sees itself and what came before);
`model.arch = "encoder"` is the same blocks with bidirectional attention (every position sees every other, the
BERT family), trained by masked-language modelling (lmforge/model/masking.py) instead of next-token prediction.

GPT-2 style: learned positions, LayerNorm with bias, GELU MLP 4x, tied embedding and head. Options:
rotary positions, RMSNorm, SwiGLU or ReLU² MLP, QK-norm, grouped-query attention (`n_kv_head`), untied
head, no biases, logit soft-cap, dropout; and two from the speedrun literature: value embeddings (a token
embedding per layer added to the attention values) and multi-token prediction (extra heads that learn tokens
further ahead while training; nothing else reads them). The vocabulary is padded to a multiple of 64 inside the
embedding (faster matmuls); logits and losses only ever cover the real `vocab_size` tokens.

Parameter names (`wte`, `wpe`, `blocks.{i}.norm_1`, `.attn.qkv`, `.attn.proj`, `.norm_2`, `.mlp.fc`,
`.mlp.proj`, `norm_f`, `lm_head`; with the options, `value_embeds.{i}` and `ahead.{k}`) are the checkpoint
format every engine and exporter reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config.sections import ModelConfig
from lmforge.errors import UserError
from lmforge.model.activations import activation
from lmforge.model.init import init_weights

VOCAB_MULTIPLE = 64
TRANSFORMER_ARCHS = ("gpt", "encoder")  # the model.arch choices this class builds


def padded_vocab_size(vocab_size: int) -> int:
    return -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def mlp_hidden_size(config: ModelConfig) -> int:
    """4x the width; SwiGLU has three matrices instead of two, so 2/3 of that (rounded up to 64) matches
    the parameter count."""
    if config.mlp_hidden:
        return config.mlp_hidden
    if config.mlp == "swiglu":
        return -(-(8 * config.n_embd // 3) // 64) * 64
    return 4 * config.n_embd


def norm_eps(config: ModelConfig) -> float:
    if config.norm_eps > 0:
        return config.norm_eps
    return 1e-6 if config.norm == "rmsnorm" else 1e-5


def norm_layer(config: ModelConfig, size: int) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(size, eps=norm_eps(config))
    return nn.LayerNorm(size, bias=config.bias, eps=norm_eps(config))


def rotary_tables(head_size: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, (length, head_size / 2), for rotating pairs of channels."""
    frequencies = theta ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
    angles = torch.outer(torch.arange(length, dtype=torch.float64), frequencies)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (first half, second half) channel pair of x (B, H, T, D) by its position's angle."""
    first, second = x.float().chunk(2, dim=-1)
    rotated = torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
    return rotated.type_as(x)


@dataclass
class KVCache:
    """Keys and values of the tokens seen so far, per layer (rows, n_kv_head, block_size, head_size), and how many
    tokens each row holds. Rows fill at their own pace (the batched engine's requests each have their own
    length): a row's new tokens take the positions after its own cached ones and see only its own tokens. A
    forward extends every row in order, or the rows a `select` names."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    lengths: list[int]
    rows: list[int] | None = None  # the cache rows of a forward's batch rows, in order; None: every row

    @classmethod
    def empty(cls, config: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        shape = (batch, config.n_kv_head or config.n_head, config.block_size, config.n_embd // config.n_head)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)], [0] * batch)

    def select(self, rows: Sequence[int]) -> KVCache:
        """The same cache (storage and lengths shared) for a forward whose batch row i extends cache row rows[i]."""
        return KVCache(self.keys, self.values, self.lengths, list(rows))

    def reset(self, row: int) -> None:
        """Forget a row's tokens: the next forward on it starts at position 0 and overwrites its keys and values."""
        self.lengths[row] = 0

    def step(self, batch: int, length: int, block_size: int, device: torch.device) -> CacheStep:
        """Where a forward of `length` new tokens for each of `batch` rows goes."""
        rows = self.rows if self.rows is not None else list(range(len(self.lengths)))
        if batch != len(rows):
            raise ValueError(f"a batch of {batch} rows for a cache of {len(rows)}")
        starts = [self.lengths[row] for row in rows]
        if max(starts) + length > block_size:
            raise ValueError(f"sequence of {max(starts) + length} tokens exceeds block_size {block_size}")
        positions = torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)
        span = max(starts) + length
        mask = None
        if any(starts):  # new token t of row b sees that row's cached tokens and new tokens up to itself
            mask = (torch.arange(span, device=device) <= positions[:, :, None])[:, None]
        consecutive = rows == list(range(rows[0], rows[0] + len(rows)))
        return CacheStep(self, rows, torch.tensor(rows, device=device), positions, span, mask,
                         slice(rows[0], rows[0] + len(rows)) if consecutive else None,
                         starts[0] if len(set(starts)) == 1 else None)


@dataclass(frozen=True)
class CacheStep:
    """One forward's place in a KVCache: batch row b writes cache row rows[b] at positions[b] (B, T) and
    attends over that row's first `span` entries through `mask` (B, 1, T, span). The mask is None when no row
    has cached tokens: the new tokens alone, under the plain causal mask, exactly as without a cache."""

    cache: KVCache
    rows: list[int]
    row_index: torch.Tensor  # rows, on the device
    positions: torch.Tensor
    span: int
    mask: torch.Tensor | None
    # The common cases as plain slices (a view and a copy instead of gathering and scattering by index): the rows
    # when they are consecutive cache rows (one request's own, or every row), their start when all rows share it.
    consecutive: slice | None
    start: int | None

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values (B, H_kv, T, D) of one layer; return all that the new tokens attend
        over."""
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        if self.consecutive is not None and self.start is not None:
            new = slice(self.start, self.start + k.size(2))
            keys[self.consecutive, :, new] = k
            values[self.consecutive, :, new] = v
        else:
            keys[self.row_index[:, None], :, self.positions] = k.transpose(1, 2)
            values[self.row_index[:, None], :, self.positions] = v.transpose(1, 2)
        if self.mask is None:
            return k, v
        if self.consecutive is not None:  # a view, no copy
            return keys[self.consecutive, :, : self.span], values[self.consecutive, :, : self.span]
        return keys[self.row_index, :, : self.span], values[self.row_index, :, : self.span]

    def advance(self) -> None:
        """The rows now hold their new tokens too."""
        for row in self.rows:
            self.cache.lengths[row] += self.positions.size(1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, causal: bool | None = None):
        super().__init__()
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head or config.n_head
        self.head_size = config.n_embd // config.n_head
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        # the decoder's self-attention is causal, the encoder's attends both ways (None: as model.arch says)
        self.causal = config.arch == "gpt" if causal is None else causal
        qkv_size = (self.n_head + 2 * self.n_kv_head) * self.head_size
        self.qkv = nn.Linear(config.n_embd, qkv_size, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.residual = True  # init: scaled down by depth

    def heads(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
              value_embedding: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (B, H, T, D), keys and values (B, H_kv, T, D) of x (B, T, C), normed and rotated; a layer's
        value embedding of the tokens (B, T, H_kv * D) is added to its values."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_size, self.n_kv_head * self.head_size,
                                     self.n_kv_head * self.head_size], dim=-1)
        q = q.view(batch, length, self.n_head, self.head_size).transpose(1, 2)  # (B, H, T, D)
        k = k.view(batch, length, self.n_kv_head, self.head_size).transpose(1, 2)
        if value_embedding is not None:
            v = v + value_embedding
        v = v.view(batch, length, self.n_kv_head, self.head_size).transpose(1, 2)
        if self.qk_norm:  # unit-RMS queries and keys keep attention logits bounded at high learning rates
            q, k = F.rms_norm(q, (self.head_size,)), F.rms_norm(k, (self.head_size,))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        return q, k, v

    def probabilities(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """The attention probabilities (B, H, T, T) for x (B, T, C) with no cache (causal for the decoder): what
        SDPA computes inside and never returns, written out for the report (GPT.attention_maps)."""
        q, k, _ = self.heads(x, rotary)
        k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        scores = q.float() @ k.float().transpose(-2, -1) / self.head_size**0.5
        if not self.causal:
            return scores.softmax(-1)
        visible = torch.ones(x.size(1), x.size(1), dtype=torch.bool, device=x.device).tril()
        return scores.masked_fill(~visible, float("-inf")).softmax(-1)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                cache_step: CacheStep | None, layer: int, key_mask: torch.Tensor | None = None,
                value_embedding: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.heads(x, rotary, value_embedding)
        mask = key_mask  # (B, 1, 1, T): the keys an encoder's padded rows attend to (their real tokens)
        if cache_step is not None:
            k, v = cache_step.extend(layer, k, v)
            mask = cache_step.mask
        if self.n_kv_head != self.n_head:  # each key/value head serves a group of query heads
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        dropout = self.dropout if self.training else 0.0
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=self.causal)
        else:  # new tokens after cached ones, each row at its own position; or an encoder's padded rows
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        self.act = activation(config.activation or "gelu")  # GPT-2's tanh-approximated GELU by default
        hidden = mlp_hidden_size(config)
        # SwiGLU: one matrix computes gate and value side by side, split in forward.
        self.fc = nn.Linear(config.n_embd, 2 * hidden if self.kind == "swiglu" else hidden, bias=config.bias)
        self.proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.proj.residual = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.kind == "gelu":
            h = self.act(h)
        elif self.kind == "relu2":
            h = F.relu(h).square()
        else:
            gate, value = h.chunk(2, dim=-1)
            h = F.silu(gate) * value
        return self.proj(h)


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, causal: bool | None = None):
        super().__init__()
        self.norm_1 = norm_layer(config, config.n_embd)
        self.attn = Attention(config, causal)
        self.norm_2 = norm_layer(config, config.n_embd)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                cache_step: CacheStep | None, layer: int, key_mask: torch.Tensor | None = None,
                value_embedding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm_1(x), rotary, cache_step, layer, key_mask, value_embedding))
        return x + self.dropout(self.mlp(self.norm_2(x)))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch not in TRANSFORMER_ARCHS:  # the values were checked when the config was made (lmforge/config/)
            raise UserError(f"GPT builds model.arch 'gpt' or 'encoder', not '{config.arch}' "
                            "(lmforge.model.factory.build_model builds every arch)")
        self.config = config
        self.causal = config.arch == "gpt"
        self.vocab_size = config.vocab_size
        self.padded_vocab_size = padded_vocab_size(config.vocab_size)
        self.wte = nn.Embedding(self.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = norm_layer(config, config.n_embd)
        self.lm_head = None if config.tie_embeddings else \
            nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
        # Value embeddings: one table per layer, as wide as the layer's values; zero at the start, so the model
        # starts as it would without them.
        kv_width = (config.n_kv_head or config.n_head) * (config.n_embd // config.n_head)
        self.value_embeds = nn.ModuleList(nn.Embedding(config.vocab_size, kv_width) for _ in range(config.n_layer)) \
            if config.value_embeddings else None
        # Multi-token prediction: head k reads the final states through a residual projection of its own (zero
        # at the start: it begins as the next-token head) and the shared unembedding, and learns token t + 1 + k.
        self.ahead = nn.ModuleList(nn.Linear(config.n_embd, config.n_embd, bias=False)
                                   for _ in range(config.multi_token))
        if config.position == "rope":
            cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, config)
        with torch.no_grad():
            for table in self.value_embeds or ():
                table.weight.zero_()
            for projection in self.ahead:
                projection.weight.zero_()

    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        if not self.causal:  # a cache holds the past for the next token; an encoder reads the future too
            raise UserError("model.arch = encoder does not generate text (it fills in masked tokens); sample, chat "
                            "and serve take a decoder (model.arch = gpt)")
        return KVCache.empty(self.config, batch, device, dtype)

    @torch.no_grad()
    def attention_maps(self, idx: torch.Tensor, layer: int) -> torch.Tensor:
        """The attention probabilities (B, n_head, T, T) of one layer for token ids idx (B, T). A forward
        pre-hook on that layer's attention sees its input during one forward and computes them on the side,
        so the forward that training and generation run carries nothing for the report."""
        attention = self.blocks[layer].attn
        maps = []
        hook = attention.register_forward_pre_hook(
            lambda module, args: maps.append(module.probabilities(args[0], args[1])))
        try:
            self(idx)
        finally:
            hook.remove()
        return maps[0]

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, lengths: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The final normed states (B, T, n_embd) that the head reads, for token ids idx (B, T). With a cache,
        each row of idx continues its own cached tokens, at its own positions, and the cache grows by T. An
        encoder's right-padded rows give their real `lengths` (B,), so that no position attends to the padding
        (a decoder's positions never see later ones, padding included, and need none)."""
        batch, length = idx.shape
        cache_step = None
        key_mask = None
        if lengths is not None:
            if self.causal:
                raise ValueError("lengths are for an encoder's padded rows; a decoder never attends to later padding")
            key_mask = (torch.arange(length, device=idx.device) < lengths[:, None])[:, None, None]
        if cache is None:
            if length > self.config.block_size:
                raise ValueError(f"sequence of {length} tokens exceeds block_size {self.config.block_size}")
            positions = torch.arange(length, device=idx.device)  # (T,): the same for every row
        else:
            cache_step = cache.step(batch, length, self.config.block_size, idx.device)
            positions = cache_step.positions  # (B, T)
        x = self.wte(idx)
        rotary = None
        if self.wpe is not None:
            x = x + self.wpe(positions)
        else:
            rotary = self.rope_cos[positions], self.rope_sin[positions]
            if positions.dim() == 2:  # per row: broadcast over the heads of (B, H, T, D)
                rotary = rotary[0][:, None], rotary[1][:, None]
        x = self.dropout(x)
        for layer, block in enumerate(self.blocks):
            value_embedding = self.value_embeds[layer](idx) if self.value_embeds is not None else None
            x = block(x, rotary, cache_step, layer, key_mask, value_embedding)
        if cache_step is not None:
            cache_step.advance()
        return self.norm_f(x)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab_size) of final states (B, T, n_embd): the head, soft-capped if the config says."""
        logits = F.linear(states, self.head_weight())
        if self.padded_vocab_size != self.vocab_size:
            logits = logits[..., : self.vocab_size]
        if self.config.logit_softcap > 0:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits / cap)
        return logits

    def cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, self.vocab_size), targets.reshape(-1))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) for token ids idx (B, T); with targets, also the mean cross-entropy.
        With a cache, idx continues the cached tokens of each row (see `hidden_states`). Training with
        multi-token prediction, the loss's gradient also carries the extra heads' (`tokens_ahead_loss`); its
        value stays the next-token loss, so training and validation losses measure the same thing."""
        states = self.hidden_states(idx, cache)
        logits = self.logits(states)
        if targets is None:
            return logits, None
        loss = self.cross_entropy(logits, targets)
        if self.training and len(self.ahead) and targets.size(1) > 1:
            extra = self.config.multi_token_weight * self.tokens_ahead_loss(states, targets)
            loss = loss + (extra - extra.detach())
        return logits, loss

    def tokens_ahead_loss(self, states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy of the multi-token heads: head k (1..K) predicts, from the states at position
        t, the target of position t + k (the token t + 1 + k), wherever the window still has one."""
        losses = []
        for k, projection in enumerate(self.ahead, start=1):
            if k >= targets.size(1):
                break
            ahead = states[:, :-k]
            ahead = F.rms_norm(ahead + projection(ahead), (ahead.size(-1),))
            losses.append(self.cross_entropy(self.logits(ahead), targets[:, k:]))
        return torch.stack(losses).mean()

    def num_params(self, include_embeddings: bool = True) -> int:
        """Trainable parameters, the vocabulary padding not counted; without embeddings: minus wte and wpe
        (an untied head still counts)."""
        total = sum(p.numel() for p in self.parameters())
        padding = (self.padded_vocab_size - self.vocab_size) * self.config.n_embd
        total -= padding if self.lm_head is None else 2 * padding  # an untied head is padded too
        if not include_embeddings:
            total -= self.wte.weight.numel() - padding
            if self.wpe is not None:
                total -= self.wpe.weight.numel()
            total -= sum(table.weight.numel() for table in self.value_embeds or ())
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward + backward = 3x forward), as in the PaLM paper's MFU: 6 per
        weight of every matmul (the head included, at its padded size) plus 12 * layers * width * context for
        the attention scores and the weighted sum. Multi-token prediction's heads count too (a projection and the
        head each): training computes them for (almost) every token."""
        matmul_weights = sum(p.numel() for name, p in self.named_parameters()
                             if p.dim() == 2 and name.startswith(("blocks.", "ahead.")))
        matmul_weights += (1 + len(self.ahead)) * self.head_weight().numel()
        config = self.config
        return 6 * matmul_weights + 12 * config.n_layer * config.n_embd * config.block_size
