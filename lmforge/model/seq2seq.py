"""The T5-style encoder-decoder (`model.arch = "encoder-decoder"`): the transformer's blocks, twice, and a bridge.

The encoder is `n_layer` of the transformer's blocks (lmforge/model/gpt.py) attending both ways over the source;
the decoder is `n_layer` blocks whose causal self-attention over the target is followed by cross-attention, in
which each target position queries the encoder's final states. One embedding (and the head tied to it) and one
set of positions serve both sides, as in T5. It is pretrained by span corruption (lmforge/model/spans.py).

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
from lmforge.model.gpt import MLP, Attention, Block, norm_layer, padded_vocab_size, rotary_tables
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

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q = self.q(x).view(batch, length, self.n_head, self.head_size).transpose(1, 2)
        k, v = (part.view(batch, memory.size(1), self.n_head, self.head_size).transpose(1, 2)
                for part in self.kv(memory).chunk(2, dim=-1))
        if self.qk_norm:
            q, k = F.rms_norm(q, (self.head_size,)), F.rms_norm(k, (self.head_size,))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
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

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None, memory: torch.Tensor,
                layer: int) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.norm_1(x), rotary, None, layer))
        x = x + self.dropout(self.cross(self.norm_cross(x), memory))
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

    def new_cache(self, batch: int, device: torch.device, dtype: torch.dtype):
        raise UserError("model.arch = encoder-decoder: generation from a prompt is not implemented yet")

    def _embed(self, idx: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        length = idx.size(1)
        if length > self.config.block_size:
            raise ValueError(f"sequence of {length} tokens exceeds block_size {self.config.block_size}")
        positions = torch.arange(length, device=idx.device)
        x = self.wte(idx)
        if self.wpe is not None:
            return self.dropout(x + self.wpe(positions)), None
        return self.dropout(x), (self.rope_cos[positions], self.rope_sin[positions])

    def encode(self, source: torch.Tensor) -> torch.Tensor:
        """The encoder's final states (B, S, C) for source ids (B, S). (Span corruption's sources all have one
        length; padded sources, as fine-tuning will bring, need the encoder's key mask, GPT.hidden_states'.)"""
        x, rotary = self._embed(source)
        for layer, block in enumerate(self.encoder):
            x = block(x, rotary, None, layer)
        return self.norm_encoder(x)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab_size) of the next target token at each decoder position, for inputs (source ids
        (B, S), decoder input ids (B, T)); with targets (B, T; IGNORE scores nothing), also the mean
        cross-entropy."""
        source, decoder_input = inputs
        memory = self.encode(source)
        x, rotary = self._embed(decoder_input)
        for layer, block in enumerate(self.decoder):
            x = block(x, rotary, memory, layer)
        logits = F.linear(self.norm_f(x), self.head_weight())[..., : self.vocab_size]
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
