"""Saving and resuming training state; exporting and loading model weights.

A training checkpoint is DeepSpeed's own (every rank writes its ZeRO shard) plus our sidecar:
``vlmtrain_state.json`` (step, every rank's data cursor, resolved config, data fingerprint) and
one ``rng_rank*.pt`` per rank. It is written under ``checkpoints/.staging/<tag>``, renamed into
place once every rank has finished, and only then named by ``checkpoints/latest`` (replaced
atomically), so a kill at any moment leaves the previous ``latest`` whole. The newest ``keep``
checkpoints are kept. (``failpoints.reached`` marks the points the crash tests kill a run at.)

The exported model is a ``model.safetensors`` file plus ``vlmtrain.json`` (format, model family, model
config and run metadata): loading it never unpickles anything. Its weights are the full model, whatever
the layout the run trained in (tensor/pipeline shards are gathered first).
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmtrain import atomic, failpoints
from vlmtrain.configlib import to_dict
from vlmtrain.errors import CheckpointError, ConfigError
from vlmtrain.models.registry import load_model_config, spec_of
from vlmtrain.runlock import LOCK_FILE

WEIGHTS_FILE = "model.safetensors"
META_FILE = "vlmtrain.json"
EXPORT_DIR = "final"
CHECKPOINTS_DIR = "checkpoints"
STAGING_DIR = ".staging"
LATEST_FILE = "latest"  # DeepSpeed's convention: a text file holding the newest tag
SIDECAR_FILE = "vlmtrain_state.json"
EXPORT_FORMAT = "vlmtrain-model"

log = logging.getLogger(__name__)


def checkpoint_tag(step: int) -> str:
    return f"step_{step:07d}"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save_training_state(engine, run_dir: Path, step: int, sidecar: dict, keep: int) -> Path:
    """Collective: write the checkpoint of ``step``, publish it as ``latest``, prune to ``keep``."""
    root = run_dir / CHECKPOINTS_DIR
    tag = checkpoint_tag(step)
    staging = root / STAGING_DIR
    if engine.global_rank == 0:
        shutil.rmtree(staging / tag, ignore_errors=True)  # left by a run killed mid-write
    _barrier()
    with atomic.naming_full_disk(staging / tag):
        engine.save_checkpoint(str(staging), tag=tag, save_latest=False)  # ends with a barrier
        torch.save(_rng_state(), staging / tag / f"rng_rank{engine.global_rank}.pt")
    _barrier()
    final = root / tag
    if engine.global_rank == 0:
        atomic.write_json(staging / tag / SIDECAR_FILE, sidecar)
        for written in (staging / tag).rglob("*"):  # every rank's files are on disk before they count
            if written.is_file():
                atomic.fsync_path(written)
        if final.exists():  # a tag saved again: swap, so `latest` never names a missing checkpoint
            exchange_directories(staging / tag, final)
            shutil.rmtree(staging / tag)
        else:
            os.replace(staging / tag, final)
        atomic.fsync_path(root)
        failpoints.reached("renamed", tag)  # fault injection (tests): in place, `latest` names the previous one
        with atomic.replacing(root / LATEST_FILE) as tmp:
            tmp.write_text(tag)
            failpoints.reached("publishing", tag)  # the new `latest` written beside the old, not renamed yet
        prune(root, keep, step)
    _barrier()
    return final


def exchange_directories(a: Path, b: Path) -> None:
    """Swap two directories in one step (Linux ``renameat2(RENAME_EXCHANGE)``): at no instant is either
    name missing."""
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"cannot swap {a} and {b}: {os.strerror(error)}")


def prune(root: Path, keep: int, step: int) -> None:
    """Keep the newest ``keep`` checkpoints up to ``step`` (the one just written), by step number.

    Checkpoints past ``step`` belong to a continuation this run abandoned by resuming from an
    earlier one; they are left alone rather than counted as newer than the one just written.
    """
    tags = sorted((tag_step(p.name), p) for p in root.glob("step_*") if p.is_dir() and tag_step(p.name) is not None)
    mine = [path for number, path in tags if number <= step]
    for old in mine[:-keep]:
        shutil.rmtree(old)
        failpoints.reached("pruning", f"step_{step:07d}")  # fault injection (tests): one removed, maybe more to go


def tag_step(tag: str) -> int | None:
    number = tag.removeprefix("step_")
    return int(number) if number.isdigit() else None


def check_output_dir(run_dir: Path, resume: str, overwrite: bool) -> None:
    """A run directory that holds a run is continued (``resume``) or cleared (``overwrite``), never
    silently trained over: new checkpoints would mix with the old run's."""
    if resume or overwrite:
        return
    held = sorted(p.name for p in (run_dir / CHECKPOINTS_DIR).glob("step_*")) if (run_dir / CHECKPOINTS_DIR).is_dir() else []
    if (run_dir / EXPORT_DIR).is_dir():
        held.append(f"{EXPORT_DIR}/")
    if held:
        raise CheckpointError(f"output_dir={run_dir} already holds a run ({', '.join(held[-3:])}): continue it with "
                              f"resume=latest, start over with overwrite=true (deletes it first), or choose "
                              f"another output_dir")


