"""The embed step of ``vlm-curate run``: CLIP embeddings of the candidate rows and of the reference sets.

Candidates are the rows still kept after validation, heuristics and dedup. Everything lives under
``output_dir/.work/embeddings/``, one folder per ``embed_pool`` call (each resumable on its own):

  pool/                           one job per scored part: its candidate rows (image + caption,
                                  so every row also gets its CLIP score)
  eval_sets/<i>-<name>-<hash>/    decontamination eval set i (images only)
  seed_sets/<i>-<name>-<hash>/    retrieval seed set i (images only)

The hash covers the folder's file list (paths, sizes, mtimes): an edited set is embedded again. Each
folder's model.json restarts it when the model changes (``data_pipeline.embedding``). One set of
model workers serves all the calls, so the model is loaded once per worker.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from data_pipeline.config import CurateConfig
from data_pipeline.embedding import EmbedWorkers, embed_pool
from data_pipeline.stages.embed import EmbedJob, folder_jobs, job_outputs
from vlmtrain.errors import UserError


class EmbeddingsMissing(RuntimeError):
    """The write step needs embeddings the embed step has not produced (yet)."""


class EmbeddingInputError(UserError):
    """The model checkpoint or an eval/seed folder is missing, or a folder holds no images; names the
    config key and the path."""


@dataclass(frozen=True)
class EmbeddingSet:
    """Where one ``embed_pool`` call writes, and its jobs."""
    key: str  # what the set is: "pool" or the config key naming its folder
    out: Path
    jobs: tuple[EmbedJob, ...]


@dataclass
class Embedded:
    """The embeddings of one set: ids (a candidate's uid; ``<folder>:<uid>`` for reference sets),
    float32 image vectors (rows, dim), and for the pool each row's CLIP score."""
    ids: np.ndarray
    vectors: np.ndarray
    clip_score: np.ndarray | None = None


@dataclass
class EmbedPlan:
    pool: EmbeddingSet | None  # None: no candidate rows
    eval_sets: list[EmbeddingSet]
    seed_sets: list[EmbeddingSet]

    def all_sets(self) -> list[EmbeddingSet]:
        return ([self.pool] if self.pool else []) + self.eval_sets + self.seed_sets


def check_inputs(cfg: CurateConfig) -> None:
    """Fail before any work when the model checkpoint or a reference folder does not exist."""
    checkpoint = cfg.embedding.model.checkpoint
    if checkpoint and not Path(checkpoint).exists():
        raise EmbeddingInputError(f"embedding.model.checkpoint: not found: {checkpoint}")
    for key, folder in _reference_folders(cfg):
        if not Path(folder).is_dir():
            raise EmbeddingInputError(f"{key}: folder not found: {folder}")


def input_paths(cfg: CurateConfig) -> list[tuple[str, str]]:
    """(config key, path) of everything the embed step reads: the model checkpoint and the reference folders."""
    return [("embedding.model.checkpoint", cfg.embedding.model.checkpoint), *_reference_folders(cfg)]


def _reference_folders(cfg: CurateConfig, kind: str | None = None) -> list[tuple[str, str]]:
    """(config key, folder) of the enabled stages' eval sets and seed sets (or only ``kind``'s)."""
    stages = cfg.embedding
    folders = []
    if stages.decontaminate.enabled and kind in (None, "eval_sets"):
        folders += [(f"embedding.decontaminate.eval_sets[{i}]", f) for i, f in enumerate(stages.decontaminate.eval_sets)]
    if stages.retrieval.enabled and kind in (None, "seed_sets"):
        folders += [(f"embedding.retrieval.seed_sets[{i}]", f) for i, f in enumerate(stages.retrieval.seed_sets)]
    return folders


def plan(cfg: CurateConfig, candidates: pd.DataFrame, parts_dir: Path, work: Path) -> EmbedPlan:
    """``candidates``: part_id, uid of the rows the embedding stages will see (in part order)."""
    root = work / "embeddings"
    jobs = tuple(EmbedJob(part_id, str(parts_dir / f"{part_id}.parquet"), tuple(group["uid"]))
                 for part_id, group in candidates.groupby("part_id", sort=False))
    eval_sets = [_reference_set(key, folder, root / "eval_sets", i)
                 for i, (key, folder) in enumerate(_reference_folders(cfg, "eval_sets"))]
    seed_sets = [_reference_set(key, folder, root / "seed_sets", i)
                 for i, (key, folder) in enumerate(_reference_folders(cfg, "seed_sets"))]
    return EmbedPlan(EmbeddingSet("pool", root / "pool", jobs) if jobs else None, eval_sets, seed_sets)


def _reference_set(key: str, folder: str, parent: Path, index: int) -> EmbeddingSet:
    path = Path(folder)  # exists: check_inputs ran before any step
    jobs = folder_jobs(path)
    if not jobs:
        raise EmbeddingInputError(f"{key}: {path} holds no .tar shards and no image files (jpg, jpeg, png, webp)")
    listing = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256(repr((str(path.resolve()), listing)).encode()).hexdigest()[:10]
    return EmbeddingSet(key, parent / f"{index}-{path.resolve().name}-{digest}", tuple(jobs))


def embed(plan: EmbedPlan, cfg: CurateConfig, use_ray: bool, log: Callable[[str], None]) -> None:
    """Embed every set of the plan (finished jobs are skipped), on one set of model workers."""
    spec = cfg.embedding.model
    with EmbedWorkers(spec, cfg.embedding.embed, use_ray) as workers:
        for embedding_set in plan.all_sets():
            embed_pool(list(embedding_set.jobs), embedding_set.out, spec, cfg.embedding.embed, use_ray=use_ray,
                       log=lambda line, key=embedding_set.key: log(f"{line} [{key}]"), workers=workers)


def load(embedding_set: EmbeddingSet, reference: bool = False) -> Embedded:
    """The set's embeddings in job order; EmbeddingsMissing when a job is not (or not fully) embedded.
    A reference set's ids name their source: ``<shard>:<key>`` or the image file's path."""
    ids, vectors, scores = [], [], []
    for job in embedding_set.jobs:
        files = job_outputs(embedding_set.out, job)
        if not files["index"].is_file():
            raise EmbeddingsMissing(f"{embedding_set.key}: {job.path} has not been embedded yet "
                                    f"(expected {files['index']}); run `vlm-curate run`")
        index = pd.read_parquet(files["index"])
        if job.uids is not None and set(index["uid"]) != set(job.uids):
            raise EmbeddingsMissing(f"{embedding_set.key}: the embeddings of {job.path} are for other rows; "
                                    "run `vlm-curate run`")
        uids = index["uid"].astype(str)
        if reference:
            uids = f"{job.path}:" + uids if job.path.endswith(".tar") else uids.map(lambda u: str(Path(job.path) / u))
        ids.append(uids.to_numpy(dtype=object))
        vectors.append(np.load(files["image"]).astype(np.float32))
        if "clip_score" in index:
            scores.append(index["clip_score"].to_numpy(np.float32))
    return Embedded(np.concatenate(ids), np.concatenate(vectors),
                    np.concatenate(scores) if scores and len(scores) == len(vectors) else None)


def load_references(sets: list[EmbeddingSet]) -> Embedded | None:
    """All reference sets of one stage as one matrix (None without any)."""
    if not sets:
        return None
    loaded = [load(s, reference=True) for s in sets]
    return Embedded(np.concatenate([e.ids for e in loaded]), np.concatenate([e.vectors for e in loaded]))
