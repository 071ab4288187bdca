"""Shared test fixtures: the repository's CLIs run as real subprocesses on a generated corpus."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
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


# How torchrun names a rank killed by a native crash: a segfault, or glibc aborting on a corrupted heap.
RANK_CRASHES = ("SIGSEGV", "SIGABRT")


def run_tool(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a console tool (``vlm-train`` …) or a script under tools/ with this interpreter.

    A training launch whose rank crashed (SIGSEGV, SIGABRT) is rerun once in a fresh output directory, with a
    warning that carries the crash's stacks into the test report. Rarely (a few times in hundreds of launches on a
    loaded machine, never reproduced on its own) a gloo rank crashes in native code; a second crash, or
    any other failure, fails the test as before."""
    head, *rest = args
    if head.endswith(".py"):
        command = [sys.executable, str(REPO / head), *rest]
    else:
        command = [str(Path(sys.executable).parent / head), *rest]
    result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    out_dir = fresh_output_dir(rest)
    if result.returncode != 0 and any(f"({name})" in result.stderr for name in RANK_CRASHES) and out_dir is not None:
        warnings.warn(f"a rank of `{head} {' '.join(rest)}` crashed; rerunning it once in a fresh "
                      f"{out_dir}:\n{failure_text(result)}", stacklevel=2)
        shutil.rmtree(out_dir, ignore_errors=True)
        result = subprocess.run(command, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=timeout)
    return result


def fresh_output_dir(args: list[str]) -> Path | None:
    """The ``output_dir=`` of a training launch that starts from nothing in it (no ``resume=`` of its own
    checkpoints), so deleting it loses nothing the launch needs; None for anything else."""
    overrides = dict(arg.split("=", 1) for arg in args if "=" in arg and not arg.startswith("-"))
    if "--nproc-per-node" not in args or "output_dir" not in overrides:
        return None
    out_dir = Path(overrides["output_dir"])
    resume = overrides.get("resume", "")
    if resume and (resume == "latest" or Path(resume).resolve().is_relative_to(out_dir.resolve())):
        return None
    return out_dir


def failure_text(stderr: str | subprocess.CompletedProcess, tail: int = 3000) -> str:
    """What a failed run's assertion should show: the end of its stderr and, before it, what a crashed rank
    printed, which the rank's death pushes far above the launcher's summary: the C++ stack of the thread
    that faulted (torch's fatal-signal handler prints every thread's; the faulting one runs the handler)
    and the Python stacks (faulthandler's "Fatal Python error" block)."""
    text = stderr if isinstance(stderr, str) else stderr.stderr
    faulted = [block.split("\n\n")[0] for block in text.split("SIGSEGV(11), PID")[1:]
               if "fatalSignalHandler(int" in block.split("\n\n")[0]]
    python = [block[:4000] for block in text.split("Fatal Python error")[1:]]
    crashes = [f"SIGSEGV(11), PID{block}" for block in faulted] + [f"Fatal Python error{block}" for block in python]
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
