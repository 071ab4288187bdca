"""One pre-norm transformer block built only from ``nn.Linear`` projections.

Keeping q/k/v/out as separate ``nn.Linear`` layers is what lets DeepSpeed AutoTP shard
attention (column-parallel q/k/v, row-parallel out). Under tensor parallelism a rank holds
``heads / tp`` heads, so the head count is read from the projected width, never stored.

Stochastic depth skips compute (DINOv2's ``drop_add_residual_stochastic_depth``): in training each
residual branch runs on a random subset of the batch only and is added back scaled, so a dropped
sample costs no FLOPs in that branch. The subset comes from torch's global RNG, which the trainer
seeds per micro-batch from the data-parallel rank (``vlmtrain/rng.py``): tensor-parallel peers drop
the same samples, as their partial sums require.
"""
from __future__ import annotations

from typing import Callable

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

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask``: bool, True where a query may attend to a key, shaped [T, T] or [B, 1, T, T]."""
        batch, tokens, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        heads = q.shape[-1] // self.head_dim

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, tokens, heads, self.head_dim).transpose(1, 2)

        if attn_mask is not None and causal:  # SDPA takes one or the other
            attn_mask = attn_mask & torch.ones(tokens, tokens, dtype=torch.bool, device=x.device).tril()
            causal = False
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask, is_causal=causal)
        return self.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up_proj = nn.Linear(width, hidden)
        self.down_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.gelu(self.up_proj(x)))


def kept_samples(batch: int, rate: float, device: torch.device) -> torch.Tensor:
    """The rows a dropped-path branch runs on: a random ``max(int(batch·(1-rate)), 1)`` of them (as DINOv2)."""
    return torch.randperm(batch, device=device)[: max(int(batch * (1.0 - rate)), 1)]


def residual(x: torch.Tensor, branch: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
             attn_mask: torch.Tensor | None, rate: float) -> torch.Tensor:
    """``x + branch(x)``, or with ``rate`` > 0 the branch on a random subset of the rows only, added
    back scaled by batch/kept (DINOv2's factor: each row is kept with probability kept/batch, so the
    expected output is ``x + branch(x)`` exactly). A per-sample ``attn_mask`` is subset with the rows."""
    if rate <= 0.0:
        return x + branch(x, attn_mask)
    keep = kept_samples(x.shape[0], rate, x.device)
    if attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[0] > 1:
        attn_mask = attn_mask.index_select(0, keep)
    out = branch(x.index_select(0, keep), attn_mask)
    return x.index_add(0, keep, out.to(x.dtype), alpha=x.shape[0] / keep.numel())


class Block(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        rate = self.drop_path if self.training else 0.0
        x = residual(x, lambda h, mask: self.attn(self.ln_1(h), causal=causal, attn_mask=mask), attn_mask, rate)
        return residual(x, lambda h, mask: self.mlp(self.ln_2(h)), None, rate)


def drop_path_rates(rate: float, layers: int) -> list[float]:
    """Stochastic depth's linear rule (Huang et al. 2016): block l of L drops with rate·l/L, so the
    last block has ``rate`` and a one-block tower is not left without any."""
    return [rate * (index + 1) / layers for index in range(layers)]


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, drop_path: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio, rate)
                                    for rate in drop_path_rates(drop_path, layers))

    def forward(self, x: torch.Tensor, causal: bool = False, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, causal=causal, attn_mask=attn_mask)
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
