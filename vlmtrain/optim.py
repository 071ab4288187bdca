"""AdamW with open_clip-style parameter groups, a warmup + cosine learning-rate schedule, and
gradient-norm clipping where the trainer does it itself."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from vlmtrain.config import OptimConfig
from vlmtrain.embedding_grads import EmbeddingGradients


def no_weight_decay(name: str, param: nn.Parameter, also: Sequence[str] = ()) -> bool:
    """Norms, biases, embeddings and what the model family names (CLIP's logit scale) are not decayed."""
    return param.ndim < 2 or "embedding" in name or any(key in name for key in also)


def build_optimizer(model: nn.Module, cfg: OptimConfig, no_decay_names: Sequence[str] = ()) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if no_weight_decay(name, param, no_decay_names) else decay).append(param)
    groups = [{"name": "decay", "params": decay, "weight_decay": cfg.weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = split_expert_groups(groups)
    # The fused kernel (CPU and CUDA) steps all tensors at once; the default per-tensor loop costs
    # as much as forward + backward for a small CLIP with a 49k-token embedding.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)


def split_expert_groups(groups: list[dict]) -> list[dict]:
    """DeepSpeed MoE's experts get groups of their own (same weight decay as the group they came from):
    their gradients are averaged and their ZeRO states sharded over the expert-data-parallel ranks."""
    from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer

    if not any(is_moe_param(p) for group in groups for p in group["params"]):
        return groups
    return split_params_into_different_moe_groups_for_optimizer(groups)


def warmup_cosine(warmup_steps: int, total_steps: int):
    """LR multiplier: linear warmup to 1, then cosine decay to 0 at ``total_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, total_steps))


class GradientClipper:
    """Clip whole (unpartitioned) gradients to a global norm with fused kernels; keeps the norm.

    With ``embedding_grads``, an embedding's gradient enters the norm and the scale as the rows its
    batch touched (the others are zero): the same norm up to summation order and the same scaled
    values, without reading and writing the whole table.
    """

    def __init__(self, module: nn.Module, max_norm: float, embedding_grads: EmbeddingGradients | None = None):
        self.parameters = [p for p in module.parameters() if p.requires_grad]
        self.max_norm = max_norm
        self.embedding_grads = embedding_grads
        self._norm = torch.zeros(())

    @torch.no_grad()
    def clip(self) -> None:
        # The norm stays a tensor here: reading it (a host sync on GPUs) waits for a log step.
        if self.embedding_grads is None:
            self._norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_norm, foreach=True)
            return
        rows = self.embedding_grads.touched_rows()
        params = [p for p in self.parameters if p.grad is not None]
        grads = [p.grad.index_select(0, rows[id(p)]) if id(p) in rows else p.grad for p in params]
        # clip_grad_norm_'s rule on these tensors: scale by min(1, max / (norm + 1e-6)).
        self._norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        torch._foreach_mul_(grads, torch.clamp(self.max_norm / (self._norm + 1e-6), max=1.0))
        for p, grad in zip(params, grads):
            if id(p) in rows:
                p.grad.index_copy_(0, rows[id(p)], grad)

    def norm(self) -> float:
        """The global gradient norm before clipping, at the last optimizer step."""
        return float(self._norm)
