"""Cost of curation's input fingerprint (data_pipeline.inputs) on a pool of shards: the first run hashes
every shard (sha256), a resume only stats them (the cheap key: size, mtime_ns, inode).

    python tools/bench_fingerprint.py demo_out/data/train
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from data_pipeline.inputs import RACY_NS, fingerprint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shards", type=Path, help="a folder of .tar shards")
    shards = sorted(str(p) for p in parser.parse_args().shards.glob("*.tar"))
    size = sum(Path(s).stat().st_size for s in shards)
    start = time.perf_counter()
    first = fingerprint(shards)
    hashing = time.perf_counter() - start
    time.sleep(RACY_NS / 1e9)  # files modified within the racy window are re-hashed on purpose
    first = fingerprint(shards, first)
    start = time.perf_counter()
    again = fingerprint(shards, first)
    resume = time.perf_counter() - start
    print(f"{len(shards)} shards, {size / 2**20:.1f} MiB: first run (sha256 of every shard) {hashing * 1000:.0f} ms; "
          f"resume (stat only) {resume * 1000:.2f} ms; same fingerprint: {first == again}")


if __name__ == "__main__":
    main()
