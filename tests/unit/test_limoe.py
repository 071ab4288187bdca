"""LIMoE's entropy losses and routing statistics against hand computations, and its capacity limits."""
from __future__ import annotations

import math

import pytest
import torch

from vlmtrain.models.common.moe import Routing
from vlmtrain.models.limoe.loss import LIMoEObjective
from vlmtrain.models.limoe.routing import routing_stats
from vlmtrain.models.registry import get_spec

SPEC = get_spec("limoe")


def tiny(**moe):
    return SPEC.resolve({"width": 32, "embed_dim": 32, "image_size": 16, "context_length": 8, "vocab_size": 1000,
                         "moe": {"num_experts": 4, **moe}})


def h(*p: float) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


# A fixed routing distribution per modality, [blocks=1, tokens=2, experts=4].
IMAGE = torch.tensor([[[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]])
TEXT = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])


def test_entropy_terms_equal_a_hand_computation_per_modality():
    cfg = tiny(every=2).loss
    cfg.local_entropy_weight, cfg.global_entropy_weight, cfg.aux_weight = 0.3, 0.5, 0.01
    cfg.global_entropy_threshold = 1.3
    out = {"image_features": torch.eye(2, 4), "text_features": torch.eye(2, 4), "logit_scale": torch.tensor([10.0]),
           "l_aux": torch.tensor(1.25), "image_router_probs": IMAGE, "text_router_probs": TEXT}
    terms = LIMoEObjective(cfg)(out)
    image_local = (h(0.7, 0.1, 0.1, 0.1) + h(0.25, 0.25, 0.25, 0.25)) / 2
    image_global = max(0.0, 1.3 - h(0.475, 0.175, 0.175, 0.175))  # H ≈ 1.29 < 1.3
    text_local, text_global = 0.0, max(0.0, 1.3 - h(0.5, 0.5))  # confident tokens, two experts in use
    assert image_global > 0 and text_global > 0
    assert terms["image_local_entropy"].item() == pytest.approx(image_local, abs=1e-6)
    assert terms["image_global_entropy"].item() == pytest.approx(image_global, abs=1e-6)
    assert terms["text_local_entropy"].item() == pytest.approx(text_local, abs=1e-6)
    assert terms["text_global_entropy"].item() == pytest.approx(text_global, abs=1e-6)
    expected = (terms["contrastive"].item() + 0.01 * 1.25 + 0.3 * (image_local + text_local)
                + 0.5 * (image_global + text_global))
    assert terms["loss"].item() == pytest.approx(expected, abs=1e-6)
    # Above the threshold the global term is off.
    cfg.global_entropy_threshold = 0.5
    assert LIMoEObjective(cfg)(out)["image_global_entropy"].item() == 0.0


