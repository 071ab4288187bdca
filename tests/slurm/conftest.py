"""The local 2-node SLURM cluster (slurm/local_cluster.sh) for the tests that need one.

`.ci/run` starts it before `make test`; otherwise the session fixture starts it (installing SLURM with
apt when root) and stops it at the end, even on failure. Where neither works, the tests skip with the
reason. At the end no process of a job may be left: one would have escaped SLURM's process tracking.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO

SCRIPT = REPO / "slurm" / "local_cluster.sh"
STATE = REPO / "build" / "slurm"
CONF = STATE / "slurm.conf"
PROFILE = STATE / "profile.sh"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


class Cluster:
    """Client commands against the local cluster."""

    env = {**os.environ, "SLURM_CONF": str(CONF)}

    def run(self, *command: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=120, **kwargs)

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (finished jobs stay listed for MinJobAge)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 900) -> dict[str, str]:
        """Until the job ends for good (a requeued job passes through PENDING again)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINAL_STATES:
                return info
            time.sleep(1)
        self.run("scancel", job_id)
        raise AssertionError(f"job {job_id} did not finish in {timeout} s: {self.job(job_id)}")

    def job_processes(self) -> list[psutil.Process]:
        """Processes of this cluster's jobs still alive (they carry its SLURM_CONF and a job id)."""
        left = []
        for process in psutil.process_iter():
            try:
                environ = process.environ()
            except (psutil.Error, OSError):
                continue
            if environ.get("SLURM_CONF") == str(CONF) and "SLURM_JOB_ID" in environ:
                left.append(process)
        return left


def _script(action: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), action], cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="session")
def slurm_cluster():
    """The running local cluster; started (and stopped at the end) here unless .ci/run did it."""
    started_here = False
    if _script("status").returncode != 0:
        if not shutil.which("slurmctld") and os.geteuid() != 0:
            pytest.skip("SLURM is not installed and installing it (apt-get install slurm-wlm munge) needs root")
        started = _script("start")
        started_here = True
        if started.returncode != 0:
            _script("stop")
            pytest.skip(f"the local SLURM cluster did not start: {started.stderr.strip()[-500:]}")
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.run("scancel", "--user", str(os.getuid()))  # nothing of ours keeps running
        deadline = time.monotonic() + 60
        while cluster.job_processes() and time.monotonic() < deadline:
            time.sleep(1)
        left = cluster.job_processes()
        if started_here:
            _script("stop")
        for process in left:
            process.kill()
        assert not left, f"job processes outlived their jobs: {[p.pid for p in left]}"
        if started_here:
            daemons = [p for p in psutil.process_iter(["cmdline"]) if str(STATE) in " ".join(p.info["cmdline"] or ())]
            assert not daemons, f"cluster daemons still running after stop: {[p.pid for p in daemons]}"
