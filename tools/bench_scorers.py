#!/usr/bin/env python
"""Cheaper scorers (``embed.precision``, ``embed.sparsify``): speed, and agreement with the exact scorer.

For each variant, on the curated demo pool and one trained CLIP scorer (a vlm-train run or export):

  embed step      the embed step itself (``embed_pool`` in this process: read, decode, transform,
                  tokenize, encode, write) over the first ``--timing-shards`` shards, images per
                  second, one torch thread (as one embed actor)
  forward         the scorer's encode_image + encode_text on pre-transformed batches
  image tower     encode_image alone (what token sparsification speeds up)
  Spearman rho    of the variant's CLIP scores against the exact (fp32, dense) scorer's, whole pool
  top-75% overlap |kept ∩ kept_exact| / |kept_exact| when each keeps its best-scoring 75% (the
                  CLIP-score rule of the demo's bootstrap round: top_fraction 0.75)
  mismatched out  with ``--ground-truth`` (the generator's train/index.parquet): the fraction of the
                  pool's mismatched-caption pairs that the top-75% rule removes, what pruning is for

The agreement comes from one embed step per variant over the whole pool (untimed). Speeds are
medians over ``--rounds`` rounds; inside a round the variants run one after the other in turn, so a
change in the machine's load hits all of them alike. Each speed is given per second of wall time and
per CPU-second of this process (see ``Clock``). The load average is printed.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline import scorer_variants  # noqa: E402
from data_pipeline.config import EmbedConfig, ModelSpec, SparsifyConfig  # noqa: E402
from data_pipeline.embed.jobs import read_shard  # noqa: E402
from data_pipeline.embed.workers import embed_pool  # noqa: E402
from data_pipeline.stages.clip_score import ClipScoreConfig, passes_clip_score  # noqa: E402
from vlmtrain.eval.checkpoints import load_eval_model  # noqa: E402

KEEP_FRACTION = 0.75


def variants(depths: list[int], keep: float) -> dict[str, dict]:
    sparse = {"depths": depths, "keep": keep}
    return {
        "fp32 (exact)": {},
        "bf16 autocast": {"precision": "bf16"},
        "int8 dynamic": {"precision": "int8"},
        f"sparsify {keep} fused": {"sparsify": SparsifyConfig(**sparse, fuse=True)},
        f"sparsify {keep} dropped": {"sparsify": SparsifyConfig(**sparse, fuse=False)},
        f"int8 + sparsify {keep} fused": {"precision": "int8", "sparsify": SparsifyConfig(**sparse, fuse=True)},
    }


def forward_batches(loaded, shards: list[str], count: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``count`` samples of the pool as (pixels, tokens) batches, decoded and transformed once."""
    samples = [s for shard in shards for s in read_shard(shard)][:count]
    return [(torch.stack([loaded.transform(Image.open(io.BytesIO(s.image)).convert("RGB"))
                          for s in samples[start:start + batch_size]]),
             loaded.tokenizer([s.caption for s in samples[start:start + batch_size]]))
            for start in range(0, len(samples), batch_size)]


class Clock:
    """Wall time and this process's CPU time of a block. On a loaded machine the wall time counts the
    waits for a core; the CPU time (one torch thread, everything in this process) counts the work."""

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, images: int) -> tuple[float, float]:
        return images / self.wall, images / self.cpu


def time_forward(model, batches, image_only: bool) -> tuple[float, float]:
    """Images per second (wall, CPU) of the scorer's forward over ``batches``."""
    with torch.inference_mode(), Clock() as clock:
        for pixels, tokens in batches:
            model.encode_image(pixels)
            if not image_only:
                model.encode_text(tokens)
    return clock.rates(sum(len(p) for p, _ in batches))


def kept_at_top(scores: pd.DataFrame) -> set[str]:
    rule = ClipScoreConfig(rule="top_fraction", top_fraction=KEEP_FRACTION)
    return set(scores["uid"][passes_clip_score(scores[["uid", "clip_score"]], rule)[0]])


def agreement(scores: pd.DataFrame, exact: pd.DataFrame) -> tuple[float, float]:
    """Spearman rho of the scores and overlap of the top-75% kept sets, against the exact scorer's."""
    both = exact.merge(scores, on="uid", suffixes=("_exact", ""), validate="one_to_one")
    rho = float(both["clip_score"].corr(both["clip_score_exact"], method="spearman"))
    kept, kept_exact = kept_at_top(scores), kept_at_top(exact)
    return rho, len(kept & kept_exact) / len(kept_exact)


