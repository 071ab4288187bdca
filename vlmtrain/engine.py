"""The training loop: one optimizer step after another, read top to bottom.

Model-family specifics are reached through the family's ``ModelSpec`` (model, loss terms, tokenizer,
clamped parameters); the layout (data × tensor × pipeline) through ``ParallelDims`` and the
DeepSpeed config that ``distributed/deepspeed_config.py`` builds. Ranks read data by their
data-parallel rank: tensor and pipeline peers see the same batches.
"""
from __future__ import annotations

import functools
import gc
import logging
import os
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from vlmtrain import atomic, checkpoint
from vlmtrain.config import TrainConfig
from vlmtrain.configlib import to_dict
from vlmtrain.data import build_train_loader, data_fingerprint, resolve_sources
from vlmtrain.distributed import universal
from vlmtrain.distributed.collectives import all_gather_objects, sum_over
from vlmtrain.distributed.deepspeed_config import (build_deepspeed_config, trainer_clips_gradients,
                                                   trainer_owns_gradients)
from vlmtrain.distributed.env import discover
from vlmtrain.distributed.full_state import full_state_dict
from vlmtrain.distributed.parallel_dims import ParallelDims, ProcessGroups, build_process_groups
from vlmtrain.distributed.rank_map import gather_rank_map, write_rank_map
from vlmtrain.distributed.requeue import SlurmRequeue
from vlmtrain.distributed.tensor_parallel import check_deepspeed_groups
from vlmtrain.embedding_grads import EmbeddingGradients
from vlmtrain.errors import CheckpointError
from vlmtrain.metrics import (MetricsLogger, StepLog, count_flops_per_sample, device_peak_tflops,
                              peak_memory_gb)
from vlmtrain.models.registry import load_model_config, spec_of
from vlmtrain.models.spec import ModelSpec
from vlmtrain.optim import GradientClipper, build_optimizer, build_scheduler
from vlmtrain.rng import seed_model_rng
from vlmtrain.runlock import DirectoryLockedError, RunLock
from vlmtrain.step import StepResult, train_step

log = logging.getLogger(__name__)

# Keys that must match between a checkpoint and the run resuming it for the resume to be exact.
RESUME_INVARIANTS = ("model", "optim", "seed", "zero_stage", "precision")


