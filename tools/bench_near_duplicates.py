#!/usr/bin/env python
"""Near-duplicate removal on low-structure, letterboxed images: false positives and recall.

The set: ``--distinct`` different pictures with little low-frequency structure, a third each of
(a) a flat background with one small object of its own shape, colour, size and place, (b) random
noise, (c) a linear gradient between two colours; each drawn at its own aspect ratio and letterboxed
to 64 px as img2dataset's ``resize_mode=border`` stores it (resized to fit, black bars). A
``--copy-fraction`` of them get one true duplicate: the source re-encoded as JPEG (quality 50-90)
and/or resized (0.5-1.5×) before the same letterboxing, like the same web image fetched twice.

Runs the dedup stage's own functions (decode → find_duplicates, no Ray) and prints: the share of
distinct images removed as a duplicate of another picture (false-positive rate) and the share of
true duplicate pairs caught. ``--demo-pool DIR`` also scores a generated demo pool (tools/make_demo_data.py)
against its index.parquet: injected near duplicates caught and clean pairs removed wrongly.

    python tools/bench_near_duplicates.py                    # 600 distinct + 150 duplicates
    python tools/bench_near_duplicates.py --demo-pool build/demo/train --json
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data_pipeline.config import SourceConfig  # noqa: E402
from data_pipeline.sources import list_parts, read_part  # noqa: E402
from data_pipeline.stages.decode import DecodeConfig, validate  # noqa: E402
from data_pipeline.stages.dedup import DedupConfig, find_duplicates  # noqa: E402

SIDE = 64
KINDS = ("object_on_flat", "noise", "gradient")
ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 3.0, 1 / 3)


def source_picture(kind: str, rng: np.random.Generator) -> Image.Image:
    """One distinct picture at source resolution (the long side 64-320 px, its own aspect ratio): noise
    drawn at a larger size is averaged to a lower contrast by the letterboxing resize."""
    long_side, aspect = int(rng.integers(64, 321)), float(rng.choice(ASPECTS))
    width, height = (long_side, max(8, round(long_side / aspect))) if aspect >= 1 else \
        (max(8, round(long_side * aspect)), long_side)
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if kind == "gradient":
        angle, (a, b) = rng.uniform(0, 2 * np.pi), rng.integers(0, 256, (2, 3))
        y, x = np.mgrid[0:height, 0:width]
        t = (np.cos(angle) * x / width + np.sin(angle) * y / height + 1) / 2
        return Image.fromarray((a + (b - a) * t[..., None]).astype(np.uint8), "RGB")
    background = tuple(int(v) for v in rng.integers(200, 256, 3)) if rng.random() < 0.7 else \
        tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (width, height), background)
    size = rng.uniform(0.04, 0.2) * min(width, height)
    cx, cy = rng.uniform(size, width - size), rng.uniform(size, height - size)
    box = (cx - size, cy - size, cx + size, cy + size)
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        draw.ellipse(box, fill=colour)
    else:
        draw.rectangle(box, fill=colour)
    return image


def letterbox(image: Image.Image, side: int = SIDE) -> Image.Image:
    """img2dataset ``resize_mode=border``: fit inside side×side keeping the aspect ratio, pad black."""
    scale = side / max(image.size)
    fitted = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                          Image.LANCZOS)
    canvas = Image.new("RGB", (side, side), (0, 0, 0))
    canvas.paste(fitted, ((side - fitted.width) // 2, (side - fitted.height) // 2))
    return canvas


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def true_copy(source: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The same picture fetched again: resized and/or re-encoded at the source, then letterboxed."""
    copy = source
    if rng.random() < 0.6:
        scale = rng.uniform(0.5, 1.5)
        copy = copy.resize((max(8, round(copy.width * scale)), max(8, round(copy.height * scale))), Image.BICUBIC)
    copy = Image.open(io.BytesIO(jpeg(copy, int(rng.integers(50, 91)))))
    return letterbox(copy)


def letterbox_set(distinct: int, copy_fraction: float, seed: int) -> tuple[list[bytes], list[int]]:
    """JPEG bytes of 64 px letterboxed images and, for each, the index of the picture it shows."""
    rng = np.random.default_rng(seed)
    images, group = [], []
    for index in range(distinct):
        source = source_picture(KINDS[index % len(KINDS)], rng)
        images.append(jpeg(letterbox(source)))
        group.append(index)
        if rng.random() < copy_fraction:
            images.append(jpeg(true_copy(source, rng)))
            group.append(index)
    return images, group


