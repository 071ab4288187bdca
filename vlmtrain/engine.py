"""The training loop: one optimizer step after another, read top to bottom.

Model-family specifics live in the model (its forward returns a dict) and its loss (which takes
that dict); parallelism enters only through the DeepSpeed config that ``parallel.py`` builds.
"""
from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vlmtrain import checkpoint
from vlmtrain.config import TrainConfig, to_dict
from vlmtrain.data import build_train_loader, data_fingerprint, resolve_sources
from vlmtrain.dist import all_gather_objects, discover
from vlmtrain.losses import build_loss
from vlmtrain.metrics import (MetricsLogger, StepLog, count_flops_per_sample, device_peak_tflops,
                              peak_memory_gb)
from vlmtrain.models.registry import build_model
from vlmtrain.optim import build_optimizer, build_scheduler
from vlmtrain.parallel import build_deepspeed_config

log = logging.getLogger(__name__)

# Keys that must match between a checkpoint and the run resuming it for the resume to be exact.
RESUME_INVARIANTS = ("model", "loss", "optim", "seed", "zero_stage", "precision")


def train(cfg: TrainConfig) -> dict:
    """Run (or continue) training to ``cfg.steps`` on every rank; returns the run summary."""
    import deepspeed

    env = discover()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    sources = resolve_sources(cfg.data)
    fingerprint = data_fingerprint(cfg.data, sources)
    resume = checkpoint.find_resume_point(cfg.resume, run_dir) if cfg.resume else None
    if resume:
        check_resumable(resume.sidecar, cfg, env.world_size, fingerprint)
    elif cfg.resume and env.is_main:
        print(f"vlm-train: no checkpoint under {run_dir / checkpoint.CHECKPOINTS_DIR} yet: starting at step 0",
              flush=True)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    model = build_model(cfg.model)
    if cfg.init_from and not resume:
        model.load_state_dict(checkpoint.load_initial_weights(cfg.init_from, cfg.model))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(cfg))
    start_step, cursor = 0, None
    if resume:
        checkpoint.load_training_state(engine, resume)
        start_step, cursor = resume.sidecar["step"], resume.sidecar["data_cursors"][env.rank]
        if env.is_main:
            print(f"vlm-train: resumed from {resume.root / resume.tag} at step {start_step}", flush=True)

    batches = build_train_loader(cfg.data, cfg.model.vision, cfg.model.text, dp_rank=env.rank,
                                 dp_size=env.world_size, seed=cfg.seed, cursor=cursor)
    loss_fn = build_loss(cfg.loss)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    meter = ThroughputMeter(flops_per_sample=count_flops_per_sample(cfg.model),
                            peak_tflops=device_peak_tflops(cfg.metrics.peak_tflops))
    metrics = MetricsLogger(run_dir, env.is_main, cfg.metrics.tensorboard, resume_step=start_step)
    key_log = (StepLog(run_dir / "sample_keys" / f"rank{env.rank}.jsonl", start_step)
               if cfg.data.record_keys else None)
    stop = StopRequest()

    def save(step: int) -> None:
        sidecar = {"step": step, "data_cursors": all_gather_objects(batches.cursor.to_dict()),
                   "data_fingerprint": fingerprint, "world_size": env.world_size, "config": to_dict(cfg)}
        checkpoint.save_training_state(engine, run_dir, step, sidecar, keep=cfg.checkpoint.keep)

    started = time.perf_counter()
    bar = tqdm(initial=start_step, total=cfg.steps, desc="train", unit="step",
               disable=not (env.is_main and cfg.progress))
    record, step = {}, start_step
    while step < cfg.steps:
        step += 1
        result = train_step(engine, batches, loss_fn, dtype, cfg.optim.grad_accum_steps)
        apply_parameter_bounds(engine)
        meter.add(result, first=step == start_step + 1)
        if key_log:
            key_log.write({"step": step, "keys": result.keys})
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, "loss": mean_over_ranks(result.loss), "lr": engine.get_lr()[0],
                      **model_scalars(engine), **meter.report(), "peak_mem_gb": peak_memory_gb()}
            grad_norm = engine.get_global_grad_norm()  # before clipping; None where DeepSpeed has none
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            metrics.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
        if cfg.eval.every and step % cfg.eval.every == 0:
            metrics.log({"step": step, **evaluate_in_training(engine, cfg)})
        bar.update(1)
        preempted = stop.agreed()
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.steps or preempted:
            save(step)
        if preempted:
            if env.is_main:
                print(f"vlm-train: stop requested: saved step {step}; continue with resume=latest", flush=True)
            break
    bar.close()
    metrics.close()
    if key_log:
        key_log.close()

    summary = {"steps": step, "world_size": env.world_size, "finished": step == cfg.steps,
               "global_batch": cfg.data.batch_size * cfg.optim.grad_accum_steps * env.world_size,
               "final_loss": record.get("loss"), "samples_per_s": meter.samples_per_s_overall(),
               "skipped_samples": record.get("skipped_samples"), "wall_s": time.perf_counter() - started}
    if step == cfg.steps:
        checkpoint.export_model(engine, cfg.model, run_dir / checkpoint.EXPORT_DIR,
                                {"train_summary": summary, "train_config": to_dict(cfg)})
        if env.is_main:
            (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    batches.close()
    # An orderly teardown: a rank that leaves gloo to interpreter finalization can crash there
    # (its transport threads outlive the objects they use), and a rank exiting early breaks its
    # peers' last collective.
    dist.barrier()
    dist.destroy_process_group()
    return summary


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over micro-batches, this rank
    samples: int
    skipped: int
    data_wait_s: float
    step_s: float
    keys: list[str] = field(default_factory=list)


def train_step(engine, batches, loss_fn, dtype: torch.dtype, accum_steps: int) -> StepResult:
    """One optimizer step: ``accum_steps`` micro-batches, DeepSpeed steps on the last one."""
    started = time.perf_counter()
    losses, samples, skipped, waited, keys = [], 0, 0, 0.0, []
    for _ in range(accum_steps):
        wait_from = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - wait_from
        out = engine(batch.images.to(engine.device, dtype), batch.tokens.to(engine.device))
        loss = loss_fn(**{name: value.float() for name, value in out.items()})
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
        samples += len(batch.keys)
        skipped += batch.skipped
        keys += batch.keys
    return StepResult(torch.stack(losses).mean(), samples, skipped, waited,
                      time.perf_counter() - started, keys)


class ThroughputMeter:
    """Per-rank throughput between log steps; the first step (lazy init, JIT) is not timed."""

    def __init__(self, flops_per_sample: float, peak_tflops: float | None):
        self.flops_per_sample = flops_per_sample
        self.peak_tflops = peak_tflops
        self._window = self._empty()
        self._total = self._empty()
        self.skipped = 0

    @staticmethod
    def _empty() -> dict:
        return {"steps": 0, "samples": 0, "step_s": 0.0, "wait_s": 0.0}

    def add(self, result: StepResult, first: bool) -> None:
        self.skipped += result.skipped
        if first:
            return
        for window in (self._window, self._total):
            window["steps"] += 1
            window["samples"] += result.samples
            window["step_s"] += result.step_s
            window["wait_s"] += result.data_wait_s

    def report(self) -> dict:
        w, self._window = self._window, self._empty()
        world = dist.get_world_size() if dist.is_initialized() else 1
        per_rank = w["samples"] / w["step_s"] if w["step_s"] else 0.0
        tflops = per_rank * self.flops_per_sample / 1e12
        record = {"samples_per_s": per_rank * world,
                  "step_time_s": w["step_s"] / w["steps"] if w["steps"] else 0.0,
                  "data_wait_frac": w["wait_s"] / w["step_s"] if w["step_s"] else 0.0,
                  "tflops_per_device": tflops,
                  "skipped_samples": int(sum_over_ranks(self.skipped))}
        if self.peak_tflops:
            record["mfu"] = tflops / self.peak_tflops
        return record

    def samples_per_s_overall(self) -> float:
        world = dist.get_world_size() if dist.is_initialized() else 1
        t = self._total
        return t["samples"] / t["step_s"] * world if t["step_s"] else 0.0


class StopRequest:
    """SIGTERM/SIGUSR1 (SLURM's warning before preemption) ask for a save at the next step end.

    Ranks can receive the signal at different steps, so every rank votes each step and all stop
    together, after the same step.
    """

    def __init__(self) -> None:
        self._requested = False
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._request)

    def _request(self, signum, frame) -> None:
        self._requested = True

    def agreed(self) -> bool:
        return sum_over_ranks(float(self._requested)) > 0


