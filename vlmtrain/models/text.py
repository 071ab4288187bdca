"""Causal text transformer, laid out like open_clip's text tower (pooled at the EOT token)."""
from __future__ import annotations

import torch
from torch import nn

from vlmtrain.config import TextConfig
from vlmtrain.models.blocks import Transformer


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        # open_clip's tokenizer gives EOT the largest id, so argmax finds the end of each caption.
        eot = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return self.proj(eot)
