"""Requeue the SLURM job after a pre-emption save, so the job runs again and resumes.

One small object, in the spirit of Lightning's ``SLURMEnvironment(auto_requeue=True)``: it exists only
inside a SLURM job, and rank 0 calls it once every rank has saved and left the process group.
``scontrol requeue`` ends the job at once, killing peers that are still exiting; so where the job
script can requeue after its tasks have exited (slurm/train.sbatch sets VLM_REQUEUE_FLAG, a file in
the job's working directory, which every node sees), rank 0 leaves it that flag instead.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping


@dataclass(frozen=True)
class SlurmRequeue:
    job_id: str
    flag_file: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "SlurmRequeue | None":
        """The job to requeue, or None outside SLURM. (An array task has a job id of its own.)"""
        job_id = env.get("SLURM_JOB_ID")
        return cls(job_id, env.get("VLM_REQUEUE_FLAG") or None) if job_id else None

    def command(self) -> list[str]:
        return ["scontrol", "requeue", self.job_id]

    def request(self) -> str:
        """Requeue (or have the job script requeue) the job; returns what happened, for the log."""
        if self.flag_file:
            Path(self.flag_file).write_text(self.job_id)
            return f"job {self.job_id} is requeued by its script once every rank has exited"
        try:
            result = subprocess.run(self.command(), capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"could not requeue job {self.job_id}: {err}; resubmit it to continue"
        if result.returncode:
            return (f"scontrol requeue {self.job_id} failed ({result.stderr.strip() or result.returncode}); "
                    f"resubmit the job to continue")
        return f"requeued job {self.job_id}: it continues from this checkpoint"
