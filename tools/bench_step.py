#!/usr/bin/env python
"""The trainer's fixed cost per optimizer step: what a step costs beyond the model's own work.

Each rank builds the model, optimizer and DeepSpeed engine exactly as ``vlm-train`` does (the same
spec, optimizer and DeepSpeed-config builders), then runs the training loop's per-step work — the
engine's ``train_step`` on an in-memory batch (no data loading in the timing), the parameter
clamp, the throughput meter, the pre-emption vote, and every ``--log-every`` steps the exact
logged metrics — at several batch sizes. Step time is fitted as ``intercept + slope × batch``; the
intercept is the per-step cost that no batch amortizes. From it we subtract the optimizer's own
update (the trainer's fused AdamW and parameter groups on the same parameters, timed alone in each
round), which a step cannot avoid; what is left is the fixed cost. Rounds alternate over the
variants (``--variants``) and batch sizes, and the median per batch size is used. ``model-only``
times the model's forward, loss and backward alone: the part of the fixed cost that is the model's
own (eager per-op cost), which no trainer change removes. ``compiled`` and ``compiled-model-only`` are
``vlm-train`` and ``model-only`` with the model compiled by torch.compile (inductor, in place, one
graph with a dynamic batch for every batch size; ``compiled`` prints its compile time).

Example:
  python tools/bench_step.py                      # 2 gloo ranks, ZeRO 2 (the demo's layout)
  python tools/bench_step.py --nproc 1 --zero-stage 0 --clock cpu --variants vlm-train,dense-embedding,model-only
  python tools/bench_step.py --nproc 1 --zero-stage 0 --clock cpu --variants vlm-train,compiled,model-only,compiled-model-only
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VARIANTS = ("vlm-train", "compiled", "dense-embedding", "5e7-bucket", "model-only", "compiled-model-only")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train/demo.yaml", help="vlm-train config giving the model")
    parser.add_argument("--nproc", type=int, default=2, help="gloo ranks (default 2)")
    parser.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    parser.add_argument("--batch-sizes", default="8,16,32,64", help="micro-batch sizes per rank")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per batch size and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds over the batch sizes")
    parser.add_argument("--log-every", type=int, default=10, help="steps between exact metric syncs, as in training")
    parser.add_argument("--variants", default="vlm-train", type=lambda text: text.split(","),
                        help="comma-separated, alternating in each round: vlm-train (the trainer's step), "
                             "compiled (the same with the model compiled by torch.compile, as compile=true; "
                             "one graph with a dynamic batch serves every batch size), dense-embedding (the same with nn.Embedding's dense gradient, as before "
                             "embedding_grads.py), 5e7-bucket (ZeRO buckets of 5e7 elements whatever the "
                             "model, as before deepspeed_config.bucket_elements), model-only (forward, loss "
                             "and backward alone), compiled-model-only (the same, the model compiled)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: step time; cpu: this process's CPU time per step, steadier on a shared "
                             "machine (one rank only: it does not count waiting for peers)")
    args = parser.parse_args(argv)
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}; choose from {', '.join(VARIANTS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                      TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / "build" / "torch_extensions")))
    import torch.multiprocessing as mp

    from vlmtrain.distributed.env import free_port

    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(rank_worker, args=(args, free_port(), out), nprocs=args.nproc, join=True)
        result = json.loads((Path(out) / "rank0.json").read_text())
    report(result, args)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


def rank_worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(args.nproc))
    import deepspeed
    import torch

    from vlmtrain.config import load_train_config
    from vlmtrain.distributed.parallel_dims import build_process_groups

    deepspeed.init_distributed(dist_backend="gloo")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    cfg = load_train_config(args.config, ["data.train_shards=unused", f"zero_stage={args.zero_stage}",
                                          f"data.batch_size={batch_sizes[0]}", "optim.warmup_steps=1"])
    dims = cfg.parallel_dims(args.nproc)
    groups = build_process_groups(dims, rank)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    variants = {variant: (model_loop(cfg, clock, compiled=variant.startswith("compiled")) if model_only(variant)
                          else trainer_loop(variant, cfg, dims, groups, clock, args.log_every))
                for variant in args.variants}

    update = optimizer_alone(cfg, clock)
    for timed_steps in variants.values():  # warm-up: allocator, lazy init, first collectives
        for size in batch_sizes:
            timed_steps(size, 3)
    update(3)
    # Per round and batch size: the median step and, less sensitive to other jobs on the machine, the fastest.
    rounds = {variant: {size: [] for size in batch_sizes} for variant in variants}
    fastest = {variant: {size: [] for size in batch_sizes} for variant in variants}
    updates, fastest_updates, faults = [], [], {variant: [] for variant in variants}
    for _ in range(args.rounds):
        for variant, timed_steps in variants.items():
            for size in batch_sizes:
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                times = timed_steps(size, args.steps)
                faults[variant].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / args.steps)
                rounds[variant][size].append(statistics.median(times))
                fastest[variant][size].append(min(times))
        times = update(args.steps)
        updates.append(statistics.median(times))
        fastest_updates.append(min(times))
    if rank == 0:
        (Path(out) / "rank0.json").write_text(json.dumps({
            "rounds": rounds, "optimizer_s": statistics.median(updates),
            "fastest": fastest, "fastest_optimizer_s": statistics.median(fastest_updates),
            "faults": {variant: statistics.median(counts) for variant, counts in faults.items()},
            "layout": dims.describe(), "zero_stage": args.zero_stage}))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def model_only(variant: str) -> bool:
    """The variants timing the model alone (no engine, no optimizer: nothing to subtract)."""
    return variant.endswith("model-only")


def trainer_loop(variant: str, cfg, dims, groups, clock, log_every: int):
    """A model, optimizer and engine built as vlm-train builds them (``dense-embedding``: with
    nn.Embedding's own dense gradient; ``5e7-bucket``: with ZeRO buckets not sized to the model),
    and a function timing ``steps`` steps of its loop."""
    import deepspeed
    import torch

    from vlmtrain import engine as trainer
    from vlmtrain.distributed.deepspeed_config import (BUCKET_ELEMENTS, build_deepspeed_config,
                                                       trainer_clips_gradients, trainer_owns_gradients)
    from vlmtrain.embedding_grads import EmbeddingGradients
    from vlmtrain.metrics import count_flops_per_sample
    from vlmtrain.models.registry import spec_of
    from vlmtrain.optim import GradientClipper, build_optimizer, build_scheduler
    from vlmtrain.step import train_step

    spec = spec_of(cfg.model)
    torch.manual_seed(cfg.seed)
    model = spec.build(cfg.model)
    optimizer = build_optimizer(model, cfg.optim, spec.no_weight_decay)
    config = build_deepspeed_config(cfg, dims, spec.tp_plan, model)
    if variant == "5e7-bucket":
        config["zero_optimization"].update(reduce_bucket_size=BUCKET_ELEMENTS, allgather_bucket_size=BUCKET_ELEMENTS)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      lr_scheduler=build_scheduler(optimizer, cfg.optim, 10**6), config=config)
    if dims.dp == 1 and cfg.zero_stage == 0:
        engine.enable_backward_allreduce = False  # as the trainer does
    if variant == "compiled":
        started = time.perf_counter()
        engine.compile(compile_kwargs={"dynamic": True})
    rows = trainer_owns_gradients(cfg, dims) and variant != "dense-embedding"
    embedding_grads = EmbeddingGradients(engine.module) if rows else None  # as the trainer does
    clipper = (GradientClipper(engine.module, cfg.optim.grad_clip, embedding_grads)
               if trainer_clips_gradients(cfg, dims) else None)
    loss_fn = spec.build_loss(cfg.model, groups.dp)
    bounds = trainer.ParameterBounds(engine.module, spec)
    stop = trainer.StopRequest()
    meter = trainer.ThroughputMeter(count_flops_per_sample(spec, cfg.model), None, dims.dp)
    if variant == "compiled":  # compiles now (the first call), not in the warm-up; reported with its time
        train_step(engine, batches(spec, cfg.model, 2), loss_fn, torch.float32, 1, clipper,
                   embedding_grads=embedding_grads)
        print(f"rank {torch.distributed.get_rank()}: compiled in {time.perf_counter() - started:.0f} s "
              f"(wall, first step included)", flush=True)

    def timed_steps(size: int, steps: int) -> list[float]:
        source, times = batches(spec, cfg.model, size), []
        for step in range(1, steps + 1):
            started = clock()
            result = train_step(engine, source, loss_fn, torch.float32, cfg.optim.grad_accum_steps, clipper,
                                embedding_grads=embedding_grads)
            bounds.apply()
            meter.add(result, first=False)
            if step % log_every == 0:  # the exact metrics of a log step, amortized as in training
                trainer.mean_losses(result.losses, groups)
                trainer.logged_parameters(engine.module, spec)
                meter.report()
                if clipper:
                    clipper.norm()
            stop.agreed()
            times.append(clock() - started)
        return times

    return timed_steps


def model_loop(cfg, clock, compiled: bool):
    """The model's own work in a step, the floor under the trainer's: forward, loss and backward of
    the same model (its embeddings' backward returning rows, as in vlm-train at one process, ZeRO 0),
    gradients dropped; no engine, no optimizer. ``compiled``: the model compiled as ``compiled``'s."""
    import torch

    from vlmtrain.embedding_grads import EmbeddingGradients
    from vlmtrain.models.registry import spec_of

    spec = spec_of(cfg.model)
    torch.manual_seed(cfg.seed)
    model = spec.build(cfg.model)
    EmbeddingGradients(model)
    loss_fn = spec.build_loss(cfg.model, None)
    parameters = list(model.parameters())
    if compiled:
        model.compile(dynamic=True)

    def timed_steps(size: int, steps: int) -> list[float]:
        source, times = batches(spec, cfg.model, size), []
        for _ in range(steps):
            started = clock()
            batch = next(source)
            loss_fn(model(batch.images, batch.tokens, **batch.extras))["loss"].backward()
            for p in parameters:
                p.grad = None
            times.append(clock() - started)
        return times

    return timed_steps


def batches(spec, model_cfg, size: int):
    """One in-memory batch of ``size`` samples, forever."""
    import torch

    from vlmtrain.data import Batch

    inputs = spec.example_inputs(model_cfg, size)
    images = torch.randn_like(inputs["images"])
    tokens = torch.randint(1, 49000, inputs["tokens"].shape)
    tokens[:, -1] = 49407  # an end-of-text token for the pooling
    extras = {}
    if spec.sample_inputs:  # the family's per-sample inputs (masks…), made as the loader makes them
        make = spec.sample_inputs(model_cfg)
        samples = [make(image, caption) for image, caption in zip(images, tokens)]
        extras = {name: torch.stack([sample[name] for sample in samples]) for name in samples[0]}
    batch = Batch(images, tokens, [f"k{i}" for i in range(size)], 0, extras)
    while True:
        yield batch


def optimizer_alone(cfg, clock):
    """The trainer's optimizer (``build_optimizer``: fused AdamW, its parameter groups) over the same
    parameters with gradients in place: the update every step pays. Returns a function timing steps."""
    import torch

    from vlmtrain.models.registry import spec_of
    from vlmtrain.optim import build_optimizer

    spec = spec_of(cfg.model)
    model = spec.build(cfg.model)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = build_optimizer(model, cfg.optim, spec.no_weight_decay)

    def timed_steps(steps: int) -> list[float]:
        times = []
        for _ in range(steps):
            started = clock()
            optimizer.step()
            times.append(clock() - started)
        return times

    return timed_steps


def report(result: dict, args: argparse.Namespace) -> None:
    print(f"{args.nproc} rank(s), {result['layout']}, ZeRO {result['zero_stage']}, {args.config}, {args.clock} clock")
    for variant, rounds in result["rounds"].items():
        print(f"== {variant}: batch/rank, step ms (median of rounds), rounds")
        for size in sorted(rounds, key=int):
            print(f"{size:>10}  {1e3 * statistics.median(rounds[size]):>8.1f}  "
                  + ", ".join(f"{1e3 * t:.1f}" for t in rounds[size]))
    print(f"optimizer update alone (the trainer's fused AdamW and groups, same parameters, median of "
          f"rounds): {1e3 * result['optimizer_s']:.1f} ms")
    print("-- fit through each round's median step, median over rounds:")
    fit_table(result["rounds"], result["optimizer_s"])
    print("-- the same through each round's fastest step (less sensitive to other jobs on the machine):")
    fit_table(result["fastest"], result["fastest_optimizer_s"])
    print("minor page faults per step (median over rounds and batch sizes, rank 0): "
          + ", ".join(f"{variant} {count:.0f}" for variant, count in result["faults"].items()))


def fit_table(per_variant: dict, optimizer: float) -> None:
    """``step = intercept + slope × batch`` through the medians over rounds; fixed cost = intercept − update."""
    import numpy as np

    fits = {}
    for variant, rounds in per_variant.items():
        sizes = sorted(int(size) for size in rounds)
        fits[variant] = np.polyfit(sizes, [statistics.median(rounds[str(size)]) for size in sizes], 1)
    floor = fits["model-only"][1] if "model-only" in fits else None
    print(f"{'':<16}  intercept  slope/sample  fixed cost (intercept − update)"
          + ("  of which beyond the model's forward+backward" if floor is not None else ""))
    for variant, (slope, intercept) in fits.items():
        fixed = intercept if model_only(variant) else intercept - optimizer
        beyond = "" if floor is None or model_only(variant) else f"  {1e3 * (fixed - floor):>10.1f} ms"
        print(f"{variant:<16}  {1e3 * intercept:>6.1f} ms  {1e3 * slope:>9.2f} ms  {1e3 * fixed:>10.1f} ms{beyond}")


if __name__ == "__main__":
    main()
