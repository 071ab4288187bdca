"""Curation that scales with the pool: the near-duplicate candidate search against its brute-force
reference, the write step's decisions streamed in pieces bounded by ``output.stream_rows``, and the dedup
step's driver holding a few integers per candidate."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from data_pipeline.config import load_curate_config
from data_pipeline.pipeline import run
from data_pipeline.stages.near_candidates import (CellSearch, CodeArray, brute_force_neighbours, candidate_pairs,
                                                  plan_cells)
from data_pipeline.stages.near_duplicates import serial_map
from tests.conftest import REPO


def clustered_codes(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Look-alikes around 40 layouts (grid noise σ 12) and 150 planted near copies (σ 2): the codes,
    and the planted (source, copy) pairs."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(20, 236, (40, 192))
    rows = centres[rng.integers(0, 40, 3000)] + rng.normal(0, 12, (3000, 192))
    sources = rng.choice(3000, 150, replace=False)
    copies = rows[sources] + rng.normal(0, 2, (150, 192))
    codes = np.clip(np.rint(np.concatenate([rows, copies])), 0, 255).astype(np.uint8)
    return codes, np.stack([sources, 3000 + np.arange(150)], axis=1)


def test_cell_search_is_the_brute_force_reference_when_every_cell_is_probed_and_finds_every_near_copy():
    codes, planted = clustered_codes()
    reference = brute_force_neighbours(codes, 10)
    cells = plan_cells(CodeArray(codes), CellSearch(cell_rows=64))
    assert len(cells.starts) - 1 == len(codes) // 64 and sorted(cells.members) == list(range(len(codes)))
    everything = CellSearch(cell_rows=64, probes=len(codes) // 64)
    np.testing.assert_array_equal(candidate_pairs(CodeArray(codes), 10, everything, serial_map, 3), reference)

    found = candidate_pairs(CodeArray(codes), 10, CellSearch(cell_rows=64, probes=4), serial_map, 3)
    found_set, reference_set = set(map(tuple, found)), set(map(tuple, reference))
    assert set(map(tuple, planted)) <= found_set  # every near copy is a candidate
    assert len(found_set & reference_set) / len(reference_set) >= 0.9  # most look-alike neighbours too


def test_decisions_are_written_in_pieces_of_stream_rows_and_read_back_complete(generated_pool, tmp_path):
    out = tmp_path / "out"
    overrides = [f"output_dir={out}", f"sources=[{{format: webdataset, path: '{generated_pool}'}}]",
                 "output.samples_per_shard=400", "progress=false"]
    config = REPO / "configs" / "curate" / "demo.yaml"
    whole = run(load_curate_config(config, overrides), use_ray=False, log=lambda _: None)
    at_once = pd.read_parquet(out / "decisions.parquet")
    # Only the write step again, 64 rows at a time: the scored parts and duplicates are reused.
    pieces = run(load_curate_config(config, [*overrides, "output.stream_rows=64"]), steps=["write"],
                 use_ray=False, log=lambda _: None)
    metadata = pq.ParquetFile(out / "decisions.parquet").metadata
    sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
    assert max(sizes) <= 64 and metadata.num_row_groups > len(pieces["shards"])
    decisions = pd.read_parquet(out / "decisions.parquet")
    rows = pieces["funnel"]["rows"]
    assert len(decisions) == rows["read"] == 1500
    assert rows["kept"] + int((~decisions["kept"]).sum()) == rows["read"]
    pd.testing.assert_frame_equal(decisions, at_once)
    assert pieces["funnel"] == whole["funnel"] and pieces["shards"] == whole["shards"]


def dedup_step_peak(pool_glob: str, out, ray_address: str) -> tuple[int, int]:
    """(candidate rows, peak bytes the driver's Python and numpy allocations reached) of the dedup step alone,
    on Ray (its tasks' memory is theirs) over the already scored sources ``pool_glob``."""
    cfg = load_curate_config(REPO / "configs" / "curate" / "demo.yaml", [
        f"output_dir={out}", f"sources=[{{format: webdataset, path: '{pool_glob}'}}]", "progress=false",
        "output.stream_rows=64"])
    run(cfg, steps=["score"], ray_address=ray_address, log=lambda _: None)
    logged: list[str] = []
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        run(cfg, steps=["dedup"], ray_address=ray_address, log=logged.append)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    (summary,) = [line for line in logged if line.startswith("dedup:")]
    return int(summary.split(" of ")[1].split()[0]), peak


def test_the_dedup_steps_driver_memory_grows_by_a_few_bytes_a_candidate_not_a_string_or_code_each(
        generated_pool, tmp_path, local_ray, monkeypatch):
    # The strings the driver reads a group at a time (uids of rows that tie on size, colliding sha256s) are
    # bounded by these constants; small here, so the pools below are past them as a 1M pool is past the defaults.
    monkeypatch.setattr("data_pipeline.stages.dedup.GROUP_ROWS", 256, raising=False)
    monkeypatch.setattr("data_pipeline.verdicts.GROUP_ROWS", 256, raising=False)
    small = dedup_step_peak(f"{generated_pool}/shard-00000[0-1].tar", tmp_path / "small", local_ray)
    large = dedup_step_peak(f"{generated_pool}/*.tar", tmp_path / "large", local_ray)
    per_row = (large[1] - small[1]) / (large[0] - small[0])
    print(f"dedup step, driver: {per_row:.0f} bytes a candidate ({small} → {large})")
    # Before: 894 bytes a candidate (uid and sha256 strings, 192-byte grid codes, candidate pairs); now ≈ 60.
    assert large[0] > 2 * small[0] and per_row <= 96, f"{per_row:.0f} bytes a candidate ({small} → {large})"
