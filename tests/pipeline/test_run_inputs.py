"""What a curation run reads is never its own output, and a rerun sees changed or vanished inputs.

An input inside the output directory is refused before anything is written; an input file the
earlier run read that is gone fails the rerun (a rejection row is for a bad sample, not a lost file);
a shard rewritten at the same size is read again, so the rerun writes what a fresh run would.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_pipeline.shards import file_sha256
from tests.conftest import run_tool
from tests.helpers import copy_shards, curate_config_args, rewrite_captions_in_place, webdataset_source

pytestmark = pytest.mark.e2e


def curate(pool: Path, out: Path):
    return run_tool("vlm-curate", "run", *curate_config_args(webdataset_source(pool), out), "--no-ray")


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("vlm-curate: error: ")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    return lines[0]


def test_an_input_inside_the_output_directory_is_refused_before_anything_is_written(tmp_path, small_corpus):
    out = tmp_path / "out"
    pool = copy_shards(small_corpus / "train", out / "shards")
    before = {p.name: p.read_bytes() for p in pool.iterdir()}

    result = curate(pool, out)

    assert "inside the output directory" in error_line(result)
    assert sorted(p.name for p in out.iterdir()) == ["shards"]  # nothing written next to it
    assert {p.name: p.read_bytes() for p in pool.iterdir()} == before


def test_an_input_file_gone_since_the_last_run_fails_the_rerun(tmp_path, small_corpus):
    pool, out = copy_shards(small_corpus / "train", tmp_path / "pool"), tmp_path / "out"
    assert curate(pool, out).returncode == 0
    gone = sorted(pool.glob("*.tar"))[0]
    gone.unlink()

    line = error_line(curate(pool, out))

    assert "gone" in line and str(gone) in line
    assert (out / "decisions.parquet").is_file()  # the earlier run's results are left as they were


def test_a_shard_rewritten_at_the_same_size_is_read_again(tmp_path, small_corpus):
    pool, out = copy_shards(small_corpus / "train", tmp_path / "pool"), tmp_path / "out"
    assert curate(pool, out).returncode == 0
    rewritten = sorted(pool.glob("*.tar"))[1]
    rewrite_captions_in_place(rewritten, str.upper)

    assert curate(pool, out).returncode == 0
    assert curate(pool, tmp_path / "fresh").returncode == 0

    manifest = json.loads((out / "manifest.json").read_text())
    for name in ["decisions.parquet", *(f"shards/{s['name']}" for s in manifest["shards"])]:
        assert (out / name).read_bytes() == (tmp_path / "fresh" / name).read_bytes(), name
    assert {entry["path"]: entry["sha256"] for entry in manifest["inputs"]}[str(rewritten)] == file_sha256(rewritten)
