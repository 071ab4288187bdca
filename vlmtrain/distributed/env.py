"""Discover the distributed environment in one place.

torchrun and the deepspeed launcher both export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; without
a launcher we run as one local process.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def is_launched() -> bool:
    """True inside a process started by a distributed launcher."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def discover() -> DistEnv:
    """Read rank and world size; a process with no launcher becomes rank 0 of 1."""
    env = os.environ
    if not is_launched():
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(free_port()))
    return DistEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                   local_rank=int(env.get("LOCAL_RANK", "0")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
