"""Embed stage: a CLIP model over image-text samples → image and text embeddings and their cosine.

Plain functions, no Ray (``data_pipeline.embedding`` runs them on an actor pool). The unit of work
and of resuming is an ``EmbedJob``: a webdataset shard, or chosen rows of a scored part of a
curation run (``.work/parts/<part>.parquet``, which holds the image bytes). Its outputs, under the
embeddings directory, are

  image-<name>.npy, text-<name>.npy     float16 (rows, dim), L2-normalised, rows in job order
  index-<name>.parquet                  uid (a shard sample's ``__key__``: the uid in curated shards),
                                        key (the source key), row, clip_score

``clip_score`` is the cosine of the float32 features, before the float16 cast. The index file is
written last and atomically, so a job whose index exists is complete.
"""
from __future__ import annotations

import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"


class EmbedError(ValueError):
    """A sample cannot be embedded (no image, undecodable image, no caption); names its file and key."""


@dataclass(frozen=True)
class ModelSpec:
    """What ``vlmtrain.eval.checkpoints.load_eval_model`` needs: ours, or open_clip with local weights."""
    checkpoint: str = ""
    open_clip_model: str = ""
    pretrained: str = ""

    def load(self):
        from vlmtrain.eval.checkpoints import load_eval_model

        if self.checkpoint:
            return load_eval_model(self.checkpoint)
        return load_eval_model(model=self.open_clip_model, pretrained=self.pretrained or None)

    def describe(self) -> dict:
        return {"checkpoint": self.checkpoint, "open_clip_model": self.open_clip_model,
                "pretrained": self.pretrained}


@dataclass(frozen=True)
class EmbedJob:
    """One unit of embedding work: a ``.tar`` shard (every sample), or a scored part ``.parquet`` (the
    rows ``uids``, in the part's order). ``name`` is the stem of the job's output files."""
    name: str
    path: str
    uids: tuple[str, ...] | None = None

    @classmethod
    def shard(cls, path: str | Path) -> EmbedJob:
        return cls(Path(path).name.removesuffix(".tar"), str(path))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EmbedJob:
        raw = json.loads(text)
        return cls(raw["name"], raw["path"], None if raw["uids"] is None else tuple(raw["uids"]))


@dataclass
class Sample:
    uid: str
    key: str | None
    image: bytes
    caption: str


def shard_outputs(out_dir: Path, shard: str) -> dict[str, Path]:
    return job_outputs(out_dir, EmbedJob.shard(shard))


def job_outputs(out_dir: Path, job: EmbedJob) -> dict[str, Path]:
    stem = job.name
    return {"image": out_dir / f"image-{stem}.npy", "text": out_dir / f"text-{stem}.npy",
            "index": out_dir / f"index-{stem}.parquet"}


def read_shard(path: str) -> Iterator[Sample]:
    """Samples of a webdataset tar: consecutive members ``<key>.<ext>`` grouped by key."""
    current: dict = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, ext = Path(member.name).name.partition(".")
            if current and current["__key__"] != stem:
                yield _sample(current, path)
                current = {}
            current["__key__"] = stem
            current[ext.lower()] = tar.extractfile(member).read()
    if current:
        yield _sample(current, path)


def read_scored_rows(path: str, uids: tuple[str, ...] | None) -> Iterator[Sample]:
    """Rows of a curation run's scored part (the stored image: the re-encoded one when there is one)."""
    table = pq.read_table(path, columns=["uid", "key", "image", "image_out", "caption"]).to_pandas()
    if uids is not None:
        table = table[table["uid"].isin(set(uids))]
    for row in table.itertuples(index=False):
        image = row.image_out if row.image_out is not None else row.image
        if image is None or not isinstance(row.caption, str):
            raise EmbedError(f"{path}: row {row.uid!r} has no {'image' if image is None else 'caption'}")
        yield Sample(uid=row.uid, key=row.key, image=image, caption=row.caption)


def read_job(job: EmbedJob) -> Iterator[Sample]:
    if job.path.endswith(".tar"):
        return read_shard(job.path)
    return read_scored_rows(job.path, job.uids)


def _sample(fields: dict, shard: str) -> Sample:
    key = fields["__key__"]
    image = next((fields[ext] for ext in IMAGE_EXTS if ext in fields), None)
    if image is None:
        raise EmbedError(f"{shard}: sample {key!r} has no image ({', '.join(IMAGE_EXTS)})")
    if CAPTION_EXT not in fields:
        raise EmbedError(f"{shard}: sample {key!r} has no caption (.{CAPTION_EXT})")
    meta = json.loads(fields["json"]) if "json" in fields else {}
    return Sample(uid=key, key=meta.get("key"), image=image, caption=fields[CAPTION_EXT].decode("utf-8"))


def decode_rgb(sample: Sample, source: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(sample.image)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise EmbedError(f"{source}: sample {sample.uid!r}: undecodable image ({err})") from None


def embed_batch(model, pixels, tokens) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image, text) L2-normalised float32 features and their row-wise cosine."""
    import torch
    import torch.nn.functional as F

    with torch.inference_mode():
        image = F.normalize(model.encode_image(pixels).float(), dim=-1)
        text = F.normalize(model.encode_text(tokens).float(), dim=-1)
    return image.numpy(), text.numpy(), (image * text).sum(-1).numpy()


def embed_job(job: EmbedJob, loaded, out_dir: Path, batch_size: int) -> dict:
    """Embed every sample of one job with ``loaded`` (an ``EvalModel``); write its outputs."""
    import torch

    samples = list(read_job(job))
    images, texts, scores = [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        pixels = torch.stack([loaded.transform(decode_rgb(s, job.path)) for s in chunk])
        tokens = loaded.tokenizer([s.caption for s in chunk])
        image, text, score = embed_batch(loaded.model, pixels, tokens)
        images.append(image)
        texts.append(text)
        scores.append(score)
    outputs = job_outputs(out_dir, job)
    dim = images[0].shape[1] if images else 0
    _save_npy(outputs["image"], np.concatenate(images) if images else np.zeros((0, dim)))
    _save_npy(outputs["text"], np.concatenate(texts) if texts else np.zeros((0, dim)))
    index = pd.DataFrame({"uid": [s.uid for s in samples], "key": [s.key for s in samples],
                          "row": np.arange(len(samples), dtype=np.int64),
                          "clip_score": np.concatenate(scores).astype(np.float32) if scores else
                          np.zeros(0, np.float32)})
    tmp = outputs["index"].with_suffix(".parquet.tmp")
    pq.write_table(pa.Table.from_pandas(index, preserve_index=False), tmp)
    os.replace(tmp, outputs["index"])
    return {"job": job.name, "rows": len(samples)}


def _save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array.astype(np.float16))
    os.replace(tmp, path)
