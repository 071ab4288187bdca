"""FLAVA's objectives on hand-built batches with known answers: which texts the ITM view fuses and
with which labels, that MMM fuses only positive pairs, that MIM/MLM reach only the masked positions,
which parameters each term trains; and the configuration rules (pipeline refused, heads divisible)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmtrain.config import load_train_config
from vlmtrain.errors import ConfigError
from vlmtrain.models.common.masking import masked_count, patch_pixels
from vlmtrain.models.flava import model as flava_model
from vlmtrain.models.flava.loss import FlavaObjective
from vlmtrain.models.registry import get_spec

SPEC = get_spec("flava")
MASK_ID = 49408
BATCH, CONTEXT = 4, 8
# 16 px images in 8 px patches: 4 patches, 2 of them masked; 2 of the 8 text positions masked.
MIM_POSITIONS = torch.tensor([[0, 1], [2, 3], [1, 3], [0, 2]])
MLM_POSITIONS = torch.tensor([[1, 2], [3, 0], [2, 4], [5, 6]])
MLM_LABELS = torch.tensor([[11, 12], [13, -100], [14, 15], [16, 17]])  # sample 1 has one masked token


def tiny_cfg(**keys):
    return SPEC.resolve({"preset": "flava_tiny", "embed_dim": 16, "mim_min_block": 1, "mim_ratio": 0.5,
                         "vision": {"image_size": 16, "width": 16, "layers": 1},
                         "text": {"context_length": CONTEXT, "width": 16, "layers": 1},
                         "fusion": {"width": 16}, **keys})


def hand_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 1000, (BATCH, CONTEXT), generator=generator)
    tokens[:2, -1] = 0  # two captions end in padding
    masked = tokens.clone()
    for row, (positions, labels) in enumerate(zip(MLM_POSITIONS, MLM_LABELS)):
        for position, label in zip(positions, labels):
            if label >= 0:
                tokens[row, position] = label
                masked[row, position] = MASK_ID
    return {"images": torch.randn(BATCH, 3, 16, 16, generator=generator), "tokens": tokens,
            "mim_positions": MIM_POSITIONS, "mlm_tokens": masked, "mlm_positions": MLM_POSITIONS,
            "mlm_labels": MLM_LABELS}


def run(cfg, batch, seed: int = 0):
    """The model, its outputs and loss terms, and the inputs of every encoder/fusion call in order."""
    torch.manual_seed(0)
    model = SPEC.build(cfg)
    calls: dict[str, list] = {"visual": [], "text": [], "fuse": []}
    model.visual.register_forward_hook(lambda m, args, out: calls["visual"].append(out))
    model.text.register_forward_hook(lambda m, args, out: calls["text"].append(out))
    fuse = model.fuse
    model.fuse = lambda image, text, tokens: calls["fuse"].append((image, text, tokens)) or fuse(image, text, tokens)
    torch.manual_seed(seed)
    out = model(**batch)
    return model, out, FlavaObjective(cfg)(out), calls


def test_itm_labels_match_the_swaps():
    batch = hand_batch()
    for prob, expected_labels in ((0.0, [1] * BATCH), (1.0, [0] * BATCH), (0.5, None)):
        _, out, _, calls = run(tiny_cfg(itm_negative_prob=prob), batch)
        unmasked_text = calls["text"][0]
        fused_text = calls["fuse"][0][1]
        # Which sample's text each ITM row fused, read back from the fusion's input.
        index = [next(j for j in range(BATCH) if torch.equal(fused_text[i], unmasked_text[j])) for i in range(BATCH)]
        labels = out["itm_labels"].tolist()
        assert labels == [int(j == i) for i, j in enumerate(index)]
        assert torch.equal(calls["fuse"][0][2], batch["tokens"][index])  # its padding goes with it
        if expected_labels is not None:
            assert labels == expected_labels
        assert torch.equal(calls["fuse"][0][0], calls["visual"][0])  # every image fused with a text


@pytest.mark.parametrize("hard", [False, True])
def test_hard_negatives_are_drawn_by_the_contrastive_logits(monkeypatch, hard):
    """The shared ``itm_pairs`` (tested with the masking code) draws hard negatives from the similarity it
    is given: here the contrastive logits of the batch, and nothing without the option."""
    seen = []
    real = flava_model.itm_pairs
    monkeypatch.setattr(flava_model, "itm_pairs", lambda *args, **kw: seen.append(kw["similarity"]) or real(*args, **kw))
    _, out, _, _ = run(tiny_cfg(itm_hard_negatives=hard), hand_batch())
    if hard:
        expected = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        torch.testing.assert_close(seen[0], expected)
        assert not seen[0].requires_grad
    else:
        assert seen == [None]


def test_mmm_fuses_only_positive_pairs():
    """All ITM pairs negative, yet the masked view fuses image i with text i: its masked states, in order."""
    cfg = tiny_cfg(itm_negative_prob=1.0)
    model, out, terms, calls = run(cfg, hand_batch())
    assert out["itm_labels"].tolist() == [0] * BATCH
    batch = hand_batch()
    image, text, tokens = calls["fuse"][1]
    assert torch.equal(image, calls["visual"][1]) and torch.equal(text, calls["text"][1])
    assert torch.equal(tokens, batch["mlm_tokens"])
    # The MMM text term by hand: the fusion of the positive pairs at the masked text positions.
    fused = model.fuse(calls["visual"][1], calls["text"][1], batch["mlm_tokens"])
    at = MLM_POSITIONS + 2 + 4  # after the fusion CLS, the image CLS and the 4 patches
    logits = model.mmm_text_head(fused[torch.arange(BATCH)[:, None], at])
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), MLM_LABELS.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(terms["mmm_text"], expected)


def masked_state_grads(term: str):
    """Gradients of one term at the masked view's encoder outputs (image and text states)."""
    model, out, terms, calls = run(tiny_cfg(), hand_batch())
    image, text = calls["visual"][1], calls["text"][1]
    return torch.autograd.grad(terms[term], (image, text), allow_unused=True)


