#!/usr/bin/env python
"""Training throughput of the tiny CLIP across layouts, in one run: dp=2, tp=2 and pp=2 on 2 ranks,
and the scaling efficiency of dp=2 over one rank at the same per-rank batch, at ZeRO 0 and ZeRO 2.

Every layout is a real ``vlm-train`` run on a generated corpus; its samples/s is the run's own
(``train_summary.json``: all steps but the first, each data-parallel replica counted once). Rounds
alternate over the layouts so that a busy machine slows them alike; the median per layout is
reported with the load average.

Scaling efficiency = samples/s(dp=2) / (2 × samples/s(1 rank)), both at the same per-rank batch.

Example:
  python tools/bench_layouts.py                # 3 rounds, ~15 min on 2 CPU cores
  python tools/bench_layouts.py --rounds 1 --steps 20
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VLM_TRAIN = str(Path(sys.executable).parent / "vlm-train")

LAYOUTS = {  # name → (ranks, overrides)
    "1 rank, ZeRO 0": (1, ["zero_stage=0"]),
    "dp=2, ZeRO 0": (2, ["zero_stage=0"]),
    "1 rank, ZeRO 2": (1, ["zero_stage=2"]),
    "dp=2, ZeRO 2": (2, ["zero_stage=2"]),
    "tp=2, ZeRO 1": (2, ["zero_stage=1", "parallel.tp=2"]),
    "pp=2, ZeRO 1": (2, ["zero_stage=1", "parallel.pp=2"]),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train/demo.yaml")
    parser.add_argument("--steps", type=int, default=40, help="steps per run (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch per data-parallel rank")
    parser.add_argument("--accum", type=int, default=2, help="gradient accumulation (pipeline micro-batches)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the layouts")
    parser.add_argument("--work-dir", type=Path, default=REPO / "build" / "bench_layouts")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions"))}
    corpus = args.work_dir / "corpus"
    if not (corpus / "train").is_dir():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--out", str(corpus),
                        "--seed", "0", "--num-train", "2000", "--samples-per-shard", "250", "--force"],
                       check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    results: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for round_ in range(args.rounds):
        for name, (ranks, overrides) in LAYOUTS.items():
            results[name].append(run(name, ranks, overrides, args, corpus, env))
            print(f"round {round_ + 1}: {name}: {results[name][-1]:.0f} samples/s", flush=True)
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"\n{args.steps} steps, micro-batch {args.batch_size} per data-parallel rank, "
          f"{args.accum} micro-batches per step, median of {args.rounds} alternating rounds")
    print(f"{'layout':<16} {'samples/s':>10}   rounds")
    for name, values in results.items():
        print(f"{name:<16} {medians[name]:>10.0f}   {', '.join(f'{v:.0f}' for v in values)}")
    for zero in (0, 2):
        efficiency = medians[f"dp=2, ZeRO {zero}"] / (2 * medians[f"1 rank, ZeRO {zero}"])
        print(f"scaling efficiency of dp=2 over 1 rank, ZeRO {zero}: {efficiency:.2f}")
    print(f"load average {os.getloadavg()[0]:.2f} at end")


def run(name: str, ranks: int, overrides: list[str], args: argparse.Namespace, corpus: Path, env: dict) -> float:
    out = args.work_dir / name.replace(" ", "").replace(",", "_").replace("=", "")
    command = [VLM_TRAIN, "--config", args.config, "--nproc-per-node", str(ranks),
               f"data.train_shards={corpus / 'train'}", f"output_dir={out}", f"steps={args.steps}",
               f"data.batch_size={args.batch_size}", f"optim.grad_accum_steps={args.accum}",
               "optim.warmup_steps=1", "log_every=10", "metrics.tensorboard=false", "progress=false",
               "overwrite=true", *overrides]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"bench_layouts: {name} failed:\n{result.stderr[-3000:]}")
    return json.loads((out / "train_summary.json").read_text())["samples_per_s"]


if __name__ == "__main__":
    main()
