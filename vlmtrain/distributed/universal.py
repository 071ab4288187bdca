"""Resuming a checkpoint in another layout, through DeepSpeed's universal checkpoint.

DeepSpeed's converter (``deepspeed.checkpoint.ds_to_universal``) merges the ZeRO optimizer files of
every rank into one folder per parameter, full-sized (fp32 master weights, Adam moments, step); an
engine configured with ``checkpoint.load_universal`` then slices each parameter for its own layout.
Two changes are supported and tested with DeepSpeed 0.19.8:

* the tensor-parallel degree (tp 2 → 1 and 1 → 2, no pipeline);
* a pipeline resumed unsplit (pp P → 1, no tensor parallelism). A pipeline names its parameters by
  layer index (``5.block.attn.q_proj.weight``), the unsplit model by module
  (``text.transformer.blocks.0.attn.q_proj.weight``), so the folders are renamed before the load.

The data-parallel size must stay: it fixes the global batch and the per-replica data cursors, so with
it equal the resumed run reads the same batches and its losses equal the uninterrupted run's. The
converter reads ZeRO's optimizer files, so ZeRO stage >= 1 is needed (ZeRO 0 saves the optimizer
state whole, in another format). Each rank takes the RNG state of its data replica's first rank.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vlmtrain.checkpoint import CHECKPOINTS_DIR, ResumePoint, saved_layout
from vlmtrain.distributed.parallel_dims import ParallelDims
from vlmtrain.errors import CheckpointError
from vlmtrain.models.spec import ModelSpec

WORK_DIR = ".universal"  # under the run's checkpoints directory, removed once loaded


def can_change_layout(saved: dict, now: dict, zero_stage: int) -> bool:
    """Whether a checkpoint written at layout ``saved`` resumes exactly at ``now`` (``{"dp", "tp", "pp"}``)."""
    if zero_stage < 1 or saved["dp"] != now["dp"] or saved.get("ep", 1) != now.get("ep", 1):
        return False
    tp_changed = saved["pp"] == now["pp"] == 1
    unsplit = saved["pp"] > 1 and now["pp"] == 1 and saved["tp"] == now["tp"] == 1
    return tp_changed or unsplit


def convert(point: ResumePoint, spec: ModelSpec, model_cfg, run_dir: Path, dims: ParallelDims) -> ResumePoint:
    """Collective: ``point`` as a universal checkpoint under the model's own names, written by rank 0
    under ``RUN/checkpoints/.universal`` (``clean_up`` removes it once loaded)."""
    out = run_dir / CHECKPOINTS_DIR / WORK_DIR / point.tag
    saved = saved_layout(point.sidecar)
    if dist.get_rank() == 0:
        shutil.rmtree(out.parent, ignore_errors=True)  # left by a run killed while loading
        _run_converter(point.root / point.tag, out)
        if saved["pp"] > 1:
            _rename_to_model_names(out / "zero", spec, model_cfg)
        saved_dims = ParallelDims(saved["dp"] * saved["tp"] * saved["pp"], tp=saved["tp"], pp=saved["pp"])
        for rank in range(dims.world):
            _, dp_rank, _ = dims.coordinates(rank)
            shutil.copy(point.root / point.tag / f"rng_rank{saved_dims.rank_of(0, dp_rank, 0)}.pt",
                        out / f"rng_rank{rank}.pt")
    dist.barrier()
    return ResumePoint(out.parent, point.tag, point.sidecar)


def clean_up(run_dir: Path) -> None:
    """Collective: remove the converted copy once every rank has loaded it."""
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(run_dir / CHECKPOINTS_DIR / WORK_DIR)


def _run_converter(checkpoint: Path, out: Path) -> None:
    # A subprocess: the converter may fork worker pools, which must not inherit gloo's threads. A tp=1
    # checkpoint has no AutoTP metadata ("missing state"): the loading side's sharded layers know their split.
    result = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                             "--input_folder", str(checkpoint), "--output_folder", str(out),
                             "--num_extract_workers", "1", "--num_merge_workers", "1", "--inject_missing_state"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckpointError(f"DeepSpeed could not convert {checkpoint} to a universal checkpoint:\n"
                              f"{result.stderr[-2000:]}")


def _rename_to_model_names(zero: Path, spec: ModelSpec, model_cfg) -> None:
    from vlmtrain.distributed.pipeline import source_names

    with torch.device("meta"):  # names only
        model = spec.build(model_cfg)
    for index, names in enumerate(source_names(model, spec.pipeline_layers(model))):
        for key, name in names.items():
            os.rename(zero / f"{index}.{key}", zero / name)