def clear_run_dir(run_dir: Path) -> None:
    """What ``overwrite=true`` removes: the previous run's checkpoints, export, logs and metrics (not
    the lock this run holds)."""
    for entry in run_dir.iterdir():
        if entry.name != LOCK_FILE:
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def _rng_state() -> dict:
    # The loader seeds augmentation by sample position; these cover model-side randomness (dropout).
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _restore_rng_state(path: Path) -> None:
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class ResumePoint:
    root: Path  # the checkpoints directory DeepSpeed loads from
    tag: str
    sidecar: dict


def find_resume_point(resume: str, run_dir: Path) -> ResumePoint | None:
    """``latest`` (None when the run has no checkpoint yet) or an explicit checkpoint directory."""
    if resume == "latest":
        root = run_dir / CHECKPOINTS_DIR
        latest = root / LATEST_FILE
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
    else:
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"resume={resume}: no such checkpoint directory")
        root, tag = path.parent, path.name
    sidecar_path = root / tag / SIDECAR_FILE
    try:
        sidecar = json.loads(sidecar_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"resume={resume}: unreadable {sidecar_path} ({err}); "
                              "is this a vlm-train checkpoint?") from None
    return ResumePoint(root, tag, sidecar)


def saved_layout(sidecar: dict) -> dict:
    """The layout a checkpoint was written at (data-parallel only before layouts were recorded)."""
    return sidecar.get("parallel", {"dp": sidecar["world_size"], "tp": 1, "pp": 1})


def load_training_state(engine, point: ResumePoint) -> None:
    """Collective: restore model, optimizer, scheduler and this rank's RNG from ``point``."""
    load_path, _ = engine.load_checkpoint(str(point.root), tag=point.tag)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {point.root / point.tag}")
    _restore_rng_state(point.root / point.tag / f"rng_rank{engine.global_rank}.pt")


def write_export(state: dict[str, torch.Tensor], model_cfg, out_dir: Path, metadata: dict) -> None:
    """Write the full model's weights and config as an export (called by one rank)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic.naming_full_disk(out_dir / WEIGHTS_FILE), atomic.replacing(out_dir / WEIGHTS_FILE) as tmp:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(tmp))
    meta = {"format": EXPORT_FORMAT, "family": model_cfg.family, "model": to_dict(model_cfg), **metadata}
    atomic.write_json(out_dir / META_FILE, meta)


def find_export(path: str | Path) -> Path:
    """Accept an export directory, or a run directory that contains one under ``final/``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    for candidate in (path, path / EXPORT_DIR):
        if (candidate / META_FILE).is_file() and (candidate / WEIGHTS_FILE).is_file():
            return candidate
    raise CheckpointError(f"no exported model in {path}: expected {META_FILE} and {WEIGHTS_FILE} "
                          f"there or under {path / EXPORT_DIR} (written at the end of vlm-train)")


def load_initial_weights(path: str | Path, model_cfg) -> dict[str, torch.Tensor]:
    """Our state dict for ``model_cfg`` from an export of ours or a file the family's adapter reads
    (open_clip's checkpoints for CLIP)."""
    path = Path(path)
    if path.is_dir():
        model, exported_cfg, _ = load_exported(path)
        if to_dict(exported_cfg) != to_dict(model_cfg):
            raise CheckpointError(f"init_from={path}: its model config differs from this run's model")
        return model.state_dict()
    adapter = spec_of(model_cfg).adapter
    if adapter is None:
        raise CheckpointError(f"init_from={path}: model.family={model_cfg.family} reads only exports of "
                              f"vlm-train (a directory), not weight files")
    return adapter.load_file(path, model_cfg)


def load_exported(path: str | Path) -> tuple[torch.nn.Module, object, dict]:
    """Build the model described by an export and load its weights (strictly)."""
    export = find_export(path)
    try:
        meta = json.loads((export / META_FILE).read_text())
        model_cfg = load_model_config(meta["model"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ConfigError) as err:
        raise CheckpointError(f"unreadable {export / META_FILE}: {err}") from None
    try:
        state = load_file(str(export / WEIGHTS_FILE))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"unreadable {export / WEIGHTS_FILE}: {err}") from None
    model = spec_of(model_cfg).build(model_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{export / WEIGHTS_FILE} does not match its config: {err}") from None
    return model.eval(), model_cfg, meta
