"""What the curated shards store: the source's own bytes unless the image had to change."""
from __future__ import annotations

import hashlib
import io
import tarfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_pipeline.shards import SHARD_COLUMNS, ShardPlan, write_shard
from data_pipeline.stages.decode import DecodeConfig, validate
from tests.pipeline.conftest import encode, noise_image

ORIENTATION = 0x0112  # the EXIF tag


def with_orientation(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(image, fmt, exif=exif.tobytes())


def store(images: list[bytes], exts: list[str], tmp_path) -> tuple[pd.DataFrame, dict[str, tuple[str, bytes]]]:
    """Validate the images as one batch, write the rows as one shard; return the rows and, per uid, the
    stored image member (extension, bytes)."""
    rows = pd.DataFrame({"uid": [f"u{i}" for i in range(len(images))], "image": images, "image_ext": exts,
                         "caption_raw": [b"a caption"] * len(images), "source": "test", "file": "f", "key": "k"})
    rows["sha256"] = [hashlib.sha256(b).hexdigest() for b in images]
    for column in ("json_raw", "url", "read_error"):
        rows[column] = None
    rows = validate(rows, DecodeConfig())
    pq.write_table(pa.Table.from_pandas(rows[SHARD_COLUMNS], preserve_index=False), tmp_path / "p0.parquet")
    plan = ShardPlan("shard-000000.tar", {"p0": list(rows["uid"])})
    write_shard(plan, tmp_path, tmp_path)
    stored = {}
    with tarfile.open(tmp_path / plan.name) as tar:
        for member in tar:
            uid, _, ext = member.name.partition(".")
            if ext not in ("txt", "json"):
                stored[uid] = (ext, tar.extractfile(member).read())
    return rows.set_index("uid"), stored


def test_images_that_need_no_change_are_stored_byte_for_byte(tmp_path):
    photo = noise_image(1, side=80)
    images = [encode(photo, "JPEG", quality=80), encode(photo, "PNG"), encode(photo, "WEBP", quality=70),
              with_orientation(photo, "JPEG", 1), encode(photo.convert("RGB"), "JPEG", progressive=True)]
    rows, stored = store(images, ["jpg", "png", "webp", "jpg", "jpg"], tmp_path)
    for uid, source in zip(rows.index, images):
        ext, data = stored[uid]
        assert hashlib.sha256(data).hexdigest() == rows.loc[uid, "sha256"], uid
        assert rows.loc[uid, "notes"] == "", (uid, rows.loc[uid, "notes"])
    assert [stored[uid][0] for uid in rows.index] == ["jpg", "png", "webp", "jpg", "jpg"]


@pytest.mark.parametrize("fmt,ext", [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")])
def test_an_exif_rotation_is_applied_and_stored_in_the_source_format(tmp_path, fmt, ext):
    wide = noise_image(2, side=64).resize((96, 48))
    # Orientation 6: the camera was turned, viewers rotate 90° clockwise to show it upright.
    rows, stored = store([with_orientation(wide, fmt, 6)], [ext], tmp_path)
    row = rows.iloc[0]
    assert row["notes"] == "exif_rotated" and (row["width"], row["height"]) == (48, 96)
    got_ext, data = stored["u0"]
    stored_image = Image.open(io.BytesIO(data))
    assert got_ext == ext and stored_image.format == fmt and stored_image.size == (48, 96)
    assert stored_image.getexif().get(ORIENTATION, 1) == 1  # not rotated a second time by a viewer
    upright = np.asarray(wide.transpose(Image.Transpose.ROTATE_270), dtype=float)
    assert np.abs(np.asarray(stored_image.convert("RGB"), dtype=float) - upright).mean() < 40  # lossy formats


def test_a_mode_conversion_keeps_the_source_format_when_it_holds_rgb(tmp_path):
    grey_alpha = noise_image(3).convert("LA")
    rows, stored = store([encode(noise_image(4, mode="CMYK"), "JPEG"), encode(grey_alpha, "PNG"),
                          encode(noise_image(5), "GIF")], ["jpg", "png", "gif"], tmp_path)
    assert list(rows["notes"]) == ["converted_mode:CMYK", "converted_mode:LA", "converted_mode:P"]
    # GIF is not a format the shards keep (readers expect jpg/png/webp): it becomes a PNG.
    assert [stored[uid][0] for uid in rows.index] == ["jpg", "png", "png"]
    for uid in rows.index:
        assert Image.open(io.BytesIO(stored[uid][1])).mode == "RGB"
