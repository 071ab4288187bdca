"""A plain transformer stack's arguments (FLAVA's fusion encoder, MaskVLM's cross-modal decoders), and the
head-count rule every tower checks."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmtrain.configlib import at_least
from vlmtrain.errors import ConfigError


def check_heads(prefix: str, width: int, heads: int) -> None:
    if width % heads:
        raise ConfigError(f"{prefix}.width={width} is not divisible by {prefix}.heads={heads}")


@dataclass
class StackConfig:
    width: int = field(default=64, metadata=at_least(8))
    layers: int = field(default=1, metadata=at_least(1))
    heads: int = field(default=2, metadata=at_least(1))
    mlp_ratio: float = field(default=4.0, metadata=at_least(0.25))

    def check(self, prefix: str) -> None:
        check_heads(prefix, self.width, self.heads)
