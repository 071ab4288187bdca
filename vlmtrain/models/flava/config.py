"""FLAVA model arguments, objective weights and named presets (Singh et al. 2022, torchmultimodal's layout)."""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmtrain.configlib import at_least, between
from vlmtrain.errors import ConfigError
from vlmtrain.models.common.masking import MASK_VOCAB_SIZE, masked_count
from vlmtrain.models.common.stack import StackConfig
from vlmtrain.models.common.temperature import INIT_LOGIT_SCALE
from vlmtrain.models.common.text import TextConfig
from vlmtrain.models.common.vision import VisionConfig


@dataclass
class LossWeights:
    """Each objective's weight in the total loss (FLAVA weighs them all 1); 0 still logs the term."""
    contrastive: float = field(default=1.0, metadata=at_least(0.0))
    mim: float = field(default=1.0, metadata=at_least(0.0))
    mlm: float = field(default=1.0, metadata=at_least(0.0))
    mmm_image: float = field(default=1.0, metadata=at_least(0.0))
    mmm_text: float = field(default=1.0, metadata=at_least(0.0))
    itm: float = field(default=1.0, metadata=at_least(0.0))


@dataclass
class FLAVAConfig:
    """Image encoder, text encoder (bidirectional, with the [MASK] id), fusion encoder, and their heads.

    ``mim_ratio``: share of patches masked in BEiT blocks of at least ``mim_min_block`` patches (FLAVA:
    ~75 of 196, blocks >= 16). The MIM/MMM-image target is the masked patch's pixels normalized per patch
    (MAE's target): FLAVA predicts a DALL-E dVAE's tokens, and no dVAE is available offline.
    ``mlm_prob``: share of text tokens masked BERT-style (80% [MASK], 10% random, 10% kept).
    ``itm_negative_prob``: chance that a sample's text is swapped for another's in the ITM view (0.1,
    as torchmultimodal's FLAVA data modules); ``itm_hard_negatives`` draws the swapped text from the
    in-batch image-text similarity (ALBEF's hard negatives) instead of uniformly.
    """
    family: str = "flava"
    preset: str = "flava_tiny"
    embed_dim: int = field(default=64, metadata=at_least(1))
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(vocab_size=MASK_VOCAB_SIZE))
    fusion: StackConfig = field(default_factory=StackConfig)  # over [fusion CLS; image; text]
    mim_ratio: float = field(default=0.4, metadata=between(0.0, 1.0))
    mim_min_block: int = field(default=16, metadata=at_least(1))
    mlm_prob: float = field(default=0.15, metadata=between(0.0, 1.0))
    itm_negative_prob: float = field(default=0.1, metadata=between(0.0, 1.0))
    itm_hard_negatives: bool = False
    weights: LossWeights = field(default_factory=LossWeights)
    init_logit_scale: float = INIT_LOGIT_SCALE

    def check(self, prefix: str = "model") -> None:
        self.vision.check(f"{prefix}.vision")
        self.text.check(f"{prefix}.text")
        self.fusion.check(f"{prefix}.fusion")
        if self.text.vocab_size != MASK_VOCAB_SIZE:
            raise ConfigError(f"{prefix}.text.vocab_size={self.text.vocab_size}: FLAVA's tokenizer has "
                              f"{MASK_VOCAB_SIZE} ids (open_clip's 49408 and [MASK]); remove the key")
        patches = (self.vision.image_size // self.vision.patch_size) ** 2
        if not 1 <= self.mim_count() < patches:
            raise ConfigError(f"{prefix}.mim_ratio={self.mim_ratio} masks {self.mim_count()} of {patches} "
                              f"patches: MIM needs at least one masked and one visible patch")
        if self.mim_min_block > self.mim_count():
            raise ConfigError(f"{prefix}.mim_min_block={self.mim_min_block} exceeds the {self.mim_count()} "
                              f"patches masked per image: lower it")

    def mim_count(self) -> int:
        """Patches masked per image for MIM/MMM (the same count for every image)."""
        return masked_count((self.vision.image_size // self.vision.patch_size) ** 2, self.mim_ratio)


PRESETS: dict[str, dict] = {
    # Sized for CPU tests and the demo: 16 patches, 6 masked in blocks of >= 2.
    "flava_tiny": {
        "embed_dim": 64,
        "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2},
        "text": {"context_length": 32, "width": 64, "layers": 2, "heads": 2, "vocab_size": MASK_VOCAB_SIZE},
        "fusion": {"width": 64, "layers": 1, "heads": 2},
        "mim_min_block": 2,
    },
    # The paper's: ViT-B/16 image encoder, a BERT-base-sized text encoder, a 6-layer fusion encoder of
    # width 768, 768-d contrastive embeddings.
    "flava_base": {
        "embed_dim": 768,
        "vision": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "text": {"context_length": 77, "width": 768, "layers": 12, "heads": 12, "vocab_size": MASK_VOCAB_SIZE},
        "fusion": {"width": 768, "layers": 6, "heads": 12},
        "mim_min_block": 16,
    },
}
