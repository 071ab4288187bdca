"""Resuming a checkpoint at another tensor-parallel degree, through DeepSpeed's universal checkpoint.

DeepSpeed's converter (``deepspeed.checkpoint.ds_to_universal``) merges the ZeRO optimizer files of
every tensor- and data-parallel rank into one folder per parameter, full-sized (fp32 master weights,
Adam moments, step); an engine configured with ``checkpoint.load_universal`` then slices each
parameter for its own layout (tp 2 → 1 and 1 → 2 are tested). Only the tensor-parallel degree may
change: the data-parallel size fixes the global batch and the per-replica data cursors, so with it
equal the resumed run reads the same batches and its losses equal the uninterrupted run's. The
converter reads ZeRO's optimizer files, so ZeRO stage >= 1 is needed (ZeRO 0 saves the optimizer
state whole, in another format).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch.distributed as dist

from vlmtrain.checkpoint import ResumePoint, load_training_state
from vlmtrain.distributed.parallel_dims import ParallelDims
from vlmtrain.errors import CheckpointError

WORK_DIR = ".universal"  # under the run's checkpoints directory, removed once loaded


def can_change_layout(saved: dict, now: dict, zero_stage: int) -> bool:
    """Whether a checkpoint written at layout ``saved`` resumes exactly at ``now`` (``{"dp", "tp", "pp"}``)."""
    return zero_stage >= 1 and saved["dp"] == now["dp"] and saved["pp"] == now["pp"] == 1


def load(engine, point: ResumePoint, saved: ParallelDims, dims: ParallelDims, checkpoints_dir: Path) -> None:
    """Collective: restore ``point``, written at layout ``saved``, into ``engine`` (configured with
    ``load_universal``), through a converted copy under ``checkpoints_dir/.universal``."""
    rank = engine.global_rank
    work = checkpoints_dir / WORK_DIR
    if rank == 0:
        _convert(point, work / point.tag, saved, dims)
    dist.barrier()
    load_training_state(engine, ResumePoint(work, point.tag, point.sidecar))
    dist.barrier()
    if rank == 0:
        shutil.rmtree(work)


def _convert(point: ResumePoint, out: Path, saved: ParallelDims, dims: ParallelDims) -> None:
    """``point`` as a universal checkpoint in ``out``, with an RNG file for every rank of the new layout
    (its data replica's first rank's)."""
    shutil.rmtree(out.parent, ignore_errors=True)  # left by a run killed while loading
    # A subprocess: the converter forks worker pools, which must not inherit gloo's threads. A tp=1
    # checkpoint has no AutoTP metadata ("missing state"): the loading side's sharded layers know their split.
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                             "--input_folder", str(point.root / point.tag), "--output_folder", str(out),
                             "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckpointError(f"DeepSpeed could not convert {point.root / point.tag} to a universal "
                              f"checkpoint:\n{result.stderr[-2000:]}")
    for rank in range(dims.world):
        stage, dp_rank, _ = dims.coordinates(rank)
        shutil.copy(point.root / point.tag / f"rng_rank{saved.rank_of(stage, dp_rank, 0)}.pt",
                    out / f"rng_rank{rank}.pt")
