"""Two curation runs into one output directory: the second fails at once naming the first's pid,
and the first finishes with a consistent output (every row read decided once)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, cli_env
from tests.helpers import copy_shards, curate_config_args, webdataset_source

pytestmark = pytest.mark.e2e


def start_curation(pool: Path, out: Path) -> subprocess.Popen:
    command = [str(Path(sys.executable).parent / "vlm-curate"), "run",
               *curate_config_args(webdataset_source(pool), out), "--no-ray"]
    return subprocess.Popen(command, cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None and time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_second_curation_into_the_same_directory_fails_at_once_naming_the_first(tmp_path, small_corpus):
    pool, out = copy_shards(small_corpus / "train", tmp_path / "pool", count=4), tmp_path / "out"
    first = start_curation(pool, out)
    try:
        wait_for(out / ".work" / "fingerprint.json", first)  # the first run has begun writing
        second = start_curation(pool, out)
        _, second_err = second.communicate(timeout=120)
        first_out, first_err = first.communicate(timeout=600)
    finally:
        first.kill()

    assert second.returncode == 2, second_err
    assert f"pid {first.pid}" in second_err and "another process" in second_err
    assert first.returncode == 0, first_err
    decisions = pd.read_parquet(out / "decisions.parquet")
    assert decisions["uid"].is_unique and len(decisions) == 4 * 160
