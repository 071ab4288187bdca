"""The full fp32 weights of a ZeRO 1-3 DeepSpeed checkpoint, read without unpickling arbitrary objects.

DeepSpeed's ``zero_to_fp32`` loads every file with ``weights_only=False``, so a hostile file in a
checkpoint directory would run code. Here each file is read by ``safe_load.load_checkpoint_file``
(tensors, plain values, DeepSpeed's few checkpoint types) and only the parsed values are handed to
DeepSpeed's own merge of the partitions (``_get_fp32_state_dict_from_zero{2,3}_checkpoint``, the code
behind its ``get_fp32_state_dict_from_zero_checkpoint``; deepspeed is pinned, see pyproject.toml).
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import torch

from vlmtrain.errors import CheckpointError
from vlmtrain.safe_load import load_checkpoint_file


def zero_fp32_state_dict(tag_dir: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Consolidate the model of checkpoint ``tag_dir`` (ZeRO 1-3) from its optimizer partitions."""
    from deepspeed.checkpoint import constants as keys
    from deepspeed.utils import zero_to_fp32 as ds

    try:
        model_files = ds.get_model_state_files(str(tag_dir))
        optim_files = ds.get_optim_files(str(tag_dir))
    except FileNotFoundError as err:
        raise CheckpointError(f"incomplete ZeRO checkpoint {tag_dir}: {err}") from None
    models = [_model_state(ds, keys, load_checkpoint_file(f, trust=trust), f) for f in model_files]
    optims = [load_checkpoint_file(f, trust=trust, mmap=True).get(keys.OPTIMIZER_STATE_DICT, {}) for f in optim_files]
    if keys.ZERO_STAGE not in optims[0]:
        raise CheckpointError(f"{optim_files[0]} is not a ZeRO optimizer state (no {keys.ZERO_STAGE!r})")
    stage, world_size = int(optims[0][keys.ZERO_STAGE]), optims[0][keys.PARTITION_COUNT]
    world_size = max(world_size) if isinstance(world_size, list) else world_size  # ZeRO-2 MoE: per group
    if world_size != len(optims):
        raise CheckpointError(f"incomplete ZeRO checkpoint {tag_dir}: {world_size} ranks saved it, but "
                              f"{len(optims)} optimizer state file(s) are there")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed prints progress; keep our stdout a table
            if stage in (1, 2):
                groups = [o[keys.SINGLE_PARTITION_OF_FP32_GROUPS] for o in optims]
                merged = ds._get_fp32_state_dict_from_zero2_checkpoint(
                    world_size, groups, models, False, optims[0].get(keys.PARAM_ALIGNMENT_PADDINGS))
            elif stage == 3:
                groups = [o[keys.FP32_FLAT_GROUPS] for o in optims]
                merged = ds._get_fp32_state_dict_from_zero3_checkpoint(world_size, groups, models, False)
            else:
                raise CheckpointError(f"{optim_files[0]}: unknown ZeRO stage {stage}")
            return ds.to_torch_tensor(merged)
    except (KeyError, ValueError, RuntimeError, AssertionError) as err:
        raise CheckpointError(f"cannot consolidate ZeRO checkpoint {tag_dir}: {type(err).__name__}: {err}") from None


def _model_state(ds, keys, state: dict, path: str):
    """DeepSpeed's ``zero_model_state`` from one safely loaded ``*model_states.pt`` (as its ``parse_model_states``)."""
    if keys.BUFFER_NAMES not in state:
        raise CheckpointError(f"{path} is not a DeepSpeed model state (no {keys.BUFFER_NAMES!r})")
    try:
        ds._raise_if_autoep_zero3_partitioned_state(state)
    except NotImplementedError as err:
        raise CheckpointError(f"{path}: {err}") from None
    buffers = {k: v.float() if v.is_floating_point() else v
               for k, v in state["module"].items() if k in state[keys.BUFFER_NAMES]}
    return ds.zero_model_state(buffers=buffers, param_shapes=state[keys.PARAM_SHAPES],
                               shared_params=[[k, v] for k, v in state["shared_params"].items()],
                               ds_version=state.get(keys.DS_VERSION),
                               frozen_param_shapes=state.get(keys.FROZEN_PARAM_SHAPES),
                               frozen_param_fragments=state.get(keys.FROZEN_PARAM_FRAGMENTS))
