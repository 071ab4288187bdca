"""One optimizer step of a data- or tensor-parallel run, and what a step reports.

(A pipelined step, ``PipelineEngine.train_batch``, lives in ``distributed/pipeline.py`` and reports
the same ``StepResult``.)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from vlmtrain.embedding_grads import EmbeddingGradients
from vlmtrain.optim import GradientClipper


@dataclass
class StepResult:
    losses: dict[str, torch.Tensor]  # each loss term, mean over micro-batches, this rank
    samples: int
    skipped: int
    data_wait_s: float
    step_s: float
    keys: list[str] = field(default_factory=list)


def train_step(engine, batches, loss_fn, dtype: torch.dtype, accum_steps: int,
               clipper: GradientClipper | None = None,
               seed_micro_batch: Callable[[int], None] | None = None,
               embedding_grads: EmbeddingGradients | None = None) -> StepResult:
    """One optimizer step: ``accum_steps`` micro-batches, DeepSpeed steps on the last one (after
    the gradients are clipped, where the trainer clips them). ``seed_micro_batch(micro)`` seeds the
    model's randomness before each forward (after the batch is read: a loader without workers
    reseeds the global RNG per sample). A batch's extras reach the model as keyword arguments.
    ``embedding_grads`` (where the trainer owns the gradients) collects the embeddings' row gradients
    after each backward and installs them as dense gradients before the clip and the update."""
    started = time.perf_counter()
    terms: dict[str, list[torch.Tensor]] = {}
    samples, skipped, waited, keys = 0, 0, 0.0, []
    for micro in range(accum_steps):
        wait_from = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - wait_from
        if seed_micro_batch:
            seed_micro_batch(micro)
        losses = loss_fn(engine(batch.images.to(engine.device, dtype), batch.tokens.to(engine.device),
                                **to_device(batch.extras, engine.device, dtype)))
        engine.backward(losses["loss"])
        if embedding_grads:
            embedding_grads.accumulate()
            if micro == accum_steps - 1:
                embedding_grads.install()
        if clipper and micro == accum_steps - 1:
            clipper.clip()
        engine.step()
        for name, value in losses.items():
            terms.setdefault(name, []).append(value.detach())
        samples += len(batch.keys)
        skipped += batch.skipped
        keys += batch.keys
    return StepResult({name: torch.stack(values).mean() for name, values in terms.items()}, samples, skipped,
                      waited, time.perf_counter() - started, keys)


def to_device(extras: dict[str, torch.Tensor], device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Extras on the device; floating ones in the run's precision (as the images), masks and ids as they are."""
    return {name: value.to(device, dtype) if value.is_floating_point() else value.to(device)
            for name, value in extras.items()}
