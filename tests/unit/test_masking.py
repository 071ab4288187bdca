"""Masks, the masking tokenizer, pixel targets and visible indices (vlmtrain/models/common/masking.py),
checked against brute force and hand-worked answers; and that a sample's extras are a pure function
of (seed, position) through the real loader and reach the forward as keyword arguments."""
import itertools

import numpy as np
import pytest
import torch
import webdataset as wds

from tests.helpers import clip_config, loader_inputs, png_bytes
from vlmtrain.config import DataConfig
from vlmtrain.data import build_train_loader
from vlmtrain.models.common import masking
from vlmtrain.models.registry import get_spec


def generators(count: int):
    return (torch.Generator().manual_seed(seed) for seed in range(count))


@pytest.mark.parametrize("num, ratio", [(196, 0.75), (196, 0.4), (49, 0.5), (16, 0.0), (16, 1.0), (7, 0.3)])
def test_random_mask_hides_exactly_round_ratio_n(num, ratio):
    expected = int(np.floor(ratio * num + 0.5))
    masks = torch.stack([masking.random_mask(num, ratio, g) for g in generators(200)])
    assert (masks.sum(dim=1) == expected).all()
    if 0 < expected < num:  # placed uniformly: every patch is masked in about ratio of the draws
        assert masks.float().mean(dim=0).sub(expected / num).abs().max() < 0.15


def test_masked_count_rounds_halves_up():
    assert [masking.masked_count(n, 0.5) for n in (1, 3, 5)] == [1, 2, 3]  # round() would give 0, 2, 2
    assert masking.masked_count(196, 0.4) == 78 and masking.masked_count(196, 0.75) == 147


def rectangles_union(grid_h: int, grid_w: int, rectangles) -> torch.Tensor:
    mask = np.zeros((grid_h, grid_w), dtype=bool)
    for top, left, h, w in rectangles:
        assert 0 <= top and top + h <= grid_h and 0 <= left and left + w <= grid_w and h >= 1 and w >= 1
        for i, j in itertools.product(range(top, top + h), range(left, left + w)):
            mask[i, j] = True
    return torch.from_numpy(mask.reshape(-1))


@pytest.mark.parametrize("grid, target, min_block", [((14, 14), 78, 16), ((14, 14), 147, 16), ((7, 7), 29, 4),
                                                     ((4, 6), 23, 16), ((14, 14), 3, 16)])
def test_block_masks_are_exact_unions_of_contiguous_rectangles(grid, target, min_block):
    strip_patches = 0
    for seed in range(60):
        rectangles = masking.block_rectangles(*grid, target, min_block=min_block,
                                              generator=torch.Generator().manual_seed(seed))
        mask = masking.block_mask(*grid, target, min_block=min_block, generator=torch.Generator().manual_seed(seed))
        assert int(mask.sum()) == target
        assert torch.equal(mask, rectangles_union(*grid, rectangles))
        for top, left, h, w in rectangles:
            if h * w < min_block:  # only the top-up strips may be small, and they are one patch wide
                assert min(h, w) == 1
                strip_patches += h * w
            else:  # a block: within the aspect bounds, up to the rounding of its sides
                assert max(h / w, w / h) <= 3.0 * (1 + 1.0 / min(h, w)) + 1e-9
    if target >= 4 * min_block:  # mostly blocks: the top-up only fills the last few patches
        assert strip_patches < 0.1 * 60 * target


def test_block_mask_differs_by_seed_and_checks_its_arguments():
    a, b = (masking.block_mask(14, 14, 78, generator=torch.Generator().manual_seed(s)) for s in (1, 2))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="num_masked"):
        masking.block_mask(4, 4, 17)


def test_the_masking_tokenizer_adds_one_mask_id_and_keeps_clips_ids():
    clip_tokens = get_spec("clip").tokenizer(clip_config(text={"context_length": 12}))
    tokenizer = masking.masking_tokenizer(12)
    captions = ["a photo of a cat", "two dogs in the snow, playing"]
    assert torch.equal(tokenizer(captions), clip_tokens(captions))
    assert len(tokenizer.encoder) == masking.MASK_VOCAB_SIZE == masking.MASK_ID + 1
    assert tokenizer.decode([masking.MASK_ID]).strip() == masking.MASK_TOKEN


