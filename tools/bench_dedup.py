#!/usr/bin/env python
"""Benchmark copy-detection dedup (data_pipeline.vector.copy_dedup) on a large synthetic pool.

Pool: N unit vectors (default 1M × 256 float32) around C cluster centres (two members of a cluster
have cosine ≈ 0.33, so clusters alone do not form edges at 0.6), plus planted copy groups: a
fraction of the rows are 1–4 noisy copies of another row, cosine 0.7–0.98 to it.

Prints: wall time of copy_dedup (k = 64, cosine > 0.6, connected components, keep one) and its
peak memory; pair recall against exact brute force (faiss.knn, exact inner product) on a random
sample of query rows: of the exact edges (j among q's 64 nearest others with cosine > 0.6), the share
the dedup graph has, and the share it puts in one component; and the speed ratio against exact
brute-force k-NN extrapolated from that sample (same process, same threads). Threads default to 2.

    python tools/bench_dedup.py                       # 1M × 256, 2 threads
    python tools/bench_dedup.py --n 200000 --threads 1
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="pool rows")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--clusters", type=int, default=2000, help="cluster centres of the synthetic pool")
    parser.add_argument("--copy-fraction", type=float, default=0.05, help="share of rows that are planted copies")
    parser.add_argument("--threads", type=int, default=2, help="BLAS/OpenMP threads (numpy and faiss)")
    parser.add_argument("--queries", type=int, default=2000, help="rows checked against exact brute force")
    parser.add_argument("--join-nprobe", type=int, default=8, help="GraphConfig.join_nprobe (the library default is 8)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


ARGS = parse_args()
# Thread counts are read when numpy/faiss load their BLAS: set them before the imports.
for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = str(ARGS.threads)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import resource  # noqa: E402
import time  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from data_pipeline.vector import GraphConfig, copy_dedup  # noqa: E402


def synthetic_pool(n: int, dim: int, clusters: int, copy_fraction: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x *= np.float32(np.sqrt(2.0 / dim))
    x += centres[rng.integers(0, clusters, n)]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    n_copies = int(n * copy_fraction)
    originals = rng.integers(0, n - n_copies, n_copies // 2)
    sources = np.repeat(originals, rng.integers(1, 5, len(originals)))[:n_copies]  # 1–4 copies each
    noise = rng.uniform(0.2, 1.0, (len(sources), 1)).astype(np.float32)  # cosine ≈ 1/√(1+noise²)
    copies = x[sources] + noise * rng.standard_normal((len(sources), dim), dtype=np.float32) / np.float32(np.sqrt(dim))
    x[n - len(sources):] = copies / np.linalg.norm(copies, axis=1, keepdims=True)
    return x


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    faiss.omp_set_num_threads(ARGS.threads)
    start = time.perf_counter()
    x = synthetic_pool(ARGS.n, ARGS.dim, ARGS.clusters, ARGS.copy_fraction, ARGS.seed)
    print(f"pool: {ARGS.n} x {ARGS.dim} float32, {ARGS.clusters} clusters, {ARGS.copy_fraction:.0%} planted copies "
          f"(generated in {time.perf_counter() - start:.1f} s, not counted)")
    load_before = os.getloadavg()

    cpu0, start = cpu_seconds(), time.perf_counter()
    result = copy_dedup(x, graph=GraphConfig(join_nprobe=ARGS.join_nprobe, progress=True))
    dedup_s, dedup_cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    load_after = os.getloadavg()

    queries = np.sort(np.random.default_rng(ARGS.seed + 1).choice(ARGS.n, ARGS.queries, replace=False))
    start = time.perf_counter()
    sims, ids = faiss.knn(x[queries], x, 65, metric=faiss.METRIC_INNER_PRODUCT)
    exact_s = time.perf_counter() - start
    exact = []  # j among q's 64 most similar others (q itself dropped from its top 65), cosine > 0.6
    for q, row, row_sims in zip(queries.tolist(), ids, sims):
        others = [(int(j), s) for j, s in zip(row, row_sims) if j != q][:64]
        exact.extend((q, j) for j, s in others if s > 0.6)
    edges = set(zip(result.graph.rows.tolist(), result.graph.cols.tolist()))
    found = sum((min(q, j), max(q, j)) in edges for q, j in exact)
    together = sum(result.component[q] == result.component[j] for q, j in exact)
    brute_force_s = exact_s * ARGS.n / ARGS.queries

    graph = result.graph
    print(f"copy_dedup: {dedup_s:.1f} s wall, {dedup_cpu:.1f} s CPU on {ARGS.threads} threads "
          f"(method {graph.method}, nlist {graph.nlist}, nprobe {graph.nprobe}); peak RSS {peak_rss:.2f} GiB")
    print(f"graph: {len(graph.rows)} edges; kept {int(result.keep.sum())} of {ARGS.n}, "
          f"{int((result.component_size > 1).sum())} rows in {len(np.unique(result.component[result.component_size > 1]))} "
          f"copy groups")
    print(f"pair recall vs exact ({ARGS.queries} random query rows, {len(exact)} exact edges): "
          f"edges {found / max(1, len(exact)):.4f}, same component {together / max(1, len(exact)):.4f} (target >= 0.99)")
    print(f"exact brute-force k-NN (faiss.knn): {ARGS.queries / exact_s:.0f} queries/s -> {brute_force_s:.0f} s for "
          f"the whole pool; speed-up {brute_force_s / dedup_s:.1f}x")
    print(f"load average (1 min) before/after the dedup: {load_before[0]:.2f} / {load_after[0]:.2f} "
          f"on {os.cpu_count()} cores; target wall time < 60 s")


if __name__ == "__main__":
    main()
