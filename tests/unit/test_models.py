"""Model towers: shapes, the [1]-shaped logit scale, and the causal text tower."""
import dataclasses
import math

import pytest
import torch

from tests.helpers import CLIP_SPEC, build_clip as build_model, clip_config
from vlmtrain.models.common.temperature import LOGIT_SCALE_MAX


def tiny_config(**vision):
    return clip_config(vision=vision)


def make_tokenizer(cfg):
    return CLIP_SPEC.tokenizer(cfg)


def test_forward_returns_normalized_features_and_scale():
    cfg = tiny_config()
    model = build_model(cfg)
    tokens = make_tokenizer(cfg)(["a red circle", "a blue star on the left", "seven"])
    images = torch.randn(3, 3, 32, 32)
    out = model(images, tokens)
    image_features, text_features, scale = out["image_features"], out["text_features"], out["logit_scale"]
    assert "logit_bias" not in out
    assert image_features.shape == text_features.shape == (3, cfg.embed_dim)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(3))
    assert scale.shape == (1,) and math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-5)


def test_siglip_models_carry_a_learnable_bias():
    cfg = dataclasses.replace(tiny_config(), init_logit_scale=math.log(10), init_logit_bias=-10.0)
    out = build_model(cfg)(torch.randn(2, 3, 32, 32), make_tokenizer(cfg)(["a", "b"]))
    assert out["logit_bias"].shape == (1,) and out["logit_bias"].item() == -10.0
    assert math.isclose(out["logit_scale"].item(), 10.0, rel_tol=1e-5)


def test_logit_scale_is_one_dimensional_for_deepspeed():
    assert build_model(tiny_config()).logit_scale.shape == (1,)


def test_the_trainer_bounds_only_the_logit_scale_to_zero_and_ln_100():
    assert CLIP_SPEC.parameter_bounds == {"logit_scale": (0.0, pytest.approx(LOGIT_SCALE_MAX))}


def test_text_features_ignore_tokens_after_the_end_of_caption():
    cfg = tiny_config()
    model = build_model(cfg).eval()
    tokens = make_tokenizer(cfg)(["a green square"])
    eot = int(tokens.argmax())
    padded_differently = tokens.clone()
    padded_differently[0, eot + 1:] = 7  # junk after EOT must not leak back through causal attention
    torch.testing.assert_close(model.encode_text(tokens), model.encode_text(padded_differently))


@pytest.mark.parametrize("image_size, patch", [(32, 8), (48, 16), (64, 8)])
def test_vision_tower_accepts_configured_resolution(image_size, patch):
    cfg = tiny_config(image_size=image_size, patch_size=patch)
    model = build_model(cfg)
    assert model.encode_image(torch.randn(2, 3, image_size, image_size)).shape == (2, cfg.embed_dim)


def test_vit_b_16_preset_has_the_expected_size():
    with torch.device("meta"):
        model = build_model(clip_config("vit_b_16"))
    params = sum(p.numel() for p in model.parameters())
    assert 145e6 < params < 155e6  # open_clip's ViT-B-16 has 149.6M parameters


def test_vit_l_14_preset_has_the_expected_size():
    with torch.device("meta"):
        model = build_model(clip_config("vit_l_14"))
    params = sum(p.numel() for p in model.parameters())
    assert 425e6 < params < 430e6  # open_clip's ViT-L-14 has 427.6M parameters
