"""Run the embed stage over a pool's shards on a Ray actor pool: resumable, with images/s.

Each actor loads the model once (with its own eval transform and tokenizer) and embeds whole
shards (see ``data_pipeline.stages.embed`` for the files a shard produces). A rerun embeds only
the shards without a finished index file. ``OUT/model.json`` records the model: embeddings made by
a different model are deleted before anything is reused. ``OUT/index.parquet`` (uid, key, shard,
row, clip_score for every embedded sample) is written last.
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
from data_pipeline.stages.embed import EmbedError, ModelSpec, embed_shard, shard_outputs

INDEX_FILE = "index.parquet"
MODEL_FILE = "model.json"


class ShardEmbedder:
    """A Ray Data actor: loads the model once, then embeds one shard per call."""

    def __init__(self, spec: dict, out_dir: str, batch_size: int, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.loaded = ModelSpec(**spec).load()
        self.out_dir, self.batch_size = Path(out_dir), batch_size

    def __call__(self, batch: dict) -> dict:
        return {"summary": [json.dumps(self.embed(str(shard))) for shard in batch["shard"]]}

    def embed(self, shard: str) -> dict:
        """The shard's summary, or the bad sample's message (Ray would bury the exception in its own)."""
        try:
            return embed_shard(shard, self.loaded, self.out_dir, self.batch_size)
        except EmbedError as err:
            return {"error": str(err)}


def embed_pool(shards: list[str], out_dir: str | Path, spec: ModelSpec, cfg: EmbedConfig, use_ray: bool = True,
               log: Callable[[str], None] = print) -> pd.DataFrame:
    """Embed every sample of ``shards`` into ``out_dir`` (skipping finished shards); return the index."""
    if not shards:
        raise EmbedError("the pool has no shards to embed (an empty pool: nothing was kept upstream)")
    out = Path(out_dir)
    _reset_if_other_model(out, spec, log)
    pending = [s for s in shards if not shard_outputs(out, s)["index"].is_file()]
    if pending:
        runner = _ray_embed if use_ray else _local_embed
        with tqdm(desc="embed", unit="img", disable=not cfg.progress, dynamic_ncols=True) as bar:
            for done, summary in enumerate(runner(pending, out, spec, cfg), start=1):
                if "error" in summary:
                    raise EmbedError(summary["error"])
                bar.update(summary["rows"])
                bar.set_postfix_str(f"shards {done}/{len(pending)}")
    log(f"embed: {len(shards)} shard(s) embedded ({len(shards) - len(pending)} from an earlier run) in {out}")
    index = pd.concat([pd.read_parquet(shard_outputs(out, s)["index"]).assign(shard=Path(s).name) for s in shards],
                      ignore_index=True)
    index.to_parquet(out / INDEX_FILE, index=False)
    return index


def _reset_if_other_model(out: Path, spec: ModelSpec, log: Callable[[str], None]) -> None:
    stamp = out / MODEL_FILE
    if stamp.is_file() and json.loads(stamp.read_text()) != spec.describe():
        log(f"{out}: embeddings of another model found; starting over")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(stamp, spec.describe())


def _ray_embed(pending: list[str], out: Path, spec: ModelSpec, cfg: EmbedConfig) -> Iterator[dict]:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=cfg.num_cpus or None, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False  # ours shows images/s
    try:
        dataset = ray.data.from_items([{"shard": s} for s in pending], override_num_blocks=len(pending)).map_batches(
            ShardEmbedder, batch_size=1, num_cpus=cfg.cpus_per_worker,
            fn_constructor_kwargs={"spec": spec.describe(), "out_dir": str(out), "batch_size": cfg.batch_size,
                                   "threads": cfg.threads_per_worker},
            compute=ray.data.ActorPoolStrategy(size=min(cfg.workers, len(pending))))
        for row in dataset.iter_rows():
            yield json.loads(row["summary"])
    finally:
        if started:
            ray.shutdown()


def _local_embed(pending: list[str], out: Path, spec: ModelSpec, cfg: EmbedConfig) -> Iterator[dict]:
    """The same stage function in this process (debugging, and the benchmark's single-process side)."""
    embedder = ShardEmbedder(spec.describe(), str(out), cfg.batch_size, cfg.threads_per_worker)
    for shard in pending:
        yield embedder.embed(shard)
