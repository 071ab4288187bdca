"""Saving training state and exporting/loading model weights.

Training state is DeepSpeed's own checkpoint (all ranks write their shards). The exported model is
a ``model.safetensors`` file plus ``vlmtrain.json`` (model config and run metadata): loading it
never unpickles anything.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vlmtrain.config import ConfigError, ModelConfig, from_dict, to_dict

WEIGHTS_FILE = "model.safetensors"
META_FILE = "vlmtrain.json"
EXPORT_DIR = "final"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or unreadable; the message names the path."""


def save_training_state(engine, run_dir: Path, step: int, client_state: dict) -> None:
    """Collective: every rank writes its DeepSpeed shard under ``run_dir/checkpoints``."""
    engine.save_checkpoint(str(run_dir / "checkpoints"), tag=f"step_{step:07d}", client_state=client_state)


def export_model(engine, model_cfg: ModelConfig, out_dir: Path, metadata: dict) -> None:
    """Collective: gather full weights (a no-op below ZeRO-3) and write them from rank 0."""
    import deepspeed

    module = engine.module
    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        if engine.global_rank == 0:
            state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()}
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / f".{WEIGHTS_FILE}.tmp"
            save_file(state, str(tmp))
            os.replace(tmp, out_dir / WEIGHTS_FILE)
            meta = {"format": "vlmtrain-clip", "model": to_dict(model_cfg), **metadata}
            (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))


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


def load_exported(path: str | Path) -> tuple[torch.nn.Module, ModelConfig, dict]:
    """Build the model described by an export and load its weights (strictly)."""
    from vlmtrain.models.registry import build_model

    export = find_export(path)
    try:
        meta = json.loads((export / META_FILE).read_text())
        model_cfg = from_dict(ModelConfig, meta["model"], "model")
    except (OSError, json.JSONDecodeError, KeyError, ConfigError) as err:
        raise CheckpointError(f"unreadable {export / META_FILE}: {err}") from None
    try:
        state = load_file(str(export / WEIGHTS_FILE))
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"unreadable {export / WEIGHTS_FILE}: {err}") from None
    model = build_model(model_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{export / WEIGHTS_FILE} does not match its config: {err}") from None
    return model.eval(), model_cfg, meta
