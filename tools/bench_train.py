#!/usr/bin/env python
"""Benchmark vlm-train against open_clip_train, and ZeRO's per-rank memory, in one run.

Throughput: both trainers train the same architecture (the resolved ``model`` of --config,
default the demo's tiny CLIP) with the same batch size, fp32, data-loader workers, optimizer
settings and number of processes (1: open_clip_train cannot run 2 processes on CPU, its DDP
wrapper needs GPUs). vlm-train reads JPEG webdataset shards made by tools/make_demo_data.py;
open_clip_train uses ``--dataset-type synthetic`` (one blank PIL image, no decoding; its
webdataset path needs webdataset <= 0.2). Each reports samples/s over all steps but the first
(ours: ``train_summary.json``; open_clip_train: its per-step ``Batch (t)`` log lines). Peak RSS
of each rank process (and with its loader workers) is polled with psutil.

Memory: for a ViT-B/16 (our ``vit_b_16`` preset) on 2 gloo ranks, each ZeRO stage is really
initialised through vlm-train's own model/optimizer/DeepSpeed-config builders and trained two
steps; every live tensor storage of the rank is then counted (after the second backward, before
its optimizer step, when parameters, gradients and optimizer state are all held) and compared
with the ideal of that stage (ZeRO paper, fp32 + Adam: 4 B params + 4 B grads + 8 B state).

Example:
  python tools/bench_train.py                       # both parts, ~10 min on 2 CPU cores
  python tools/bench_train.py --skip-zero-memory --steps 40
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
GIB = 1024 ** 3
OPENCLIP_STEP = re.compile(r"Batch \(t\): [\d.]+, ([\d.]+)/s")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.zero_worker is not None:
        return zero_memory_worker(args.zero_worker, args.zero_model, Path(args.zero_out))
    env = bench_env()
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    if not args.skip_throughput:
        report_throughput(args, work, env)
    if not args.skip_zero_memory:
        report_zero_memory(args, work, env)
    print(f"load average {os.getloadavg()[0]:.2f} at end")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train/demo.yaml", help="vlm-train config giving the model")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per trainer (first is not timed)")
    parser.add_argument("--batch-size", type=int, default=64, help="batch size of both trainers")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of both trainers; the best of each is reported")
    parser.add_argument("--workers", type=int, default=1, help="data-loader workers of both trainers")
    parser.add_argument("--zero-stage", type=int, default=0, choices=(0, 1, 2, 3),
                        help="ZeRO stage of our 1-process run (default 0: with one process there is "
                             "nothing to partition, and ZeRO-1/2 bookkeeping only adds time)")
    parser.add_argument("--context-length", type=int, default=32, help="text context of both models")
    parser.add_argument("--num-train", type=int, default=2000, help="generated training pairs for vlm-train")
    parser.add_argument("--work-dir", type=Path, default=REPO / "build" / "bench_train")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-zero-memory", action="store_true")
    parser.add_argument("--zero-model", default="vit_b_16", help="preset measured for ZeRO memory")
    parser.add_argument("--zero-worker", type=int, help=argparse.SUPPRESS)  # internal: one rank of one stage
    parser.add_argument("--zero-out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def bench_env() -> dict[str, str]:
    build = REPO / "build"
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "TORCH_EXTENSIONS_DIR": str(build / "torch_extensions"), "MPLCONFIGDIR": str(build / "matplotlib"),
            "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------- throughput


@dataclass
class RunResult:
    samples_per_s: float
    timed_steps: int
    peak_rss_gib: float  # the rank process
    peak_rss_with_workers_gib: float  # rank + loader workers (shared pages counted once per process)
    wall_s: float


class PeakRss:
    """Polls a process tree's resident memory until stopped; keeps the root's and the tree's peaks."""

    def __init__(self, pid: int, interval_s: float = 0.1):
        self.root, self.interval_s = psutil.Process(pid), interval_s
        self.root_peak = self.tree_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                root = self.root.memory_info().rss
                tree = root + sum(child.memory_info().rss for child in self.root.children(recursive=True))
            except psutil.Error:  # a process ended between listing and reading
                continue
            self.root_peak, self.tree_peak = max(self.root_peak, root), max(self.tree_peak, tree)
            self._stop.wait(self.interval_s)

    def stop(self) -> tuple[float, float]:
        self._stop.set()
        self._thread.join()
        return self.root_peak / GIB, self.tree_peak / GIB


