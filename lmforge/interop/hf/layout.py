"""The tensor names on both sides, per architecture: what import and export rename (ours ← theirs).

Per layer i:
  gpt2 (GPT2LMHeadModel): norm_1 ← h.i.ln_1, attn.qkv ← h.i.attn.c_attn, attn.proj ← h.i.attn.c_proj,
      norm_2 ← h.i.ln_2, mlp.fc ← h.i.mlp.c_fc, mlp.proj ← h.i.mlp.c_proj. GPT-2's Conv1D stores weights
      (in, out), so every matrix is transposed.
  llama, arcee, qwen3 (LlamaForCausalLM, ArceeForCausalLM, Qwen3ForCausalLM): norm_1 ← input_layernorm,
      attn.qkv ← q_proj, k_proj, v_proj stacked by rows, attn.proj ← o_proj, norm_2 ←
      post_attention_layernorm, mlp.proj ← down_proj, and mlp.fc ← the MLP_PARTS stacked by rows:
      llama and qwen3 gate_proj, up_proj (silu(gate) * up, lmforge's swiglu); arcee up_proj alone
      (relu(up)², lmforge's relu2). qwen3 also has self_attn.q_norm and k_norm: per-head RMSNorm gains,
      which lmforge's QK-norm does not have (it is F.rms_norm without a weight), so they are ones.
  Rotary embeddings rotate (first half, second half) channel pairs in lmforge and in transformers
  (rotate_half), and key/value head j serves query heads j*g ... (j+1)*g - 1 in both.
"""

from __future__ import annotations

GPT2_LAYER = (("norm_1", "ln_1", False), ("attn.qkv", "attn.c_attn", True), ("attn.proj", "attn.c_proj", True),
              ("norm_2", "ln_2", False), ("mlp.fc", "mlp.c_fc", True), ("mlp.proj", "mlp.c_proj", True))
# The rotary families: the projections lmforge's mlp.fc stacks, and transformers' hidden_act for them.
MLP_PARTS = {"llama": ("gate", "up"), "arcee": ("up",), "qwen3": ("gate", "up")}
HIDDEN_ACT = {"llama": "silu", "arcee": "relu2", "qwen3": "silu"}
