"""The embed step's unit of work, an ``EmbedJob``, and reading its samples.

A job is a webdataset shard, chosen rows of a scored part of a curation run
(``.work/parts/<part>.parquet``, which holds the image bytes), or chosen image files of a folder.
It is also the unit of resuming: its outputs (``job_outputs``), under the embeddings directory, are

  image-<name>.npy, text-<name>.npy     float16 (rows, dim), L2-normalised, rows in job order
  index-<name>.parquet                  uid (a shard sample's ``__key__``: the uid in curated shards;
                                        a file's path relative to its folder), key (the source key),
                                        row, clip_score

An ``images_only`` job (the reference sets of the embedding stages: images, no captions needed) has
no text file and no clip_score. ``forward.embed_job`` writes them, the index last.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from data_pipeline.shards import read_shard_members
from vlmtrain.errors import UserError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXT = "txt"
FILES_PER_JOB = 1000  # image files of a folder embedded (and resumed) together


class EmbedError(UserError):
    """A sample cannot be embedded (no image, undecodable image, no caption); names its file and key."""


@dataclass(frozen=True)
class EmbedJob:
    """One unit of embedding work: a ``.tar`` shard (every sample), a scored part ``.parquet`` (the
    rows ``uids``, in the part's order) or a folder (the image files ``uids``, paths relative to it).
    ``name`` is the stem of the job's output files; ``images_only`` jobs need and embed no captions."""
    name: str
    path: str
    uids: tuple[str, ...] | None = None
    images_only: bool = False

    @classmethod
    def shard(cls, path: str | Path, images_only: bool = False) -> EmbedJob:
        return cls(Path(path).name.removesuffix(".tar"), str(path), images_only=images_only)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> EmbedJob:
        raw = json.loads(text)
        return cls(raw["name"], raw["path"], None if raw["uids"] is None else tuple(raw["uids"]),
                   raw.get("images_only", False))


@dataclass
class Sample:
    uid: str
    key: str | None
    image: bytes
    caption: str | None  # None in images_only jobs


def shard_outputs(out_dir: Path, shard: str) -> dict[str, Path]:
    return job_outputs(out_dir, EmbedJob.shard(shard))


def job_outputs(out_dir: Path, job: EmbedJob) -> dict[str, Path]:
    stem = job.name
    return {"image": out_dir / f"image-{stem}.npy", "text": out_dir / f"text-{stem}.npy",
            "index": out_dir / f"index-{stem}.parquet"}


def read_shard(path: str, images_only: bool = False) -> Iterator[Sample]:
    """Samples of a webdataset tar: consecutive members ``<key>.<ext>`` grouped by key."""
    for key, members in read_shard_members(path):
        fields = {Path(info.name).name.partition(".")[2].lower(): data for info, data in members}
        yield _sample({"__key__": key, **fields}, path, images_only)


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


def read_image_files(folder: str, files: tuple[str, ...]) -> Iterator[Sample]:
    """Image files of a folder (paths relative to it), without captions."""
    for name in files:
        try:
            image = (Path(folder) / name).read_bytes()
        except OSError as err:
            raise EmbedError(f"{Path(folder) / name}: cannot read image file ({err.strerror or err})") from None
        yield Sample(uid=name, key=None, image=image, caption=None)


def read_job(job: EmbedJob) -> Iterator[Sample]:
    if job.path.endswith(".tar"):
        return read_shard(job.path, job.images_only)
    if job.path.endswith(".parquet"):
        return read_scored_rows(job.path, job.uids)
    return read_image_files(job.path, job.uids or ())


def folder_jobs(folder: str | Path) -> list[EmbedJob]:
    """Images-only jobs for every ``.tar`` shard and image file (jpg/jpeg/png/webp) under ``folder``,
    recursively: webdataset folders, image folders and vlm-eval sets (``test/*.tar``, class folders,
    or the image files a CSV set names). Empty when there are none."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    jobs = [EmbedJob(_job_name(p.relative_to(folder).as_posix().removesuffix(".tar")), str(p), images_only=True)
            for p in files if p.suffix == ".tar"]
    images = [p.relative_to(folder).as_posix() for p in files if p.suffix.lower().lstrip(".") in IMAGE_EXTS]
    jobs += [EmbedJob(f"files-{start // FILES_PER_JOB:06d}", str(folder), tuple(images[start:start + FILES_PER_JOB]),
                      images_only=True) for start in range(0, len(images), FILES_PER_JOB)]
    return jobs


def _job_name(relative: str) -> str:
    """An output-file stem for a shard below a folder: sub/dir/000.tar → tar-sub_dir_000."""
    return "tar-" + relative.replace("/", "_")


def _sample(fields: dict, shard: str, images_only: bool = False) -> Sample:
    key = fields["__key__"]
    image = next((fields[ext] for ext in IMAGE_EXTS if ext in fields), None)
    if image is None:
        raise EmbedError(f"{shard}: sample {key!r} has no image ({', '.join(IMAGE_EXTS)})")
    if images_only:
        return Sample(uid=key, key=_json_key(fields), image=image, caption=None)
    if CAPTION_EXT not in fields:
        raise EmbedError(f"{shard}: sample {key!r} has no caption (.{CAPTION_EXT})")
    meta = json.loads(fields["json"]) if "json" in fields else {}
    return Sample(uid=key, key=meta.get("key"), image=image, caption=fields[CAPTION_EXT].decode("utf-8"))


def _json_key(fields: dict) -> str | None:
    """The ``key`` of a sample's optional json (eval shards carry one); a broken json is no reason to stop."""
    try:
        meta = json.loads(fields["json"]) if "json" in fields else {}
    except ValueError:
        return None
    key = meta.get("key") if isinstance(meta, dict) else None
    return None if key is None else str(key)
