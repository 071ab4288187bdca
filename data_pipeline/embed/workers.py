"""The worker loop of the embed step: jobs over long-lived model workers, resumable, with images/s.

``EmbedWorkers`` holds the model workers, which the executor runs (Ray actors, or this process):
each loads the model once with its own eval transform and tokenizer and then embeds whole jobs
(``jobs``; ``forward.embed_job`` writes a job's files). Loading the model costs seconds per
worker, so one set of workers serves every ``embed_pool`` call made with it (a pool, then its eval
and seed sets). The workers read their inputs and write their outputs themselves, so only job
descriptions and summaries travel between processes.

A rerun embeds only the jobs without a finished index file. ``OUT/model.json`` records the model (and
the scorer variant, ``data_pipeline.scorer_variants``, unless exact): embeddings made by a different
model or variant are deleted before anything is reused. ``OUT/index.parquet``
(uid, key, shard, row, clip_score for every embedded sample; ``shard`` names the job's input file) is
written last.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
from tqdm import tqdm

from data_pipeline.config import EmbedConfig, ModelSpec, RayConfig
from data_pipeline.embed.forward import embed_job
from data_pipeline.embed.jobs import EmbedError, EmbedJob, job_outputs
from data_pipeline.executor import Executor, make_executor
from vlmtrain import atomic
from vlmtrain.runlock import LOCK_FILE

INDEX_FILE = "index.parquet"
MODEL_FILE = "model.json"


class JobEmbedder:
    """One model worker (a Ray actor, or an object in this process): loads the model once, then embeds jobs."""

    def __init__(self, spec: dict, batch_size: int, threads: int, variant: dict):
        import torch

        from data_pipeline import scorer_variants
        from vlmtrain.configlib import from_dict
        from vlmtrain.errors import CheckpointError, ConfigError

        torch.set_num_threads(threads)
        self.batch_size = batch_size
        self.loaded, self.load_error = None, None
        try:
            cfg = from_dict(EmbedConfig, variant, "embed")  # its precision and sparsify keys
            cfg.check("embed")
            self.loaded = scorer_variants.apply(ModelSpec(**spec).load(), cfg)
        except (CheckpointError, ConfigError) as err:  # reported by embed(): Ray would bury it in an actor-died error
            self.load_error = str(err)

    def embed(self, job: str, out_dir: str) -> dict:
        """The job's summary, or the bad sample's (or model's) message (Ray would bury the exception in its own)."""
        if self.load_error:
            return {"error": self.load_error}
        try:
            return embed_job(EmbedJob.from_json(job), self.loaded, Path(out_dir), self.batch_size)
        except EmbedError as err:
            return {"error": str(err)}


class EmbedWorkers:
    """Up to ``cfg.workers`` model workers for one model, started on first use and kept until ``close``;
    on ``executor`` (a run's), or by default on an executor of their own (Ray unless not ``use_ray``)."""

    def __init__(self, spec: ModelSpec, cfg: EmbedConfig, use_ray: bool = True, executor: Executor | None = None):
        self.spec, self.cfg, self.use_ray = spec, cfg, use_ray
        self.executor, self.own_executor = executor, executor is None
        self.pool = None

    def __enter__(self) -> EmbedWorkers:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, jobs: list[EmbedJob], out: Path) -> Iterator[dict]:
        """Each job's summary as it finishes (in completion order)."""
        if self.pool is None:
            self.executor = self.executor or make_executor(RayConfig(num_cpus=self.cfg.num_cpus), self.use_ray)
            # Fractional CPUs: the workers share a small machine with the curation's own Ray tasks.
            self.pool = self.executor.workers(JobEmbedder, self._worker_args(), self.cfg.workers,
                                              self.cfg.cpus_per_worker)
        yield from self.pool.map("embed", [(job.to_json(), str(out)) for job in jobs])

    def _worker_args(self) -> tuple:
        variant = {"precision": self.cfg.precision, "sparsify": asdict(self.cfg.sparsify)}
        return asdict(self.spec), self.cfg.batch_size, self.cfg.threads_per_worker, variant

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        if self.own_executor and self.executor is not None:
            self.executor.close()
            self.executor = None


def embed_pool(jobs: list[str] | list[EmbedJob], out_dir: str | Path, spec: ModelSpec, cfg: EmbedConfig,
               use_ray: bool = True, log: Callable[[str], None] = print,
               workers: EmbedWorkers | None = None) -> pd.DataFrame:
    """Embed every sample of ``jobs`` (shard paths or ``EmbedJob``s) into ``out_dir``, skipping finished
    jobs; return the index of all of them, in job order. ``workers``: model workers to reuse (their
    model must be ``spec``); by default workers are started for this call and stopped after it."""
    if not jobs:
        raise EmbedError("the pool has nothing to embed (no shards or rows: an empty pool, nothing was kept upstream)")
    if workers is not None and (workers.spec, workers.cfg.variant()) != (spec, cfg.variant()):
        raise ValueError(f"embed_pool: the workers run {workers.spec.describe()} {workers.cfg.variant()}, "
                         f"not {spec.describe()} {cfg.variant()}")
    jobs = [job if isinstance(job, EmbedJob) else EmbedJob.shard(job) for job in jobs]
    out = Path(out_dir)
    _reset_if_other_model(out, {**spec.describe(), **cfg.variant()}, log)
    pending = [job for job in jobs if not _finished(out, job)]
    if pending:
        own_workers = workers is None
        workers = workers or EmbedWorkers(spec, cfg, use_ray)
        try:
            _run_with_progress(workers, pending, out, cfg.progress)
        finally:
            if own_workers:
                workers.close()
    log(f"embed: {len(jobs)} job(s) embedded ({len(jobs) - len(pending)} from an earlier run) in {out}")
    index = pd.concat([pd.read_parquet(job_outputs(out, job)["index"]).assign(shard=Path(job.path).name)
                       for job in jobs], ignore_index=True)
    with atomic.replacing(out / INDEX_FILE) as tmp:
        index.to_parquet(tmp, index=False)
    return index


def _run_with_progress(workers: EmbedWorkers, pending: list[EmbedJob], out: Path, progress: bool) -> None:
    with tqdm(desc="embed", unit="img", disable=not progress, dynamic_ncols=True) as bar:
        for done, summary in enumerate(workers.run(pending, out), start=1):
            if "error" in summary:
                raise EmbedError(summary["error"])
            bar.update(summary["rows"])
            bar.set_postfix_str(f"jobs {done}/{len(pending)}")


def _finished(out: Path, job: EmbedJob) -> bool:
    """Its index exists and, for a job of chosen rows, holds exactly those rows."""
    index = job_outputs(out, job)["index"]
    if not index.is_file():
        return False
    return job.uids is None or set(pd.read_parquet(index, columns=["uid"])["uid"]) == set(job.uids)


def _reset_if_other_model(out: Path, model: dict, log: Callable[[str], None]) -> None:
    """``model``: the model's description and its scorer variant (none for the exact one)."""
    stamp = out / MODEL_FILE
    if stamp.is_file() and json.loads(stamp.read_text()) != model:
        log(f"{out}: embeddings of another model found; starting over")
        for path in out.iterdir():
            if path.name != LOCK_FILE:  # the writer's lock stays: deleting it would let a second writer in
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(stamp, model)
