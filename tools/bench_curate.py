#!/usr/bin/env python
"""Benchmark vlm-curate: the full pipeline on Ray (a local Ray of N CPUs, N workers) against the same stage
functions run in one plain Python process, on a generated pool.

The two alternate for ``--rounds`` rounds (plain, Ray, plain, Ray, ...) in one process, and the
speed-up is the ratio of their median times. Prints each round, rows/s of both, the load average,
and the peak resident memory of the driver and the Ray workers. Ray's own start-up (≈3 s) happens
once, before the first round, and is not counted in the pipeline time.

    python tools/bench_curate.py --num-train 20000 --cpus 2 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.config import load_curate_config  # noqa: E402
from data_pipeline.executor import ensure_ray  # noqa: E402
from data_pipeline.pipeline import run  # noqa: E402


class PeakWorkerMemory(threading.Thread):
    """Samples the summed RSS of the Ray worker processes (children of this driver's raylet)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_total = self.peak_single = 0
        self.running = True

    def run(self) -> None:
        while self.running:
            sizes = []
            for line in subprocess.run(["ps", "-eo", "rss=,args="], capture_output=True, text=True).stdout.splitlines():
                rss, _, args = line.strip().partition(" ")
                if "ray::" in args:
                    sizes.append(int(rss) * 1024)
            self.peak_total = max(self.peak_total, sum(sizes))
            self.peak_single = max(self.peak_single, max(sizes, default=0))
            time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-train", type=int, default=20000)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of each (default: 3)")
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench_curate")
    args = parser.parse_args()

    pool = args.work / f"pool{args.num_train}"
    if not (pool / "train" / "index.parquet").is_file():
        subprocess.run([sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--out", str(pool), "--seed", "1",
                        "--num-train", str(args.num_train), "--eval-per-class", "1", "--force"], check=True)

    def config(name: str):
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        return load_curate_config(REPO / "configs" / "curate" / "demo.yaml", [
            f"output_dir={out}", f"sources=[{{format: webdataset, path: '{pool / 'train'}'}}]", "progress=false",
            f"ray.workers={args.cpus}"])

    quiet = lambda message: None  # noqa: E731
    import ray

    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    ensure_ray(args.cpus)  # as vlm-curate starts it: quiet, no dashboard
    ray_start_s = time.perf_counter() - started
    memory = PeakWorkerMemory()
    memory.start()
    times: dict[str, list[float]] = {"plain": [], "ray": []}
    funnels = []
    for number in range(args.rounds):
        for name in times:
            started = time.perf_counter()
            manifest = run(config(name), use_ray=name == "ray", log=quiet)
            times[name].append(time.perf_counter() - started)
            funnels.append(manifest["funnel"])
            print(f"round {number + 1}/{args.rounds} {name:5s}: {times[name][-1]:6.1f} s, "
                  f"load average {os.getloadavg()[0]:.1f}", flush=True)
    memory.running = False
    ray.shutdown()
    assert all(funnel == funnels[0] for funnel in funnels), "Ray and plain runs disagree"

    rows, kept = funnels[0]["rows"]["read"], funnels[0]["rows"]["kept"]
    plain_s, ray_s = statistics.median(times["plain"]), statistics.median(times["ray"])
    print(f"pool: {rows} pairs, kept {kept}; machine: {os.cpu_count()} cores, load average before "
          f"{load_before:.1f}, after {os.getloadavg()[0]:.1f}; median of {args.rounds} alternating rounds")
    print(f"plain Python, 1 process  : {plain_s:6.1f} s  {rows / plain_s:7.0f} rows/s")
    print(f"{f'Ray, {args.cpus} CPUs, {args.cpus} workers':25s}: {ray_s:6.1f} s  {rows / ray_s:7.0f} rows/s  "
          f"(+ {ray_start_s:.1f} s ray.init, once, not counted)")
    print(f"speed-up                 : {plain_s / ray_s:.2f}×")
    print(f"peak RSS: driver {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (all runs), "
          f"Ray workers {memory.peak_total / 2**20:.0f} MiB summed, largest single worker "
          f"{memory.peak_single / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
