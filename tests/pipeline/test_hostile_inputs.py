"""Hostile curation inputs become rejection rows with a reason; the run exits 0 and kept + rejected = read.

A jsonl pool whose rows point outside image_root (``..``, an absolute path, ``/dev/zero``), a line of
JSON nested 100,000 deep, an image file and a line over the byte caps; a webdataset shard with a deeply nested
sidecar and a member over the byte cap. Images and captions are the generator's.
"""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import run_tool
from tests.helpers import curate_config_args

pytestmark = pytest.mark.e2e
NESTED = "[" * 100_000 + "]" * 100_000  # 200 KB: json.loads raises RecursionError on it
FILE_CAP, MEMBER_CAP = 20_000, 300_000  # bytes: above every generated image (and NESTED), below the padded ones


def clean_samples(corpus_train: Path, count: int) -> list[tuple[str, bytes, bytes]]:
    """(key, jpg bytes, caption bytes) of the first ``count`` samples the generator made clean."""
    truth = pd.read_parquet(corpus_train / "index.parquet")
    clean = set(truth.loc[truth["noise"] == "clean", "key"])
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(sorted(corpus_train.glob("*.tar"))[0]) as tar:
        for info in tar:
            key, _, ext = info.name.partition(".")
            if key in clean:
                members.setdefault(key, {})[ext] = tar.extractfile(info).read()
    return [(key, m["jpg"], m["txt"]) for key, m in list(members.items())[:count]]


def hostile_pool(root: Path, corpus_train: Path) -> tuple[str, dict[str, str]]:
    """Both sources (a YAML list) and the reason expected for each hostile sample's key."""
    (good, image, caption), (key2, image2, caption2), *_ = clean_samples(corpus_train, 2)
    images = root / "images"
    images.mkdir(parents=True)
    (images / "good.jpg").write_bytes(image)
    (images / "huge.jpg").write_bytes(image + b"\0" * FILE_CAP)  # a valid JPEG start, padded past the cap
    (root / "outside.jpg").write_bytes(image2)
    text = caption.decode()
    lines = [
        NESTED,  # first: unfixed code dies on it before reaching /dev/zero
        {"key": "good", "image": "good.jpg", "caption": text},
        {"key": "dotdot", "image": "../outside.jpg", "caption": text},
        {"key": "absolute", "image": str(root / "outside.jpg"), "caption": text},
        {"key": "devzero", "image": "/dev/zero", "caption": text},
        {"key": "huge", "image": "huge.jpg", "caption": text},
        {"key": "long-line", "image": "good.jpg", "caption": "word " * MEMBER_CAP},
    ]
    (root / "pairs.jsonl").write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                                                for line in lines) + "\n")
    with tarfile.open(root / "hostile.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in ((key2, {"jpg": image2, "txt": caption2}),
                             ("nested", {"jpg": image, "txt": caption, "json": NESTED.encode()}),
                             ("oversized", {"jpg": image + b"\0" * MEMBER_CAP, "txt": caption})):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    caps = f"max_file_bytes: {FILE_CAP}, max_member_bytes: {MEMBER_CAP}"
    sources = (f"[{{format: jsonl, path: '{root / 'pairs.jsonl'}', image_root: '{images}', {caps}}}, "
               f"{{format: webdataset, path: '{root / 'hostile.tar'}', {caps}}}]")
    expected = {"line-0": "invalid_jsonl_line", "dotdot": "image_path_outside_root",
                "absolute": "image_path_outside_root", "devzero": "image_path_outside_root",
                "huge": "image_file_too_large", "line-6": "jsonl_line_too_large",
                "nested": "invalid_json", "oversized": "tar_member_too_large"}
    return sources, expected


def test_hostile_inputs_are_rejection_rows_with_reasons_and_the_run_succeeds(tmp_path, small_corpus):
    sources, expected = hostile_pool(tmp_path / "pool", small_corpus / "train")

    result = run_tool("vlm-curate", "run", *curate_config_args(sources, tmp_path / "out"), "--no-ray", timeout=300)

    assert result.returncode == 0, result.stderr
    decisions = pd.read_parquet(tmp_path / "out" / "decisions.parquet")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    rows = manifest["funnel"]["rows"]
    assert len(decisions) == rows["read"] == 7 + 3
    assert rows["kept"] + int((~decisions["kept"]).sum()) == rows["read"]
    reasons = dict(zip(decisions["key"], decisions["reason"]))
    assert {key: reasons[key] for key in expected} == expected
    assert decisions.set_index("key").loc["good", "kept"]