def decoded(images: list[bytes]) -> pd.DataFrame:
    """The images as the decode stage leaves them (uids in input order)."""
    rows = pd.DataFrame({"uid": [f"u{i:06d}" for i in range(len(images))], "image": images,
                         "image_ext": "jpg", "caption_raw": [b"a picture"] * len(images)})
    rows["sha256"] = [hashlib.sha256(b).hexdigest() for b in images]
    for column in ("json_raw", "url", "read_error"):
        rows[column] = None
    return validate(rows, DecodeConfig())


def letterbox_figures(distinct: int, copy_fraction: float, seed: int, cfg: DedupConfig) -> dict:
    images, group = letterbox_set(distinct, copy_fraction, seed)
    rows = decoded(images)
    found = find_duplicates(rows, cfg)
    group_of = dict(zip(rows["uid"], group))
    same = found["uid"].map(group_of) == found["duplicate_of"].map(group_of)
    sizes = pd.Series(group).value_counts()
    removed_groups = set(found.loc[same, "uid"].map(group_of))
    return {"distinct": distinct, "true_duplicates": int((sizes > 1).sum()),
            "false_positives": int((~same).sum()), "false_positive_rate": float((~same).sum() / distinct),
            "caught": len(removed_groups), "recall": len(removed_groups) / max(1, int((sizes > 1).sum()))}


def demo_pool_figures(pool: Path, cfg: DedupConfig) -> dict:
    """Near-duplicate figures on a generated pool, every row taking part (no heuristics first)."""
    source = SourceConfig(format="webdataset", path=str(pool))
    rows = pd.concat([validate(read_part(p, source), DecodeConfig()) for p in list_parts([source])],
                     ignore_index=True)
    rows = rows[rows["reason_validate"].isna()]
    truth = pd.read_parquet(pool / "index.parquet").set_index("key")
    rows = rows.assign(group=rows["key"].map(truth["duplicate_of"].fillna(pd.Series(truth.index, truth.index))),
                       noise=rows["key"].map(truth["noise"]))
    found = find_duplicates(rows, cfg)
    group_of, noise_of = dict(zip(rows["uid"], rows["group"])), dict(zip(rows["uid"], rows["noise"]))
    same = found["uid"].map(group_of) == found["duplicate_of"].map(group_of)
    near = rows[rows["noise"] == "near_duplicate"]
    caught_groups = set(found.loc[same, "uid"].map(group_of))
    wrong = found.loc[~same, "uid"]
    clean = int((rows["noise"] == "clean").sum())
    return {"injected_near_duplicates": len(near), "caught": int(near["group"].isin(caught_groups).sum()),
            "recall": float(near["group"].isin(caught_groups).mean()),
            "clean_removed_wrongly": int(wrong.map(noise_of).eq("clean").sum()),
            "clean_false_positive_rate": float(wrong.map(noise_of).eq("clean").sum() / clean),
            "all_removed_wrongly": len(wrong)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--distinct", type=int, default=600, help="distinct pictures (a third of each kind)")
    parser.add_argument("--copy-fraction", type=float, default=0.25, help="share of them given a true duplicate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--demo-pool", type=Path, help="a generated pool's train/ folder, scored too")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    args = parser.parse_args()
    cfg = DedupConfig(exact=False)
    start = time.perf_counter()
    result = {"letterbox": letterbox_figures(args.distinct, args.copy_fraction, args.seed, cfg)}
    if args.demo_pool:
        result["demo_pool"] = demo_pool_figures(args.demo_pool, cfg)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        print(json.dumps(result))
        return
    box = result["letterbox"]
    print(f"letterbox set: {box['distinct']} distinct, {box['true_duplicates']} with a true duplicate")
    print(f"  false positives: {box['false_positives']} ({box['false_positive_rate']:.2%} of distinct)")
    print(f"  true duplicates caught: {box['caught']} ({box['recall']:.1%})")
    if "demo_pool" in result:
        demo = result["demo_pool"]
        print(f"demo pool: {demo['caught']} of {demo['injected_near_duplicates']} injected near duplicates caught "
              f"({demo['recall']:.1%}); clean pairs removed wrongly: {demo['clean_removed_wrongly']} "
              f"({demo['clean_false_positive_rate']:.2%}); all rows removed wrongly: {demo['all_removed_wrongly']}")
    print(f"({result['seconds']} s)")


if __name__ == "__main__":
    main()
