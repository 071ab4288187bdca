"""On Ray, every step of a curation run works in one pool of ``ray.workers`` processes (``RayExecutor``):
a worker process starts, and imports the pipeline, once per run, not once per step. On a small
machine that start-up was most of what Ray added to a run (BENCHMARKS.md, "One pool of worker
processes per run")."""
from __future__ import annotations

import os
from pathlib import Path

from data_pipeline.config import RayConfig
from data_pipeline.executor import RayExecutor


class NumberedBuild:
    """The score step's shape: built once per worker and step (the language model), then called per item."""
    builds = 0  # in this worker process

    def __init__(self, step: str):
        NumberedBuild.builds += 1
        self.step, self.number = step, NumberedBuild.builds

    def __call__(self, item: int) -> tuple[int, str, int, int]:
        return os.getpid(), self.step, self.number, item


def shared_call(shared: str, item: int) -> tuple[int, str, int]:
    """The search and write steps' shape: ``function(shared, *item)``."""
    return os.getpid(), shared, item


def dies_once(marker_dir: str, item: int) -> int:
    """Ends its worker's process the first time it is called with 3."""
    marker = Path(marker_dir) / "died"
    if item == 3 and not marker.exists():
        marker.touch()
        os._exit(1)
    return item


def test_every_step_of_a_run_works_in_the_same_worker_processes(local_ray):
    executor = RayExecutor(RayConfig(workers=2), local_ray)
    try:
        score = list(executor.map_actors(NumberedBuild, {"step": "score"}, list(range(8))))
        search = executor.map_shared(shared_call, "codes", [(item,) for item in range(8)])
        again = list(executor.map_actors(NumberedBuild, {"step": "again"}, list(range(8))))
    finally:
        executor.close()

    workers = {pid for pid, *_ in score}
    assert len(workers) == 2
    assert {pid for pid, *_ in search} == {pid for pid, *_ in again} == workers
    assert os.getpid() not in workers
    # Each worker built the step's object once, and builds the next step's anew.
    assert {(pid, number) for pid, _, number, _ in score} == {(pid, 1) for pid in workers}
    assert {(pid, step, number) for pid, step, number, _ in again} == {(pid, "again", 2) for pid in workers}
    # Every item once; map_shared's results in item order, map_actors' as they finish.
    assert sorted(item for *_, item in score) == sorted(item for *_, item in again) == list(range(8))
    assert [(shared, item) for _, shared, item in search] == [("codes", item) for item in range(8)]


def test_a_worker_whose_process_dies_is_restarted_and_its_call_retried(local_ray, tmp_path):
    executor = RayExecutor(RayConfig(workers=2), local_ray)
    try:
        done = executor.map_shared(dies_once, str(tmp_path), [(item,) for item in range(6)])
    finally:
        executor.close()
    assert (tmp_path / "died").exists()
    assert done == list(range(6))
