"""Content signatures are parsed in bulk exactly as each would be read on its own."""
from __future__ import annotations

import numpy as np
from PIL import Image

from data_pipeline.stages.content_signature import SIDE, Signatures, content_signature


def read_one(signature: bytes) -> tuple[np.ndarray, list[tuple[float, np.ndarray]]]:
    """The layout ``content_signature`` documents, read field by field: bars, then (spread, levels) of the
    content part and of the whole-image part (the content part again when there are no bars)."""
    part = 2 + SIDE * SIDE
    bars = np.frombuffer(signature[:4], np.uint8) / 256
    parts = []
    for offset in (4, 4 + part if len(signature) > 4 + part else 4):
        spread = float(np.frombuffer(signature[offset:offset + 2], np.float16)[0])
        parts.append((spread, np.frombuffer(signature[offset + 2:offset + part], np.int8).reshape(SIDE, SIDE)))
    return bars, parts


def letterboxed(rng: np.random.Generator, bar: int) -> Image.Image:
    pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    pixels[:bar] = pixels[64 - bar:] = 0
    return Image.fromarray(pixels)


def test_signatures_with_and_without_bars_parse_in_bulk_as_each_reads_alone():
    rng = np.random.default_rng(0)
    signatures = [content_signature(letterboxed(rng, bar)) for bar in (0, 8, 0, 12, 8, 0)]
    assert len({len(s) for s in signatures}) == 2  # both layouts, interleaved
    parsed = Signatures.parse(signatures)
    for i, signature in enumerate(signatures):
        bars, ((content_spread, content), (whole_spread, whole)) = read_one(signature)
        np.testing.assert_array_equal(parsed.bars[i], bars.astype(np.float32))
        assert parsed.content_spread[i] == np.float32(content_spread)
        assert parsed.whole_spread[i] == np.float32(whole_spread)
        np.testing.assert_array_equal(parsed.content[i], content)
        np.testing.assert_array_equal(parsed.whole[i], whole)
    assert parsed.bars[1].any() and not parsed.bars[0].any()


def test_no_signatures_parse_to_empty_arrays():
    parsed = Signatures.parse([])
    assert parsed.bars.shape == (0, 4) and parsed.content.shape == (0, SIDE, SIDE)
