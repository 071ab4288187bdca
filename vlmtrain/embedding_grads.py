"""Token-embedding gradients that cost the rows a batch touches, not the whole table.

nn.Embedding's dense gradient is a fresh zero-filled table every step (12.6 MB for a 49,408 × 64
vocabulary: 93% of the tiny CLIP), read whole again by the clipping norm and written whole by the
clip, while a batch touches at most batch × context rows. Here the embeddings run with
``sparse=True`` (their backward returns the touched rows only); after each backward those rows are
added into a dense buffer kept from step to step, and after the last micro-batch the buffer becomes
``weight.grad``: the clipper and the optimizer read the same dense values nn.Embedding would give.
The next step zeroes only the rows written. The clipper asks for the rows to norm and scale.

Only where nothing but the trainer touches gradients (``deepspeed_config.trainer_owns_gradients``):
DeepSpeed's reductions, buckets and partitions expect dense gradients.
"""
from __future__ import annotations

import torch
from torch import nn


class _Table:
    """One embedding weight: its dense gradient buffer and the rows written into it this step."""

    def __init__(self, weight: nn.Parameter):
        self.weight = weight
        self.buffer = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        self.rows = torch.zeros(0, dtype=torch.long, device=weight.device)
        self.pending = False  # rows added this step, not yet installed as weight.grad
        self.installed = False  # the buffer holds the last step's rows: zero them first

    def accumulate(self) -> None:
        grad = self.weight.grad
        if grad is None:  # the embedding was not used by this micro-batch
            return
        if not grad.is_sparse:
            raise RuntimeError("EmbeddingGradients: the embedding gradient is dense; it must be cleared "
                               "(set to None) after each optimizer step, as DeepSpeed's step does")
        self.weight.grad = None  # the next micro-batch's backward returns a fresh sparse gradient
        if self.installed:
            self.buffer.index_fill_(0, self.rows, 0.0)
            self.rows, self.installed = self.rows[:0], False
        rows, where = torch.unique(grad._indices()[0], return_inverse=True)
        values = grad._values()
        # The same arithmetic as the dense path: each row summed from zero in token order (as
        # nn.Embedding's dense backward), then added once to what earlier micro-batches left
        # (as autograd accumulates a dense gradient).
        part = values.new_zeros(len(rows), values.shape[1]).index_add_(0, where, values)
        self.buffer.index_add_(0, rows, part)
        self.rows = torch.unique(torch.cat([self.rows, rows])) if self.pending else rows
        self.pending = True

    def install(self) -> None:
        if self.pending:
            self.weight.grad = self.buffer
            self.pending, self.installed = False, True


class EmbeddingGradients:
    """Switches every trainable ``nn.Embedding`` of ``module`` to row gradients kept in dense buffers.

    Call ``accumulate()`` after each micro-batch's backward and ``install()`` after the last one,
    before clipping and the optimizer step; the step must clear gradients to ``None`` (DeepSpeed does).
    """

    def __init__(self, module: nn.Module):
        tables: dict[int, _Table] = {}
        for embedding in module.modules():
            if isinstance(embedding, nn.Embedding) and embedding.weight.requires_grad:
                embedding.sparse = True
                tables.setdefault(id(embedding.weight), _Table(embedding.weight))  # tied weights: one table
        self._tables = list(tables.values())

    def accumulate(self) -> None:
        for table in self._tables:
            table.accumulate()

    def install(self) -> None:
        for table in self._tables:
            table.install()

    def touched_rows(self) -> dict[int, torch.Tensor]:
        """By ``id(weight)``: the rows of each installed gradient that may be non-zero (the others are zero)."""
        return {id(table.weight): table.rows for table in self._tables if table.weight.grad is table.buffer}