def captions(rows: int, length: int, generator) -> torch.Tensor:
    """Rows like the tokenizer's: SOT, a random number (1..length-2) of ordinary ids, EOT, padding."""
    tokens = torch.zeros(rows, length, dtype=torch.long)
    for row in range(rows):
        n = int(torch.randint(1, length - 1, (), generator=generator))
        tokens[row, 0], tokens[row, n + 1] = masking.SOT_ID, masking.EOT_ID
        tokens[row, 1:n + 1] = torch.randint(1, 49000, (n,), generator=generator)
    return tokens


def test_text_masking_follows_bert_80_10_10_and_never_touches_special_tokens():
    g = torch.Generator().manual_seed(0)
    tokens = captions(4000, 32, g)
    inputs, labels = masking.mask_text(tokens, 0.15, generator=g)
    special = torch.isin(tokens, torch.tensor(masking.SPECIAL_IDS))
    chosen = labels != masking.IGNORE_INDEX
    assert not (chosen & special).any() and torch.equal(inputs[special], tokens[special])
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # unchosen positions are left alone
    maskable = (~special).sum(dim=1)
    expected = torch.tensor([max(1, int(np.floor(0.15 * n + 0.5))) for n in maskable.tolist()])
    assert torch.equal(chosen.sum(dim=1), expected)  # an exact count per caption
    became_mask = (inputs[chosen] == masking.MASK_ID).float().mean()
    kept = (inputs[chosen] == tokens[chosen]).float().mean()
    random = 1 - became_mask - kept
    total = int(chosen.sum())
    assert total > 8000
    assert abs(became_mask - 0.8) < 0.02 and abs(kept - 0.1) < 0.015 and abs(random - 0.1) < 0.015
    replaced = inputs[chosen & (inputs != masking.MASK_ID) & (inputs != tokens)]
    assert not torch.isin(replaced, torch.tensor(masking.SPECIAL_IDS)).any()


def test_random_replacements_are_uniform_over_the_non_special_ids():
    draws = masking._random_ordinary(60000, 10, torch.tensor([0, 3, 9]), torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=10)
    assert counts[[0, 3, 9]].sum() == 0
    assert (counts[[1, 2, 4, 5, 6, 7, 8]].float() / 60000 - 1 / 7).abs().max() < 0.01


def test_text_masking_of_a_single_caption_and_of_one_without_words():
    tokens = torch.tensor([masking.SOT_ID, 320, 2368, masking.EOT_ID, 0, 0])
    inputs, labels = masking.mask_text(tokens, 0.15, generator=torch.Generator().manual_seed(3))
    assert (labels != -100).sum() == 1  # round(0.3) is 0, but every caption with words gets a target
    empty = torch.tensor([masking.SOT_ID, masking.EOT_ID, 0, 0])
    inputs, labels = masking.mask_text(empty, 0.15)
    assert torch.equal(inputs, empty) and (labels == -100).all()


def test_patch_pixels_match_a_loop_and_normalize_each_patch():
    images = torch.randn(2, 3, 8, 12)
    got = masking.patch_pixels(images, 4, normalize=False)
    assert got.shape == (2, 6, 48)
    for b, (i, j) in itertools.product(range(2), itertools.product(range(2), range(3))):
        patch = images[b, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4]  # [3, 4, 4] → (row, col, channel)
        torch.testing.assert_close(got[b, i * 3 + j], patch.permute(1, 2, 0).reshape(-1), rtol=0, atol=0)
    normalized = masking.patch_pixels(images, 4)
    torch.testing.assert_close(normalized.mean(-1), torch.zeros(2, 6), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized.var(-1), torch.ones(2, 6), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="patches"):
        masking.patch_pixels(images, 5)


