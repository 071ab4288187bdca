#!/usr/bin/env python
"""Benchmark vlm-curate: the full pipeline on Ray Data (local Ray, N CPUs) against the same stage
functions run in one plain Python process, in one run, on a generated pool.

Prints rows/s of both, their ratio, and the peak resident memory of the driver and the Ray workers.
Ray's own start-up (≈3 s) is measured separately and not counted in the pipeline time.

    python tools/bench_curate.py --num-train 20000 --cpus 2
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.config import load_curate_config  # noqa: E402
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
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench_curate")
    args = parser.parse_args()

    pool = args.work / "pool"
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
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    manifest = run(config("plain"), use_ray=False, log=quiet)
    plain_s = time.perf_counter() - started
    rows = manifest["funnel"]["rows"]["read"]
    driver_peak_plain = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    import ray

    started = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray_start_s = time.perf_counter() - started
    memory = PeakWorkerMemory()
    memory.start()
    started = time.perf_counter()
    ray_manifest = run(config("ray"), log=quiet)
    ray_s = time.perf_counter() - started
    memory.running = False
    ray.shutdown()
    assert ray_manifest["funnel"] == manifest["funnel"], "Ray and plain runs disagree"

    print(f"pool: {rows} pairs, kept {manifest['funnel']['rows']['kept']}; machine: {os.cpu_count()} cores, "
          f"load average before {load_before:.1f}, after {os.getloadavg()[0]:.1f} (other jobs share the cores)")
    print(f"plain Python, 1 process : {plain_s:6.1f} s  {rows / plain_s:7.0f} rows/s  "
          f"peak RSS {driver_peak_plain / 2**20:.0f} MiB")
    print(f"Ray Data, {args.cpus} CPUs        : {ray_s:6.1f} s  {rows / ray_s:7.0f} rows/s  "
          f"(+ {ray_start_s:.1f} s ray.init, not counted)")
    print(f"speed-up                : {plain_s / ray_s:.2f}×")
    print(f"peak RSS: driver {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (both runs), "
          f"Ray workers {memory.peak_total / 2**20:.0f} MiB summed, largest single worker "
          f"{memory.peak_single / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
