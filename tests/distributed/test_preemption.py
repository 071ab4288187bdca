"""SIGTERM (what SLURM sends before pre-emption, to every process of the job step) makes every rank
save after the same step and exit cleanly; `resume=latest` continues from that step."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, cli_env, failure_text, run_tool

pytestmark = pytest.mark.dist


def command(corpus: Path, out_dir: Path, *extra: str) -> list[str]:
    return [str(Path(sys.executable).parent / "vlm-train"), "--config", "configs/train/demo.yaml",
            "--nproc-per-node", "2", f"data.train_shards={corpus / 'train'}", f"output_dir={out_dir}",
            "data.batch_size=8", "data.shuffle_buffer=16", "optim.warmup_steps=2", "log_every=1",
            "metrics.tensorboard=false", "progress=false", *extra]


def training_ranks(launcher: psutil.Process) -> list[psutil.Process]:
    """The rank processes (children of the launcher, which runs torchrun's agent), not their loader workers."""
    return launcher.children()


def test_sigterm_saves_at_a_step_boundary_and_the_run_resumes_from_there(small_corpus, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(small_corpus, run_dir, "steps=100000"), cwd=REPO, env=cli_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.monotonic() < deadline, "the run did not start training"
        time.sleep(0.2)
    for rank in training_ranks(psutil.Process(process.pid)):
        for target in (rank, *rank.children()):  # as scancel does: the ranks and their loader workers
            target.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)

    assert process.returncode == 0, output[-3000:]
    assert "stop requested: saved step" in output
    saved = int((run_dir / "checkpoints" / "latest").read_text().removeprefix("step_"))
    steps_logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps_logged[-1] == saved >= 3

    resumed = run_tool(*command(small_corpus, run_dir, f"steps={saved + 2}", "resume=latest"))
    assert resumed.returncode == 0, failure_text(resumed)
    assert f"at step {saved}" in resumed.stdout
    steps_logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps_logged == list(range(1, saved + 3))
