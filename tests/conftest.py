"""Shared test fixtures: the repository's CLIs run as real subprocesses on a generated corpus."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """The environment the Makefile gives the tools: offline, caches inside build/."""
    build = REPO / "build"
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(build / "torch_extensions")),
        "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", str(build / "matplotlib")),
        "PYTHONUNBUFFERED": "1",
    }


def run_tool(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a console tool (``vlm-train`` …) or a script under tools/ with this interpreter."""
    head, *rest = args
    if head.endswith(".py"):
        command = [sys.executable, str(REPO / head), *rest]
    else:
        command = [str(Path(sys.executable).parent / head), *rest]
    return subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def failure_text(stderr: str | subprocess.CompletedProcess, tail: int = 3000) -> str:
    """What a failed run's assertion should show: the end of its stderr and, before it, the Python stacks a
    crashed rank printed (faulthandler's "Fatal Python error" block), which the rank's death pushes far
    above the launcher's summary."""
    text = stderr if isinstance(stderr, str) else stderr.stderr
    crashes = [f"Fatal Python error{block[:4000]}" for block in text.split("Fatal Python error")[1:]]
    return "".join(f"{crash}\n[...]\n" for crash in crashes) + text[-tail:]


def generate_corpus(out: Path, *, seed: int, num_train: int, samples_per_shard: int, eval_per_class: int) -> Path:
    """Run the demo generator: OUT/train (shards + ground-truth index.parquet) and OUT/eval."""
    result = run_tool("tools/make_demo_data.py", "--out", str(out), "--seed", str(seed), "--num-train",
                      str(num_train), "--samples-per-shard", str(samples_per_shard), "--eval-per-class",
                      str(eval_per_class), "--force")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """A few hundred generated pairs in several shards, plus the held-out eval sets."""
    return generate_corpus(tmp_path_factory.mktemp("corpus"), seed=3, num_train=640, samples_per_shard=160,
                           eval_per_class=3)
