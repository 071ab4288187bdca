"""Run the embed stage over a pool's shards on a Ray actor pool: resumable, with images/s.

Each actor loads the model once (with its own eval transform and tokenizer) and embeds whole
jobs: shards, or rows of a curation run's scored parts (see ``data_pipeline.stages.embed`` for the
files a job produces). A rerun embeds only the jobs without a finished index file. ``OUT/model.json`` records the model: embeddings made by
a different model are deleted before anything is reused. ``OUT/index.parquet`` (uid, key, shard,
row, clip_score for every embedded sample; ``shard`` names the job's input file) is written last.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
from tqdm import tqdm

from data_pipeline.config import EmbedConfig
from data_pipeline.shards import write_json_atomic
from data_pipeline.stages.embed import EmbedError, EmbedJob, ModelSpec, embed_job, job_outputs

INDEX_FILE = "index.parquet"
MODEL_FILE = "model.json"


class ShardEmbedder:
    """A Ray Data actor: loads the model once, then embeds one job per call."""

    def __init__(self, spec: dict, out_dir: str, batch_size: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.loaded = ModelSpec(**spec).load()
        self.out_dir, self.batch_size = Path(out_dir), batch_size

    def __call__(self, batch: dict) -> dict:
        return {"summary": [json.dumps(self.embed(EmbedJob.from_json(job))) for job in batch["job"]]}

    def embed(self, job: EmbedJob) -> dict:
        """The job's summary, or the bad sample's message (Ray would bury the exception in its own)."""
        try:
            return embed_job(job, self.loaded, self.out_dir, self.batch_size)
        except EmbedError as err:
            return {"error": str(err)}


def embed_pool(jobs: list[str] | list[EmbedJob], out_dir: str | Path, spec: ModelSpec, cfg: EmbedConfig,
               use_ray: bool = True, log: Callable[[str], None] = print) -> pd.DataFrame:
    """Embed every sample of ``jobs`` (shard paths or ``EmbedJob``s) into ``out_dir``, skipping finished
    jobs; return the index of all of them, in job order."""
    if not jobs:
        raise EmbedError("the pool has nothing to embed (no shards or rows: an empty pool, nothing was kept upstream)")
    jobs = [job if isinstance(job, EmbedJob) else EmbedJob.shard(job) for job in jobs]
    out = Path(out_dir)
    _reset_if_other_model(out, spec, log)
    pending = [job for job in jobs if not _finished(out, job)]
    if pending:
        runner = _ray_embed if use_ray else _local_embed
        with tqdm(desc="embed", unit="img", disable=not cfg.progress, dynamic_ncols=True) as bar:
            for done, summary in enumerate(runner(pending, out, spec, cfg), start=1):
                if "error" in summary:
                    raise EmbedError(summary["error"])
                bar.update(summary["rows"])
                bar.set_postfix_str(f"jobs {done}/{len(pending)}")
    log(f"embed: {len(jobs)} job(s) embedded ({len(jobs) - len(pending)} from an earlier run) in {out}")
    index = pd.concat([pd.read_parquet(job_outputs(out, job)["index"]).assign(shard=Path(job.path).name)
                       for job in jobs], ignore_index=True)
    index.to_parquet(out / INDEX_FILE, index=False)
    return index


def _finished(out: Path, job: EmbedJob) -> bool:
    """Its index exists and, for a job of chosen rows, holds exactly those rows."""
    index = job_outputs(out, job)["index"]
    if not index.is_file():
        return False
    return job.uids is None or set(pd.read_parquet(index, columns=["uid"])["uid"]) == set(job.uids)


def _reset_if_other_model(out: Path, spec: ModelSpec, log: Callable[[str], None]) -> None:
    stamp = out / MODEL_FILE
    if stamp.is_file() and json.loads(stamp.read_text()) != spec.describe():
        log(f"{out}: embeddings of another model found; starting over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stamp, spec.describe())


def _ray_embed(pending: list[EmbedJob], out: Path, spec: ModelSpec, cfg: EmbedConfig) -> Iterator[dict]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours shows images/s
    try:
        items = [{"job": job.to_json()} for job in pending]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            ShardEmbedder, batch_size=1, num_cpus=cfg.cpus_per_worker,
            fn_constructor_kwargs={"spec": spec.describe(), "out_dir": str(out), "batch_size": cfg.batch_size,
                                   "threads": cfg.threads_per_worker},
            compute=ray.data.ActorPoolStrategy(size=min(cfg.workers, len(pending))))
        for row in dataset.iter_rows():
            yield json.loads(row["summary"])
    finally:
        if started:
            ray.shutdown()


def _local_embed(pending: list[EmbedJob], out: Path, spec: ModelSpec, cfg: EmbedConfig) -> Iterator[dict]:
    """The same stage function in this process (debugging, and the benchmark's single-process side)."""
    embedder = ShardEmbedder(spec.describe(), str(out), cfg.batch_size, cfg.threads_per_worker)
    for job in pending:
        yield embedder.embed(job)
