"""Training-free token sparsification of the image tower (EViT-style), checked against the dense tower."""
from __future__ import annotations

import pytest
import torch

from tests.helpers import build_clip, clip_config
from vlmtrain.models.common.token_sparsify import (SparsifiedVisionTower, attention_with_class_row,
                                                   keep_attended_tokens)

CFG = clip_config(embed_dim=32, vision={"width": 32, "layers": 4, "image_size": 32, "patch_size": 8},
                  text={"context_length": 8, "width": 32})


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    return build_clip(CFG).eval().visual


def test_attention_matches_the_block_and_its_class_row_is_the_softmax_of_the_class_query(tower):
    attn = tower.transformer.blocks[1].attn
    x = torch.randn(3, 17, 32)
    out, class_row = attention_with_class_row(attn, x)
    torch.testing.assert_close(out, attn(x), atol=1e-5, rtol=0)
    # Reference for the class row: per head, softmax(q_cls · k / sqrt(d)) over all 17 tokens, mean of heads.
    heads, dim = 32 // attn.head_dim, attn.head_dim
    q = attn.q_proj(x)[:, 0].view(3, heads, dim)
    k = attn.k_proj(x).view(3, 17, heads, dim)
    expected = torch.einsum("bhd,bthd->bht", q, k).div(dim ** 0.5).softmax(-1)[:, :, 1:].mean(1)
    torch.testing.assert_close(class_row, expected, atol=1e-6, rtol=0)


def test_keeps_the_class_token_and_the_most_attended_tokens_in_order_and_fuses_the_rest():
    x = torch.arange(6 * 2, dtype=torch.float32).view(1, 6, 2)  # class token + 5 tokens
    attention = torch.tensor([[0.05, 0.40, 0.10, 0.30, 0.15]])
    kept = keep_attended_tokens(x, attention, keep=0.4, fuse=False)  # ceil(0.4 · 5) = 2 tokens: 1 and 3
    torch.testing.assert_close(kept, x[:, [0, 2, 4]])
    fused = keep_attended_tokens(x, attention, keep=0.4, fuse=True)
    dropped = 0.05 * x[:, 1] + 0.10 * x[:, 3] + 0.15 * x[:, 5]  # EViT: attention-weighted, unnormalised
    torch.testing.assert_close(fused, torch.cat([x[:, [0, 2, 4]], dropped[:, None]], dim=1))
    assert keep_attended_tokens(x, attention, keep=1.0, fuse=True) is x


def test_keep_one_equals_the_dense_tower_and_lower_keeps_shrink_the_tokens_the_later_blocks_see(tower):
    images = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        dense = tower(images)
        for fuse in (True, False):
            torch.testing.assert_close(SparsifiedVisionTower(tower, [1, 2, 3], 1.0, fuse)(images), dense,
                                       atol=1e-5, rtol=0)
    seen = []
    hook = tower.transformer.blocks[3].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.inference_mode():
            sparse = SparsifiedVisionTower(tower, [1, 2, 3], 0.7, fuse=False)(images)
            fused = SparsifiedVisionTower(tower, [1, 2, 3], 0.7, fuse=True)(images)
    finally:
        hook.remove()
    # 16 patches → 12 → 9 → 7 (+ the class token); fused: 12+1 → 10+1 → 8+1
    assert seen == [1 + 7, 1 + 8 + 1]
    assert sparse.shape == fused.shape == dense.shape
    assert not torch.allclose(sparse, dense, atol=1e-3) and not torch.allclose(sparse, fused, atol=1e-3)


def test_depths_outside_the_tower_are_refused(tower):
    with pytest.raises(ValueError, match=r"depths \[4\] are outside the tower's 4 blocks"):
        SparsifiedVisionTower(tower, [1, 4], 0.7)
