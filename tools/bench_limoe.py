#!/usr/bin/env python
"""LIMoE benchmark: expert parallelism's throughput and per-rank parameter memory, and LIMoE against
a dense model with the same active parameters in zero-shot top-1.

1. Throughput: limoe_tiny (configs/train/limoe_tiny.yaml) on 2 gloo ranks, parallel.ep=1 vs ep=2,
   the same batch and steps, in alternating rounds; samples/s is ``train_summary.json``'s (all steps
   but the first), the median over rounds is reported. Per-rank parameter memory is counted on the
   model each rank builds (``build_sharded``: ep=2 holds half the experts), fp32.
2. Quality: limoe_tiny (4 experts, top-1: each token runs one expert MLP) and the same model with
   ``moe.every=0`` (a dense MLP in that block: the same active parameters per token), trained with the
   same steps, batch and seed at ep=1, then evaluated zero-shot on the demo eval sets.

Example:
  python tools/bench_limoe.py --rounds 3 --throughput-steps 40 --quality-steps 300
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
CONFIG = REPO / "configs" / "train" / "limoe_tiny.yaml"


def vlm_train(out: Path, data: Path, *overrides: str) -> dict:
    command = [str(Path(sys.executable).parent / "vlm-train"), "--config", str(CONFIG), "--nproc-per-node", "2",
               f"data.train_shards={data / 'train'}", f"output_dir={out}", "overwrite=true", "progress=false",
               "metrics.tensorboard=false", *overrides]
    print("$", " ".join(command[1:]), flush=True)
    if subprocess.run(command, cwd=REPO, stdout=subprocess.DEVNULL).returncode != 0:
        sys.exit(f"bench_limoe: training failed: {' '.join(command)}")
    return json.loads((out / "train_summary.json").read_text())


def parameter_mib(ep: int) -> float:
    """fp32 parameters that rank 0 holds at this ep (every rank holds as many)."""
    from vlmtrain.config import load_train_config
    from vlmtrain.models.registry import spec_of

    cfg = load_train_config(CONFIG, ["data.train_shards=unused", f"parallel.ep={ep}"])
    spec = spec_of(cfg.model)
    model = spec.experts.build_sharded(cfg.model, ep, 0) if ep > 1 else spec.build(cfg.model)
    return sum(p.numel() for p in model.parameters()) * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench_limoe")
    parser.add_argument("--data", type=Path, help="a demo corpus (tools/make_demo_data.py); made if absent")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--throughput-steps", type=int, default=40)
    parser.add_argument("--quality-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--skip-quality", action="store_true")
    args = parser.parse_args()
    work = args.work.resolve()
    data = (args.data or work / "data").resolve()
    if not (data / "manifest.json").exists():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--out", str(data), "--seed", "0"],
                       check=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start", flush=True)
    common = [f"data.batch_size={args.batch}", "log_every=10"]
    speeds: dict[int, list[float]] = {1: [], 2: []}
    for round_ in range(args.rounds):
        for ep in (1, 2) if round_ % 2 == 0 else (2, 1):
            summary = vlm_train(work / f"ep{ep}", data, *common, f"steps={args.throughput_steps}",
                                "optim.warmup_steps=5", f"parallel.ep={ep}")
            speeds[ep].append(summary["samples_per_s"])
    print(f"\n{'layout':<14}{'samples/s (median)':>20}{'rounds':>30}{'params / rank (MiB)':>22}")
    for ep, values in speeds.items():
        print(f"{'dp=2 ep=' + str(ep):<14}{statistics.median(values):>20.1f}"
              f"{' '.join(f'{v:.1f}' for v in values):>30}{parameter_mib(ep):>22.3f}")
    if not args.skip_quality:
        results = {}
        for name, extra in (("limoe_tiny", []), ("dense (moe.every=0)", ["model.moe.every=0"])):
            out = work / name.split()[0]
            vlm_train(out, data, *common, f"steps={args.quality_steps}", "parallel.ep=1",
                      f"eval.every={args.quality_steps}", f"eval.datasets=[{data / 'eval'}]", *extra)
            last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            results[name] = {k: v for r in last for k, v in r.items() if k.endswith("acc1")}
        sets = sorted({k for r in results.values() for k in r})
        print(f"\n{'model':<22}" + "".join(f"{s:>26}" for s in sets))
        for name, acc in results.items():
            print(f"{name:<22}" + "".join(f"{acc.get(s, float('nan')):>26.4f}" for s in sets))
    print(f"load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
