"""LIMoE model arguments and their named presets: one shared transformer for image patches and text
tokens, with a mixture-of-experts MLP in every ``moe.every``-th block (Mustafa et al. 2022)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from vlmtrain.configlib import at_least, choices
from vlmtrain.errors import ConfigError
from vlmtrain.models.common.stack import check_heads
from vlmtrain.models.common.temperature import INIT_LOGIT_SCALE


@dataclass
class MoEConfig:
    """The sparse MLPs, on DeepSpeed's ``MoE`` layer. ``every: 0`` makes a dense model (no experts)."""
    num_experts: int = field(default=4, metadata=at_least(1))
    every: int = field(default=2, metadata=at_least(0))  # blocks every-1, 2·every-1, ... hold experts
    top_k: int = field(default=1, metadata=choices(1, 2))
    capacity_factor: float = field(default=1.0, metadata=at_least(0.0))  # training
    eval_capacity_factor: float = field(default=1.0, metadata=at_least(0.0))
    min_capacity: int = field(default=4, metadata=at_least(0))
    # Router noise while training: DeepSpeed's multiplicative input jitter, or Gumbel noise on the
    # logits (rsample; with top_k=2 it also samples the second expert).
    noisy_gate: str = field(default="none", metadata=choices("none", "jitter", "rsample"))
    # Off: no token is dropped (the capacity grows to the busiest expert's load).
    drop_tokens: bool = True


@dataclass
class LIMoELossConfig:
    """Weights of the terms added to the contrastive loss. The entropy terms are computed per
    modality on the router probabilities: local = mean per-token entropy (minimized: confident
    routing); global = max(0, threshold − entropy of the modality's mean routing distribution)
    (so each modality keeps using several experts: ``threshold`` = ln 2 asks for ≥ 2 experts' worth)."""
    aux_weight: float = field(default=0.01, metadata=at_least(0.0))  # DeepSpeed's load-balancing l_aux
    local_entropy_weight: float = field(default=0.01, metadata=at_least(0.0))
    global_entropy_weight: float = field(default=0.01, metadata=at_least(0.0))
    global_entropy_threshold: float = field(default=math.log(2), metadata=at_least(0.0))  # nats


@dataclass
class LIMoEConfig:
    family: str = "limoe"
    preset: str = "limoe_tiny"
    embed_dim: int = field(default=64, metadata=at_least(1))
    width: int = field(default=64, metadata=at_least(8))
    layers: int = field(default=2, metadata=at_least(1))
    heads: int = field(default=2, metadata=at_least(1))
    mlp_ratio: float = field(default=4.0, metadata=at_least(0.25))
    image_size: int = field(default=32, metadata=at_least(8))
    patch_size: int = field(default=8, metadata=at_least(1))
    context_length: int = field(default=32, metadata=at_least(4))
    vocab_size: int = field(default=49408, metadata=at_least(2))
    text_causal: bool = True  # causal (CLIP-like, EOT pooled) or bidirectional text attention
    shared_final_norm: bool = False  # one final LayerNorm for both modalities, or one each
    moe: MoEConfig = field(default_factory=MoEConfig)
    loss: LIMoELossConfig = field(default_factory=LIMoELossConfig)
    init_logit_scale: float = INIT_LOGIT_SCALE

    def check(self, prefix: str = "model") -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"{prefix}.image_size={self.image_size} is not divisible by "
                              f"{prefix}.patch_size={self.patch_size}")
        check_heads(prefix, self.width, self.heads)
        if self.moe.every > self.layers:
            raise ConfigError(f"{prefix}.moe.every={self.moe.every} exceeds {prefix}.layers={self.layers}: "
                              f"no block would hold experts (use moe.every=0 for a dense model)")
        if self.moe.top_k > self.moe.num_experts:
            raise ConfigError(f"{prefix}.moe.top_k={self.moe.top_k} exceeds {prefix}.moe.num_experts="
                              f"{self.moe.num_experts}")

    def moe_layers(self) -> list[int]:
        """Indices of the blocks whose MLP is a mixture of experts."""
        every = self.moe.every
        return [i for i in range(self.layers) if every and (i + 1) % every == 0]


PRESETS: dict[str, dict] = {
    # Sized for CPU tests and the demo.
    "limoe_tiny": {"embed_dim": 64, "width": 64, "layers": 2, "heads": 2, "image_size": 32, "patch_size": 8,
                   "context_length": 32, "moe": {"num_experts": 4, "every": 2}},
    # LIMoE-B/16 (Mustafa et al. 2022): a ViT-B/16-sized shared encoder, 8 experts in every 2nd block.
    "limoe_b16": {"embed_dim": 512, "width": 768, "layers": 12, "heads": 12, "image_size": 224, "patch_size": 16,
                  "context_length": 77, "moe": {"num_experts": 8, "every": 2}},
}
