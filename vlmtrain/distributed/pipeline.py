"""Pipeline parallelism with DeepSpeed's ``PipelineModule``: the stages, one training step, and the
full model's weights gathered from the stages.

The family's ``pipeline_layers`` split a built model into layers that pass tuples of tensors; the
stages get equal numbers of the ``*Block`` layers (transformer blocks dominate compute; balancing by
parameters would give CLIP's token embedding a stage of its own). Every rank builds the whole model
from the run's seed, so the weights equal a non-pipelined run's, and moves its stage's layers to the
device (DeepSpeed keeps the other stages' layers referenced, in host memory: fine at CLIP sizes).

One step is ``PipelineEngine.train_batch``: ``grad_accum_steps`` micro-batches through DeepSpeed's
1F1B schedule, then one optimizer step. Every rank of a replica reads the same micro-batches from
its data-parallel loader (DeepSpeed gives the first stage the inputs and the last stage the labels;
middle stages read and drop theirs), so cursors, sample counts and key logs agree on every rank.
The loss runs on the last stage, per micro-batch; its named terms are broadcast to the other stages,
so every rank reports its replica's losses.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.distributed as dist
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
from torch import nn

from vlmtrain.distributed.collectives import all_gather_objects
from vlmtrain.distributed.parallel_dims import ParallelDims
from vlmtrain.step import StepResult
from vlmtrain.models.spec import ModelSpec

# DeepSpeed's ``type:`` partitioning balances the number of layers whose class name matches.
PARTITION_METHOD = "type:Block$"
# The last stage's labels: contrastive losses need none (a pair's positive is itself).
NO_LABELS = torch.empty(0)


class RecordedLoss:
    """The pipeline's loss function: the family's objective on the last stage's output. It returns
    the total for backward and keeps each micro-batch's named terms for the step's report."""

    def __init__(self, objective: nn.Module):
        self.objective = objective
        self.micro_batches: list[dict[str, torch.Tensor]] = []

    def __call__(self, outputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        losses = self.objective(outputs)
        self.micro_batches.append({name: value.detach() for name, value in losses.items()})
        return losses["loss"]

    def take_means(self) -> dict[str, float]:
        """Each term's mean over the micro-batches since the last call."""
        recorded, self.micro_batches = self.micro_batches, []
        return {name: torch.stack([m[name] for m in recorded]).mean().item() for name in recorded[0]}


class StagedModel(PipelineModule):
    """This rank's stage of a model; it knows each of its weights' names in the unsplit model."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], loss_fn: RecordedLoss, dims: ParallelDims):
        names = source_names(model, layers)
        # The topology's rank order is ParallelDims': rank = (stage * dp + dp_rank) * tp + tp_rank.
        topology = PipeModelDataParallelTopology(num_pp=dims.pp, num_mp=dims.tp, num_dp=dims.dp)
        super().__init__(layers, topology=topology, loss_fn=loss_fn, partition_method=PARTITION_METHOD)
        self.source_names = names[self._local_start:self._local_stop]

    def source_state_dict(self) -> dict[str, torch.Tensor]:
        """This stage's weights under the unsplit model's names (fp32, CPU copies)."""
        return {names[key]: value.detach().float().cpu().clone()
                for layer, names in zip(self.forward_funcs, self.source_names)
                for key, value in layer.state_dict().items()}


def source_names(model: nn.Module, layers: list[nn.Module]) -> list[dict[str, str]]:
    """For each layer, its state-dict keys → the model's keys for the same tensors; every model
    tensor must be in exactly one layer (else the gathered weights would not be the model's)."""
    of_tensor = {id(tensor): name for name, tensor in model.state_dict(keep_vars=True).items()}
    names = [{key: of_tensor[id(tensor)] for key, tensor in layer.state_dict(keep_vars=True).items()}
             for layer in layers]
    covered = [name for layer_names in names for name in layer_names.values()]
    if sorted(covered) != sorted(of_tensor.values()):
        raise ValueError(f"pipeline layers do not hold each model weight once: "
                         f"missing {sorted(set(of_tensor.values()) - set(covered))}, "
                         f"repeated {sorted({n for n in covered if covered.count(n) > 1})}")
    return names


def split(spec: ModelSpec, model: nn.Module, objective: nn.Module, dims: ParallelDims) -> StagedModel:
    """Collective: this rank's stage of ``model``, the loss on the last stage being ``objective``."""
    return StagedModel(model, spec.pipeline_layers(model), RecordedLoss(objective), dims)


def train_step(engine, batches, dtype: torch.dtype, accum_steps: int,
               seed_micro_batch: Callable[[int], None] | None = None) -> StepResult:
    """One optimizer step of ``accum_steps`` pipelined micro-batches (``engine.train_step``'s shape).
    The model's randomness is seeded once per step (``seed_micro_batch(0)``): each stage then runs its
    micro-batches in the schedule's fixed order, so its draws replay exactly on resume."""
    started = time.perf_counter()
    micro_batches, waited = [], 0.0
    for _ in range(accum_steps):
        wait_from = time.perf_counter()
        micro_batches.append(next(batches))
        waited += time.perf_counter() - wait_from
    if seed_micro_batch:
        seed_micro_batch(0)
    engine.train_batch(iter([((b.images.to(engine.device, dtype), b.tokens.to(engine.device)), NO_LABELS)
                             for b in micro_batches]))
    return StepResult({name: torch.tensor(value) for name, value in replica_losses(engine).items()},
                      sum(len(b.keys) for b in micro_batches), sum(b.skipped for b in micro_batches), waited,
                      time.perf_counter() - started, [key for b in micro_batches for key in b.keys])


def replica_losses(engine) -> dict[str, float]:
    """Collective over the pipeline: the last stage's mean loss terms of this step, on every stage."""
    last = engine.grid.stage_to_global(engine.num_stages - 1)
    means = [engine.module.loss_fn.take_means() if engine.global_rank == last else None]
    dist.broadcast_object_list(means, src=last, group=engine.grid.get_pipe_parallel_group())
    return means[0]


def full_state_dict(engine, dims: ParallelDims) -> dict[str, torch.Tensor]:
    """Collective: the unsplit model's state dict on every rank, gathered from the first replica's stages."""
    mine = engine.module.source_state_dict() if dims.dp_rank(engine.global_rank) == 0 else {}
    return {name: value for part in all_gather_objects(mine) for name, value in part.items()}