def train(cfg: TrainConfig) -> dict:
    """Run (or continue) training to ``cfg.steps`` on every rank; returns the run summary."""
    import deepspeed

    env = discover()
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    dims = cfg.parallel_dims(env.world_size)
    groups = build_process_groups(dims, env.rank)
    rank_map = gather_rank_map(env, dims)
    spec = spec_of(cfg.model)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.output_dir)
    sources = resolve_sources(cfg.data)
    fingerprint = data_fingerprint(cfg.data, sources)
    resume = checkpoint.find_resume_point(cfg.resume, run_dir) if cfg.resume else None
    if resume:
        check_resumable(resume.sidecar, cfg, dims, fingerprint)
    elif cfg.resume and env.is_main:
        print(f"vlm-train: no checkpoint under {run_dir / checkpoint.CHECKPOINTS_DIR} yet: starting at step 0",
              flush=True)
    lock = hold_run_directory(run_dir, env.is_main)
    checkpoint.check_output_dir(run_dir, cfg.resume, cfg.overwrite)
    if env.is_main:
        if cfg.overwrite and not cfg.resume:
            checkpoint.clear_run_dir(run_dir)
        atomic.write_json(run_dir / "config.json", to_dict(cfg))
        print(f"vlm-train: {write_rank_map(run_dir, rank_map)}", flush=True)
    dist.barrier()  # no rank writes into the run directory before it is cleared

    model = (spec.experts.build_sharded(cfg.model, dims.ep, dims.ep_rank(env.rank)) if dims.ep > 1
             else spec.build(cfg.model))
    if cfg.init_from and not resume:
        model.load_state_dict(checkpoint.load_initial_weights(cfg.init_from, cfg.model))
    loss_fn = spec.build_loss(cfg.model, groups.dp)
    if dims.pp > 1:  # this rank's stage; the loss runs inside the pipeline, on the last stage
        from vlmtrain.distributed import pipeline

        model = pipeline.split(spec, model, loss_fn, dims)
    optimizer = build_optimizer(model, cfg.optim, spec.no_weight_decay)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    # A checkpoint of another layout (check_resumable allowed it) loads as a universal one.
    relayout = bool(resume) and checkpoint.saved_layout(resume.sidecar) != layout_of(dims)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=build_deepspeed_config(cfg, dims, spec.tp_plan, model,
                                                                         load_universal=relayout))
    if dims.tp > 1:
        check_deepspeed_groups(engine, dims, env.rank)
    if dims.dp == 1 and cfg.zero_stage == 0:
        # One replica without ZeRO: DeepSpeed would still flatten, "all-reduce" and copy back every
        # gradient. (ZeRO 1/2 reduce their gradient partitions on this path: it stays on for them.)
        engine.enable_backward_allreduce = False
    # One process at ZeRO 0: the token embedding's gradient costs the rows a batch touches (see
    # embedding_grads.py); the clip and the update see the same dense gradient.
    embedding_grads = EmbeddingGradients(engine.module) if trainer_owns_gradients(cfg, dims) else None
    clipper = (GradientClipper(engine.module, cfg.optim.grad_clip, embedding_grads)
               if trainer_clips_gradients(cfg, dims) else None)
    start_step, cursor = 0, None
    if resume:
        if relayout:
            checkpoint.load_training_state(engine, universal.convert(resume, spec, cfg.model, run_dir, dims))
            universal.clean_up(run_dir)
        else:
            checkpoint.load_training_state(engine, resume)
        start_step, cursor = resume.sidecar["step"], resume.sidecar["data_cursors"][groups.dp_rank]
        if env.is_main:
            print(f"vlm-train: resumed from {resume.root / resume.tag} at step {start_step}", flush=True)

    batches = build_train_loader(cfg.data, spec.image_transform(cfg.model, True), spec.tokenizer(cfg.model),
                                 dp_rank=groups.dp_rank, dp_size=dims.dp, seed=cfg.seed, cursor=cursor,
                                 sample_inputs=spec.sample_inputs(cfg.model) if spec.sample_inputs else None)
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    # FLOPs per sample feed the throughput columns of the metrics, which only the main rank writes: the others
    # skip the count (the model's forward and backward on the meta device, about a second of CPU in a fresh
    # process, with every rank of the node starting up on the same cores).
    meter = ThroughputMeter(flops_per_sample=count_flops_per_sample(spec, cfg.model) if env.is_main else 0.0,
                            peak_tflops=device_peak_tflops(cfg.metrics.peak_tflops), dp_size=dims.dp)
    bounds = ParameterBounds(engine.module, spec)
    metrics = MetricsLogger(run_dir, env.is_main, cfg.metrics.tensorboard, resume_step=start_step)
    key_log = (StepLog(run_dir / "sample_keys" / f"rank{env.rank}.jsonl", start_step)
               if cfg.data.record_keys else None)
    stop = StopRequest()

    def save(step: int) -> None:
        sidecar = {"step": step, "data_cursors": data_cursors(batches.cursor.to_dict(), dims),
                   "data_fingerprint": fingerprint, "world_size": env.world_size,
                   "parallel": layout_of(dims), "config": to_dict(cfg)}
        checkpoint.save_training_state(engine, run_dir, step, sidecar, keep=cfg.checkpoint.keep)

    # What is built by now (the imported modules, the model, the DeepSpeed engine, the loader) lives until the
    # run ends. Out of the cyclic collector's sight it costs no full collection during training, nor at exit:
    # there, with torch, DeepSpeed and open_clip loaded, those collections took a second of CPU per rank.
    gc.collect()  # what is garbage already is freed, not kept for good
    gc.freeze()
    started = time.perf_counter()
    bar = tqdm(initial=start_step, total=cfg.steps, desc="train", unit="step",
               disable=not (env.is_main and cfg.progress))
    record, step, preempted = {}, start_step, False
    while step < cfg.steps:
        step += 1
        seed_micro_batch = functools.partial(seed_model_rng, cfg.seed, step, dp_rank=groups.dp_rank)
        if dims.pp > 1:
            result = pipeline.train_step(engine, batches, dtype, cfg.optim.grad_accum_steps, seed_micro_batch)
        else:
            result = train_step(engine, batches, loss_fn, dtype, cfg.optim.grad_accum_steps, clipper,
                                seed_micro_batch, embedding_grads)
        bounds.apply()
        meter.add(result, first=step == start_step + 1)
        if key_log:
            key_log.write({"step": step, "keys": result.keys})
        if step % cfg.log_every == 0 or step == cfg.steps:
            record = {"step": step, **mean_losses(result.losses, groups), "lr": engine.get_lr()[0],
                      **logged_parameters(engine.module, spec), **meter.report(), "peak_mem_gb": peak_memory_gb()}
            grad_norm = clipper.norm() if clipper else engine.get_global_grad_norm()  # before clipping
            if grad_norm is not None:  # None where DeepSpeed keeps none
                record["grad_norm"] = float(grad_norm)
            if spec.step_diagnostics:
                record.update(spec.step_diagnostics(engine.module))
            metrics.log(record)
            bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
        if cfg.eval.every and step % cfg.eval.every == 0:
            metrics.log({"step": step, **evaluate_in_training(engine, cfg, spec, dims)})
        bar.update(1)
        preempted = stop.agreed()
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == cfg.steps or preempted:
            save(step)
        if preempted:
            if env.is_main:
                print(f"vlm-train: stop requested: saved step {step}; continue with resume=latest", flush=True)
            break
    stop.close()
    bar.close()
    metrics.close()
    if spec.plot_run and env.is_main:
        spec.plot_run(run_dir)
    if key_log:
        key_log.close()

    summary = {"steps": step, "world_size": env.world_size, "parallel": layout_of(dims),
               "finished": step == cfg.steps,
               "global_batch": cfg.data.batch_size * cfg.optim.grad_accum_steps * dims.dp,
               "final_loss": record.get("loss"), "samples_per_s": meter.samples_per_s_overall(),
               "skipped_samples": record.get("skipped_samples"), "wall_s": time.perf_counter() - started}
    if step == cfg.steps:
        state = full_state_dict(engine, dims)
        if env.is_main:
            checkpoint.write_export(state, cfg.model, run_dir / checkpoint.EXPORT_DIR,
                                    {"train_summary": summary, "train_config": to_dict(cfg)})
            atomic.write_json(run_dir / "train_summary.json", summary)
    batches.close()
    # An orderly teardown: a rank that leaves gloo to interpreter finalization can crash there
    # (its transport threads outlive the objects they use), and a rank exiting early breaks its
    # peers' last collective.
    dist.barrier()
    dist.destroy_process_group()
    if lock:
        lock.release()
    requeue = SlurmRequeue.from_env(os.environ) if preempted and stop.requeue else None
    if requeue and env.is_main:  # every rank has saved and left the group: the job may end now
        print(f"vlm-train: {requeue.request()}", flush=True)
    return summary


