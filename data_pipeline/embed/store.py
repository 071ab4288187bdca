"""The embedding sets a run stores, and reading them back for the embedding stages.

An ``EmbeddingSet`` is one folder of job outputs (``jobs``) written by one ``embed_pool`` call: the
pool's candidate rows, or one reference folder of a stage (an eval set, a seed set). ``load`` gives
its embeddings in job order, refusing a set the embed step has not (fully) produced.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from data_pipeline.embed.jobs import EmbedJob, job_outputs


class EmbeddingsMissing(RuntimeError):
    """The write step needs embeddings the embed step has not produced (yet)."""


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

    @classmethod
    def concat(cls, sets: list[Embedded]) -> Embedded:
        """Several reference sets as one (their ids and vectors; no scores)."""
        return cls(np.concatenate([s.ids for s in sets]), np.concatenate([s.vectors for s in sets]))


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
