"""Masks and masked-modelling targets for the masking families (FLAVA, MaskVLM) and FLIP's patch dropout.

Pure functions of their arguments and a ``torch.Generator`` (None: torch's global RNG). In training
they run in the loader worker through a spec's ``sample_inputs`` hook, while the global RNG is seeded
by ``sample_seed(seed, slot, position)``: a sample's mask is a function of the run's seed and the
sample's position, so resuming replays it exactly.

Conventions: image masks are bool, True = masked (hidden from the encoder), over the patches in raster
order; text labels are -100 where no loss is taken (``torch.nn.functional.cross_entropy``'s default).
"""
from __future__ import annotations

import math

import torch

# open_clip's BPE vocabulary has 49,408 ids (…, 49406 <start_of_text>, 49407 <end_of_text>); the
# masking tokenizer adds "<mask>" as one more special token, id 49408, so its text vocabulary is 49,409.
MASK_TOKEN = "<mask>"
MASK_ID = 49408
MASK_VOCAB_SIZE = 49409
SOT_ID, EOT_ID, PAD_ID = 49406, 49407, 0
SPECIAL_IDS = (PAD_ID, SOT_ID, EOT_ID, MASK_ID)
IGNORE_INDEX = -100


def masking_tokenizer(context_length: int):
    """open_clip's ``SimpleTokenizer`` with ``additional_special_tokens=["<mask>"]``: the same ids for
    every caption as CLIP's tokenizer, plus ``MASK_ID`` (its vocabulary ships in the wheel: no download).
    A caption that spells "<mask>" literally gets the mask id, as one spelling "<end_of_text>" gets EOT;
    masking never selects it and it carries no label. Note that ``TextTower.pool`` finds EOT by argmax,
    which a mask id (larger than EOT's) would win: pool with the unmasked tokens."""
    import open_clip  # lazily: the launcher process reads configs and never needs it

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length,
                                                    additional_special_tokens=[MASK_TOKEN])
    assert tokenizer.encoder[MASK_TOKEN] == MASK_ID  # fixed by the wheel's vocabulary size
    return tokenizer


def masked_count(num: int, ratio: float) -> int:
    """round(ratio·num), halves rounded up (Python's ``round`` would round them to even)."""
    return int(math.floor(ratio * num + 0.5))


def _check_ratio(ratio: float, name: str = "ratio") -> None:
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{name} must be within [0, 1], got {ratio}")


