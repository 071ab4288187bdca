"""One pre-norm transformer block built only from ``nn.Linear`` projections.

Keeping q/k/v/out as separate ``nn.Linear`` layers is what lets DeepSpeed AutoTP shard
attention (column-parallel q/k/v, row-parallel out). Under tensor parallelism a rank holds
``heads / tp`` heads, so the head count is read from the projected width, never stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.head_dim = width // heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        heads = q.shape[-1] // self.head_dim

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, heads, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up_proj = nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, causal=causal)
        return x


class CrossAttention(nn.Module):
    """Queries from ``x``, keys and values from ``memory`` (another sequence, possibly of another
    width). ``key_mask`` ([batch, memory tokens], True = attend) hides padding; self-attention with a
    key mask is this module with ``memory = x``. Head count from the projected width, as in ``Attention``."""

    def __init__(self, width: int, heads: int, memory_width: int | None = None):
        super().__init__()
        memory_width = memory_width or width
        self.head_dim = width // heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(memory_width, width)
        self.v_proj = nn.Linear(memory_width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(memory), self.v_proj(memory)
        heads = q.shape[-1] // self.head_dim

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], heads, self.head_dim).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]  # broadcast over heads and queries
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], heads * self.head_dim))


class CrossAttentionBlock(nn.Module):
    """A pre-norm decoder block: bidirectional self-attention, cross-attention to ``memory``, MLP.
    ``key_mask`` hides padding among the block's own tokens, ``memory_mask`` among the memory's."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, memory_width: int | None = None):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.self_attn = CrossAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.cross_attn = CrossAttention(width, heads, memory_width)
        self.ln_3 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, key_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.self_attn(h, h, key_mask)
        x = x + self.cross_attn(self.ln_2(x), memory, memory_mask)
        return x + self.mlp(self.ln_3(x))
