#!/usr/bin/env python
"""What encoding fewer image tokens buys: the image tower's forward + backward time with MAE-style
visible-token encoding (75% of the patches masked) against the full sequence, and with FLIP's patch
dropout (50%) against none, for the tiny ViT (32 px, patch 8: 16 patches) and ViT-B/16 (224 px:
196 patches).

Each variant runs ``VisionTower`` in training mode on random images, backward from the sum of its
pooled output. Rounds alternate over the variants (so load drifts hit every variant alike) and the
median per variant is reported, with the speed-up over the full sequence next to the encoded token
ratio (class token included). ``--clock cpu`` times this process's CPU time (one thread), steadier
than wall time on a shared machine.

Example:
  python tools/bench_masking.py                               # both models, wall clock
  python tools/bench_masking.py --models vit_b_16 --clock cpu --rounds 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = {"tiny": 64, "vit_b_16": 4}  # CLIP preset → batch size


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="tiny,vit_b_16", help=f"CLIP presets' image towers: {', '.join(MODELS)}")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: 64 tiny, 4 vit_b_16)")
    parser.add_argument("--iterations", type=int, default=0, help="timed forward+backward per variant and round "
                                                                   "(default: 20 tiny, 2 vit_b_16)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds over the variants")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    return parser.parse_args(argv)


def variants(tower, image_size: int, batch: int, num_patches: int) -> dict[str, tuple[float, object]]:
    """name → (encoded tokens / full tokens, a callable running forward + backward)."""
    import torch

    from vlmtrain.models.common import masking

    def run(keep=None, dropout: float = 0.0):
        def step():
            tower.patch_dropout = dropout
            tower.zero_grad(set_to_none=True)
            tower(images, keep).sum().backward()
        return step

    images = torch.randn(batch, 3, image_size, image_size)
    masks = torch.stack([masking.random_mask(num_patches, 0.75) for _ in range(batch)])
    keep = masking.visible_index(masks)
    dropped = num_patches - masking.masked_count(num_patches, 0.5)
    return {"full sequence": (1.0, run()),
            "75% masked, visible tokens": ((1 + keep.shape[1]) / (1 + num_patches), run(keep=keep)),
            "patch dropout 50%": ((1 + dropped) / (1 + num_patches), run(dropout=0.5))}


def bench(preset: str, args: argparse.Namespace) -> None:
    import torch

    from vlmtrain.models.clip.config import PRESETS
    from vlmtrain.models.common.vision import VisionConfig, VisionTower

    cfg = VisionConfig(**PRESETS[preset]["vision"])
    batch = args.batch or MODELS[preset]
    iterations = args.iterations or (20 if preset == "tiny" else 2)
    torch.manual_seed(0)
    tower = VisionTower(cfg, PRESETS[preset]["embed_dim"]).train()
    runs = variants(tower, cfg.image_size, batch, (cfg.image_size // cfg.patch_size) ** 2)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for _, step in runs.values():  # warm-up: allocator, kernels
        step()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (_, step) in runs.items():
            started = clock()
            for _ in range(iterations):
                step()
            times[name].append((clock() - started) / iterations)
    full = statistics.median(times["full sequence"])
    print(f"\n{preset}: {cfg.image_size} px, patch {cfg.patch_size}, width {cfg.width}, {cfg.layers} layers; "
          f"batch {batch}, {iterations} iterations × {args.rounds} rounds, {args.clock} clock, "
          f"{args.threads} thread(s)")
    print("| variant | tokens encoded (of full) | fwd+bwd ms (median) | speed-up |")
    print("|---|---|---|---|")
    for name, (ratio, _) in runs.items():
        median = statistics.median(times[name])
        print(f"| {name} | {ratio:.3f} | {1000 * median:.1f} | {full / median:.2f}× |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f} at start")
    for preset in args.models.split(","):
        bench(preset, args)
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
