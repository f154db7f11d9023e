"""The T5-style encoder-decoder (`model.arch = "encoder-decoder"`): the transformer's blocks, twice, and a bridge.

The encoder is `n_layer` of the transformer's blocks (lmforge/model/gpt.py) attending both ways over the source;
the decoder is `n_layer` blocks whose causal self-attention over the target is followed by cross-attention, in
which each target position queries the encoder's final states. One embedding (and the head tied to it) and one
set of positions serve both sides, as in T5. It is pretrained by span corruption (lmforge/model/spans.py).
`forward` is training's (teacher-forced); generation (lmforge/infer/generate.py) runs its parts: `encode` once per
source, `source_keys_values` once (each block's cross-attention keys and values), then `decode` a token at a time
with the decoder's self-attention in a KVCache. Right-padded sources give their lengths, and the padding is hidden
from the encoder's attention and the cross-attention alike.

Every block option of the transformer applies (positions, norms, MLPs, QK-norm, grouped-query self-attention);
the cross-attention has plain multi-head attention without positions, as T5's has no position bias. Parameter
names: `wte`, `wpe`, `encoder.{i}` and `norm_encoder`, `decoder.{i}` (`norm_1`, `attn`, `norm_cross`, `cross.q`,
`cross.kv`, `cross.proj`, `norm_2`, `mlp`), `norm_f`, `lm_head`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.config.sections import ModelConfig
from lmforge.errors import UserError
from lmforge.model.gpt import (
    MLP,
    Attention,
    Block,
    CacheStep,
    KVCache,
    norm_layer,
    padded_vocab_size,
    rotary_tables,
)
from lmforge.model.init import init_weights


class CrossAttention(nn.Module):
    """Queries from the decoder's states (B, T, C), keys and values from the encoder's (B, S, C)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.head_size = config.n_head, config.n_embd // config.n_head
        self.qk_norm = config.qk_norm
        self.dropout = config.dropout
        self.q = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.kv = nn.Linear(config.n_embd, 2 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.proj.residual = True

    def keys_values(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (B, H, S, D) of the encoder's states: computed once per source, however many target
        tokens query them."""
        batch, length, _ = memory.shape
        k, v = (part.view(batch, length, self.n_head, self.head_size).transpose(1, 2)
                for part in self.kv(memory).chunk(2, dim=-1))
        if self.qk_norm:
            k = F.rms_norm(k, (self.head_size,))
        return k, v

    def forward(self, x: torch.Tensor, keys_values: tuple[torch.Tensor, torch.Tensor],
                source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`source_mask` (B, 1, 1, S): the real source tokens of right-padded sources (None: all are real)."""
        batch, length, width = x.shape
        q = self.q(x).view(batch, length, self.n_head, self.head_size).transpose(1, 2)
        if self.qk_norm:
            q = F.rms_norm(q, (self.head_size,))
        k, v = keys_values
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=source_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class DecoderBlock(nn.Module):
    """x + self-attention(norm(x)) (causal), then x + cross-attention(norm(x), memory), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm_1 = norm_layer(config, config.n_embd)
        self.attn = Attention(config, causal=True)
        self.norm_cross = norm_layer(config, config.n_embd)
        self.cross = CrossAttention(config)
        self.norm_2 = norm_layer(config, config.n_embd)
        self.mlp = MLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                source: tuple[torch.Tensor, torch.Tensor], layer: int, cache_step: CacheStep | None = None,
                source_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`source`: this block's cross-attention keys and values of the encoder's states."""
        x = x + self.dropout(self.attn(self.norm_1(x), rotary, cache_step, layer))
        x = x + self.dropout(self.cross(self.norm_cross(x), source, source_mask))
        return x + self.dropout(self.mlp(self.norm_2(x)))


class EncoderDecoder(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        if config.arch != "encoder-decoder":
            raise UserError(f"EncoderDecoder builds model.arch 'encoder-decoder', not '{config.arch}'")
        self.config = config
        self.vocab_size = config.vocab_size
        self.padded_vocab_size = padded_vocab_size(config.vocab_size)
        self.wte = nn.Embedding(self.padded_vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd) if config.position == "learned" else None
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(Block(config, causal=False) for _ in range(config.n_layer))
        self.norm_encoder = norm_layer(config, config.n_embd)
        self.decoder = nn.ModuleList(DecoderBlock(config) for _ in range(config.n_layer))
        self.norm_f = norm_layer(config, config.n_embd)
        self.lm_head = None if config.tie_embeddings else \
            nn.Linear(config.n_embd, self.padded_vocab_size, bias=False)
        if config.position == "rope":
            cos, sin = rotary_tables(config.n_embd // config.n_head, config.block_size, config.rope_theta)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        init_weights(self, config)

    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head.weight

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype) -> KVCache:
        """The decoder's self-attention cache (its n_layer blocks, block_size target positions per row)."""
        return KVCache.empty(self.config, batch, device, dtype)

    def _embed(self, idx: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Token and position embeddings of idx (B, T) at positions (T,) or, per row, (B, T)."""
        x = self.wte(idx)
        if self.wpe is not None:
            return self.dropout(x + self.wpe(positions)), None
        rotary = self.rope_cos[positions], self.rope_sin[positions]
        if positions.dim() == 2:  # per row: broadcast over the heads of (B, H, T, D)
            rotary = rotary[0][:, None], rotary[1][:, None]
        return self.dropout(x), rotary

    def _positions(self, idx: torch.Tensor) -> torch.Tensor:
        length = idx.size(1)
        if length > self.config.block_size:
            raise ValueError(f"sequence of {length} tokens exceeds block_size {self.config.block_size}")
        return torch.arange(length, device=idx.device)

    @staticmethod
    def source_mask(source: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor | None:
        """(B, 1, 1, S): which source positions are real in right-padded rows of `lengths` tokens (None: all)."""
        if lengths is None:
            return None
        return (torch.arange(source.size(1), device=source.device) < lengths[:, None])[:, None, None]

    def encode(self, source: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The encoder's final states (B, S, C) for source ids (B, S); right-padded rows give their real
        `lengths` (B,), so that no position attends to the padding (the padding's own states are never read)."""
        x, rotary = self._embed(source, self._positions(source))
        key_mask = self.source_mask(source, lengths)
        for layer, block in enumerate(self.encoder):
            x = block(x, rotary, None, layer, key_mask)
        return self.norm_encoder(x)

    def source_keys_values(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each decoder block's cross-attention keys and values of the encoder's states."""
        return [block.cross.keys_values(memory) for block in self.decoder]

    def decode(self, decoder_input: torch.Tensor, source: list[tuple[torch.Tensor, torch.Tensor]],
               source_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab_size) of the next target token after each decoder input (B, T), reading the
        source through its keys and values (`source_keys_values`). With a cache, each row continues its own
        cached target tokens (as GPT.hidden_states), and the cache grows by T."""
        cache_step = None
        if cache is None:
            positions = self._positions(decoder_input)
        else:
            cache_step = cache.step(decoder_input.size(0), decoder_input.size(1), self.config.block_size,
                                    decoder_input.device)
            positions = cache_step.positions
        x, rotary = self._embed(decoder_input, positions)
        for layer, block in enumerate(self.decoder):
            x = block(x, rotary, source[layer], layer, cache_step, source_mask)
        if cache_step is not None:
            cache_step.advance()
        return F.linear(self.norm_f(x), self.head_weight())[..., : self.vocab_size]

    def forward(self, inputs: tuple[torch.Tensor, ...], targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) of the next target token at each decoder position, for inputs (source ids
        (B, S), decoder input ids (B, T)[, the real lengths (B,) of right-padded sources]); with targets (B, T;
        IGNORE scores nothing), also the mean cross-entropy."""
        source, decoder_input, *lengths = inputs
        lengths = lengths[0] if lengths else None
        memory = self.encode(source, lengths)
        logits = self.decode(decoder_input, self.source_keys_values(memory), self.source_mask(source, lengths))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().reshape(-1, self.vocab_size), targets.reshape(-1))

    def num_params(self, include_embeddings: bool = True) -> int:
        """Trainable parameters, the vocabulary padding not counted (as GPT.num_params)."""
        total = sum(p.numel() for p in self.parameters())
        padding = (self.padded_vocab_size - self.vocab_size) * self.config.n_embd
        total -= padding if self.lm_head is None else 2 * padding
        if not include_embeddings:
            total -= self.wte.weight.numel() - padding
            if self.wpe is not None:
                total -= self.wpe.weight.numel()
        return total

    def flops_per_token(self) -> int:
        """Training FLOPs per target token, as GPT.flops_per_token counts them: 6 per weight of every matmul of
        both stacks and the head, plus the attention scores and sums of the self- and cross-attentions
        (a source about as long as the target, both at most block_size)."""
        matmul_weights = sum(p.numel() for name, p in self.named_parameters()
                             if p.dim() == 2 and name.startswith(("encoder.", "decoder.")))
        matmul_weights += self.head_weight().numel()
        config = self.config
        return 6 * matmul_weights + 3 * 12 * config.n_layer * config.n_embd * config.block_size
