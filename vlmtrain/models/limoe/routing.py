"""Routing diagnostics: per MoE block and modality, the tokens each expert processed, the fraction of
routes dropped by capacity, and the local and global routing entropy; drawn as ``RUN/routing.png``.

The numbers describe the last forward pass (the last micro-batch of the step) summed over all
ranks: counts are totals, the local entropy is the mean over every rank's tokens, the global
entropy is that of the mean routing distribution over every rank's tokens.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from vlmtrain.distributed.collectives import sum_over
from vlmtrain.models.common.moe import Routing
from vlmtrain.models.limoe.loss import entropy
from vlmtrain.models.limoe.model import MODALITIES

ROUTING_FILE = "routing.png"
PREFIX = "routing"


def _moe_blocks(module: nn.Module) -> list[int]:
    from vlmtrain.models.common.moe import MoEBlock

    return [i for i, block in enumerate(module.blocks) if isinstance(block, MoEBlock)]


def _sums(routing: Routing) -> torch.Tensor:
    """[assigned (E), kept (E), summed probabilities (E), summed token entropy, tokens, capacity]."""
    probs = routing.probs.detach().float()
    return torch.cat([routing.assigned.float().cpu(), routing.kept().float().cpu(), probs.sum(0).cpu(),
                      torch.tensor([entropy(probs).sum().item(), probs.shape[0], routing.capacity])])


def routing_stats(module: nn.Module) -> dict[str, float]:
    """Collective over all ranks (each calls it at the same step): ``routing/<modality>/block<i>/…``
    scalars for the metrics record."""
    blocks = _moe_blocks(module)
    if not blocks or not getattr(module, "last_routing", None):
        return {}
    parts = [_sums(r) for m in MODALITIES for r in module.last_routing[m]]
    totals = sum_over(torch.stack(parts))
    record, row = {}, 0
    for modality in MODALITIES:
        for block in blocks:
            values = totals[row]
            experts = (len(values) - 3) // 3
            assigned, kept, probs = values[:experts], values[experts:2 * experts], values[2 * experts:3 * experts]
            tokens = values[-2].item()
            key = f"{PREFIX}/{modality}/block{block}"
            for e in range(experts):
                record[f"{key}/tokens_e{e}"] = kept[e].item()
            record[f"{key}/dropped_frac"] = 1.0 - kept.sum().item() / assigned.sum().item()
            record[f"{key}/local_entropy"] = values[-3].item() / tokens
            record[f"{key}/global_entropy"] = entropy(probs / tokens).item()
            row += 1
    return record


def plot_routing(run_dir: Path) -> None:
    """``routing.png`` from ``metrics.jsonl``: per modality and MoE block, the share of tokens each
    expert processed over the steps, and the dropped fraction and entropies below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if any(k.startswith(f"{PREFIX}/") for k in r)]
    if not records:
        return
    panels = sorted({k.rsplit("/", 1)[0] for k in records[-1] if k.startswith(f"{PREFIX}/")})
    fig, axes = plt.subplots(2, len(panels), figsize=(4 * len(panels), 6), squeeze=False)
    steps = [r["step"] for r in records]
    for column, panel in enumerate(panels):
        experts = sorted((k for k in records[-1] if re.fullmatch(rf"{panel}/tokens_e\d+", k)),
                         key=lambda k: int(k.rsplit("e", 1)[1]))
        counts = torch.tensor([[r[k] for k in experts] for r in records])
        shares = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
        top = axes[0][column]
        top.stackplot(steps, shares.T.numpy(), labels=[k.rsplit("_", 1)[1] for k in experts])
        top.set_title(panel.removeprefix(f"{PREFIX}/") + ": share of tokens")
        top.set_ylim(0, 1)
        top.legend(fontsize=7, loc="upper right")
        bottom = axes[1][column]
        for name in ("dropped_frac", "local_entropy", "global_entropy"):
            bottom.plot(steps, [r[f"{panel}/{name}"] for r in records], label=name)
        bottom.set_xlabel("step")
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(run_dir / ROUTING_FILE, dpi=100)
    plt.close(fig)