def run_measured(command: list[str], env: dict, log: Path) -> tuple[str, float, float, float]:
    started = time.perf_counter()
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        rss = PeakRss(process.pid)
        code = process.wait()
    root_peak, tree_peak = rss.stop()
    text = log.read_text()
    if code != 0:
        sys.exit(f"bench_train: {command[0]} failed (exit {code}); last lines of {log}:\n{text[-3000:]}")
    return text, root_peak, tree_peak, time.perf_counter() - started


def report_throughput(args: argparse.Namespace, work: Path, env: dict) -> None:
    from vlmtrain.config import load_train_config

    data = work / "data"
    if not (data / "manifest.json").is_file():
        print(f"generating {args.num_train} training pairs in {data} ...")
        subprocess.run([sys.executable, str(REPO / "tools/make_demo_data.py"), "--out", str(data), "--seed", "0",
                        "--num-train", str(args.num_train), "--samples-per-shard", "500",
                        "--eval-per-class", "1", "--force"], cwd=REPO, env=env, check=True,
                       capture_output=True)
    warmup = min(10, args.steps)
    overrides = [f"data.train_shards={data / 'train'}", f"data.batch_size={args.batch_size}",
                 f"data.workers={args.workers}", f"steps={args.steps}", f"zero_stage={args.zero_stage}",
                 "precision=fp32", f"model.text.context_length={args.context_length}",
                 f"optim.warmup_steps={warmup}", f"output_dir={work / 'ours'}", "progress=false"]
    cfg = load_train_config(REPO / args.config, overrides)

    ours_cmd = [str(VENV_BIN / "vlm-train"), "--config", args.config, "--nproc-per-node", "1", *overrides]
    theirs_cmd = openclip_train_command(cfg, args, work, warmup)
    ours = theirs = None
    # Alternate the trainers and keep each one's best round: load from other jobs hits both alike.
    for round_ in range(1, args.rounds + 1):
        print(f"round {round_}/{args.rounds}: vlm-train, then open_clip_train, {args.steps} steps each ...",
              flush=True)
        ours = best(ours, run_ours(ours_cmd, work, env))
        theirs = best(theirs, run_openclip_train(theirs_cmd, work, env, args))
    print_throughput(cfg, args, ours, theirs, ours_cmd, theirs_cmd)


def run_ours(command: list[str], work: Path, env: dict) -> RunResult:
    shutil.rmtree(work / "ours", ignore_errors=True)
    _, root, tree, wall = run_measured(command, env, work / "ours.log")
    summary = json.loads((work / "ours" / "train_summary.json").read_text())
    return RunResult(summary["samples_per_s"], summary["steps"] - 1, root, tree, wall)


def run_openclip_train(command: list[str], work: Path, env: dict, args: argparse.Namespace) -> RunResult:
    shutil.rmtree(work / "open_clip_logs", ignore_errors=True)
    text, root, tree, wall = run_measured(command, env, work / "open_clip_train.log")
    step_rates = [float(m) for m in OPENCLIP_STEP.findall(text)]
    if len(step_rates) != args.steps:
        sys.exit(f"bench_train: expected {args.steps} step lines in {work / 'open_clip_train.log'}, "
                 f"found {len(step_rates)}")
    timed = step_rates[1:]  # same rule as ours: the first step is not timed
    return RunResult(len(timed) * args.batch_size / sum(args.batch_size / r for r in timed),
                     len(timed), root, tree, wall)


def best(current: RunResult | None, new: RunResult) -> RunResult:
    if current is None:
        return new
    fastest = max(current, new, key=lambda r: r.samples_per_s)
    return RunResult(fastest.samples_per_s, fastest.timed_steps, max(current.peak_rss_gib, new.peak_rss_gib),
                     max(current.peak_rss_with_workers_gib, new.peak_rss_with_workers_gib), fastest.wall_s)