def test_mim_reaches_only_the_masked_patches_with_normalized_pixel_targets():
    batch = hand_batch()
    grad_image, grad_text = masked_state_grads("mim")
    assert grad_text is None
    reached = grad_image.abs().sum(-1) > 0  # [B, 1 + patches]
    expected = torch.zeros_like(reached)
    expected[torch.arange(BATCH)[:, None], MIM_POSITIONS + 1] = True
    assert torch.equal(reached, expected)
    _, out, _, _ = run(tiny_cfg(), batch)
    pixels = patch_pixels(batch["images"], 8)
    torch.testing.assert_close(out["mim_target"], pixels[torch.arange(BATCH)[:, None], MIM_POSITIONS])


def test_mlm_reaches_only_the_masked_tokens():
    grad_image, grad_text = masked_state_grads("mlm")
    assert grad_image is None
    reached = grad_text.abs().sum(-1) > 0
    expected = torch.zeros_like(reached)
    for row, (positions, labels) in enumerate(zip(MLM_POSITIONS, MLM_LABELS)):
        expected[row, positions[labels >= 0]] = True
    assert torch.equal(reached, expected)


def test_the_mlm_term_ignores_empty_slots():
    """Logits of an empty slot (label -100) could not be wronger; the term is the CE of the others."""
    cfg = tiny_cfg()
    logits = torch.zeros(2, 2, 5)
    logits[0, 0, 3] = logits[1, 0, 1] = 2.0
    logits[1, 1] = torch.tensor([-50.0, 50, 0, 0, 0])
    labels = torch.tensor([[3, 0], [1, -100]])
    out = {**{name: torch.zeros(1) for name in ("mim_pred", "mim_target", "mmm_image_pred")},
           "image_features": F.normalize(torch.ones(2, 4), dim=-1), "text_features": F.normalize(torch.ones(2, 4), dim=-1),
           "logit_scale": torch.ones(1), "mlm_logits": logits, "mmm_text_logits": logits, "mlm_labels": labels,
           "itm_logits": torch.zeros(2, 2), "itm_labels": torch.tensor([1, 0])}
    terms = FlavaObjective(cfg)(out)
    p_hit = math.exp(2) / (math.exp(2) + 4)
    expected = -(2 * math.log(p_hit) + math.log(1 / 5)) / 3
    assert terms["mlm"].item() == pytest.approx(expected) and terms["mmm_text"].item() == pytest.approx(expected)
    assert terms["itm"].item() == pytest.approx(math.log(2))


# Which parameters (by name prefix) each term must train; every other parameter must get none from it.
ENCODER_TRUNK = ("visual.patch_embed", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre",
                 "visual.transformer", "visual.ln_post")
TEXT_TRUNK = ("text.",)
FUSION = ("image_to_mm", "text_to_mm", "fusion_cls", "fusion.", "fusion_ln")
REACHES = {
    "contrastive": (*ENCODER_TRUNK, "visual.proj", *TEXT_TRUNK, "text_proj", "logit_scale"),
    "mim": (*ENCODER_TRUNK, "visual.mask_token", "mim_head"),
    "mlm": (*TEXT_TRUNK, "mlm_head"),
    "mmm_image": (*ENCODER_TRUNK, "visual.mask_token", *TEXT_TRUNK, *FUSION, "mmm_image_head"),
    "mmm_text": (*ENCODER_TRUNK, "visual.mask_token", *TEXT_TRUNK, *FUSION, "mmm_text_head"),
    "itm": (*ENCODER_TRUNK, *TEXT_TRUNK, *FUSION, "itm_head"),
}


def test_every_term_is_finite_and_trains_exactly_its_parameters():
    """Every parameter gets gradient from the total; each term reaches its own encoders and head only
    (the contrastive projections only from the contrastive term, the [MASK] patch only from the masked
    view, the ITM head only from ITM)."""
    model, _, terms, _ = run(tiny_cfg(), hand_batch())
    assert set(terms) == {"loss", *REACHES}
    named = dict(model.named_parameters())
    for term, prefixes in REACHES.items():
        assert torch.isfinite(terms[term]), term
        grads = torch.autograd.grad(terms[term], list(named.values()), retain_graph=True, allow_unused=True)
        reached = {name for name, grad in zip(named, grads) if grad is not None and grad.abs().sum() > 0}
        assert reached == {name for name in named if name.startswith(prefixes)}, term
    terms["loss"].backward()
    assert [name for name, p in named.items() if p.grad is None or p.grad.abs().sum() == 0] == []
    total = sum(terms[term] for term in REACHES)  # all weights 1
    torch.testing.assert_close(terms["loss"], total)


