"""Load any checkpoint we can evaluate, with its tokenizer and eval image transform.

Three kinds:

- **our export**: a directory with ``model.safetensors`` + ``vlmtrain.json`` (``RUN/final/``);
- **a DeepSpeed checkpoint** of a vlm-train run: the run directory, ``RUN/checkpoints`` (the tag in
  its ``latest`` file, DeepSpeed's convention) or one tag directory ``RUN/checkpoints/<tag>``. The
  model config comes from ``<tag>/vlmtrain_state.json`` (key ``config``) or ``RUN/config.json``.
  ZeRO 1-3 weights are consolidated from the optimizer partitions (``zero_weights``, DeepSpeed's merge);
  ZeRO 0 keeps them whole in ``mp_rank_00_model_states.pt``. Every file is read without unpickling
  arbitrary objects (``vlmtrain.safe_load``) unless ``trust_checkpoint`` (``--trust-checkpoint``);
- **an open_clip model**: a model name plus a local ``pretrained`` weights file, or
  ``local-dir:/path`` (a folder with ``open_clip_config.json`` and the weights). It is evaluated
  as it is: open_clip models have ``encode_image``/``encode_text`` too.

A run directory with an export is loaded from the export unless a DeepSpeed ``tag`` is asked for.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from vlmtrain.checkpoint import EXPORT_DIR, find_export, load_exported
from vlmtrain.errors import CheckpointError, ConfigError
from vlmtrain.eval.zero_weights import zero_fp32_state_dict
from vlmtrain.models.registry import load_model_config, spec_of
from vlmtrain.safe_load import load_checkpoint_file

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
RUN_CONFIG_FILE = "config.json"
SIDECAR_FILE = "vlmtrain_state.json"
ZERO0_MODEL_STATES = "mp_rank_00_model_states.pt"
MODEL_STATES_GLOB = "*model_states.pt"
OPTIM_STATES_GLOB = "*optim_states.pt"
OPEN_CLIP_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth")  # what open_clip looks for in a local-dir


@dataclass
class EvalModel:
    """What an evaluation needs: the model, its tokenizer and eval transform, and a name for reports."""

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    transform: Callable
    name: str
    source: str  # "export", "deepspeed" or "open_clip"


def load_eval_model(checkpoint: str | Path | None = None, *, tag: str | None = None, model: str | None = None,
                    pretrained: str | None = None, device: str | torch.device = "cpu",
                    trust_checkpoint: bool = False) -> EvalModel:
    """Load ``checkpoint`` (ours) or ``model`` + ``pretrained`` (open_clip), in eval mode on ``device``.
    ``trust_checkpoint``: unpickle DeepSpeed files fully (can run code: only for checkpoints you wrote)."""
    if (checkpoint is None) == (model is None):
        raise CheckpointError("give either a checkpoint path (ours) or an open_clip model name, not both or neither")
    if model is not None:
        loaded = _load_open_clip(model, pretrained)
    else:
        loaded = _load_ours(Path(checkpoint), tag, trust_checkpoint)
    loaded.model.to(device).eval()
    return loaded


# ---------------------------------------------------------------- ours


def _ours(model: torch.nn.Module, model_cfg, name: str, source: str) -> EvalModel:
    spec = spec_of(model_cfg)
    return EvalModel(model, spec.tokenizer(model_cfg), spec.image_transform(model_cfg, False), name, source)


def _load_ours(path: Path, tag: str | None, trust: bool = False) -> EvalModel:
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if tag is None and _has_export(path):
        model, model_cfg, _ = load_exported(path)
        return _ours(model, model_cfg, str(path), "export")
    root, tag = _deepspeed_root_and_tag(path, tag)
    model_cfg = _deepspeed_model_config(root, tag)
    state = _deepspeed_state_dict(root, tag, trust)
    model = spec_of(model_cfg).build(model_cfg)
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"weights in {root / tag} do not match the run's model config: {err}") from None
    return _ours(model, model_cfg, f"{path} ({tag})", "deepspeed")


def _has_export(path: Path) -> bool:
    try:
        find_export(path)
        return True
    except CheckpointError:
        return False


def _is_tag_dir(path: Path) -> bool:
    return path.is_dir() and any(path.glob(MODEL_STATES_GLOB))


def _deepspeed_root_and_tag(path: Path, tag: str | None) -> tuple[Path, str]:
    """``(RUN/checkpoints, tag)`` from a run dir, a checkpoints dir or a tag dir."""
    if _is_tag_dir(path):
        if tag is not None and tag != path.name:
            raise CheckpointError(f"{path} is the checkpoint of tag {path.name!r}, but tag {tag!r} was asked for")
        return path.parent, path.name
    root = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    if tag is None:
        latest = root / LATEST_FILE
        if not latest.is_file():
            raise CheckpointError(
                f"no model in {path}: expected an export ({EXPORT_DIR}/model.safetensors + vlmtrain.json), "
                f"a DeepSpeed checkpoint directory with a '{LATEST_FILE}' file (RUN/{CHECKPOINTS_DIR}/), "
                f"or a tag directory holding {ZERO0_MODEL_STATES}"
            )
        tag = latest.read_text().strip()
    if not _is_tag_dir(root / tag):
        available = sorted(p.name for p in root.iterdir() if _is_tag_dir(p)) if root.is_dir() else []
        raise CheckpointError(f"no DeepSpeed checkpoint {root / tag} (no {MODEL_STATES_GLOB} in it); "
                              f"tags there: {', '.join(available) or 'none'}")
    return root, tag


def _deepspeed_model_config(root: Path, tag: str):
    """The run's model config: the tag's sidecar first (it travels with the checkpoint), else RUN/config.json."""
    candidates = [(root / tag / SIDECAR_FILE, "config"), (root.parent / RUN_CONFIG_FILE, None)]
    for path, key in candidates:
        if not path.is_file():
            continue
        try:
            raw = json.loads(path.read_text())
            run_config = raw[key] if key else raw
            return load_model_config(run_config["model"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ConfigError) as err:
            raise CheckpointError(f"unreadable model config in {path}: {type(err).__name__}: {err}") from None
    raise CheckpointError(f"no model config for checkpoint {root / tag}: expected {candidates[0][0]} "
                          f"(key 'config') or {candidates[1][0]} (written by vlm-train)")


def _deepspeed_state_dict(root: Path, tag: str, trust: bool) -> dict[str, torch.Tensor]:
    tag_dir = root / tag
    if any(tag_dir.glob(OPTIM_STATES_GLOB)):  # ZeRO 1-3: fp32 weights live in the optimizer partitions
        return zero_fp32_state_dict(tag_dir, trust)
    states = load_checkpoint_file(tag_dir / ZERO0_MODEL_STATES, trust=trust)
    if not isinstance(states, dict) or "module" not in states:
        raise CheckpointError(f"{tag_dir / ZERO0_MODEL_STATES} has no 'module' entry (not a DeepSpeed model state)")
    return states["module"]


# ---------------------------------------------------------------- open_clip


def _load_open_clip(name: str, pretrained: str | None) -> EvalModel:
    import open_clip

    local_dir = name.startswith("local-dir:")
    if local_dir:
        folder = Path(name.removeprefix("local-dir:"))
        weights = [p for suffix in OPEN_CLIP_WEIGHT_SUFFIXES for p in folder.glob(f"*{suffix}")]
        if not (folder / "open_clip_config.json").is_file() or not weights:
            # open_clip itself would build a randomly initialised model when the weights are missing
            raise CheckpointError(f"{folder} is not an open_clip model folder: expected open_clip_config.json "
                                  f"and open_clip_model.safetensors (or another .safetensors/.bin/.pth) in it")
    elif pretrained is None or not Path(pretrained).is_file():
        raise CheckpointError(
            f"open_clip model {name!r} needs --pretrained FILE, a local weights file "
            f"({'not found: ' + pretrained if pretrained else 'none given'}); pretrained tags would download, "
            f"and random weights would evaluate nothing"
        )
    try:
        model, _, transform = open_clip.create_model_and_transforms(name, pretrained=None if local_dir else pretrained)
        tokenizer = open_clip.get_tokenizer(name)
    except (RuntimeError, ValueError, FileNotFoundError, KeyError) as err:
        where = name if local_dir else f"{name} with weights {pretrained}"
        raise CheckpointError(f"open_clip cannot load {where}: {err}") from None
    return EvalModel(model, tokenizer, transform, name if local_dir else f"{name} ({pretrained})", "open_clip")
