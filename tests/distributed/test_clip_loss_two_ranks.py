"""Contrastive losses on 2 gloo ranks (local loss + gather with grad) equal one process on the
whole batch, in loss and in every gradient, once gradients are averaged as data parallelism does."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlmtrain.distributed.env import free_port
from vlmtrain.losses import LOSSES

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


def rank_worker(rank: int, port: int, out_dir: str, loss_name: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    batch = global_batch()
    local = slice(rank * 16 // WORLD, (rank + 1) * 16 // WORLD)
    for key in ("image_features", "text_features"):
        batch[key] = batch[key][local]
    inputs = inputs_for(loss_name, batch)
    loss = LOSSES[loss_name]()(**inputs)
    loss.backward()
    grads = {k: v.grad for k, v in inputs.items()}
    # Data parallelism averages the gradients of shared parameters (scale, bias) over ranks.
    for key in ("logit_scale", "logit_bias"):
        if key in grads:
            dist.all_reduce(grads[key])
    torch.save({"loss": loss.detach(), **{k: g / WORLD for k, g in grads.items()}}, f"{out_dir}/rank{rank}.pt")
    dist.barrier()  # no rank tears gloo down while a peer's last transfer is in flight
    dist.destroy_process_group()


@pytest.mark.parametrize("loss_name", ["clip", "siglip"])
def test_two_rank_loss_and_gradients_equal_the_single_process_loss(tmp_path, loss_name):
    mp.spawn(rank_worker, args=(free_port(), str(tmp_path), loss_name), nprocs=WORLD, join=True)
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
