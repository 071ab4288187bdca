"""Fixtures for the evaluation tests: a tiny randomly initialised open_clip model as the reference."""
import open_clip
import pytest
import torch
from open_clip.tokenizer import SimpleTokenizer

CONTEXT_LENGTH = 16
CLASSNAMES = ["cat", "dog", "car", "tree", "boat", "plane", "house"]
TEMPLATES = ["a photo of a {c}.", "a blurry drawing of the {c}.", "{c}"]


def tiny_clip(seed: int = 0) -> open_clip.model.CLIP:
    """A randomly initialised CLIP small enough for CPU tests (avg pooling keeps image features diverse)."""
    torch.manual_seed(seed)
    return open_clip.model.CLIP(
        embed_dim=32,
        vision_cfg=dict(layers=1, width=32, head_width=16, patch_size=8, image_size=32, pool_type="avg"),
        text_cfg=dict(context_length=CONTEXT_LENGTH, vocab_size=49408, width=32, heads=2, layers=1),
    ).eval()


@pytest.fixture(scope="module")
def model() -> open_clip.model.CLIP:
    return tiny_clip()


@pytest.fixture(scope="module")
def tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer(context_length=CONTEXT_LENGTH)
