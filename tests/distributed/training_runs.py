"""Training runs the distributed tests share: launch ``vlm-train`` on the demo config, read what it
logged and exported, and kill a run the way a node failure would."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, cli_env, run_tool


def train_command(corpus: Path, out_dir: Path, ranks: int, *overrides: str) -> list[str]:
    return [str(Path(sys.executable).parent / "vlm-train"), "--config", "configs/train/demo.yaml",
            "--nproc-per-node", str(ranks), f"data.train_shards={corpus / 'train'}", f"output_dir={out_dir}",
            "metrics.tensorboard=false", "progress=false", *overrides]


def train(corpus: Path, out_dir: Path, ranks: int, *overrides: str) -> subprocess.CompletedProcess:
    """A run that must succeed; returns its completed process (stdout says what it resumed)."""
    result = run_tool(*train_command(corpus, out_dir, ranks, *overrides))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {record["step"]: record["loss"] for record in metrics(run_dir)}


def exported_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "model.safetensors")


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
