"""What a Ray worker must import to run a step's task: every worker process pays its imports once a
run, and on a small machine those are a large part of what Ray adds to it (BENCHMARKS.md, "Fewer imports
in every Ray worker")."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def modules_after(statement: str) -> set[str]:
    """The modules a fresh interpreter holds after ``statement``."""
    code = f"{statement}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.splitlines()[-1]))


def test_a_shard_writer_task_imports_no_curation_stage():
    loaded = modules_after("from data_pipeline.shards import write_shard_run")
    assert not {m for m in loaded if m.startswith("data_pipeline.stages") or m in (
        "data_pipeline.registry", "data_pipeline.pipeline")}


def test_loading_the_stage_registry_leaves_scipy_to_the_stage_that_uses_it():
    assert "scipy" not in modules_after("import data_pipeline.registry")