def random_mask(num_patches: int, ratio: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """[num_patches] bool, exactly ``masked_count(num_patches, ratio)`` True, uniformly placed (MAE)."""
    _check_ratio(ratio)
    order = torch.rand(num_patches, generator=generator).argsort()
    mask = torch.zeros(num_patches, dtype=torch.bool)
    mask[order[: masked_count(num_patches, ratio)]] = True
    return mask


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform in [low, high] (both included)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def block_rectangles(grid_h: int, grid_w: int, num_masked: int, min_block: int = 16, max_aspect: float = 3.0,
                     generator: torch.Generator | None = None) -> list[tuple[int, int, int, int]]:
    """The rectangles ``(top, left, height, width)`` whose union is ``block_mask``'s mask.

    BEiT's ``MaskingGenerator``: propose a rectangle of area uniform in [min_block, remaining] and
    aspect log-uniform in [1/max_aspect, max_aspect] at a uniform place; keep it if it has at least
    ``min_block`` patches and masks between 1 and ``remaining`` new ones (overlaps allowed), up to 10
    proposals per block. BEiT stops short of the target when a round of 10 fails (typically once fewer
    than ``min_block`` patches remain); we top up instead, with rectangles still: a 1-patch-high or -wide
    strip of exactly the remaining count of unmasked patches, uniformly among all such strips, else the
    longest strip there is, repeated. So the count is exact and every piece is a rectangle; only top-up
    strips may be smaller than ``min_block``.
    """
    if not 0 <= num_masked <= grid_h * grid_w:
        raise ValueError(f"num_masked must be within [0, {grid_h * grid_w}] for a {grid_h}x{grid_w} grid, "
                         f"got {num_masked}")
    if min_block < 1 or max_aspect < 1.0:
        raise ValueError(f"min_block must be >= 1 and max_aspect >= 1, got {min_block} and {max_aspect}")
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    rectangles: list[tuple[int, int, int, int]] = []
    log_aspect = math.log(max_aspect)
    while int(mask.sum()) < num_masked:
        remaining = num_masked - int(mask.sum())
        placed = False
        for _ in range(10):
            area = _uniform(min_block, max(min_block, remaining), generator)
            aspect = math.exp(_uniform(-log_aspect, log_aspect, generator))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if not (1 <= h <= grid_h and 1 <= w <= grid_w) or h * w < min_block:
                continue  # (BEiT keeps blocks that rounding took below the minimum; we do not)
            top, left = _randint(0, grid_h - h, generator), _randint(0, grid_w - w, generator)
            new = h * w - int(mask[top:top + h, left:left + w].sum())
            if 0 < new <= remaining:
                mask[top:top + h, left:left + w] = True
                rectangles.append((top, left, h, w))
                placed = True
                break
        if not placed:
            strip = _top_up_strip(mask, remaining, generator)
            top, left, h, w = strip
            mask[top:top + h, left:left + w] = True
            rectangles.append(strip)
    return rectangles


def _top_up_strip(mask: torch.Tensor, wanted: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """A uniformly chosen row or column strip of ``wanted`` unmasked patches, else the longest one."""
    strips: list[tuple[int, int, int, int]] = []  # every maximal run of unmasked patches, as (t, l, h, w)
    for horizontal, grid in ((True, mask), (False, mask.t())):
        for line, row in enumerate(grid.tolist()):
            start = None
            for index, masked in enumerate(row + [True]):
                if not masked and start is None:
                    start = index
                elif masked and start is not None:
                    length = index - start
                    strips.append((line, start, 1, length) if horizontal else (start, line, length, 1))
                    start = None
    fitting = []  # every placement of exactly `wanted` patches inside a run
    for top, left, h, w in strips:
        length = max(h, w)
        for offset in range(length - wanted + 1):
            fitting.append((top, left + offset, 1, wanted) if h == 1 else (top + offset, left, wanted, 1))
    if fitting:
        return fitting[_randint(0, len(fitting) - 1, generator)]
    longest = max(max(h, w) for _, _, h, w in strips)
    candidates = [s for s in strips if max(s[2], s[3]) == longest]
    return candidates[_randint(0, len(candidates) - 1, generator)]


def block_mask(grid_h: int, grid_w: int, num_masked: int, min_block: int = 16, max_aspect: float = 3.0,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """[grid_h·grid_w] bool, exactly ``num_masked`` True in contiguous rectangles (BEiT-style block
    masking; the rule in ``block_rectangles``). FLAVA masks ≈40% of a 14×14 grid with min_block=16."""
    mask = torch.zeros(grid_h, grid_w, dtype=torch.bool)
    for top, left, h, w in block_rectangles(grid_h, grid_w, num_masked, min_block, max_aspect, generator):
        mask[top:top + h, left:left + w] = True
    return mask.flatten()


def mask_text(tokens: torch.Tensor, ratio: float, mask_id: int = MASK_ID, vocab_size: int = MASK_VOCAB_SIZE,
              special_ids: tuple[int, ...] = SPECIAL_IDS,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked language modelling over ``tokens`` ([L] or [B, L]): ``(input_tokens, labels)``.

    Of each caption's maskable tokens (those not in ``special_ids``: padding, SOT, EOT, mask) exactly
    ``max(1, masked_count(n, ratio))`` are chosen (at least one, so every caption has a target); each
    chosen one becomes ``mask_id`` with probability 0.8, a random non-special id with 0.1, or stays
    with 0.1. ``labels`` hold the original id at the chosen positions and -100 elsewhere.
    """
    _check_ratio(ratio)
    rows = tokens.reshape(-1, tokens.shape[-1])
    special = torch.tensor(sorted(set(special_ids) | {mask_id}), dtype=rows.dtype)
    maskable = ~torch.isin(rows, special)
    available = maskable.sum(dim=1)
    wanted = torch.tensor([max(1, masked_count(int(n), ratio)) if n else 0 for n in available.tolist()])
    # The `wanted` maskable positions of lowest random score, per row.
    scores = torch.rand(rows.shape, generator=generator).masked_fill(~maskable, 2.0)
    rank = scores.argsort(dim=1).argsort(dim=1)
    chosen = rank < wanted[:, None]
    action = torch.rand(rows.shape, generator=generator)
    replaced = rows.clone()
    to_mask = chosen & (action < 0.8)
    to_random = chosen & (action >= 0.8) & (action < 0.9)
    replaced[to_mask] = mask_id
    replaced[to_random] = _random_ordinary(int(to_random.sum()), vocab_size, special, generator)
    labels = torch.where(chosen, rows, torch.full_like(rows, IGNORE_INDEX))
    return replaced.reshape(tokens.shape), labels.reshape(tokens.shape)


def _random_ordinary(count: int, vocab_size: int, special: torch.Tensor, generator: torch.Generator | None):
    """``count`` ids uniform over [0, vocab_size) minus ``special`` (sorted): draw among the others, then
    step over each excluded id at or below the draw."""
    excluded = special[special < vocab_size]
    draws = torch.randint(0, vocab_size - len(excluded), (count,), generator=generator)
    for value in excluded.tolist():
        draws += (draws >= value).to(draws.dtype)
    return draws


def patch_pixels(images: torch.Tensor, patch_size: int, normalize: bool = True) -> torch.Tensor:
    """[B, 3, H, W] → [B, N, p·p·3], patches in raster order, each patch's pixels as (row, col, channel):
    MAE's masked-image-modelling target, each patch normalized by its own mean and variance when
    ``normalize`` (MAE's ``norm_pix_loss``). FLAVA and BEiT predict dVAE tokens instead; no dVAE
    tokenizer is available offline, so the families here regress pixels."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"images of {height}x{width} do not split into {patch_size}-pixel patches")
    h, w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, h, patch_size, w, patch_size)
    x = torch.einsum("bchpwq->bhwpqc", x).reshape(batch, h * w, patch_size * patch_size * channels)
    if normalize:
        mean, var = x.mean(dim=-1, keepdim=True), x.var(dim=-1, keepdim=True)
        x = (x - mean) / (var + 1e-6).sqrt()
    return x


def visible_index(mask: torch.Tensor) -> torch.Tensor:
    """[B, N] bool (True = masked) → [B, K] long: each row's unmasked patch indices, ascending — the
    ``keep`` argument of ``VisionTower``. (``visible_index(~mask)`` lists the masked ones.) Every row
    must hide the same number of patches, which fixed-count masks do."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a [B, N] bool tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    visible = (~mask).sum(dim=1)
    if visible.numel() and bool((visible != visible[0]).any()):
        raise ValueError(f"masks hide different numbers of patches per sample (visible counts "
                         f"{sorted(set(visible.tolist()))}): visible-token encoding needs equal counts")
    return (~mask).nonzero()[:, 1].reshape(mask.shape[0], -1)


def patch_dropout_keep(batch: int, num_patches: int, rate: float, device: torch.device) -> torch.Tensor:
    """FLIP's patch dropout: [B, K] ascending indices of a uniformly random ``K = num_patches -
    masked_count(num_patches, rate)`` patches per sample, from torch's global RNG (seeded per micro-batch
    by the trainer, the same on tensor-parallel peers)."""
    kept = num_patches - masked_count(num_patches, rate)
    return torch.rand(batch, num_patches, device=device).argsort(dim=1)[:, :kept].sort(dim=1).values
