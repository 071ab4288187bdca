"""Discover the distributed environment in one place.

Three launchers start our ranks: torchrun and the deepspeed launcher export RANK/WORLD_SIZE/
LOCAL_RANK/MASTER_*; ``srun`` (one task per GPU) exports SLURM_PROCID/NTASKS/LOCALID/NODEID and the
job's node list, from which the master (the first node) and a port (from the job id, so two jobs
sharing a node do not collide) follow. Without a launcher we run as one local process. Whatever
was found is written back as RANK/WORLD_SIZE/... so ``torch.distributed``'s env:// init reads it.
"""
from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

from vlmtrain.errors import ConfigError

# Ports derived from a SLURM job id fall in [BASE, BASE + SPAN): above the usual services, below
# Linux's ephemeral range (32768+), so an outgoing connection does not hold them by chance.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 10000


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    node: str            # the node's name as the scheduler knows it (SLURMD_NODENAME), else the hostname
    launcher: str        # "torchrun" (torchrun or deepspeed), "srun" or "none"
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_launched(env: Mapping[str, str] | None = None) -> bool:
    """True inside a process started by a distributed launcher (torchrun, deepspeed, srun)."""
    return read_env(os.environ if env is None else env).launcher != "none"


def read_env(env: Mapping[str, str]) -> DistEnv:
    """The rank layout ``env`` describes (pure: the environment is passed in)."""
    node = env.get("SLURMD_NODENAME") or socket.gethostname()
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun / deepspeed, also when they run inside srun
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")), node,
                       "torchrun", env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")))
    # SLURM_STEP_ID tells an srun task from the batch script, which has SLURM_PROCID=0 too.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
        master = env.get("MASTER_ADDR") or first_host(env["SLURM_JOB_NODELIST"])
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else port_for_job(env["SLURM_JOB_ID"])
        return DistEnv(int(env["SLURM_PROCID"]), world, int(env["SLURM_LOCALID"]), node, "srun", master, port)
    return DistEnv(0, 1, 0, node, "none", "127.0.0.1", 0)


def discover() -> DistEnv:
    """Read the layout and export it for env:// initialization; no launcher: rank 0 of 1 on a free port."""
    found = read_env(os.environ)
    if found.launcher == "none":
        found = DistEnv(0, 1, 0, found.node, "none", os.environ.get("MASTER_ADDR", "127.0.0.1"),
                        int(os.environ.get("MASTER_PORT") or free_port()))
    os.environ.update(RANK=str(found.rank), WORLD_SIZE=str(found.world_size), LOCAL_RANK=str(found.local_rank),
                      MASTER_ADDR=found.master_addr, MASTER_PORT=str(found.master_port))
    return found


def port_for_job(job_id: str) -> int:
    return SLURM_PORT_BASE + int(job_id) % SLURM_PORT_SPAN


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list, expanded: ``gpu[01-03,7],login1`` → gpu01 gpu02 gpu03 gpu7 login1
    (zero padding kept, as ``scontrol show hostnames`` does; one bracket per name)."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)?", nodelist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            bounds = _RANGE.match(item)
            if not bounds:
                raise ConfigError(f"SLURM node list {nodelist!r}: cannot read the range {item!r}")
            low, high = bounds.group(1), bounds.group(2) or bounds.group(1)
            hosts += [f"{prefix}{number:0{len(low)}d}{suffix}" for number in range(int(low), int(high) + 1)]
    if not hosts:
        raise ConfigError(f"SLURM node list {nodelist!r} names no host")
    return hosts


def first_host(nodelist: str) -> str:
    return expand_nodelist(nodelist)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