def hold_run_directory(run_dir: Path, is_main: bool) -> RunLock | None:
    """Collective: rank 0 takes the run directory's lock (one writer per directory); if another live
    process holds it, every rank fails with the holder's pid."""
    lock, problem = RunLock(run_dir) if is_main else None, None
    if lock:
        try:
            lock.acquire()
        except DirectoryLockedError as err:
            problem = str(err)
    problem = all_gather_objects(problem)[0]
    if problem:
        raise DirectoryLockedError(problem)
    return lock


def layout_of(dims: ParallelDims) -> dict:
    return {"dp": dims.dp, "tp": dims.tp, "pp": dims.pp, **({"ep": dims.ep} if dims.ep > 1 else {})}


def data_cursors(cursor: dict, dims: ParallelDims) -> list[dict]:
    """Collective: the loader cursor of every data-parallel rank, by dp rank (peers share one)."""
    everyone = all_gather_objects(cursor)
    return [everyone[dims.rank_of(0, dp_rank, 0)] for dp_rank in range(dims.dp)]


def mean_losses(losses: dict[str, torch.Tensor], groups: ProcessGroups) -> dict[str, float]:
    """Every loss term averaged over the data-parallel ranks (one all-reduce): ``loss`` and ``loss/<term>``."""
    names = sorted(losses)
    means = sum_over(torch.stack([losses[name] for name in names]), groups.dp) / groups.dims.dp
    return {("loss" if name == "loss" else f"loss/{name}"): value for name, value in zip(names, means.tolist())}


