"""Decode and validate: open every image safely, decode and normalize every caption.

Adds: width, height, image_format, image_mode, file_bytes, thumbnail (32×32 RGB bytes, for hashing
and the report), signature (the content signature that confirms near duplicates), image_out / image_out_ext (what the shard writer stores), caption, url, notes
(repairs made: mode conversion, EXIF rotation, wrong extension) and reason_validate (why the row
cannot be used; None when it can). A bad sample is a reason, never an exception.
"""
from __future__ import annotations

import html
import io
import json
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import pandas as pd
from PIL import ExifTags, Image, UnidentifiedImageError

from data_pipeline.stages.content_signature import content_signature

THUMBNAIL_SIDE = 32
# Formats the shards hold. An image in one of them that needs no repair is stored as its own bytes; a
# repaired one is re-encoded in its own format; any other format becomes PNG.
KEPT_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
# Quality for re-encoding a lossy source: high, so a rotation costs little beyond the source's own loss.
REENCODE_QUALITY = 95
# Modes whose colour profile (if any) still describes the RGB result; a CMYK or grey profile does not.
_RGB_SPACE_MODES = {"RGB", "RGBA", "RGBa", "P", "PA"}
# EXIF orientation → the transpose that makes the image upright (1 or absent: already upright).
_ORIENTATION_FIX = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}
_EXT_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "gif": "GIF", "bmp": "BMP",
                "tif": "TIFF", "tiff": "TIFF"}
_SPACE = re.compile(r"\s+")


@dataclass
class DecodeConfig:
    max_pixels: int = field(default=89_478_485, metadata={"min": 1})  # PIL's own bomb limit
    max_caption_bytes: int = field(default=65_536, metadata={"min": 1})  # larger is not a caption


@dataclass
class ImageCheck:
    width: int | None = None
    height: int | None = None
    format: str | None = None
    mode: str | None = None
    thumbnail: bytes | None = None
    signature: bytes | None = None  # content signature, for near-duplicate confirmation
    image_out: bytes | None = None  # re-encoded image, only when the original cannot be stored as is
    image_out_ext: str | None = None
    notes: list[str] = field(default_factory=list)
    reason: str | None = None


def check_image(data: bytes | None, ext: str | None, max_pixels: int) -> ImageCheck:
    if data is None:
        return ImageCheck(reason="missing_image")
    if len(data) == 0:
        return ImageCheck(reason="empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            # Refuse by the header's size before decoding a single pixel.
            if image.width * image.height > max_pixels:
                return ImageCheck(image.width, image.height, image.format, image.mode,
                                  reason="decompression_bomb")
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return ImageCheck(reason="decompression_bomb")
    except UnidentifiedImageError:
        return ImageCheck(reason="undecodable_image")
    except (OSError, ValueError, SyntaxError) as err:  # PIL's errors for truncated or corrupt data
        return ImageCheck(reason="truncated_image" if "truncated" in str(err) else "undecodable_image")
    check = ImageCheck(format=image.format, mode=image.mode)
    if ext and _EXT_FORMATS.get(ext) not in (None, image.format):
        check.notes.append(f"extension_mismatch:{ext}->{image.format.lower()}")
    rgb, repaired = _to_rgb(image, check.notes)
    check.width, check.height = rgb.size
    check.thumbnail = rgb.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR).tobytes()
    check.signature = content_signature(rgb)
    if repaired or image.format not in KEPT_FORMATS:
        check.image_out, check.image_out_ext = _reencode(rgb, image)
    else:
        check.image_out_ext = KEPT_FORMATS[image.format]
    return check


def _reencode(rgb: Image.Image, source: Image.Image) -> tuple[bytes, str]:
    """The repaired image in the source's format when the shards keep it (all of them hold 8-bit RGB),
    else PNG; the colour profile goes along, the EXIF (and its orientation) does not."""
    fmt = source.format if source.format in KEPT_FORMATS else "PNG"
    profile = source.info.get("icc_profile") if source.mode in _RGB_SPACE_MODES else None
    options = {"icc_profile": profile} if profile else {}
    if fmt in ("JPEG", "WEBP"):
        options["quality"] = REENCODE_QUALITY
    buffer = io.BytesIO()
    rgb.save(buffer, format=fmt, **options)
    return buffer.getvalue(), KEPT_FORMATS[fmt]