def openclip_train_command(cfg, args: argparse.Namespace, work: Path, warmup: int) -> list[str]:
    """open_clip_train on the same architecture: its config goes in a local-dir model folder."""
    from open_clip.transform import PreprocessCfg

    from vlmtrain.models.clip.openclip import OPENCLIP_CONFIG_FILE, openclip_model_config

    model_dir = work / "open_clip_model"
    model_dir.mkdir(exist_ok=True)
    config = {"model_cfg": openclip_model_config(cfg.model),
              "preprocess_cfg": asdict(PreprocessCfg(size=cfg.model.vision.image_size))}
    (model_dir / OPENCLIP_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    optim = cfg.optim
    return [sys.executable, "-m", "open_clip_train.main", "--model", f"local-dir:{model_dir}",
            "--dataset-type", "synthetic", "--train-num-samples", str(args.steps * args.batch_size),
            "--batch-size", str(args.batch_size), "--epochs", "1", "--precision", "fp32", "--device", "cpu",
            "--workers", str(args.workers), "--lr", str(optim.lr), "--wd", str(optim.weight_decay),
            "--beta1", str(optim.beta1), "--beta2", str(optim.beta2), "--eps", str(optim.eps),
            "--warmup", str(warmup), "--seed", str(cfg.seed), "--log-every-n-steps", "1",
            "--save-frequency", "0", "--report-to", "", "--logs", str(work / "open_clip_logs"),
            "--name", "bench"]


def print_throughput(cfg, args, ours: RunResult, theirs: RunResult, ours_cmd, theirs_cmd) -> None:
    m = cfg.model
    print(f"\n== training throughput: tiny CLIP (vision w{m.vision.width} x{m.vision.layers} patch "
          f"{m.vision.patch_size} {m.vision.image_size}px, text w{m.text.width} x{m.text.layers} ctx "
          f"{m.text.context_length}), batch {args.batch_size}, fp32, 1 process, {args.workers} loader worker(s), best of {args.rounds} alternating rounds")
    print(f"{'trainer':<34}{'samples/s':>10}{'timed steps':>13}{'peak RSS rank':>15}{'+workers':>10}{'wall s':>8}")
    for name, r in ((f"vlm-train (ZeRO {args.zero_stage}, JPEG shards)", ours),
                    ("open_clip_train (synthetic)", theirs)):
        print(f"{name:<34}{r.samples_per_s:>10.0f}{r.timed_steps:>13}{r.peak_rss_gib:>13.2f}Gi"
              f"{r.peak_rss_with_workers_gib:>8.2f}Gi{r.wall_s:>8.0f}")
    print(f"ratio vlm-train / open_clip_train: {ours.samples_per_s / theirs.samples_per_s:.2f}x (target >= 1.10x)")
    print(f"ours:   {shlex.join(ours_cmd)}\ntheirs: {shlex.join(theirs_cmd)}")


# ---------------------------------------------------------------- ZeRO memory


def report_zero_memory(args: argparse.Namespace, work: Path, env: dict) -> None:
    results = {}
    for stage in tqdm(range(4), desc="ZeRO stages (2 ranks each)", unit="stage"):
        outs = [work / f"zero{stage}_rank{r}.json" for r in range(2)]
        for out in outs:
            out.unlink(missing_ok=True)
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                   f"--master_port={29700 + stage}", str(Path(__file__).resolve()), "--zero-model", args.zero_model,
                   "--zero-worker", str(stage), "--zero-out", str(work / f"zero{stage}_rank{{rank}}.json")]
        log = work / f"zero{stage}.log"
        with log.open("w") as out:
            code = subprocess.run(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            sys.exit(f"bench_train: ZeRO {stage} measurement failed (exit {code}); see {log}:\n"
                     f"{log.read_text()[-3000:]}")
        results[stage] = [json.loads(out.read_text()) for out in outs]
    print_zero_memory(results)


def zero_memory_worker(stage: int, model_name: str, out_pattern: Path) -> None:
    """One rank: build vlm-train's model, optimizer and DeepSpeed config at ``stage``; count tensor bytes."""
    import deepspeed
    import torch

    from vlmtrain.config import load_train_config
    from vlmtrain.distributed.deepspeed_config import build_deepspeed_config
    from vlmtrain.models.registry import spec_of
    from vlmtrain.optim import build_optimizer

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    cfg = load_train_config(None, [f"model.preset={model_name}", f"zero_stage={stage}", "data.train_shards=unused",
                                   "data.batch_size=1", "steps=2", "optim.warmup_steps=0", "output_dir=unused"])
    torch.manual_seed(0)
    spec = spec_of(cfg.model)
    model = spec.build(cfg.model)
    num_params = sum(p.numel() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg.optim, spec.no_weight_decay),
                                      config=build_deepspeed_config(cfg, cfg.parallel_dims(1), spec.tp_plan, model))
    loss_fn = spec.build_loss(cfg.model, None)
    images = torch.randn(1, 3, cfg.model.vision.image_size, cfg.model.vision.image_size)
    tokens = torch.randint(1, 49407, (1, cfg.model.text.context_length))
    counts = {}
    for step in range(2):
        out = engine(images, tokens)
        engine.backward(loss_fn(out)["loss"])
        if step == 1:  # optimizer state exists since step 0; gradients are held until this step
            counts = count_model_state_bytes(engine)
        engine.step()
    counts.update(rank=rank, stage=stage, world_size=torch.distributed.get_world_size(), num_params=num_params,
                  rss_gib=psutil.Process().memory_info().rss / GIB)
    Path(str(out_pattern).format(rank=rank)).write_text(json.dumps(counts))