def mismatched_removed(scores: pd.DataFrame, truth: pd.DataFrame) -> float:
    """Fraction of the pool's mismatched-caption pairs (by source key) outside the top-75% kept set."""
    mismatched = scores[scores["key"].isin(set(truth.loc[truth["noise"] == "mismatched_caption", "key"]))]
    return 1 - len(set(mismatched["uid"]) & kept_at_top(scores)) / len(mismatched)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=Path, required=True, help="the curated demo pool's shards/ folder")
    parser.add_argument("--checkpoint", type=Path, required=True, help="the scorer: a vlm-train run or export")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--timing-shards", type=int, default=1, help="shards in the timed embed steps")
    parser.add_argument("--forward-images", type=int, default=1024, help="images in the forward-only timings")
    parser.add_argument("--depths", type=int, nargs="+", default=[1, 2, 3], help="sparsified blocks (0-based)")
    parser.add_argument("--keep", type=float, default=0.7, help="fraction of tokens kept at each of them")
    parser.add_argument("--ground-truth", type=Path, help="the generator's train/index.parquet (key, noise)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shards = sorted(str(p) for p in args.shards.glob("*.tar"))
    if not shards:
        sys.exit(f"bench_scorers: no .tar shards in {args.shards}")
    spec = ModelSpec(checkpoint=str(args.checkpoint))
    base = load_eval_model(args.checkpoint)
    configs = {name: EmbedConfig(batch_size=args.batch_size, progress=False, **keys)
               for name, keys in variants(args.depths, args.keep).items()}
    for cfg in configs.values():
        cfg.check("embed")
    models = {name: scorer_variants.apply(base, cfg).model for name, cfg in configs.items()}
    batches = forward_batches(base, shards, args.forward_images, args.batch_size)
    for model in models.values():  # warm-up: first-call allocations and kernel choices
        time_forward(model, batches[:1], image_only=False)

    load_before = os.getloadavg()
    speeds = {name: {"embed": [], "forward": [], "image": []} for name in configs}
    with tempfile.TemporaryDirectory(dir=REPO / "build") as tmp:
        scores = {name: embed_pool(shards, Path(tmp) / f"pool-variant{number}", spec, cfg, use_ray=False,
                                   log=lambda _: None)[["uid", "key", "clip_score"]]
                  for number, (name, cfg) in enumerate(configs.items())}
        for round_index in range(args.rounds):
            for number, (name, cfg) in enumerate(configs.items()):
                out = Path(tmp) / f"round{round_index}-variant{number}"
                with Clock() as clock:
                    index = embed_pool(shards[:args.timing_shards], out, spec, cfg, use_ray=False, log=lambda _: None)
                speeds[name]["embed"].append(clock.rates(len(index)))
                speeds[name]["forward"].append(time_forward(models[name], batches, image_only=False))
                speeds[name]["image"].append(time_forward(models[name], batches, image_only=True))
    load_after = os.getloadavg()

    exact_name = next(iter(configs))
    truth = pd.read_parquet(args.ground_truth, columns=["key", "noise"]) if args.ground_truth else None
    rows = []
    for name in configs:
        rho, overlap = agreement(scores[name], scores[exact_name])
        median = {f"{k}_{clock}_img_s": round(statistics.median(rate[i] for rate in v), 1)
                  for k, v in speeds[name].items() for i, clock in enumerate(("wall", "cpu"))}
        rows.append({"variant": name, **median, "spearman": round(rho, 4), "top75_overlap": round(overlap, 4)})
        if args.ground_truth:
            rows[-1]["mismatched_removed"] = round(mismatched_removed(scores[name], truth), 4)
    exact = rows[0]
    print(f"{len(scores[exact_name])} pool images in {len(shards)} shards; scorer {base.name}; batch "
          f"{args.batch_size}; 1 torch thread; embed step timed over {args.timing_shards} shard(s), forward over "
          f"{sum(len(p) for p, _ in batches)} images; median of {args.rounds} alternating rounds")
    print(f"sparsify: blocks {args.depths} of {len(base.model.visual.transformer.blocks)}, keep {args.keep} at each; "
          f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after ({os.cpu_count()} cores)")
    print("images per second of wall time / per CPU-second of this process (× the exact scorer's, CPU-time)")
    extra = " mismatched out |" if truth is not None else ""
    print(f"| variant | embed step | forward | image tower | Spearman ρ | top-75% overlap |{extra}")
    print(f"|---|---|---|---|---|---|{'---|' if extra else ''}")
    for row in rows:
        cells = [f"{row[f'{k}_wall_img_s']:.0f} / {row[f'{k}_cpu_img_s']:.0f} "
                 f"({row[f'{k}_cpu_img_s'] / exact[f'{k}_cpu_img_s']:.2f}×)" for k in ("embed", "forward", "image")]
        if truth is not None:
            cells.append(f"{row['spearman']:.4f} | {row['top75_overlap']:.4f} | {row['mismatched_removed']:.3f}")
        else:
            cells.append(f"{row['spearman']:.4f} | {row['top75_overlap']:.4f}")
        print(f"| {row['variant']} | {' | '.join(cells)} |")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "load_before": load_before, "load_after": load_after,
                                        "speeds": speeds}, indent=1))


if __name__ == "__main__":
    main()
