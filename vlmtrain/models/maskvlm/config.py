"""MaskVLM model arguments and their presets (Kwon et al. 2023, "Masked Vision and Language Modeling
for Multi-modal Representation Learning").

Two encoders (a ViT and a text transformer), two cross-modal decoders (text attending to the image,
for MLM and ITM; image attending to the text, for MIM) and a contrastive head for ITC.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from vlmtrain.configlib import at_least, between, choices
from vlmtrain.errors import ConfigError
from vlmtrain.models.common.masking import MASK_VOCAB_SIZE, masked_count
from vlmtrain.models.common.stack import StackConfig
from vlmtrain.models.common.temperature import INIT_LOGIT_SCALE
from vlmtrain.models.common.text import TextConfig
from vlmtrain.models.common.vision import VisionConfig


@dataclass
class LossWeights:
    itc: float = field(default=1.0, metadata=at_least(0.0))
    itm: float = field(default=1.0, metadata=at_least(0.0))
    mlm: float = field(default=1.0, metadata=at_least(0.0))
    mim: float = field(default=1.0, metadata=at_least(0.0))


@dataclass
class MaskVLMConfig:
    """``text_decoder`` runs at the text width (it continues the text stream); ``image_decoder`` is the
    small MIM decoder, projected from the vision width to its own. ``mim_block_px`` is the side of a
    masked block in pixels at 224 px images, scaled with the image size (see ``mim_block_patches``)."""
    family: str = "maskvlm"
    preset: str = "maskvlm_tiny"
    embed_dim: int = field(default=64, metadata=at_least(1))
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(vocab_size=MASK_VOCAB_SIZE))
    text_decoder: StackConfig = field(default_factory=StackConfig)
    image_decoder: StackConfig = field(default_factory=StackConfig)
    mlm_ratio: float = field(default=0.3, metadata=between(0.0, 1.0))
    mim_ratio: float = field(default=0.6, metadata=between(0.0, 1.0))
    mim_block_px: int = field(default=32, metadata=at_least(1))
    mim_loss: str = field(default="l1", metadata=choices("l1", "mse"))
    itm_hard_negatives: bool = False
    weights: LossWeights = field(default_factory=LossWeights)
    init_logit_scale: float = INIT_LOGIT_SCALE

    def check(self, prefix: str = "model") -> None:
        self.vision.check(f"{prefix}.vision")
        self.text.check(f"{prefix}.text")
        self.text_decoder.check(f"{prefix}.text_decoder")
        self.image_decoder.check(f"{prefix}.image_decoder")
        if self.text_decoder.width != self.text.width:
            raise ConfigError(f"{prefix}.text_decoder.width={self.text_decoder.width} must equal "
                              f"{prefix}.text.width={self.text.width} (the decoder continues the text stream)")
        if self.text.vocab_size < MASK_VOCAB_SIZE:
            raise ConfigError(f"{prefix}.text.vocab_size={self.text.vocab_size} has no [MASK] id: it must be "
                              f">= {MASK_VOCAB_SIZE} (open_clip's vocabulary plus one)")
        grid, side = self.vision.image_size // self.vision.patch_size, self.mim_block_patches
        if grid % side:
            raise ConfigError(f"{prefix}.mim_block_px={self.mim_block_px} gives blocks of {side} patches, which do "
                              f"not tile the {grid}x{grid} patch grid: pick a block size whose side divides it")
        if not 0 < self.mim_masked_patches < self.num_patches:
            raise ConfigError(f"{prefix}.mim_ratio={self.mim_ratio} masks {self.mim_masked_patches} of "
                              f"{self.num_patches} patches: the MIM decoder needs at least one masked and one visible")

    @property
    def num_patches(self) -> int:
        return (self.vision.image_size // self.vision.patch_size) ** 2

    @property
    def mim_block_patches(self) -> int:
        """Side of a masked block in patches: ``mim_block_px`` at 224 px, scaled to this image size."""
        return max(1, round(self.mim_block_px / 224 * self.vision.image_size / self.vision.patch_size))

    @property
    def mim_masked_patches(self) -> int:
        """Patches each image mask hides: ``mim_ratio`` of the blocks (rounded), each block side² patches."""
        blocks = (self.vision.image_size // self.vision.patch_size // self.mim_block_patches) ** 2
        return masked_count(blocks, self.mim_ratio) * self.mim_block_patches ** 2

    @property
    def mlm_slots(self) -> int:
        """The most MLM targets a caption can have (``masking.mask_text``'s count for a caption filling the
        context between SOT and EOT): the MLM head runs on this many positions per caption."""
        return max(1, masked_count(self.text.context_length - 2, self.mlm_ratio))


PRESETS: dict[str, dict] = {
    # Sized for CPU tests and the demo (the tiny CLIP's towers, one-layer decoders).
    "maskvlm_tiny": {
        "embed_dim": 64,
        "vision": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2},
        "text": {"context_length": 32, "vocab_size": MASK_VOCAB_SIZE, "width": 64, "layers": 2, "heads": 2},
        "text_decoder": {"width": 64, "layers": 1, "heads": 2},
        "image_decoder": {"width": 32, "layers": 1, "heads": 2},
    },
    # ViT-B/16 and a base text transformer (width 768, 12 heads) split ALBEF-style, as MaskVLM builds on
    # it: 6 text encoder layers, then 6 cross-attention layers (the text decoder); a 256-d contrastive
    # space; an MAE-sized image decoder (width 512, 16 heads), 4 cross-attention layers.
    "maskvlm_base": {
        "embed_dim": 256,
        "vision": {"image_size": 224, "patch_size": 16, "width": 768, "layers": 12, "heads": 12},
        "text": {"context_length": 77, "vocab_size": MASK_VOCAB_SIZE, "width": 768, "layers": 6, "heads": 12},
        "text_decoder": {"width": 768, "layers": 6, "heads": 12},
        "image_decoder": {"width": 512, "layers": 4, "heads": 16},
    },
}
