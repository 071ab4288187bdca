"""LIMoE under expert parallelism, on 2 gloo ranks in one launch (``mp.spawn``, real DeepSpeed engines):

- ep=2 is the same optimization as ep=1 (drop tokens off, fp32, ZeRO 2 and ZeRO 1 at ep=2): the same
  outputs and ``l_aux`` at step 1, the same per-step losses for 5 steps (1e-5) with the loss moving,
  and the same full weights gathered for the export (every expert under its 1-rank name);
- routing that leaves experts idle, and routing in which no rank sends a token to the other rank's
  experts, completes on both ranks (forward and backward, dropping tokens or not), and each token's
  output is its expert's, scaled by its gate. The launch has a timeout: a hang fails the test.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vlmtrain.distributed.env import free_port

pytestmark = pytest.mark.dist
WORLD, STEPS, BATCH = 2, 5, 4
MODEL = ["model.width=32", "model.embed_dim=32", "model.image_size=16", "model.context_length=8",
         "model.vocab_size=1000", "model.moe.drop_tokens=false"]
# name: (ep, zero stage)
LAYOUTS = {"ep1_zero2": (1, 2), "ep2_zero2": (2, 2), "ep2_zero1": (2, 1)}


def batch_of(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return {"images": torch.randn(BATCH, 3, 16, 16, generator=g),
            "tokens": torch.randint(1, 1000, (BATCH, 8), generator=g)}


def train_layout(rank: int, ep: int, zero: int) -> dict:
    import deepspeed

    from vlmtrain.config import load_train_config
    from vlmtrain.distributed.collectives import sum_over
    from vlmtrain.distributed.deepspeed_config import build_deepspeed_config
    from vlmtrain.distributed.full_state import full_state_dict
    from vlmtrain.models.registry import spec_of
    from vlmtrain.optim import build_optimizer, build_scheduler

    cfg = load_train_config("configs/train/limoe_tiny.yaml", [
        *MODEL, f"parallel.ep={ep}", f"zero_stage={zero}", f"data.batch_size={BATCH}", f"steps={STEPS}",
        "optim.warmup_steps=1", "optim.lr=5e-3", "data.train_shards=unused"])
    dims, spec = cfg.parallel_dims(WORLD), spec_of(cfg.model)
    torch.manual_seed(0)
    model = spec.experts.build_sharded(cfg.model, ep, dims.ep_rank(rank))
    optimizer = build_optimizer(model, cfg.optim, spec.no_weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      lr_scheduler=build_scheduler(optimizer, cfg.optim, cfg.steps),
                                      config=build_deepspeed_config(cfg, dims, spec.tp_plan, model))
    loss_fn = spec.build_loss(cfg.model, None)
    losses, first = [], None
    for step in range(STEPS):
        out = engine(**batch_of(rank, step))
        terms = loss_fn(out)
        if first is None:
            first = {key: out[key].detach().clone() for key in ("image_features", "text_features", "l_aux")}
        engine.backward(terms["loss"])
        engine.step()
        losses.append(float(sum_over(terms["loss"]) / WORLD))
    experts = {g["name"] for g in engine.optimizer.optimizer.param_groups if g.get("moe")}
    return {"losses": losses, "first": first, "weights": full_state_dict(engine, dims), "moe_groups": experts}


def forced_routing(rank: int, drop_tokens: bool) -> dict:
    """One MoE block of an ep=2 engine on inputs whose routes are forced: rank 0's tokens all to
    expert 0 (its own), rank 1's all to expert 2 (its own); experts 1 and 3 get nothing."""
    import deepspeed

    from vlmtrain.models.limoe.config import LIMoEConfig, MoEConfig
    from vlmtrain.models.limoe.model import LIMoE

    cfg = LIMoEConfig(width=32, embed_dim=32, image_size=16, context_length=8, vocab_size=1000,
                      moe=MoEConfig(num_experts=4, every=2, drop_tokens=drop_tokens))
    torch.manual_seed(0)
    model = LIMoE(cfg, ep_size=2, ep_rank=rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 1},
              "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10**9}
    from vlmtrain.optim import split_expert_groups

    optimizer = torch.optim.SGD(split_expert_groups([{"name": "all", "params": list(model.parameters())}]), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    mlp = engine.module.blocks[1].mlp
    with torch.no_grad():
        mlp.gate.wg.weight.zero_()  # equal logits: argmax takes expert 0
        if rank == 1:
            mlp.gate.wg.weight[2] = 1.0  # x > 0 everywhere: expert 2 wins
    x = (torch.rand(2, 6, 32, generator=torch.Generator().manual_seed(rank)) + 0.5).requires_grad_()
    out = mlp(x)
    out.sum().backward()
    routing = mlp.gate.last
    local = mlp.moe.deepspeed_moe.experts.deepspeed_experts[0]  # global expert 2·rank
    expected = routing.probs[:, 2 * rank, None].detach() * local(x.reshape(-1, 32)).detach()
    return {"kept": routing.kept(), "capacity": routing.capacity, "out": out.detach().reshape(-1, 32),
            "expected": expected,
            "grad_finite": bool(torch.isfinite(x.grad).all())}


def worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    results = {name: train_layout(rank, *layout) for name, layout in LAYOUTS.items()}
    results["forced"] = {drop: forced_routing(rank, drop) for drop in (True, False)}
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("limoe_ep")
    context = mp.start_processes(worker, args=(free_port(), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    # A hang (a rank waiting in an all-to-all its peer never joins) fails here instead of stalling.
    for process in context.processes:
        process.join(timeout=300)
    alive = [p.pid for p in context.processes if p.is_alive()]
    for process in context.processes:
        if process.is_alive():
            process.kill()
    assert not alive, f"ranks {alive} did not finish within the timeout (a collective hung)"
    assert all(p.exitcode == 0 for p in context.processes), [p.exitcode for p in context.processes]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)]


@pytest.mark.parametrize("layout", ["ep2_zero2", "ep2_zero1"])
def test_ep2_trains_like_ep1(results, layout):
    for rank in range(WORLD):
        reference, run = results[rank]["ep1_zero2"], results[rank][layout]
        for key, value in reference["first"].items():
            torch.testing.assert_close(run["first"][key], value, atol=1e-5, rtol=1e-5, msg=f"rank {rank} {key}")
        assert run["losses"] == pytest.approx(reference["losses"], abs=1e-5, rel=1e-5)
        assert reference["losses"][0] - reference["losses"][-1] > 0.05, "the loss did not move"
        # The export's weights: every expert, under its 1-rank name.
        assert run["weights"].keys() == reference["weights"].keys()
        for name, value in reference["weights"].items():
            torch.testing.assert_close(run["weights"][name], value, atol=1e-5, rtol=1e-5, msg=name)
        assert run["moe_groups"] == {"ep_size_2"} and reference["moe_groups"] == {"ep_size_1"}


@pytest.mark.parametrize("drop_tokens", [True, False])
def test_idle_experts_and_rank_local_routing_complete(results, drop_tokens):
    for rank in range(WORLD):
        forced = results[rank]["forced"][drop_tokens]
        # All 12 tokens to the rank's own first expert; with drops, as many as its capacity
        # (max(ceil(12 / 4 · 1.0), min_capacity 4) = 4); without, all of them.
        kept = 4 if drop_tokens else 12
        assert forced["capacity"] == (4 if drop_tokens else 12)
        expected_kept = torch.zeros(4, dtype=torch.long)
        expected_kept[2 * rank] = kept
        assert forced["kept"].tolist() == expected_kept.tolist()
        # A kept token's output is its expert's scaled by its gate; a dropped one's is zero.
        served = (forced["out"] - forced["expected"]).abs().amax(dim=1) < 1e-5
        dropped = forced["out"].abs().amax(dim=1) == 0
        assert int(served.sum()) == kept and bool((served | dropped).all())
        assert forced["grad_finite"]