def count_model_state_bytes(engine) -> dict:
    """Bytes of every live tensor storage on this rank, split into parameters, fp32 master copies,
    optimizer state and the rest (gradients, their partitions and reduction buckets)."""
    import torch

    def storages(tensors) -> dict[int, int]:
        found = {}
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().nbytes():
                found[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return found

    zero_opt = engine.optimizer
    torch_opt = getattr(zero_opt, "optimizer", zero_opt)
    params = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
    masters = [*getattr(zero_opt, "single_partition_of_fp32_groups", []),  # ZeRO 1/2
               *getattr(zero_opt, "fp32_partitioned_groups_flat", [])]  # ZeRO 3
    state = [v for s in torch_opt.state.values() for v in s.values()]
    with warnings.catch_warnings():  # isinstance() touches deprecated torch.distributed aliases
        warnings.simplefilter("ignore", FutureWarning)
        everything = storages(o for o in gc.get_objects() if isinstance(o, torch.Tensor))
    parts = {"params": storages(params), "fp32_master": storages(masters), "optimizer_state": storages(state)}
    for name in ("fp32_master", "optimizer_state"):  # a storage is counted in its first category only
        parts[name] = {k: v for k, v in parts[name].items() if k not in parts["params"]}
    claimed = set().union(*parts.values())
    result = {name: sum(found.values()) for name, found in parts.items()}
    result["grads_and_buffers"] = sum(v for k, v in everything.items() if k not in claimed)
    result["total"] = sum(everything.values())
    result["large_buffers"] = large_optimizer_buffers(zero_opt, claimed, storages)
    return result


def large_optimizer_buffers(zero_opt, claimed: set[int], storages) -> dict[str, int]:
    """Which attributes of DeepSpeed's ZeRO optimizer hold the unclaimed bytes (>= 64 MiB each)."""
    import torch

    found = {}
    for name, value in vars(zero_opt).items():
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        # One level down: lists of tensors, or small objects such as reduction buckets (.buffer).
        tensors = [t for item in items
                   for t in (item if isinstance(item, (list, tuple))
                             else vars(item).values() if hasattr(item, "__dict__") and not isinstance(item, torch.Tensor)
                             else [item])
                   if isinstance(t, torch.Tensor)]
        size = sum(v for k, v in storages(tensors).items() if k not in claimed)
        if size >= 64 * 2 ** 20:
            found[name] = size
    return found


def ideal_bytes(stage: int, num_params: int, dp: int) -> float:
    """ZeRO paper's per-rank model state for fp32 + Adam: params 4, grads 4, optimizer state 8 bytes each."""
    params, grads, states = 4.0 * num_params, 4.0 * num_params, 8.0 * num_params
    return {0: params + grads + states, 1: params + grads + states / dp, 2: params + (grads + states) / dp,
            3: (params + grads + states) / dp}[stage]


def print_zero_memory(results: dict[int, list[dict]]) -> None:
    first = results[0][0]
    n, dp = first["num_params"], first["world_size"]
    print(f"\n== per-rank model state, {n / 1e6:.1f}M params (ViT-B/16), {dp} gloo ranks, fp32 + AdamW, "
          f"GiB (max over ranks)")
    print(f"{'stage':<7}{'params':>8}{'master':>8}{'optim':>8}{'grads+buf':>11}{'total':>8}{'ideal':>8}"
          f"{'tot/ideal':>11}{'tot/(16Ψ/dp)':>14}{'RSS':>7}")
    for stage, ranks in results.items():
        worst = max(ranks, key=lambda r: r["total"])
        ideal = ideal_bytes(stage, n, dp)
        print(f"{stage:<7}{worst['params'] / GIB:>8.2f}{worst['fp32_master'] / GIB:>8.2f}"
              f"{worst['optimizer_state'] / GIB:>8.2f}{worst['grads_and_buffers'] / GIB:>11.2f}"
              f"{worst['total'] / GIB:>8.2f}{ideal / GIB:>8.2f}{worst['total'] / ideal:>11.2f}"
              f"{worst['total'] / (16 * n / dp):>14.2f}{max(r['rss_gib'] for r in ranks):>7.2f}")
    for stage, ranks in results.items():
        buffers = ", ".join(f"{name} {size / GIB:.2f}" for name, size in ranks[0]["large_buffers"].items())
        print(f"ZeRO {stage} optimizer buffers in grads+buf (GiB): {buffers or 'none >= 64 MiB'}")


if __name__ == "__main__":
    main()
