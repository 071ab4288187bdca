"""A transformer block whose MLP is a mixture of experts on DeepSpeed's ``MoE`` layer, with a gate
that keeps what the router did (probabilities, kept routes, capacity) for losses and diagnostics.

DeepSpeed's ``TopKGate`` computes the router logits inside its forward and returns only the routes,
so the router probabilities that LIMoE's entropy losses need are out of reach. ``RoutedGate`` is a
``TopKGate`` (DeepSpeed finds it as one) whose forward is DeepSpeed's, with the softmax kept (with
its graph) in ``last``; the routing itself is DeepSpeed's ``top1gating``/``top2gating``.

Experts: the ``MoE`` layer deep-copies one expert per local slot, so all would start equal. Every
rank instead builds all ``num_experts`` experts in one order from the same seed and keeps the ones
its expert-parallel rank owns (``ep_rank * local + j``, the order of DeepSpeed's all-to-all): the
same model at every ep.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmtrain.models.common.blocks import MLP, Attention

NOISY_GATE_POLICIES = {"none": None, "jitter": "Jitter", "rsample": "RSample"}


@dataclass
class Routing:
    """One gate call: what the losses (``probs``, with its graph) and diagnostics read."""
    probs: torch.Tensor  # [tokens, experts] router softmax
    routes: torch.Tensor  # [k, tokens] the expert of each kept route, -1 where capacity dropped it
    assigned: torch.Tensor  # [experts] routes chosen before the capacity limit
    capacity: int
    l_aux: torch.Tensor  # DeepSpeed's load-balancing loss of this call

    def kept(self) -> torch.Tensor:
        """[experts] routes each expert processed."""
        experts = self.probs.shape[1]
        routes = self.routes.flatten().long()
        return torch.bincount(routes[routes >= 0], minlength=experts)


def _gate_class():
    from deepspeed.moe.sharded_moe import TopKGate, multiplicative_jitter, top1gating, top2gating

    class RoutedGate(TopKGate):
        last: Routing | None = None

        def forward(self, input: torch.Tensor, used_token: torch.Tensor | None = None, sparse_routes: bool = False,
                    use_tutel: bool = False):
            x = input.float()
            if self.noisy_gate_policy == "Jitter" and self.training:
                x = multiplicative_jitter(x, device=input.device)
            logits = F.linear(x, self.wg.weight.float())
            factor = self.capacity_factor if self.training else self.eval_capacity_factor
            if self.k == 1:
                out = top1gating(logits, factor, self.min_capacity, used_token,
                                 self.noisy_gate_policy if self.training else None, self.drop_tokens, self.use_rts,
                                 self.ep_group, sparse_routes, use_tutel)
            else:  # top2gating adds its sampling noise to the logits in place: give it a copy
                out = top2gating(logits.clone(), factor, self.min_capacity, self.drop_tokens, self.ep_group,
                                 self.top2_2nd_expert_sampling and self.training, sparse_routes)
            if sparse_routes:  # what DeepSpeed's MOELayer asks for
                l_aux, capacity, _, routes, _, _, assigned = out
                self.last = Routing(F.softmax(logits, dim=1), routes, assigned, int(capacity), l_aux)
            return out

    return RoutedGate


class MoEMLP(nn.Module):
    """DeepSpeed's ``MoE`` around ``num_experts`` GELU MLPs, this rank holding ``num_experts / ep_size``."""

    def __init__(self, width: int, hidden: int, cfg, ep_size: int = 1, ep_rank: int = 0):
        super().__init__()
        from deepspeed.moe.layer import MoE

        noisy = NOISY_GATE_POLICIES[cfg.noisy_gate]
        self.num_experts, self.top_k = cfg.num_experts, cfg.top_k
        self.capacity_factor, self.min_capacity = cfg.capacity_factor, cfg.min_capacity
        self.moe = MoE(width, MLP(width, hidden), num_experts=cfg.num_experts, ep_size=ep_size, k=cfg.top_k,
                       capacity_factor=cfg.capacity_factor, eval_capacity_factor=cfg.eval_capacity_factor,
                       min_capacity=cfg.min_capacity, noisy_gate_policy=noisy, drop_tokens=cfg.drop_tokens,
                       top2_2nd_expert_sampling=noisy == "RSample")
        old = self.moe.deepspeed_moe.gate
        gate = _gate_class()(width, cfg.num_experts, cfg.top_k, cfg.capacity_factor, cfg.eval_capacity_factor,
                             cfg.min_capacity, noisy, cfg.drop_tokens, old.use_rts, None, noisy == "RSample")
        gate.wg.weight.data.copy_(old.wg.weight.data)
        self.moe.deepspeed_moe.gate = gate
        local = self.moe.num_local_experts
        every = [MLP(width, hidden) for _ in range(cfg.num_experts)]  # one draw per expert, whatever ep is
        for j, expert in enumerate(self.moe.deepspeed_moe.experts.deepspeed_experts):
            expert.load_state_dict(every[ep_rank * local + j].state_dict())

    @property
    def gate(self):
        return self.moe.deepspeed_moe.gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:  # FLOP counts and memory plans: DeepSpeed's routing needs real values
            return self._meta_forward(x)
        out, _, _ = self.moe(x)
        return out

    def _meta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same shapes and work as a real forward at full capacity: the router, and every local
        expert on a buffer of ``capacity`` tokens."""
        tokens = x.reshape(-1, x.shape[-1])
        probs = F.softmax(self.gate.wg(tokens.float()), dim=1)
        capacity = max(math.ceil(tokens.shape[0] / self.num_experts * self.capacity_factor * self.top_k),
                       self.min_capacity)
        outs = [expert(tokens.new_empty(capacity, tokens.shape[1]))
                for expert in self.moe.deepspeed_moe.experts.deepspeed_experts]
        mixed = torch.cat(outs).sum() * probs.sum() * 0  # keeps both in the graph, as the real combine does
        return (x * 0 + mixed).to(x.dtype)


class MoEBlock(nn.Module):
    """Pre-norm block (``common.blocks.Block``'s attention) with an ``MoEMLP`` for its MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, moe_cfg, ep_size: int = 1, ep_rank: int = 0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MoEMLP(width, int(width * mlp_ratio), moe_cfg, ep_size, ep_rank)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))

    def routing(self) -> Routing | None:
        """What the gate did in this block's last forward (None on the meta device)."""
        return self.mlp.gate.last