def evaluate_in_training(engine, cfg: TrainConfig) -> dict[str, float]:
    """Zero-shot metrics of the current weights on ``cfg.eval.datasets``; every rank takes part.

    The ranks split the images and gather the embeddings, so the numbers equal a 1-rank eval. An
    fp32 model below ZeRO-3 is evaluated as it is; otherwise every rank evaluates a gathered fp32
    copy (ZeRO-3 would otherwise need every rank to run the same number of forward passes).
    """
    from vlmtrain.data import make_image_transform, make_tokenizer
    from vlmtrain.eval.suite import evaluate_all, metrics_for_logging

    model = engine.module
    if engine.zero_optimization_stage() == 3 or cfg.precision != "fp32":
        import deepspeed

        model = build_model(cfg.model).to(engine.device)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            model.load_state_dict(engine.module.state_dict())
    records = evaluate_all(model, make_tokenizer(cfg.model.text), make_image_transform(cfg.model.vision, train=False),
                           cfg.eval.datasets, batch_size=cfg.eval.batch_size, device=engine.device)
    return metrics_for_logging(records)


@torch.no_grad()
def apply_parameter_bounds(engine) -> None:
    """Clamp the parameters the model bounds (CLIP's temperature) after each optimizer step.

    The clamp must reach the optimizer's fp32 master copy, or the next step would undo it. ZeRO-3
    keeps a partition of each parameter per rank, and a clamp is elementwise, so each rank clamps
    its own partition (DeepSpeed's full-parameter setter fails on parameters smaller than the world).
    """
    from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param,
                                 safe_set_full_fp32_param, safe_set_local_fp32_param)

    for param, (low, high) in engine.module.parameter_bounds():
        if hasattr(param, "ds_id"):  # ZeRO-3: the fp32 partition and this rank's working partition
            safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(low, high))
            param.ds_tensor.clamp_(low, high)
        else:
            master = safe_get_full_fp32_param(param)
            if master is not None:
                safe_set_full_fp32_param(param, master.clamp(low, high))
        # The full parameter: replicated below ZeRO-3; at ZeRO-3 a small one stays gathered
        # ("persistent") and the rest are empty outside forward, where this is a no-op.
        param.clamp_(low, high)


