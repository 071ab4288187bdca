#!/usr/bin/env python
"""Stress the contrastive loss's all-gather as training runs it, under glibc's heap checker.

Each launch starts two gloo ranks that, for ``--seconds``, repeat what a CLIP training step does around
its gathers: take the stop vote (``StopRequest.agreed``: an asynchronous all-reduce left in flight
until the next step), then the forward and backward of ``ClipLoss``, which gathers the image and the
text features with their graph. The ranks run with glibc's checking allocator (``libc_malloc_debug``,
``MALLOC_CHECK_=3``), which aborts on the first corrupted heap chunk it meets. A launch that does not exit
cleanly counts as a crash.

``--gather vlmtrain`` is ``vlmtrain.distributed.collectives.gather_with_grad``; ``funcol`` puts in its place
torch's functional-collective gather it replaced (``all_gather_single``), which corrupted the heap here: ranks
died of SIGSEGV, SIGABRT ("malloc_consolidate(): unaligned fastbin chunk detected") or deadlocked in
up to a third of 4-second launches (2 of 6 at load 1.9, 0 of 10 at load 5.7: it is a race). Crashes come
early in a launch or not at all, so many short launches find them faster than a long one.

Example:
  python tools/stress_gather.py --gather vlmtrain funcol --launches 10 --seconds 4
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MALLOC_DEBUG = Path("/usr/lib/x86_64-linux-gnu/libc_malloc_debug.so.0")
GATHERS = ("vlmtrain", "funcol")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gather", nargs="+", choices=GATHERS, default=["vlmtrain"],
                        help="implementations to stress, launches alternating between them (default: vlmtrain)")
    parser.add_argument("--launches", type=int, default=10, help="launches per implementation (default: 10)")
    parser.add_argument("--seconds", type=float, default=4.0, help="steps for this long per launch (default: 4)")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="a launch still running after this many seconds is a deadlock (default: 120)")
    parser.add_argument("--launch", nargs=3, metavar=("GATHER", "PORT", "SECONDS"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def use_functional_collectives() -> None:
    """Make ``ClipLoss`` gather with torch's ``all_gather_single``, as vlmtrain did before."""
    import torch.distributed as dist
    import torch.distributed._functional_collectives as funcol

    from vlmtrain.models.clip import loss

    loss.gather_with_grad = lambda features, group=None: funcol.all_gather_single(
        features.contiguous(), 0, group or dist.group.WORLD)


def rank_main(rank: int, gather_name: str, port: int, seconds: float) -> None:
    import torch
    import torch.distributed as dist

    from vlmtrain.engine import StopRequest
    from vlmtrain.models.clip.loss import ClipLoss

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if gather_name == "funcol":
        use_functional_collectives()
    stop, towers, loss = StopRequest(), torch.nn.Linear(32, 32), ClipLoss()
    deadline, keep_going = time.monotonic() + seconds, torch.ones(1)
    while keep_going.item() > 0:
        stop.agreed()
        features = torch.nn.functional.normalize(towers(torch.randn(16, 32)), dim=-1)
        loss(features[:8], features[8:], torch.tensor(10.0)).backward()
        towers.zero_grad(set_to_none=True)
        keep_going = torch.tensor([float(time.monotonic() < deadline)])
        dist.all_reduce(keep_going, op=dist.ReduceOp.MIN)  # every rank stops after the same step
    stop.close()
    dist.destroy_process_group()


def one_launch(gather_name: str, port: int, seconds: float) -> None:
    import torch.multiprocessing as mp

    mp.spawn(rank_main, args=(gather_name, port, seconds), nprocs=2, join=True)


def checked_env() -> dict[str, str]:
    if not MALLOC_DEBUG.is_file():
        sys.exit(f"stress_gather: glibc's checking allocator {MALLOC_DEBUG} is missing (glibc >= 2.34 ships it)")
    return {**os.environ, "LD_PRELOAD": str(MALLOC_DEBUG), "MALLOC_CHECK_": "3", "OMP_NUM_THREADS": "1"}


def crash_reason(result: subprocess.CompletedProcess | None) -> str:
    if result is None:
        return "deadlock (timed out)"
    # glibc's message ends without a newline, so the next line of stderr runs on after it.
    found = re.findall(r"\w+\(\)[^\n]*?(?:detected|corrupted)|terminated with signal \w+", result.stderr)
    return "; ".join(found[:2]) or f"exit code {result.returncode}"


def stress(gathers: list[str], launches: int, seconds: float, timeout: float) -> dict[str, list[str]]:
    """``{gather: [crash reason per crashed launch]}``, launches alternating between the gathers."""
    from vlmtrain.distributed.env import free_port

    env, crashes = checked_env(), {name: [] for name in gathers}
    for number in range(launches):
        for name in gathers:
            command = [sys.executable, __file__, "--launch", name, str(free_port()), str(seconds)]
            try:
                result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                result = None
            crashed = result is None or result.returncode != 0
            if crashed:
                crashes[name].append(crash_reason(result))
            print(f"launch {number + 1}/{launches} {name}: {'CRASH' if crashed else 'ok'}", flush=True)
    return crashes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.launch:
        one_launch(args.launch[0], int(args.launch[1]), float(args.launch[2]))
        return 0
    crashes = stress(args.gather, args.launches, args.seconds, args.timeout)
    print(f"load average {os.getloadavg()[0]:.2f}; {args.launches} launches of {args.seconds:g} s each")
    for name, reasons in crashes.items():
        print(f"{name}: {len(reasons)}/{args.launches} launches crashed")
        for reason in reasons:
            print(f"  {reason}")
    return 1 if any(crashes.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
