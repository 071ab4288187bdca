"""Contrastive losses on 2 data-parallel replicas (local loss + gather with grad over the data-parallel
group) equal one process on the whole batch, in loss and in every gradient, once gradients are
averaged as data parallelism does: with 2 gloo ranks, and with 4 ranks as 2 replicas × 2 tensor peers."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlmtrain.distributed.env import free_port
from vlmtrain.distributed.parallel_dims import ParallelDims, build_process_groups
from vlmtrain.models.clip.loss import LOSSES

pytestmark = pytest.mark.dist
WORLD = 2


def global_batch(n=16, d=8):
    g = torch.Generator().manual_seed(0)
    return {"image_features": F.normalize(torch.randn(n, d, generator=g), dim=-1),
            "text_features": F.normalize(torch.randn(n, d, generator=g), dim=-1),
            "logit_scale": torch.tensor([11.0]),
            "logit_bias": torch.tensor([-3.0])}


def inputs_for(loss_name: str, batch: dict) -> dict:
    if loss_name == "clip":
        batch.pop("logit_bias")
    return {k: v.clone().requires_grad_() for k, v in batch.items()}


def rank_worker(rank: int, port: int, out_dir: str, loss_name: str, tp: int = 1) -> None:
    """One rank of a data-parallel × tensor-parallel layout: tensor peers hold the same samples, so the
    loss must gather over the data-parallel group and offset its labels by the data-parallel rank."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dims = ParallelDims(WORLD * tp, tp=tp)
    dist.init_process_group("gloo", rank=rank, world_size=dims.world)
    groups = build_process_groups(dims, rank)
    batch = global_batch()
    local = slice(groups.dp_rank * 16 // WORLD, (groups.dp_rank + 1) * 16 // WORLD)
    for key in ("image_features", "text_features"):
        batch[key] = batch[key][local]
    inputs = inputs_for(loss_name, batch)
    loss = LOSSES[loss_name](groups.dp)(**inputs)
    loss.backward()
    grads = {k: v.grad for k, v in inputs.items()}
    # Data parallelism averages the gradients of shared parameters (scale, bias) over ranks.
    for key in ("logit_scale", "logit_bias"):
        if key in grads:
            dist.all_reduce(grads[key], group=groups.dp)
    if groups.is_dp_leader:
        torch.save({"loss": loss.detach(), **{k: g / WORLD for k, g in grads.items()}},
                   f"{out_dir}/rank{groups.dp_rank}.pt")
    dist.barrier()  # no rank tears gloo down while a peer's last transfer is in flight
    dist.destroy_process_group()


@pytest.mark.parametrize("tp", [1, 2], ids=["dp2", "dp2xtp2"])
@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_two_replica_loss_and_gradients_equal_the_single_process_loss(tmp_path, loss_name, tp):
    mp.spawn(rank_worker, args=(free_port(), str(tmp_path), loss_name, tp), nprocs=WORLD * tp, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    inputs = inputs_for(loss_name, global_batch())
    reference = LOSSES[loss_name]()(**inputs)  # no process group: plain full-batch loss
    reference.backward()

    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, reference.detach(), **close)
    for key, tensor in inputs.items():
        if key.endswith("features"):  # each rank holds the gradient of its own rows
            torch.testing.assert_close(torch.cat([r[key] for r in ranks]), tensor.grad, **close)
        else:
            torch.testing.assert_close(ranks[0][key], tensor.grad, **close)
