"""Read ``torch.save`` files (DeepSpeed checkpoints) without running code from them.

``torch.load(weights_only=True)`` rebuilds tensors, containers and plain values only; a pickle that
names any other callable (``os.system``, a class with a malicious ``__reduce__``) is refused before
anything runs. DeepSpeed's files hold a few types of its own besides; they are allowed by name.
Found by saving real checkpoints with deepspeed 0.19.8 (ZeRO 0-3; fp32, bf16, fp16; AdamW) and listing
``torch.serialization.get_unsafe_globals_in_checkpoint``; all of them sit in the ZeRO 1-3
``*optim_states.pt`` files, under ``optimizer_state_dict``:

  ``loss_scaler``           LossScaler (fp32, bf16) or DynamicLossScaler (fp16): plain attribute objects
  ``zero_stage``            ZeroStageEnum, an int enum
  ``param_slice_mappings``  fragment_address dataclasses (ZeRO 1-2)

The model-state files (``*model_states.pt``) need none of them. Each allowed type is rebuilt from
plain data (an enum value, dataclass fields, an attribute dict): none runs code when unpickled.
Anything else is refused with ``UntrustedCheckpointError``, which names the one way to load such a
file fully: ``--trust-checkpoint`` (for checkpoints you wrote yourself).
"""
from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import torch

from vlmtrain.errors import CheckpointError

TRUST_FLAG = "--trust-checkpoint"
DEEPSPEED_TYPES = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class UntrustedCheckpointError(CheckpointError):
    """A checkpoint file that only full unpickling (which can run arbitrary code) would read."""


def load_checkpoint_file(path: str | Path, *, trust: bool = False, mmap: bool = False) -> Any:
    """``torch.load`` of ``path`` onto the CPU: tensors, plain values and DeepSpeed's allowed types only,
    unless ``trust`` (the user's ``--trust-checkpoint``) allows full unpickling."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        if trust:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(_deepspeed_types_in(path)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if trust:
            raise CheckpointError(f"unreadable {path}: {_reason(err)}") from None
        # A corrupt pickle and a hostile one look alike to the weights-only unpickler: both are refused.
        raise UntrustedCheckpointError(
            f"refusing to load {path}: it holds more than tensors and DeepSpeed's checkpoint types "
            f"({_reason(err)}), and unpickling it fully could run arbitrary code. Only if you wrote this "
            f"checkpoint yourself, pass {TRUST_FLAG} to load it fully") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"unreadable {path}: {type(err).__name__}: {_reason(err)}") from None


def _deepspeed_types_in(path: Path) -> list[type]:
    """The allowed DeepSpeed types this file names (imported only then: importing deepspeed takes seconds).
    A static scan: the unpickler itself still refuses anything not allowed."""
    try:
        named = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except (ValueError, RuntimeError, OSError):
        return []  # not a zip checkpoint: torch.load reports what it is
    types = []
    for dotted in sorted(named.intersection(DEEPSPEED_TYPES)):
        module, _, name = dotted.rpartition(".")
        types.append(getattr(importlib.import_module(module), name))
    return types


def _reason(err: Exception) -> str:
    """The line of torch's message that says what was refused (it surrounds it with advice of its own)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return next((line for line in lines if "GLOBAL" in line or line.startswith("Unsupported")),
                lines[0] if lines else type(err).__name__)