def _to_rgb(image: Image.Image, notes: list[str]) -> tuple[Image.Image, bool]:
    """RGB, upright, 8-bit: alpha composited on white, 16-bit scaled, CMYK and palettes converted.
    Returns the image itself (not a copy) when nothing needed changing."""
    repaired = False
    # Read the tag ourselves: ImageOps.exif_transpose returns a copy even when nothing rotates.
    fix = _ORIENTATION_FIX.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    if fix is not None:
        notes.append("exif_rotated")
        image, repaired = image.transpose(fix), True
    mode = image.mode
    if mode == "RGB":
        return image, repaired
    if mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale: keep the top 8 bits
        pixels = np.asarray(image, dtype=np.int64)
        scale = 256 if pixels.max(initial=0) > 255 else 1
        image = Image.fromarray(np.clip(pixels // scale, 0, 255).astype(np.uint8), "L")
    elif (mode == "P" and "transparency" in image.info) or mode in ("PA", "LA", "RGBA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    notes.append(f"converted_mode:{mode}")
    return image.convert("RGB"), True


def decode_caption(raw: bytes | None, max_bytes: int) -> tuple[str | None, str | None]:
    """(normalized caption, reason): UTF-8 strictly, HTML entities resolved, whitespace collapsed."""
    if raw is None:
        return None, "missing_caption"
    if len(raw) > max_bytes:
        return None, "caption_too_large"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None, "caption_not_utf8"
    return normalize_caption(text), None


def normalize_caption(text: str) -> str:
    text = unicodedata.normalize("NFC", html.unescape(text))
    text = "".join(" " if unicodedata.category(ch)[0] == "C" else ch for ch in text)
    return _SPACE.sub(" ", text).strip()


def parse_metadata(raw: bytes | None) -> tuple[dict, str | None]:
    """The json sidecar as a dict (img2dataset puts the url there), or the reason it is unusable."""
    if raw is None:
        return {}, None
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: hostile nesting ([[[[...]]]])
        return {}, "invalid_json"
    return (meta, None) if isinstance(meta, dict) else ({}, "invalid_json")


def validator(cfg: DecodeConfig) -> Callable[[pd.DataFrame], pd.DataFrame]:
    """The validate stage's batch function for a run (its config is all it needs)."""
    return partial(validate, cfg=cfg)


def validate(batch: pd.DataFrame, cfg: DecodeConfig) -> pd.DataFrame:
    out = batch.copy()
    images = [check_image(data, ext, cfg.max_pixels) for data, ext in zip(batch["image"], batch["image_ext"])]
    captions = [decode_caption(raw, cfg.max_caption_bytes) for raw in batch["caption_raw"]]
    metas = [parse_metadata(raw) for raw in batch["json_raw"]]
    out["width"] = pd.array([c.width for c in images], dtype="Int64")
    out["height"] = pd.array([c.height for c in images], dtype="Int64")
    out["image_format"] = [c.format for c in images]
    out["image_mode"] = [c.mode for c in images]
    out["file_bytes"] = [len(d) if d is not None else 0 for d in batch["image"]]
    out["thumbnail"] = [c.thumbnail for c in images]
    out["signature"] = [c.signature for c in images]
    out["image_out"] = [c.image_out for c in images]
    out["image_out_ext"] = [c.image_out_ext for c in images]
    out["caption"] = [text for text, _ in captions]
    out["url"] = [url if isinstance(url, str) else _str_or_none(meta.get("url"))
                  for url, (meta, _) in zip(batch["url"], metas)]
    out["notes"] = [";".join(c.notes) for c in images]
    # The first problem in reading order is the row's reason.
    out["reason_validate"] = [
        _str_or_none(read_error) or _first_missing(data, raw) or image.reason or caption_reason or meta_reason
        for read_error, data, raw, image, (_, caption_reason), (_, meta_reason)
        in zip(batch["read_error"], batch["image"], batch["caption_raw"], images, captions, metas)
    ]
    return out


def _first_missing(image: bytes | None, caption: bytes | None) -> str | None:
    if image is None:
        return "missing_image"
    if caption is None:
        return "missing_caption"
    return None


def _str_or_none(value) -> str | None:
    return value if isinstance(value, str) and value else None
