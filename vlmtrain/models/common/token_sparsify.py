"""Training-free token sparsification of a ViT image tower, for cheaper inference (EViT, Liang et al. 2022).

``SparsifiedVisionTower`` runs a ``VisionTower``'s own modules (it holds no weights of its own). In
each block of ``depths`` the class token's attention to every other token (averaged over heads) is
computed beside the block's attention (the fused kernel returns no weights); after that attention,
the class token and the ``keep`` fraction of the other tokens it attends to most go on to the
block's MLP and to the later blocks. With ``fuse`` the dropped tokens go on as one extra token, their sum weighted by
that attention (EViT's "inattentive token fusion"; an earlier fused token competes like any other);
without it they are dropped (DynamicViT's hard pruning, with the class attention as the score
instead of DynamicViT's learned predictor, so no training is needed). The kept tokens stay in their
original order. The other blocks run as they are (``Block.forward``, fused attention kernel).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.models.common.blocks import Attention, Block
from vlmtrain.models.common.vision import VisionTower


def attention_with_class_row(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn(x)`` (the same fused kernel), and the class token's (row 0) attention to the other tokens,
    averaged over heads: [B, T-1]. Only that row is computed explicitly: one query against T keys."""
    batch, tokens, _ = x.shape
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    heads = q.shape[-1] // attn.head_dim

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, tokens, heads, attn.head_dim).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, heads * attn.head_dim)
    class_row = ((q[:, :, :1] * attn.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, 1, T]
    return attn.out_proj(out), class_row[:, :, 0, 1:].mean(dim=1)


def keep_attended_tokens(x: torch.Tensor, class_attention: torch.Tensor, keep: float, fuse: bool) -> torch.Tensor:
    """The class token, then the ceil(keep · n) of the n other tokens with the most class attention (in
    their order), then with ``fuse`` the attention-weighted sum of the dropped ones. Unchanged when
    nothing would be dropped."""
    cls, others = x[:, :1], x[:, 1:]
    count = others.shape[1]
    kept_count = max(1, math.ceil(keep * count))
    if kept_count >= count:
        return x
    kept_index = class_attention.topk(kept_count, dim=1).indices.sort(dim=1).values
    kept = others.gather(1, kept_index.unsqueeze(-1).expand(-1, -1, others.shape[-1]))
    if not fuse:
        return torch.cat([cls, kept], dim=1)
    dropped_weight = class_attention.scatter(1, kept_index, 0.0)  # EViT sums them unnormalised
    fused = (dropped_weight.unsqueeze(-1).to(others.dtype) * others).sum(dim=1, keepdim=True)
    return torch.cat([cls, kept, fused], dim=1)


class SparsifiedVisionTower(nn.Module):
    """``tower``'s forward with token sparsification after the attention of the blocks ``depths``."""

    def __init__(self, tower: VisionTower, depths: list[int], keep: float, fuse: bool = True):
        super().__init__()
        blocks = tower.transformer.blocks
        bad = [d for d in depths if not 0 <= d < len(blocks)]
        if bad:
            raise ValueError(f"depths {bad} are outside the tower's {len(blocks)} blocks (0-{len(blocks) - 1})")
        if not all(type(blocks[d]) is Block for d in depths):  # its forward is re-run below, step by step
            raise ValueError("token sparsification needs plain transformer blocks (attention + MLP)")
        self.tower, self.depths, self.keep, self.fuse = tower, frozenset(depths), keep, fuse

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.tower.embed(images)
        for depth, block in enumerate(self.tower.transformer.blocks):
            if depth not in self.depths:
                x = block(x)
                continue
            # Block.forward, with the token selection between its attention and its MLP (as in EViT)
            attended, class_attention = attention_with_class_row(block.attn, block.ln_1(x))
            x = keep_attended_tokens(x + attended, class_attention, self.keep, self.fuse)
            x = x + block.mlp(block.ln_2(x))
        return self.tower.pool(x)
