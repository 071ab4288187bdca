#!/usr/bin/env python
"""Zero-shot accuracy of model families trained alike: each family's config trained by ``vlm-train``
for the same steps, global batch and warm-up on the same corpus, then ``vlm-eval zeroshot`` on the
demo eval sets. Prints one Markdown row per family: top-1 on each eval set and the run's training
samples/s (``train_summary.json``: the mean over the timed steps, the first excluded).

The families run one after the other on the same machine (the load average is printed with each).

Example (the BENCHMARKS.md table):
  python tools/make_demo_data.py --out /tmp/bench_data --seed 0
  python tools/bench_families_zero_shot.py --data /tmp/bench_data --out /tmp/bench_runs \\
      --run clip=configs/train/demo.yaml --run flava=configs/train/flava_tiny.yaml --steps 300
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="a tools/make_demo_data.py output (train/, eval/)")
    parser.add_argument("--out", required=True, type=Path, help="where the runs and results go")
    parser.add_argument("--run", action="append", required=True, metavar="NAME=CONFIG",
                        help="a family's name and its vlm-train config (repeat)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank (global = × --nproc)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--warmup-steps", type=int, default=30)
    return parser.parse_args(argv)


def run(*command: str) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(f"| family | steps × global batch | {'shapes top-1'} | {'digits top-1'} | training samples/s | load avg |")
    print("|---|---|---|---|---|---|")
    for item in args.run:
        name, _, config = item.partition("=")
        run_dir, results = args.out / name, args.out / f"{name}_results.json"
        run(str(BIN / "vlm-train"), "--config", config, "--nproc-per-node", str(args.nproc),
            f"data.train_shards={args.data / 'train'}", f"output_dir={run_dir}", f"steps={args.steps}",
            f"data.batch_size={args.batch_size}", f"optim.warmup_steps={args.warmup_steps}",
            "metrics.tensorboard=false", "progress=false", "overwrite=true")
        load = os.getloadavg()[0]
        run(str(BIN / "vlm-eval"), "zeroshot", "--checkpoint", str(run_dir), "--data", str(args.data / "eval"),
            "--out", str(results), "--no-progress")
        summary = json.loads((run_dir / "train_summary.json").read_text())
        top1 = {r["dataset"]: r["metrics"].get("acc1") for r in json.loads(results.read_text())}
        print(f"| {name} | {args.steps} × {summary['global_batch']} | {top1['shapes']:.3f} | {top1['digits']:.3f} | "
              f"{summary['samples_per_s']:.0f} | {load:.1f} |", flush=True)


if __name__ == "__main__":
    main()
