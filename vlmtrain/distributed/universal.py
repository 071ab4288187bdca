"""Resuming a pipelined run without the pipeline (``parallel.pp`` P → 1, the same data-parallel size)
through DeepSpeed's universal checkpoint.

``ds_to_universal`` turns a ZeRO ≥ 1 checkpoint into one folder per parameter (fp32 weights and Adam
moments, ZeRO partitions merged) that an engine of another layout loads by parameter name. A pipeline
names its parameters by layer index (``5.block.attn.q_proj.weight``), the unsplit model by module
(``text.transformer.blocks.0.attn.q_proj.weight``), so the folders are renamed before the load.
DeepSpeed 0.19.8 then restores weights, Adam moments, step counts and the lr schedule exactly. The
data cursors carry over because the data-parallel ranks are the same; a rank takes the RNG state of
the first-stage rank that read its data.
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from vlmtrain.checkpoint import CHECKPOINTS_DIR, SIDECAR_FILE, ResumePoint
from vlmtrain.distributed.parallel_dims import ParallelDims
from vlmtrain.models.spec import ModelSpec

UNIVERSAL_DIR = ".universal"


def can_unsplit(saved: dict, now: dict, zero_stage: int) -> bool:
    """Whether a checkpoint of layout ``saved`` resumes at layout ``now`` through a universal checkpoint."""
    return (saved["pp"] > 1 and now["pp"] == 1 and saved["dp"] == now["dp"] and saved["tp"] == now["tp"] == 1
            and zero_stage >= 1)  # DeepSpeed converts ZeRO checkpoints only


def unsplit(point: ResumePoint, spec: ModelSpec, model_cfg, run_dir: Path, dims: ParallelDims) -> ResumePoint:
    """Collective: ``point`` as a universal checkpoint under the model's own names, written by rank 0
    under ``RUN/checkpoints/.universal`` (safe to delete once the run has saved a checkpoint)."""
    out = run_dir / CHECKPOINTS_DIR / UNIVERSAL_DIR / point.tag
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)
        _convert(point.root / point.tag, out)
        _rename_to_model_names(out / "zero", spec, model_cfg)
        saved = point.sidecar["parallel"]
        saved_dims = ParallelDims(saved["dp"] * saved["tp"] * saved["pp"], tp=saved["tp"], pp=saved["pp"])
        for rank in range(dims.world):
            _, dp_rank, tp_rank = dims.coordinates(rank)
            shutil.copy(point.root / point.tag / f"rng_rank{saved_dims.rank_of(0, dp_rank, tp_rank)}.pt",
                        out / f"rng_rank{rank}.pt")
        shutil.copy(point.root / point.tag / SIDECAR_FILE, out / SIDECAR_FILE)
    dist.barrier()
    return ResumePoint(out.parent, point.tag, point.sidecar)


def _convert(checkpoint: Path, out: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    # In this process: one extract and one merge worker (a pool would fork a rank with gloo threads).
    ds_to_universal.main(argparse.Namespace(input_folder=str(checkpoint), output_folder=str(out),
                                            num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                            strict=True, inject_missing_state=True))


def _rename_to_model_names(zero: Path, spec: ModelSpec, model_cfg) -> None:
    from vlmtrain.distributed.pipeline import source_names

    with torch.device("meta"):  # names only
        model = spec.build(model_cfg)
    for index, names in enumerate(source_names(model, spec.pipeline_layers(model))):
        for key, name in names.items():
            os.rename(zero / f"{index}.{key}", zero / name)