class ThroughputMeter:
    """Throughput between log steps; the first step (lazy init, JIT) is not timed. Samples/s counts
    each data-parallel replica once (its tensor/pipeline peers work on the same samples)."""

    def __init__(self, flops_per_sample: float, peak_tflops: float | None, dp_size: int):
        self.flops_per_sample = flops_per_sample
        self.peak_tflops = peak_tflops
        self.dp_size = dp_size
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
        """Collective (the skipped-sample count is summed over ranks)."""
        w, self._window = self._window, self._empty()
        per_replica = w["samples"] / w["step_s"] if w["step_s"] else 0.0
        world = dist.get_world_size() if dist.is_initialized() else 1
        tflops = per_replica * self.dp_size * self.flops_per_sample / world / 1e12
        record = {"samples_per_s": per_replica * self.dp_size,
                  "step_time_s": w["step_s"] / w["steps"] if w["steps"] else 0.0,
                  "data_wait_frac": w["wait_s"] / w["step_s"] if w["step_s"] else 0.0,
                  "tflops_per_device": tflops,
                  # every peer of a replica reads the same samples: count each replica once
                  "skipped_samples": int(sum_over(torch.tensor([float(self.skipped)])).item()
                                         * self.dp_size / world)}
        if self.peak_tflops:
            record["mfu"] = tflops / self.peak_tflops
        return record

    def samples_per_s_overall(self) -> float:
        t = self._total
        return t["samples"] / t["step_s"] * self.dp_size if t["step_s"] else 0.0


class StopRequest:
    """SIGTERM/SIGUSR1 (SLURM's warning before preemption) ask for a save at a step end.

    Ranks can receive the signal at different steps, so every rank votes each step and all stop
    together, after the same step. The vote is an asynchronous all-reduce read one step later, so
    no step waits for it: a signal stops the run at the end of the step after the one it arrived in.
    ``requeue`` tells, once agreed, whether some rank got SIGUSR1: a pre-emption warning (the job
    should run again), not a cancellation.
    """

    def __init__(self) -> None:
        self._requested = False
        self._usr1 = False
        self.requeue = False
        self._vote: tuple[torch.Tensor, object] | None = None
        # One process agrees with itself: no collective (it cost ~0.3 ms of CPU a step at 1 gloo rank).
        self._peers = dist.is_initialized() and dist.get_world_size() > 1
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(signum, self._request)

    def _request(self, signum, frame) -> None:  # a flag only: the step in progress finishes
        self._requested = True
        self._usr1 = self._usr1 or signum == signal.SIGUSR1

    def agreed(self) -> bool:
        """Collective (every rank, every step): whether a rank asked to stop by the previous step."""
        stop = self.close()
        votes = torch.tensor([float(self._requested), float(self._usr1)])
        work = dist.all_reduce(votes, async_op=True) if self._peers else None
        self._vote = (votes, work)
        return stop

    def close(self) -> bool:
        """Wait for the vote in flight (before the process group goes away); its outcome."""
        if self._vote is None:
            return False
        votes, work = self._vote
        if work is not None:
            work.wait()
        self._vote = None
        self.requeue = bool(votes[1] > 0)
        return bool(votes[0] > 0)


def evaluate_in_training(engine, cfg: TrainConfig, spec: ModelSpec, dims: ParallelDims) -> dict[str, float]:
    """Zero-shot metrics of the current weights on ``cfg.eval.datasets``; every rank takes part.

    The ranks split the images and gather the embeddings, so the numbers equal a 1-rank eval. An
    fp32 data-parallel model below ZeRO-3 is evaluated as it is; otherwise every rank evaluates a
    gathered fp32 copy of the full model (ZeRO-3 would need every rank to run the same number of
    forward passes; tensor and pipeline shards are not a model on their own).
    """
    from vlmtrain.eval.suite import evaluate_all, metrics_for_logging

    model = engine.module
    if engine.zero_optimization_stage() == 3 or cfg.precision != "fp32" or dims.tp > 1 or dims.pp > 1 or dims.ep > 1:
        model = spec.build(cfg.model)
        model.load_state_dict(full_state_dict(engine, dims))
        model.to(engine.device)
    records = evaluate_all(model, spec.tokenizer(cfg.model), spec.image_transform(cfg.model, False),
                           cfg.eval.datasets, batch_size=cfg.eval.batch_size, device=engine.device)
    return metrics_for_logging(records)


