"""MaskVLM on hand-built batches: cross-attention, masks, what each decoder sees, where each loss is
taken, and which parameters each loss term trains."""
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.config import load_train_config
from vlmtrain.errors import ConfigError
from vlmtrain.models.common.blocks import CrossAttention
from vlmtrain.models.common.masking import IGNORE_INDEX, patch_pixels
from vlmtrain.models.maskvlm.spec import block_image_mask, sample_inputs
from vlmtrain.models.registry import get_spec

SPEC = get_spec("maskvlm")
# Tiny: a 4x4 patch grid (10 patches masked in 1-patch blocks), 16 tokens, one decoder layer each.
CFG = SPEC.resolve({"preset": "maskvlm_tiny", "embed_dim": 32, "vision": {"width": 32},
                    "text": {"context_length": 16, "width": 32}, "text_decoder": {"width": 32}})
CAPTIONS = ["a red circle on the left", "a handwritten digit seven", "two green squares"]


def test_cross_attention_with_a_key_mask_equals_attention_without_the_hidden_keys():
    torch.manual_seed(0)
    attention = CrossAttention(16, 2, memory_width=8)
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    key_mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    out = attention(x, memory, key_mask)
    torch.testing.assert_close(out[0], attention(x[:1], memory[:1, :3])[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out[1], attention(x[1:], memory[1:])[0], atol=1e-6, rtol=0)


def test_cross_attention_split_by_heads_sums_to_the_whole():
    """What tensor parallelism does to it: each half holds one head's q/k/v rows and out columns; the
    head count comes from the projected width, and the halves' outputs add up to the full one."""
    torch.manual_seed(0)
    full = CrossAttention(16, 2, memory_width=8)
    x, memory = torch.randn(2, 3, 16), torch.randn(2, 5, 8)
    total = 0
    for rows in (slice(0, 8), slice(8, 16)):
        half = CrossAttention(16, 2, memory_width=8)
        for name in ("q_proj", "k_proj", "v_proj"):
            source = getattr(full, name)
            part = nn.Linear(source.in_features, 8)
            part.weight.data, part.bias.data = source.weight.data[rows], source.bias.data[rows]
            setattr(half, name, part)
        half.out_proj = nn.Linear(8, 16, bias=False)
        half.out_proj.weight.data = full.out_proj.weight.data[:, rows]
        total = total + half(x, memory)
    torch.testing.assert_close(total + full.out_proj.bias, full(x, memory), atol=1e-6, rtol=0)


def test_image_blocks_are_32_pixels_at_224_scaled_with_the_image_size():
    base = SPEC.resolve({"preset": "maskvlm_base"})
    assert (base.mim_block_patches, CFG.mim_block_patches) == (2, 1)
    assert SPEC.resolve({"preset": "maskvlm_base", "vision": {"image_size": 448}}).mim_block_patches == 4
    torch.manual_seed(5)
    mask = block_image_mask(base).reshape(14, 14)
    assert int(mask.sum()) == base.mim_masked_patches == 29 * 4  # 60% of the 7x7 blocks
    blocks = mask.reshape(7, 2, 7, 2).permute(0, 2, 1, 3).reshape(49, 4)
    assert bool((blocks.all(dim=1) | ~blocks.any(dim=1)).all())  # each 2x2 block all masked or none
    torch.manual_seed(5)
    assert torch.equal(block_image_mask(base).reshape(14, 14), mask)  # same seed, same mask


def test_pipeline_parallelism_is_refused_before_launch():
    with pytest.raises(ConfigError, match=r"^model\.family=maskvlm cannot be pipelined: set parallel\.pp=1$"):
        load_train_config("configs/train/maskvlm_tiny.yaml", ["parallel.pp=2", "zero_stage=1"])


def test_the_base_preset_is_vit_b_16_with_a_base_text_transformer():
    with torch.device("meta"):
        model = SPEC.build(SPEC.resolve({"preset": "maskvlm_base"}))
    assert model.visual.positional_embedding.shape == (197, 768)
    assert model.text.token_embedding.weight.shape == (49409, 768)  # open_clip's vocabulary + [MASK]
    assert 270e6 < sum(p.numel() for p in model.parameters()) < 290e6


# ---------------------------------------------------------------- one hand-built batch


@pytest.fixture(scope="module")
def batch():
    """Images whose patch n holds the value n/16 everywhere (a known MIM target), three captions, hand-made
    masks: 10 of the 16 patches hidden, and MLM labels at chosen positions."""
    tokens = SPEC.tokenizer(CFG)(CAPTIONS)
    images = (torch.arange(16.0) / 16).reshape(1, 1, 4, 1, 4, 1).expand(3, 3, 4, 8, 4, 8).reshape(3, 3, 32, 32)
    images = images + 0.01 * torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    image_mask = torch.zeros(3, 16, dtype=torch.bool)
    for row, hidden in enumerate([range(10), range(6, 16), [0, 2, 4, 5, 7, 9, 10, 11, 13, 15]]):
        image_mask[row, list(hidden)] = True
    mlm_labels = torch.full_like(tokens, IGNORE_INDEX)
    positions = {0: [2, 3], 1: [1], 2: [1, 2]}
    mlm_tokens = tokens.clone()
    for row, chosen in positions.items():
        mlm_labels[row, chosen] = tokens[row, chosen]
        mlm_tokens[row, chosen] = 49408
    return {"images": images, "tokens": tokens, "image_mask": image_mask, "mlm_tokens": mlm_tokens,
            "mlm_labels": mlm_labels, "positions": positions}


def inputs(batch):
    return {k: v for k, v in batch.items() if k != "positions"}


@pytest.fixture(scope="module")
def run(batch):
    """One forward of a fresh model with every decoder and encoder call recorded."""
    torch.manual_seed(0)
    model = SPEC.build(CFG)
    calls = {"visual": [], "text": [], "text_decoder": [], "image_decoder": []}
    for name in calls:
        getattr(model, name).register_forward_hook(
            lambda module, args, output, name=name: calls[name].append((args, output)))
    torch.manual_seed(1)
    out = model(**inputs(batch))
    losses = SPEC.build_loss(CFG, None)(out)
    return {"model": model, "out": out, "losses": losses, "calls": calls}


def test_sample_inputs_mask_the_image_in_blocks_and_the_caption_bert_style(batch):
    torch.manual_seed(3)
    extras = sample_inputs(CFG)(batch["images"][0], batch["tokens"][0])
    assert int(extras["image_mask"].sum()) == CFG.mim_masked_patches == 10
    labelled = extras["mlm_labels"] != IGNORE_INDEX
    assert int(labelled.sum()) == 2  # 30% of the 6 words, rounded
    assert torch.equal(extras["mlm_labels"][labelled], batch["tokens"][0][labelled])
    assert torch.equal(extras["mlm_tokens"][~labelled], batch["tokens"][0][~labelled])


def test_itm_pairs_each_image_with_its_own_caption_and_a_swapped_one(batch, run):
    out, (itm_call, itm_output) = run["out"], run["calls"]["text_decoder"][1]
    partner = out["itm_partner"]
    assert torch.equal(out["itm_labels"], torch.tensor([1, 1, 1, 0, 0, 0]))
    assert bool((partner != torch.arange(3)).all())  # every negative is a real swap
    text, text_mask, image = itm_call
    _, caption_tokens = run["calls"]["text"][0][1]
    _, image_tokens = run["calls"]["visual"][0][1]
    torch.testing.assert_close(text, torch.cat([caption_tokens, caption_tokens[partner]]))
    torch.testing.assert_close(image, torch.cat([image_tokens, image_tokens]))  # image i in rows i and B+i
    assert torch.equal(text_mask, torch.cat([batch["tokens"], batch["tokens"][partner]]) != 0)
    # Read where ITC pools the caption: at its EOT, wherever the caption ends.
    eot = torch.cat([batch["tokens"], batch["tokens"][partner]]).argmax(dim=-1)
    assert len(set(eot.tolist())) > 1
    at_eot = itm_output[torch.arange(6), eot]
    torch.testing.assert_close(out["itm_logits"], run["model"].text_decoder.itm_head(at_eot))


def test_the_mlm_decoder_sees_the_unmasked_image_and_the_mim_decoder_the_unmasked_text(batch, run):
    model, calls = run["model"], run["calls"]
    with torch.no_grad():
        _, full_image = model.visual(batch["images"])
        _, caption = model.text(batch["tokens"])
        _, masked_caption = model.text(batch["mlm_tokens"], pool=False)
    mlm_text, _, mlm_memory = calls["text_decoder"][0][0]
    torch.testing.assert_close(mlm_memory, full_image)  # all 1 + 16 tokens of the image
    torch.testing.assert_close(mlm_text, masked_caption)
    _, _, mim_memory, mim_memory_mask = calls["image_decoder"][0][0]
    torch.testing.assert_close(mim_memory, caption)
    assert (mim_memory - masked_caption).abs().max() > 1e-3
    assert torch.equal(mim_memory_mask, batch["tokens"] != 0)
    # The masked view: the encoder got the visible patches only.
    images, keep = calls["visual"][1][0]
    for row in range(3):
        assert sorted(keep[row].tolist()) == (~batch["image_mask"][row]).nonzero().flatten().tolist()


def test_the_mlm_loss_is_taken_at_the_masked_positions_only(batch, run):
    out, model = run["out"], run["model"]
    decoded = run["calls"]["text_decoder"][0][1]
    logits, labels = [], []
    for row, chosen in batch["positions"].items():
        logits.append(model.text_decoder.mlm_head(decoded[row, chosen]))
        labels.append(batch["tokens"][row, chosen])
    expected = F.cross_entropy(torch.cat(logits), torch.cat(labels))
    torch.testing.assert_close(run["losses"]["mlm"], expected)
    slots = out["mlm_labels"]
    assert slots.shape == (3, CFG.mlm_slots) and int((slots != IGNORE_INDEX).sum()) == 5


def test_the_mim_loss_is_l1_on_the_pixels_of_the_masked_patches_only(batch, run):
    out = run["out"]
    target = out["mim_target"]
    assert target.shape == (3, 16, 3 * 8 * 8)
    assert (target - (torch.arange(16.0) / 16)[None, :, None]).abs().max() < 0.05  # patch n holds n/16
    torch.testing.assert_close(target, patch_pixels(batch["images"], 8, normalize=False))
    error = (out["mim_pred"] - target).abs().mean(dim=-1)
    expected = error[batch["image_mask"]].mean()
    torch.testing.assert_close(run["losses"]["mim"], expected)
    assert (error[~batch["image_mask"]].mean() - expected).abs() > 1e-4  # the unmasked ones would differ


# Which parameters each term must train (by name); every other parameter must get no gradient from it.
ENCODERS_BUT_PROJECTIONS = r"(visual|text)\.(?!proj\.)"
TRAINED_BY = {
    "itc": r"(visual|text)\.|logit_scale",
    "itm": rf"{ENCODERS_BUT_PROJECTIONS}|text_decoder\.(?!mlm_head)",
    "mlm": rf"{ENCODERS_BUT_PROJECTIONS}|text_decoder\.(?!itm_head)",
    "mim": rf"{ENCODERS_BUT_PROJECTIONS}|image_decoder\.",
}


def test_every_term_is_finite_and_trains_exactly_its_parameters(batch):
    torch.manual_seed(0)
    model = SPEC.build(CFG)
    losses = SPEC.build_loss(CFG, None)(model(**inputs(batch)))
    assert set(losses) == {"loss", "itc", "itm", "mlm", "mim"}
    assert all(torch.isfinite(value) for value in losses.values())
    torch.testing.assert_close(losses["loss"], sum(losses[term] for term in TRAINED_BY))
    names, params = zip(*model.named_parameters())
    for term, pattern in TRAINED_BY.items():
        grads = torch.autograd.grad(losses[term], params, retain_graph=True, allow_unused=True)
        trained = {name for name, grad in zip(names, grads) if grad is not None and bool(grad.abs().sum() > 0)}
        expected = {name for name in names if re.match(pattern, name)}
        assert trained == expected, f"{term}: missing {sorted(expected - trained)}, extra {sorted(trained - expected)}"
    assert set().union(*({n for n in names if re.match(p, n)} for p in TRAINED_BY.values())) == set(names)


def test_loss_weights_scale_their_terms(run):
    weighted = SPEC.resolve({"preset": "maskvlm_tiny", "weights": {"itc": 0.0, "mim": 2.0}})
    losses, plain = SPEC.build_loss(weighted, None)(run["out"]), run["losses"]
    assert all(torch.equal(losses[term], plain[term]) for term in TRAINED_BY)  # terms are logged unweighted
    torch.testing.assert_close(losses["loss"], plain["itm"] + plain["mlm"] + 2 * plain["mim"])


def test_itm_learns_to_tell_matched_from_swapped_pairs():
    """ITM needs the two modalities aligned first, so a short run leaves it at chance (ln 2; the 2-rank
    test checks the other terms): here ITC and ITM alone train one batch until ITM falls well below it."""
    cfg = SPEC.resolve({"preset": "maskvlm_tiny", "embed_dim": 32, "vision": {"width": 32},
                        "text": {"context_length": 16, "width": 32}, "text_decoder": {"width": 32},
                        "weights": {"mlm": 0.0, "mim": 0.0}})
    torch.manual_seed(0)
    model, objective = SPEC.build(cfg), SPEC.build_loss(cfg, None)
    tokens = SPEC.tokenizer(cfg)(CAPTIONS + ["a yellow star", "the number one written by hand"])
    images = torch.randn(5, 3, 32, 32)
    extras = [sample_inputs(cfg)(image, caption) for image, caption in zip(images, tokens)]
    extras = {name: torch.stack([e[name] for e in extras]) for name in extras[0]}
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    itm = []
    for _ in range(60):
        losses = objective(model(images, tokens, **extras))
        optimizer.zero_grad()
        losses["loss"].backward()
        optimizer.step()
        itm.append(float(losses["itm"].detach()))
    assert itm[0] > 0.69 and sum(itm[-5:]) / 5 < 0.5, itm


def test_forward_and_loss_run_on_the_meta_device():
    """FLOP counts and ``vlm-train plan`` run the model and its loss on the meta device: no shape may
    depend on the data (the masks' counts are fixed, the MLM head reads ``mlm_slots`` positions)."""
    with torch.device("meta"):
        model = SPEC.build(CFG)
        losses = SPEC.build_loss(CFG, None)(model(**SPEC.example_inputs(CFG, 2)))
    assert losses["loss"].shape == () and losses["loss"].is_meta