def test_routing_statistics_equal_a_hand_computation():
    model = SPEC.build(tiny(every=2))
    routes = {"image": torch.tensor([[0, -1]]), "text": torch.tensor([[0, 1]])}
    model.last_routing = {m: [Routing(probs[0], routes[m], torch.tensor([1, 1, 0, 0]) if m == "text"
                                      else torch.tensor([2, 0, 0, 0]), 4, torch.tensor(0.0))]
                          for m, probs in (("image", IMAGE), ("text", TEXT))}
    stats = routing_stats(model)
    assert stats["routing/image/block1/local_entropy"] == pytest.approx((h(0.7, 0.1, 0.1, 0.1) + math.log(4)) / 2)
    assert stats["routing/image/block1/global_entropy"] == pytest.approx(h(0.475, 0.175, 0.175, 0.175))
    assert stats["routing/image/block1/dropped_frac"] == 0.5
    assert [stats[f"routing/image/block1/tokens_e{e}"] for e in range(4)] == [1, 0, 0, 0]
    assert stats["routing/text/block1/global_entropy"] == pytest.approx(math.log(2))
    assert stats["routing/text/block1/local_entropy"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("top_k", [1, 2])
def test_no_expert_keeps_more_tokens_than_its_capacity(top_k):
    torch.manual_seed(0)
    model = SPEC.build(tiny(every=1, top_k=top_k, capacity_factor=0.5, min_capacity=1))
    batch = 16  # 16 images × 4 patches = 64 tokens per block
    model(torch.randn(batch, 3, 16, 16), torch.randint(1, 1000, (batch, 8)))
    stats = routing_stats(model)
    for block, routing in enumerate(model.last_routing["image"]):
        capacity = math.ceil(64 / 4 * 0.5 * top_k)  # DeepSpeed's: top-2 doubles the factor
        assert routing.capacity == capacity
        kept = routing.kept()
        assert int(kept.max()) <= capacity
        # Top-1 routes every token to its most probable expert; an expert keeps at most its capacity.
        if top_k == 1:
            chosen = torch.bincount(routing.probs.argmax(dim=1), minlength=4)
            assert kept.tolist() == chosen.clamp(max=capacity).tolist()
        dropped = 1 - kept.sum().item() / (64 * top_k)
        assert dropped > 0
        assert stats[f"routing/image/block{block}/dropped_frac"] == pytest.approx(dropped)
        assert [stats[f"routing/image/block{block}/tokens_e{e}"] for e in range(4)] == kept.tolist()


def test_a_dense_limoe_has_no_router_terms():
    cfg = tiny(every=0)
    out = SPEC.build(cfg)(torch.randn(2, 3, 16, 16), torch.randint(1, 1000, (2, 8)))
    assert set(SPEC.build_loss(cfg, None)(out)) == {"loss", "contrastive"}
    assert SPEC.experts.num_experts(cfg) == 0


@pytest.mark.parametrize("overrides, message", [
    (["zero_stage=3"], "zero_stage=3 cannot partition DeepSpeed's MoE experts: set zero_stage=1 or 2"),
    (["parallel.ep=3"], "parallel.ep=3 does not divide model.moe.num_experts=4"),
    (["parallel.ep=4", "model.moe.num_experts=8"], "parallel.ep=4 does not divide the data-parallel size dp=2"),
])
def test_layouts_moe_cannot_run_fail_before_launch_in_one_line(tmp_path, capsys, monkeypatch, overrides, message):
    """``vlm-train --nproc-per-node 2`` stops with one line before it builds the launcher command."""
    from vlmtrain import cli

    monkeypatch.setattr(cli, "launch_local_ranks", lambda *a, **k: pytest.fail("the launcher was started"))
    (tmp_path / "train").mkdir()
    with pytest.raises(SystemExit) as exit_:
        cli.train_main(["--config", "configs/train/limoe_tiny.yaml", "--nproc-per-node", "2",
                        f"data.train_shards={tmp_path / 'train'}", f"output_dir={tmp_path / 'run'}", *overrides])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


def test_a_checkpoint_resumes_only_at_its_expert_parallelism(tmp_path):
    """DeepSpeed's per-expert files are written per ep rank: another ep is refused, naming both layouts."""
    from vlmtrain.config import load_train_config
    from vlmtrain.configlib import to_dict
    from vlmtrain.engine import check_resumable
    from vlmtrain.errors import CheckpointError

    cfg = load_train_config("configs/train/limoe_tiny.yaml", [f"data.train_shards={tmp_path}", "parallel.ep=1"])
    sidecar = {"config": to_dict(cfg), "data_fingerprint": "f", "world_size": 2, "parallel": {"dp": 2, "tp": 1, "pp": 1, "ep": 2}}
    with pytest.raises(CheckpointError, match=r"written at dp=2 × tp=1 × pp=1 × ep=2, this run is dp=2 × tp=1 × pp=1;"):
        check_resumable(sidecar, cfg, cfg.parallel_dims(2), "f")
    cfg.parallel.ep = 2
    check_resumable(sidecar, cfg, cfg.parallel_dims(2), "f")
