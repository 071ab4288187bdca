#!/usr/bin/env python
"""How `vlm-curate run` scales with the pool: wall time, rows/s and peak memory on one generated pool.

Runs ``vlm-curate run configs/curate/demo.yaml`` (Ray, score → dedup → write) as a child process on
``--pool`` (a ``tools/make_demo_data.py`` train folder) and samples, every ``--interval`` s with psutil,
the resident memory of the driver (the ``vlm-curate`` process) and of all processes (the driver and every
descendant: Ray's GCS, raylet and workers). Prints one line of figures and the load average before and
after (other jobs share the cores, so a loaded machine slows it down and the figures say so).

    python tools/make_demo_data.py --out build/pools/p50k --seed 1 --num-train 50000 --image-size 32 \\
        --eval-per-class 1 --samples-per-shard 5000
    python tools/bench_curate_scale.py --pool build/pools/p50k/train --out build/scale/p50k
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def tree_rss(root: psutil.Process) -> tuple[int, int]:
    """(RSS of ``root``, RSS summed over ``root`` and its descendants) in bytes; gone processes count 0."""
    def rss(process: psutil.Process) -> int:
        try:
            return process.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0

    try:
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    own = rss(root)
    return own, own + sum(rss(child) for child in children)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, required=True, help="a generated pool's train/ folder")
    parser.add_argument("--out", type=Path, required=True, help="output_dir of the run (replaced)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--keep", action="store_true", help="keep the output directory afterwards")
    parser.add_argument("--no-ray", action="store_true", help="the plain executor: everything in the driver process")
    parser.add_argument("--reuse-scored", action="store_true",
                        help="keep the scored parts of an earlier run in --out (only dedup and write run again: "
                             "the steps whose driver memory is measured; wall time then excludes scoring)")
    parser.add_argument("overrides", nargs="*", help="more key=value overrides for the curate config")
    args = parser.parse_args()
    clear_outputs(args.out, args.reuse_scored)
    command = [sys.executable, "-m", "data_pipeline.cli", "run", str(REPO / "configs" / "curate" / "demo.yaml"),
               f"output_dir={args.out}", f"sources=[{{format: webdataset, path: '{args.pool}'}}]", "progress=false",
               *args.overrides, *(["--no-ray"] if args.no_ray else [])]
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = psutil.Process(child.pid)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stdout), daemon=True)
    reader.start()
    peak_driver = peak_all = 0
    peak_by_step: dict[str, int] = {}  # the driver's, by the step it was in (the last step summary printed)
    while child.poll() is None:
        own, total = tree_rss(driver)
        peak_driver, peak_all = max(peak_driver, own), max(peak_all, total)
        step = current_step(lines)
        peak_by_step[step] = max(peak_by_step.get(step, 0), own)
        time.sleep(args.interval)
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the run's processes that have been waited for (all of a plain run; the driver, not
    # Ray's daemons, in a Ray run): unlike wall time, hardly changed by other jobs on the cores.
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    reader.join()
    output = "".join(lines)
    if child.returncode != 0:
        sys.exit(f"vlm-curate failed ({child.returncode}):\n{output}")
    manifest = json.loads((args.out / "manifest.json").read_text())
    rows = manifest["funnel"]["rows"]
    result = {"executor": "plain" if args.no_ray else "ray", "rows": rows["read"], "kept": rows["kept"], "near_dedup_removed": rows["exact_dedup"] - rows["near_dedup"],
              "wall_s": round(wall, 1), "rows_per_s": round(rows["read"] / wall, 1),
              "ms_per_row": round(1000 * wall / rows["read"], 3), "cpu_s": round(cpu, 1),
              "cpu_ms_per_row": round(1000 * cpu / rows["read"], 3),
              "peak_rss_driver_mib": round(peak_driver / 2**20), "peak_rss_all_mib": round(peak_all / 2**20),
              "peak_rss_driver_mib_by_step": {k: round(v / 2**20) for k, v in peak_by_step.items()},
              "load_before": [round(v, 2) for v in load_before],
              "load_after": [round(v, 2) for v in os.getloadavg()], "cores": os.cpu_count()}
    print("\n".join(line for line in output.splitlines() if line.startswith(("dedup:", "write:"))))
    print(json.dumps(result))
    if not args.keep:
        shutil.rmtree(args.out, ignore_errors=True)


def current_step(lines: list[str]) -> str:
    """The step a run is in, from the step summaries it has printed ("score: ...", "dedup: ...")."""
    done = [line.split(":")[0] for line in lines if line.startswith(("score:", "dedup:"))]
    return {"score": "dedup", "dedup": "write"}[done[-1]] if done else "score"


def clear_outputs(out: Path, keep_scored: bool) -> None:
    """Remove ``out``; with ``keep_scored``, all of it but the scored parts and the run's stamp."""
    if not keep_scored or not (out / ".work" / "parts").is_dir():
        shutil.rmtree(out, ignore_errors=True)
        return
    kept = {out / ".work", out / ".work" / "parts", out / ".work" / "fingerprint.json"}
    for path in sorted(out.rglob("*"), reverse=True):
        if path in kept or (out / ".work" / "parts") in path.parents:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


if __name__ == "__main__":
    main()
