"""Where each rank runs: node, local rank and its (stage, dp, tp) coordinates, written to the run
directory (``rank_map.json``) so a layout can be checked, e.g. that every tensor-parallel group
shares a node."""
from __future__ import annotations

from pathlib import Path

from vlmtrain import atomic
from vlmtrain.distributed.collectives import all_gather_objects
from vlmtrain.distributed.env import DistEnv
from vlmtrain.distributed.parallel_dims import ParallelDims

RANK_MAP_FILE = "rank_map.json"


def gather_rank_map(env: DistEnv, dims: ParallelDims) -> list[dict]:
    """Collective: one entry per rank, by rank."""
    stage, dp_rank, tp_rank = dims.coordinates(env.rank)
    return all_gather_objects({"rank": env.rank, "node": env.node, "local_rank": env.local_rank,
                               "pp": stage, "dp": dp_rank, "tp": tp_rank, "launcher": env.launcher})


def write_rank_map(run_dir: Path, entries: list[dict]) -> str:
    """Write the map; returns a one-line summary (ranks by node)."""
    atomic.write_json(run_dir / RANK_MAP_FILE, entries)
    nodes: dict[str, list[int]] = {}
    for entry in entries:
        nodes.setdefault(entry["node"], []).append(entry["rank"])
    return f"{len(entries)} rank(s) on {len(nodes)} node(s): " + "; ".join(
        f"{node} ranks {ranks}" for node, ranks in nodes.items())