def _named(module: torch.nn.Module, names) -> list[tuple[str, torch.nn.Parameter]]:
    """This rank's parameters whose name is one of ``names`` or ends in ``.name`` (any wrapper prefix)."""
    return [(key, param) for full, param in module.named_parameters()
            for key in names if full == key or full.endswith(f".{key}")]


class ParameterBounds:
    """Clamp the parameters the family bounds (CLIP's temperature) after each optimizer step.

    The clamp must reach the optimizer's fp32 master copy, or the next step would undo it. A clamp is
    elementwise, so each rank clamps the copies it holds, with no collective: its master partition
    (ZeRO 1/2: a fragment of the flat fp32 partition, maybe empty; ZeRO-3: its partition) and the
    working parameter (replicated below ZeRO-3; at ZeRO-3 its partition, and the full tensor when a
    small parameter stays gathered, "persistent").
    """

    def __init__(self, module: torch.nn.Module, spec: ModelSpec):
        self.bounded = [(param, spec.parameter_bounds[key]) for key, param in _named(module, spec.parameter_bounds)]

    @torch.no_grad()
    def apply(self) -> None:
        from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

        for param, (low, high) in self.bounded:
            if hasattr(param, "ds_id"):
                # DeepSpeed's full-parameter setter fails on parameters smaller than the world.
                safe_set_local_fp32_param(param, safe_get_local_fp32_param(param).clamp(low, high))
                param.ds_tensor.clamp_(low, high)
            elif getattr(param, "_hp_mapping", None) is not None:
                param._hp_mapping.get_hp_fragment().clamp_(low, high)
            param.clamp_(low, high)


def logged_parameters(module: torch.nn.Module, spec: ModelSpec) -> dict[str, float]:
    """Collective: the parameters the family logs (the temperature as the loss sees it), from
    whichever ranks hold them (a pipeline's last stage); gathered under ZeRO."""
    from deepspeed.utils import safe_get_full_fp32_param

    mine = {}
    for key, param in _named(module, spec.logged_parameters):
        master = safe_get_full_fp32_param(param)  # None without ZeRO: the parameter is the master
        mine[key] = spec.logged_parameters[key](float((master if master is not None else param).float().item()))
    merged: dict[str, float] = {}
    for part in all_gather_objects(mine):
        merged.update(part)
    return merged


def check_resumable(sidecar: dict, cfg: TrainConfig, dims: ParallelDims, fingerprint: str) -> None:
    """An exact resume needs the same model, optimizer, seed, layout and data as the checkpoint; the
    layout changes allowed go through DeepSpeed's universal checkpoint (``universal.can_change_layout``)."""
    saved, now = sidecar["config"], to_dict(cfg)
    # Model keys added since the checkpoint was written take their defaults there too.
    saved = {**saved, "model": to_dict(load_model_config(saved["model"]))}
    changed = [key for key in RESUME_INVARIANTS if saved.get(key) != now[key]]
    for key in ("batch_size", "workers"):
        if saved["data"][key] != now["data"][key]:
            changed.append(f"data.{key}")
    if changed:
        raise CheckpointError(f"cannot resume: {', '.join(changed)} differ from the checkpoint's config")
    saved = checkpoint.saved_layout(sidecar)
    if saved != layout_of(dims) and not universal.can_change_layout(saved, layout_of(dims), cfg.zero_stage):
        export_hint = Path(cfg.output_dir) / checkpoint.EXPORT_DIR
        raise CheckpointError(
            f"cannot resume: the checkpoint was written at {_describe(saved)}, this run is "
            f"{_describe(layout_of(dims))}; an exact resume needs the same layout, or (with zero_stage >= 1, "
            f"through DeepSpeed's universal checkpoint) the same dp with only tp changed or the pipeline "
            f"unsplit (pp → 1). To continue in this "
            f"layout, start from the weights with init_from=<an export of that run, e.g. {export_hint}> "
            f"(the optimizer state starts afresh)")
    if sidecar["data_fingerprint"] != fingerprint:
        raise CheckpointError("cannot resume: the training shards changed since the checkpoint "
                              "(names, sizes, weights or order options)")


def _describe(layout: dict) -> str:
    return " × ".join(f"{axis}={layout[axis]}" for axis in ("dp", "tp", "pp", "ep") if axis in layout)
