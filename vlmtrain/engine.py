"""The training loop: one contrastive step after another, read top to bottom.

Model-family specifics live in the model and its loss; parallelism enters only through the
DeepSpeed config that ``parallel.py`` builds.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vlmtrain import checkpoint
from vlmtrain.config import TrainConfig, to_dict
from vlmtrain.data import build_train_loader
from vlmtrain.dist import discover
from vlmtrain.losses import ClipLoss
from vlmtrain.models.clip import LOGIT_SCALE_MAX
from vlmtrain.models.registry import build_model
from vlmtrain.optim import build_optimizer, build_scheduler
from vlmtrain.parallel import build_deepspeed_config


def train(cfg: TrainConfig) -> dict:
    """Run ``cfg.steps`` optimizer steps on every rank; rank 0 returns (and writes) the summary."""
    import deepspeed

    env = discover()
    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(cfg))
    batches = build_train_loader(cfg.data, cfg.model.vision, cfg.model.text,
                                 dp_rank=env.rank, dp_size=env.world_size, seed=cfg.seed)
    loss_fn = ClipLoss()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    global_batch = cfg.data.batch_size * env.world_size

    metrics_file = (run_dir / "metrics.jsonl").open("w") if env.is_main else None
    bar = tqdm(total=cfg.steps, desc="train", unit="step", disable=not (env.is_main and cfg.progress))
    started = time.perf_counter()
    timed_from, timed_samples, skipped_total = None, 0, 0
    for step in range(1, cfg.steps + 1):
        images, tokens, skipped = next(batches)
        out = engine(images.to(engine.device, dtype), tokens.to(engine.device))
        logit_scale = out["logit_scale"]
        loss = loss_fn(out["image_features"].float(), out["text_features"].float(), logit_scale.float())
        engine.backward(loss)
        engine.step()
        clamp_logit_scale(engine)

        skipped_total += int(skipped.sum())
        if timed_from is None:  # the first step pays for lazy init; time the rest
            timed_from = time.perf_counter()
        else:
            timed_samples += global_batch
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, "loss": mean_over_ranks(loss.detach()),
                      "lr": engine.get_lr()[0], "logit_scale": float(logit_scale.detach()),
                      "samples_per_s": samples_per_second(timed_samples, timed_from),
                      "skipped_samples": int(sum_over_ranks(skipped_total))}
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
        bar.update(1)
    bar.close()

    checkpoint.save_training_state(engine, run_dir, cfg.steps, client_state={"step": cfg.steps})
    summary = {"steps": cfg.steps, "world_size": env.world_size, "global_batch": global_batch,
               "final_loss": record["loss"], "samples_per_s": record["samples_per_s"],
               "skipped_samples": record["skipped_samples"], "wall_s": time.perf_counter() - started}
    checkpoint.export_model(engine, cfg.model, run_dir / checkpoint.EXPORT_DIR,
                            {"train_summary": summary, "train_config": to_dict(cfg)})
    if env.is_main:
        (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        metrics_file.close()
    return summary


@torch.no_grad()
def clamp_logit_scale(engine) -> None:
    """Clamp to [0, ln 100] after each step, in the model *and* in ZeRO's fp32 master copy.

    With ZeRO ≥ 1 the optimizer updates its own fp32 partition and copies it into the model, so
    clamping only the model parameter would be undone by the next step.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    param = engine.module.logit_scale
    master = safe_get_full_fp32_param(param)
    if master is not None:
        safe_set_full_fp32_param(param, master.clamp(0, LOGIT_SCALE_MAX))
    engine.module.clamp_logit_scale()


def samples_per_second(samples: int, since: float | None) -> float:
    if not samples or since is None:
        return 0.0
    return samples / (time.perf_counter() - since)


def sum_over_ranks(value: float) -> float:
    tensor = torch.tensor([float(value)])
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.item()


def mean_over_ranks(value: torch.Tensor) -> float:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return sum_over_ranks(value.float().item()) / world