def test_a_weight_scales_its_term_in_the_total():
    batch = hand_batch()
    _, _, plain, _ = run(tiny_cfg(), batch)
    _, _, weighted, _ = run(tiny_cfg(weights={"itm": 0.0, "mlm": 2.0}), batch)
    torch.testing.assert_close(weighted["loss"], plain["loss"] - plain["itm"] + plain["mlm"])


def test_encoders_give_contrastive_embeddings_for_zero_shot():
    model = SPEC.build(tiny_cfg()).eval()
    batch = hand_batch()
    image = model.encode_image(batch["images"], normalize=True)
    text = model.encode_text(batch["tokens"], normalize=True)
    assert image.shape == text.shape == (BATCH, 16)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(BATCH))


def test_pipeline_parallelism_is_refused_before_launch():
    with pytest.raises(ConfigError, match=r"model.family=flava cannot be pipelined: set parallel.pp=1"):
        load_train_config("configs/train/flava_tiny.yaml", ["parallel.pp=2", "zero_stage=1"])


def test_tensor_parallelism_must_divide_every_encoders_heads():
    with pytest.raises(ConfigError, match=r"parallel.tp=2 does not divide model.fusion.heads=3"):
        load_train_config("configs/train/flava_tiny.yaml", ["parallel.tp=2", "model.fusion.heads=3",
                                                            "model.fusion.width=48"])


def test_padding_is_hidden_from_the_text_and_fusion_encoders():
    """A caption encodes the same with or without trailing padding, alone and fused."""
    model = SPEC.build(tiny_cfg()).eval()
    tokens, images = hand_batch()["tokens"][:2], hand_batch()["images"][:2]
    assert (tokens[:, -1] == 0).all()
    with torch.no_grad():
        padded, trimmed = model.text(tokens), model.text(tokens[:, :-1])
        torch.testing.assert_close(padded[:, :-1], trimmed)
        image = model.visual(images, hidden=True)
        torch.testing.assert_close(model.fuse(image, padded, tokens)[:, :-1],
                                   model.fuse(image, trimmed, tokens[:, :-1]))


def test_the_flop_count_runs_flava_on_the_meta_device():
    """``example_inputs`` carry the loader's extras with fixed shapes, so the forward has no data-dependent
    shapes; a FLAVA step costs more than a CLIP's with the same encoders (two views, fusion, heads)."""
    from vlmtrain.metrics import count_flops_per_sample

    cfg = tiny_cfg()
    clip = get_spec("clip")
    clip_cfg = clip.resolve({"embed_dim": 16, "vision": {"image_size": 16, "width": 16, "layers": 1},
                             "text": {"context_length": CONTEXT, "width": 16, "layers": 1}})
    assert count_flops_per_sample(SPEC, cfg) > 2 * count_flops_per_sample(clip, clip_cfg)


def test_patch_dropout_thins_only_the_unmasked_view():
    """FLIP's patch dropout (half of the 4 patches) shortens the contrastive/ITM view; the masked view
    keeps the whole grid, which MIM and MMM index by patch position."""
    _, out, terms, calls = run(tiny_cfg(vision={"image_size": 16, "width": 16, "layers": 1, "patch_dropout": 0.5}),
                               hand_batch())
    assert calls["visual"][0].shape[1] == 1 + 2 and calls["visual"][1].shape[1] == 1 + 4
    assert calls["fuse"][0][0].shape[1] == 1 + 2 and calls["fuse"][1][0].shape[1] == 1 + 4
    assert all(torch.isfinite(value) for value in terms.values())


def test_the_loader_masks_have_fixed_shapes_and_exact_counts():
    """``sample_inputs``: 40% of the patches (6 of 16) and the BERT-masked caption with its masked
    positions and original ids in fixed slots, the rest -100."""
    cfg = SPEC.resolve({"preset": "flava_tiny"})
    tokens = SPEC.tokenizer(cfg)(["a small red circle on the left of a dark textured background"])[0]
    torch.manual_seed(1)
    extras = SPEC.sample_inputs(cfg)(torch.zeros(3, 32, 32), tokens)
    assert extras["mim_positions"].shape == (6,) and len(set(extras["mim_positions"].tolist())) == 6
    positions, labels = extras["mlm_positions"], extras["mlm_labels"]
    used = labels != -100
    assert positions.shape == labels.shape == (5,)  # 15% of the 30 maskable places of a full context
    maskable = int(((tokens != 0) & (tokens < 49406)).sum())
    assert int(used.sum()) == max(1, masked_count(maskable, 0.15)) > 1
    assert torch.equal(labels[used], tokens[positions[used]])
    changed = (extras["mlm_tokens"] != tokens).nonzero().flatten()
    assert set(changed.tolist()) <= set(positions[used].tolist())
