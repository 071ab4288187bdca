"""Fixtures for the curation tests: bad-input shards made here, a generated pool, one local Ray."""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from webdataset import TarWriter

from data_pipeline.executor import ensure_ray
from tests.conftest import REPO, generate_corpus

os.environ.setdefault("RAY_TMPDIR", str(REPO / "build" / "ray"))
os.environ.setdefault("MPLCONFIGDIR", str(REPO / "build" / "matplotlib"))

CAPTIONS = ["a photo of a red apple lying on the kitchen table", "two dogs running across a green field",
            "an old wooden boat on the quiet lake", "a cup of hot coffee next to an open book",
            "the city skyline at night with bright lights", "a child riding a bicycle down the street",
            "fresh bread and butter on a white plate", "a cat sleeping on the warm windowsill"]


def noise_image(seed: int, side: int = 64, mode: str = "RGB") -> Image.Image:
    """Random pixels: every seed gives an image no hash confuses with another."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode) if mode != "RGB" else Image.fromarray(pixels, "RGB")


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def bad_samples() -> list[tuple[dict, str]]:
    """(webdataset sample, expected reason or note) for each kind of bad input the issue lists."""
    sixteen_bit = Image.fromarray((np.random.default_rng(5).integers(0, 65535, (64, 64))).astype(np.uint16))
    palette = noise_image(6).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.info["transparency"] = 0
    bomb = encode(Image.new("1", (12_000, 12_000)), "PNG")  # 144 Mpx in a few kB
    return [
        ({"__key__": "good-0", "jpg": encode(noise_image(1), "JPEG"), "txt": CAPTIONS[0].encode()}, None),
        ({"__key__": "zero-bytes", "jpg": b"", "txt": CAPTIONS[1].encode()}, "empty_image"),
        ({"__key__": "png-as-jpg", "jpg": encode(noise_image(2), "PNG"), "txt": CAPTIONS[2].encode()},
         "note:extension_mismatch:jpg->png"),
        ({"__key__": "cmyk", "jpg": encode(noise_image(3, mode="CMYK"), "JPEG"), "txt": CAPTIONS[3].encode()},
         "note:converted_mode:CMYK"),
        ({"__key__": "png16", "png": encode(sixteen_bit, "PNG"), "txt": CAPTIONS[4].encode()},
         "note:converted_mode:I;16"),
        ({"__key__": "palette-alpha", "png": encode(palette, "PNG", transparency=0), "txt": CAPTIONS[5].encode()},
         "note:converted_mode:P"),
        ({"__key__": "bomb", "png": bomb, "txt": CAPTIONS[6].encode()}, "decompression_bomb"),
        ({"__key__": "latin1", "jpg": encode(noise_image(8), "JPEG"), "txt": "un café crème".encode("latin-1")},
         "caption_not_utf8"),
        ({"__key__": "no-caption", "jpg": encode(noise_image(9), "JPEG")}, "missing_caption"),
        ({"__key__": "no-image", "txt": CAPTIONS[7].encode()}, "missing_image"),
        ({"__key__": "bad-json", "jpg": encode(noise_image(10), "JPEG"), "txt": CAPTIONS[0].encode(),
          "json": b"{not json"}, "invalid_json"),
        ({"__key__": "huge-caption", "jpg": encode(noise_image(11), "JPEG"), "txt": b"word " * 210_000},
         "caption_too_large"),
        ({"__key__": "good-1", "jpg": encode(noise_image(12), "JPEG"), "txt": CAPTIONS[1].encode(),
          "json": json.dumps({"url": "https://example.com/1.jpg"}).encode()}, None),
        # The same key again, further down the shard: the first sample under a key wins.
        ({"__key__": "good-0", "jpg": encode(noise_image(13), "JPEG"), "txt": CAPTIONS[2].encode()}, "duplicate_key"),
    ]


def write_tar(path: Path, samples: list[dict]) -> None:
    with TarWriter(str(path), encoder=False, mtime=0) as tar:
        for sample in samples:
            tar.write(sample)


@pytest.fixture(scope="session")
def bad_input_dir(tmp_path_factory) -> Path:
    """Three sources: webdataset tars (one truncated), img2dataset-style parquet, jsonl + image folder."""
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "wds").mkdir()
    write_tar(root / "wds" / "bad-000.tar", [s for s, _ in bad_samples()])
    truncated = root / "wds" / "bad-001.tar"
    write_tar(truncated, [{"__key__": f"cut-{i}", "jpg": encode(noise_image(20 + i, side=96), "JPEG"),
                           "txt": CAPTIONS[i].encode()} for i in range(3)])
    data = truncated.read_bytes()
    truncated.write_bytes(data[: int(len(data) * 0.6)])

    (root / "parquet" / "images").mkdir(parents=True)  # image paths are read under the parquet's folder
    (root / "parquet" / "images" / "p1.png").write_bytes(encode(noise_image(31), "PNG"))
    pq.write_table(pa.table({
        "key": ["p0", "p1", "p2"],
        "caption": [CAPTIONS[3], CAPTIONS[4], CAPTIONS[5]],
        "url": ["https://example.com/p0.jpg", "https://example.com/p1.png", "https://example.com/p2.jpg"],
        "jpg": [encode(noise_image(30), "JPEG"), None, b"\x00\x01 not an image"],
    }), root / "parquet" / "part-000.parquet")
    pq.write_table(pa.table({"key": ["q0"], "caption": [CAPTIONS[6]], "image_path": ["images/p1.png"]}),
                   root / "parquet" / "part-001.parquet")

    (root / "jsonl").mkdir()
    (root / "jsonl" / "a.jpg").write_bytes(encode(noise_image(40), "JPEG"))
    (root / "jsonl" / "pairs.jsonl").write_text("\n".join([
        json.dumps({"image": "a.jpg", "caption": CAPTIONS[7], "url": "https://blocked.example.org/a.jpg"}),
        json.dumps({"image": "missing.jpg", "caption": CAPTIONS[0]}),
        "{this line is broken",
    ]) + "\n")
    return root


@pytest.fixture(scope="session")
def generated_pool(tmp_path_factory) -> Path:
    """1,500 generated pairs (junk, near duplicates and mismatches flagged in index.parquet)."""
    out = generate_corpus(tmp_path_factory.mktemp("pool"), seed=11, num_train=1500, samples_per_shard=250,
                          eval_per_class=1)
    return out / "train"


@pytest.fixture(scope="session")
def local_ray():
    """One local 2-CPU Ray for all pipeline tests in this session; yields its address."""
    import ray

    ensure_ray(2)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()
