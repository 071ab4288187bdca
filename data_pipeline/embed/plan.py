"""The embed step of ``vlm-curate run``: which embedding sets a run needs, and embedding them.

The pool is the candidate rows (those still kept after the row and global stages); the reference
sets are the folders each enabled embedding stage lists in its ``references`` field (the registry's).
Everything lives under ``output_dir/.work/embeddings/``, one folder per set (each resumable on its own):

  pool/                            one job per scored part: its candidate rows (image + caption,
                                   so every row also gets its CLIP score)
  <field>/<i>-<name>-<hash>/       folder i of a stage's reference field (eval_sets, seed_sets), images only

The hash covers the folder's file list (paths, sizes, mtimes): an edited set is embedded again. Each
folder's model.json restarts it when the model changes (``workers``). One set of model workers, on
the run's executor, serves all the sets, so the model is loaded once per worker.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from data_pipeline import registry
from data_pipeline.config import CurateConfig
from data_pipeline.embed.jobs import EmbedJob, folder_jobs
from data_pipeline.embed.store import EmbeddingSet
from data_pipeline.embed.workers import EmbedWorkers, embed_pool
from data_pipeline.executor import Executor
from vlmtrain.errors import UserError


class EmbeddingInputError(UserError):
    """The model checkpoint or a reference folder is missing, or a folder holds no images; names the
    config key and the path."""


@dataclass
class EmbedPlan:
    pool: EmbeddingSet | None  # None: no candidate rows
    references: dict[str, list[EmbeddingSet]]  # stage name → the sets of its reference folders

    def all_sets(self) -> list[EmbeddingSet]:
        return ([self.pool] if self.pool else []) + [s for sets in self.references.values() for s in sets]


def check_inputs(cfg: CurateConfig) -> None:
    """Fail before any work when the model checkpoint or a reference folder does not exist."""
    checkpoint = cfg.embedding.model.checkpoint
    if checkpoint and not Path(checkpoint).exists():
        raise EmbeddingInputError(f"embedding.model.checkpoint: not found: {checkpoint}")
    for _, key, folder in _reference_folders(cfg):
        if not Path(folder).is_dir():
            raise EmbeddingInputError(f"{key}: folder not found: {folder}")


def input_paths(cfg: CurateConfig) -> list[tuple[str, str]]:
    """(config key, path) of everything the embed step reads: the model checkpoint and the reference folders."""
    return [("embedding.model.checkpoint", cfg.embedding.model.checkpoint),
            *((key, folder) for _, key, folder in _reference_folders(cfg))]


def _reference_folders(cfg: CurateConfig) -> list[tuple[registry.Stage, str, str]]:
    """(stage, config key, folder) of the enabled embedding stages' reference folders, in stage order."""
    return [(stage, f"{stage.section}.{stage.references}[{i}]", folder)
            for stage in registry.of_kind(registry.EMBEDDING) if stage.references and registry.enabled(cfg, stage)
            for i, folder in enumerate(getattr(registry.section_of(cfg, stage), stage.references))]


def plan(cfg: CurateConfig, candidates: pd.DataFrame, parts_dir: Path, work: Path) -> EmbedPlan:
    """``candidates``: part_id, uid of the rows the embedding stages will see (in part order)."""
    root = work / "embeddings"
    jobs = tuple(EmbedJob(part_id, str(parts_dir / f"{part_id}.parquet"), tuple(group["uid"]))
                 for part_id, group in candidates.groupby("part_id", sort=False))
    references: dict[str, list[EmbeddingSet]] = {}
    for stage, key, folder in _reference_folders(cfg):
        sets = references.setdefault(stage.name, [])
        sets.append(_reference_set(key, folder, root / stage.references, len(sets)))
    return EmbedPlan(EmbeddingSet("pool", root / "pool", jobs) if jobs else None, references)


def _reference_set(key: str, folder: str, parent: Path, index: int) -> EmbeddingSet:
    path = Path(folder)  # exists: check_inputs ran before any step
    jobs = folder_jobs(path)
    if not jobs:
        raise EmbeddingInputError(f"{key}: {path} holds no .tar shards and no image files (jpg, jpeg, png, webp)")
    listing = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                     for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256(repr((str(path.resolve()), listing)).encode()).hexdigest()[:10]
    return EmbeddingSet(key, parent / f"{index}-{path.resolve().name}-{digest}", tuple(jobs))


def embed(plan: EmbedPlan, cfg: CurateConfig, executor: Executor, log: Callable[[str], None]) -> None:
    """Embed every set of the plan (finished jobs are skipped), on one set of model workers on ``executor``."""
    spec = cfg.embedding.model
    with EmbedWorkers(spec, cfg.embedding.embed, executor=executor) as workers:
        for embedding_set in plan.all_sets():
            embed_pool(list(embedding_set.jobs), embedding_set.out, spec, cfg.embedding.embed,
                       log=lambda line, key=embedding_set.key: log(f"{line} [{key}]"), workers=workers)
