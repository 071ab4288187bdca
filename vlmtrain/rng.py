"""Seeding torch's global RNG for the model's own randomness (patch dropout, drop-path, ITM swaps).

Before each micro-batch's forward the trainer seeds it from (run seed, step, micro-batch, data-parallel
rank): a resumed run draws what the uninterrupted one drew, and tensor-parallel peers and pipeline
stages of one replica (which share a data-parallel rank) draw alike, as split layers require, while
replicas draw differently. Seeding the generators directly costs microseconds (``torch.manual_seed``
would also walk every CUDA device).
"""
from __future__ import annotations

import torch

from vlmtrain.data import sample_seed


def micro_batch_seed(seed: int, step: int, micro: int, dp_rank: int) -> int:
    """A well-mixed 63-bit seed; the slot/position mix of ``sample_seed`` under a stream of its own."""
    return sample_seed(sample_seed(seed, 1_000_003 + dp_rank, step), micro, 0x5EED)


def seed_model_rng(seed: int, step: int, micro: int, dp_rank: int) -> None:
    value = micro_batch_seed(seed, step, micro, dp_rank)
    torch.random.default_generator.manual_seed(value)
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.default_generators[torch.cuda.current_device()].manual_seed(value)