def test_visible_index_lists_the_unmasked_patches_and_refuses_unequal_counts():
    mask = torch.tensor([[True, False, False, True], [False, True, True, False]])
    assert masking.visible_index(mask).tolist() == [[1, 2], [0, 3]]
    assert masking.visible_index(~mask).tolist() == [[0, 3], [1, 2]]
    with pytest.raises(ValueError, match="different numbers"):
        masking.visible_index(torch.tensor([[True, False], [False, False]]))


def test_patch_dropout_keeps_a_sorted_random_subset_of_fixed_size():
    torch.manual_seed(0)
    keep = masking.patch_dropout_keep(64, 16, 0.5, torch.device("cpu"))
    assert keep.shape == (64, 8)
    assert (keep.diff(dim=1) > 0).all() and keep.min() >= 0 and keep.max() < 16
    assert len({tuple(row) for row in keep.tolist()}) > 50


# ---------------------------------------------------------------- through the real loader


def image_mask(image: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    mask = masking.random_mask(16, 0.5)
    text, labels = masking.mask_text(tokens, 0.15)
    return {"image_mask": mask, "image_keep": masking.visible_index(mask[None])[0], "text": text, "labels": labels}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("masking_shards")
    for s in range(2):
        with wds.TarWriter(str(directory / f"m-{s:03d}.tar")) as sink:
            for i in range(12):
                n = 12 * s + i
                sink.write({"__key__": f"m{n:04d}", "png": png_bytes(n), "txt": f"sample number {n} in red".encode()})
    return directory


def extras(shards, batches: int, cursor=None, workers: int = 1):
    cfg = DataConfig(train_shards=str(shards), batch_size=4, workers=workers, shuffle_buffer=8)
    loader = build_train_loader(cfg, *loader_inputs(image_size=16, context_length=12), dp_rank=0, dp_size=1,
                                seed=5, cursor=cursor, sample_inputs=image_mask)
    out = [next(loader) for _ in range(batches)]
    loader.close()
    return out, loader.cursor.to_dict()


def test_a_samples_masks_are_a_function_of_seed_and_position_through_the_loader(shards):
    straight, _ = extras(shards, 4)
    first, cursor = extras(shards, 2, workers=0)  # read in this process: same draws as in a worker
    resumed, _ = extras(shards, 2, cursor=cursor)
    for a, b in zip(straight, first + resumed):
        assert a.keys == b.keys
        assert a.extras.keys() == {"image_mask", "image_keep", "text", "labels"}
        for name in a.extras:
            assert torch.equal(a.extras[name], b.extras[name]), name
    batch = straight[0]
    assert batch.extras["image_mask"].shape == (4, 16) and (batch.extras["image_mask"].sum(1) == 8).all()
    assert batch.extras["image_keep"].shape == (4, 8)
    masks = torch.cat([b.extras["image_mask"] for b in straight])
    assert len({tuple(m.tolist()) for m in masks}) == len(masks)  # each position its own mask


class RecordingEngine(torch.nn.Module):
    """The part of a DeepSpeed engine ``train_step`` uses, around a forward that records its inputs."""
    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(()))
        self.seen = []

    def forward(self, images, tokens, **extras):
        self.seen.append({"images": images, "tokens": tokens, **extras})
        return {"loss": self.weight * images.float().mean()}

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


def test_a_batchs_extras_reach_the_forward_as_keywords_floats_in_the_run_precision(shards):
    from vlmtrain.step import train_step

    batches, _ = extras(shards, 2)
    for batch in batches:
        batch.extras["target"] = torch.randn(4, 3)
    engine = RecordingEngine()
    draws = []
    train_step(engine, iter(batches), lambda out: out, torch.bfloat16, 2,
               seed_micro_batch=lambda micro: draws.append(micro))
    assert draws == [0, 1]
    for batch, seen in zip(batches, engine.seen):
        assert seen["images"].dtype == seen["target"].dtype == torch.bfloat16
        for name in ("image_mask", "image_keep", "text", "labels"):
            assert seen[name].dtype == batch.extras[name].dtype and torch.equal(seen[name], batch.extras[name])