def model_scalars(engine) -> dict:
    """The temperature (and SigLIP bias) as the loss sees them; gathered under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param

    def value(param: torch.nn.Parameter) -> float:
        master = safe_get_full_fp32_param(param)  # None without ZeRO: the parameter is the master
        return (master if master is not None else param).float().item()

    module = engine.module
    scalars = {"logit_scale": float(torch.tensor(value(module.logit_scale)).exp())}
    if module.logit_bias is not None:
        scalars["logit_bias"] = value(module.logit_bias)
    return scalars


def check_resumable(sidecar: dict, cfg: TrainConfig, world_size: int, fingerprint: str) -> None:
    """An exact resume needs the same model, optimizer, seed, ranks and data as the checkpoint."""
    saved, now = sidecar["config"], to_dict(cfg)
    changed = [key for key in RESUME_INVARIANTS if saved[key] != now[key]]
    for key in ("batch_size", "workers"):
        if saved["data"][key] != now["data"][key]:
            changed.append(f"data.{key}")
    if changed:
        raise checkpoint.CheckpointError(f"cannot resume: {', '.join(changed)} differ from the checkpoint's config")
    if sidecar["world_size"] != world_size:
        raise checkpoint.CheckpointError(f"cannot resume: the checkpoint has {sidecar['world_size']} data-parallel "
                                         f"rank(s), this run {world_size}")
    if sidecar["data_fingerprint"] != fingerprint:
        raise checkpoint.CheckpointError("cannot resume: the training shards changed since the checkpoint "
                                         "(names, sizes, weights or order options)")


def sum_over_ranks(value: float) -> float:
    tensor = torch.tensor([float(value)])
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.item()


def mean_over_ranks(value: torch.Tensor) -> float:
    world = dist.get_world_size() if dist.is_initialized() else 1
    return sum_over_ranks(value.float().item()) / world
