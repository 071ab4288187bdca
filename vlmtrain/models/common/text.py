"""Causal text transformer, laid out like open_clip's text tower (pooled at the EOT token)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vlmtrain.configlib import at_least
from vlmtrain.models.common.blocks import Transformer
from vlmtrain.models.common.stack import check_heads
from vlmtrain.models.common.vision import check_below_one


@dataclass
class TextConfig:
    context_length: int = field(default=32, metadata=at_least(4))
    vocab_size: int = field(default=49408, metadata=at_least(2))
    width: int = field(default=64, metadata=at_least(8))
    layers: int = field(default=2, metadata=at_least(1))
    heads: int = field(default=2, metadata=at_least(1))
    mlp_ratio: float = field(default=4.0, metadata=at_least(0.25))
    # Stochastic depth of the last block (block l of L drops rate·l/L), in [0, 1).
    drop_path: float = 0.0

    def check(self, prefix: str) -> None:
        check_heads(prefix, self.width, self.heads)
        check_below_one(prefix, "drop_path", self.drop_path)


class TextTower(nn.Module):
    def __init__(self, cfg: TextConfig, embed_dim: int):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(cfg.context_length, cfg.width))
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, cfg.drop_path)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.proj = nn.Linear(cfg.width, embed_dim, bias=False)
        nn.init.normal_(self.token_embedding.weight, std=0.02)

    # embed → transformer blocks (causal) → pool: the stages a pipeline splits the tower into.
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]

    def pool(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        # open_clip's tokenizer gives EOT the largest id, so argmax finds the end of each caption.
        eot = self.ln_final(x)[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        return self.proj(eot)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.pool(self.transformer(self.embed(tokens), causal=True), tokens)
