"""Helpers shared by the tests that run vlm-train: killing a run mid-checkpoint, reading what a run wrote."""
from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, cli_env


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as a node failure or OOM kill would.

    (torchrun starts its workers in sessions of their own, so a process-group kill misses them.)"""
    root = psutil.Process(pid)
    processes = [root, *root.children(recursive=True)]
    for process in processes:
        process.send_signal(signal.SIGKILL)
    psutil.wait_procs(processes, timeout=30)


def kill_while_writing(command: list[str], checkpoints: Path, tag: str, timeout: float = 600) -> bool:
    """Start the run; SIGKILL its whole process tree once `tag` is being written.

    Returns whether the kill landed while the checkpoint was still in the staging area."""
    process = subprocess.Popen(command, cwd=REPO, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = checkpoints / ".staging" / tag
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if staging.is_dir() and any(staging.iterdir()):
                kill_tree(process.pid)
                return not (checkpoints / tag).exists()
            time.sleep(0.001)
        raise AssertionError(f"the run ended (code {process.returncode}) before writing {tag}")
    finally:
        if process.poll() is None:
            kill_tree(process.pid)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def keys_per_step(run_dir: Path, ranks=(0, 1)) -> dict[tuple[int, int], list[str]]:
    """The sample keys each rank trained on, by (rank, step); a step logged twice fails."""
    steps = {}
    for rank in ranks:
        for line in (run_dir / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert (rank, record["step"]) not in steps, f"step {record['step']} logged twice"
            steps[rank, record["step"]] = record["keys"]
    return steps


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol: float) -> None:
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=name)
