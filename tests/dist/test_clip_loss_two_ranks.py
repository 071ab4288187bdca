"""ClipLoss on 2 gloo ranks (local loss + gather with grad) equals one process on the whole batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from vlmtrain.dist import free_port
from vlmtrain.losses import ClipLoss

pytestmark = pytest.mark.dist
WORLD = 2


def global_batch(n=16, d=8):
    g = torch.Generator().manual_seed(0)
    return (F.normalize(torch.randn(n, d, generator=g), dim=-1),
            F.normalize(torch.randn(n, d, generator=g), dim=-1),
            torch.tensor([11.0]))


def rank_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    image, text, scale = global_batch()
    local = slice(rank * len(image) // WORLD, (rank + 1) * len(image) // WORLD)
    image, text = image[local].clone().requires_grad_(), text[local].clone().requires_grad_()
    scale = scale.clone().requires_grad_()
    loss = ClipLoss()(image, text, scale)
    loss.backward()
    # Data parallelism averages gradients over ranks; do the same for the features' gradients.
    for grad in (scale.grad,):
        dist.all_reduce(grad)
    torch.save({"loss": loss.detach(), "image_grad": image.grad / WORLD, "text_grad": text.grad / WORLD,
                "scale_grad": scale.grad / WORLD}, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_rank_clip_loss_and_gradients_equal_the_single_process_loss(tmp_path):
    mp.spawn(rank_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    image, text, scale = (t.clone().requires_grad_() for t in global_batch())
    reference = ClipLoss()(image, text, scale)  # no process group: plain full-batch loss
    reference.backward()

    mean_loss = sum(r["loss"] for r in ranks) / WORLD
    torch.testing.assert_close(mean_loss, reference.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["image_grad"] for r in ranks]), image.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["text_grad"] for r in ranks]), text.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ranks[0]["scale_grad"], scale.grad, atol=1e-5, rtol=1e-5)
