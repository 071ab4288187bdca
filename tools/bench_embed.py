#!/usr/bin/env python
"""Images/s of the embed stage (`data_pipeline.embed.workers.embed_pool` on Ray actors) against a bare
single-process loop of the same model doing the same work (read the tar, decode, eval transform,
tokenize, encode image and text, normalise), both at one torch thread per process.

Target: stage images/s per core ≥ 0.9× the bare loop. Two stage figures: "cold" starts its actors
in the timed call (each imports torch and loads the model: a fixed cost of seconds), "warm" reuses
actors an earlier call started (``EmbedWorkers``), as a curation run does for its pool, eval and seed
sets. ray.init is timed apart and counted in neither. The model is the demo's tiny CLIP preset with
random weights (the speed does not depend on the weights). The shards must be curated (decodable)
ones, e.g. the pool tools/bench_bootstrap.py curates.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.config import EmbedConfig, ModelSpec  # noqa: E402
from data_pipeline.embed.jobs import read_shard  # noqa: E402
from data_pipeline.embed.workers import EmbedWorkers, embed_pool  # noqa: E402
from data_pipeline.executor import ensure_ray  # noqa: E402
from vlmtrain.checkpoint import write_export  # noqa: E402
from vlmtrain.config import load_train_config  # noqa: E402
from vlmtrain.eval.checkpoints import load_eval_model  # noqa: E402
from vlmtrain.models.registry import spec_of  # noqa: E402


def write_tiny_export(folder: Path) -> Path:
    cfg = load_train_config(REPO / "configs" / "train" / "demo.yaml").model
    torch.manual_seed(0)
    write_export(spec_of(cfg).build(cfg).state_dict(), cfg, folder, {})
    return folder


def bare_loop(export: Path, shards: list[str], batch_size: int) -> tuple[int, float]:
    loaded = load_eval_model(export)
    started = time.perf_counter()
    count = 0
    with torch.inference_mode():
        for shard in shards:
            samples = list(read_shard(shard))
            for start in range(0, len(samples), batch_size):
                chunk = samples[start:start + batch_size]
                pixels = torch.stack([loaded.transform(Image.open(io.BytesIO(s.image)).convert("RGB")) for s in chunk])
                image = F.normalize(loaded.model.encode_image(pixels), dim=-1)
                text = F.normalize(loaded.model.encode_text(loaded.tokenizer([s.caption for s in chunk])), dim=-1)
                (image * text).sum(-1).numpy()
                count += len(chunk)
    return count, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, default=REPO / "build" / "bench_bootstrap" / "curated" / "shards")
    parser.add_argument("--max-shards", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2, help="actors (one per core)")
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards = sorted(str(p) for p in args.shards.glob("*.tar"))[:args.max_shards]
    if not shards:
        sys.exit(f"bench_embed: no shards in {args.shards}; run tools/bench_bootstrap.py first or pass --shards")

    import ray

    with tempfile.TemporaryDirectory(dir=REPO / "build") as tmp:
        export = write_tiny_export(Path(tmp) / "tiny")
        images, bare_s = bare_loop(export, shards, args.batch_size)
        started = time.perf_counter()
        ensure_ray(args.workers)  # as vlm-curate starts it
        ray_init_s = time.perf_counter() - started
        cfg = EmbedConfig(batch_size=args.batch_size, workers=args.workers, cpus_per_worker=0.5, progress=False)
        spec = ModelSpec(checkpoint=str(export))
        started = time.perf_counter()
        embed_pool(shards, Path(tmp) / "cold", spec, cfg, log=lambda _: None)
        cold_s = time.perf_counter() - started
        with EmbedWorkers(spec, cfg) as workers:
            embed_pool(shards[:args.workers], Path(tmp) / "warm-up", spec, cfg, log=lambda _: None, workers=workers)
            started = time.perf_counter()
            embed_pool(shards, Path(tmp) / "warm", spec, cfg, log=lambda _: None, workers=workers)
            warm_s = time.perf_counter() - started
        ray.shutdown()
        started = time.perf_counter()
        embed_pool(shards, Path(tmp) / "local", ModelSpec(checkpoint=str(export)), cfg, use_ray=False,
                   log=lambda _: None)
        local_s = time.perf_counter() - started

    bare, cold, warm, local = images / bare_s, images / cold_s, images / warm_s, images / local_s
    print(f"{images} images in {len(shards)} shards, tiny demo CLIP, batch {args.batch_size}, 1 torch thread per "
          f"process; machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end")
    print(f"bare single-process loop           : {bare:8.1f} images/s")
    print(f"embed stage, this process (no Ray) : {local:8.1f} images/s  ({local / bare:.2f}x bare: file writes)")
    print(f"embed stage, Ray, {args.workers} actors, cold : {cold:8.1f} images/s  ({cold / args.workers / bare:.2f}x bare "
          f"per core; actor start-up counted; + {ray_init_s:.1f} s ray.init, not counted)")
    print(f"embed stage, Ray, {args.workers} actors, warm : {warm:8.1f} images/s  ({warm / args.workers / bare:.2f}x bare "
          f"per core, target >= 0.9x)")


if __name__ == "__main__":
    main()
