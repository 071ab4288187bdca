"""Where the parallel work of a curation runs: on Ray (``RayExecutor``) or in this one process
(``LocalExecutor``, the benchmark's reference and for debugging). The only module that knows Ray.

Both offer the same three shapes of work, and the steps name no executor:
  map_actors   an object built once per worker (costly: a language model), then called on one item
               at a time: the score step
  map_shared   ``function(shared, *item)`` per item, ``shared`` sent once: dedup's searches,
               writing shards
  workers      long-lived workers that keep their state between calls: the embed step's model
               workers, which load the model once and serve every set of one run

On Ray, map_actors and map_shared run on one pool of ``ray.workers`` actors (``StepWorker``) that
lives as long as the run: each worker process starts, and imports the pipeline, once per run, not
once per step. On a small machine, starting processes was most of what Ray added to a run when the
score step had Ray Data's actors and the other steps plain Ray tasks (BENCHMARKS.md, "One pool of
worker processes per run").

Ray is joined the same way everywhere (``ensure_ray``): a cluster when given its address (or
``$RAY_ADDRESS``), else a local instance of the run's own. Our own progress bars report the work, so
Ray's INFO chatter on the console is turned down to warnings; Ray's log files keep it.
"""
from __future__ import annotations

import itertools
import logging
import os
from typing import Callable, Iterator

from data_pipeline.config import RayConfig
from data_pipeline.stages.near_duplicates import serial_map

RESTARTS = 3  # a worker whose process died is restarted and its call retried, as often as Ray retries a task


def ensure_ray(num_cpus: int = 0, address: str | None = None) -> bool:
    """Start or join Ray unless this process already has; True when this call did (and should shut it down).
    The cluster: ``address``, else ``$RAY_ADDRESS``, else a new local instance. Never the cluster that
    ``ray start`` last ran on this machine, which Ray alone would join even when it is gone."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(address="local", num_cpus=num_cpus or None, include_dashboard=False, **quiet)
    return True


class StepWorker:
    """A worker of the run's pool: calls any step's function, and keeps the object ``map_actors`` built
    for the step it serves."""

    def __init__(self):
        self.step, self.built = None, None

    def build_and_call(self, step: int, factory: type, kwargs: dict, item):
        if step != self.step:  # a new step, or a restart after this worker's process died
            self.release()
            self.built, self.step = factory(**kwargs), step
        return self.built(item)

    def release(self) -> None:
        self.step, self.built = None, None

    def call(self, function: Callable, shared, *item):
        return function(shared, *item)


class RayExecutor:
    """Joins Ray as ``ensure_ray`` does; the run's steps work in one pool of ``cfg.workers`` actors."""

    def __init__(self, cfg: RayConfig, address: str | None = None):
        import ray

        self.ray, self.cfg = ray, cfg
        self.started = ensure_ray(cfg.num_cpus, address)
        self.pool = RayWorkers(ray, StepWorker, (), cfg.workers, cfg.cpus_per_worker)
        self.steps = itertools.count()

    def map_actors(self, actor: type, kwargs: dict, items: list) -> Iterator:
        """``actor(**kwargs)`` built once on each worker of the pool, then called with one item at a time;
        the results as they finish. The workers drop what they built when the step ends."""
        step, kwargs_ref = next(self.steps), self.ray.put(kwargs)
        try:
            yield from self.pool.map("build_and_call", [(step, actor, kwargs_ref, item) for item in items])
        finally:
            self.pool.tell_each("release")

    def map_shared(self, function: Callable, shared, items: list[tuple]) -> list:
        """``function(shared, *item)`` per item on the pool, the results in item order; ``shared`` goes to
        the object store once."""
        shared_ref = self.ray.put(shared)
        return list(self.pool.map("call", [(function, shared_ref, *item) for item in items], ordered=True))

    def workers(self, worker: type, args: tuple, most: int, cpus: float) -> RayWorkers:
        return RayWorkers(self.ray, worker, args, most, cpus)

    def close(self) -> None:
        self.pool.close()
        if self.started:
            self.ray.shutdown()


class RayWorkers:
    """Up to ``most`` Ray actors, each ``worker(*args)``, started when work first needs them and spread over
    the cluster's nodes; each item goes to whichever actor is free (``ray.util.ActorPool``), so only items
    and results travel through Ray."""

    def __init__(self, ray, worker: type, args: tuple, most: int, cpus: float):
        self.ray, self.args, self.most = ray, args, most
        self.remote = ray.remote(num_cpus=cpus, scheduling_strategy="SPREAD", max_restarts=RESTARTS,
                                 max_task_retries=RESTARTS)(worker)
        self.actors: list = []

    def map(self, method: str, items: list[tuple], ordered: bool = False) -> Iterator:
        """``worker.<method>(*item)`` per item; the results in completion order (``ordered``: in item order)."""
        from ray.util import ActorPool

        wanted = min(self.most, len(items))
        self.actors += [self.remote.remote(*self.args) for _ in range(wanted - len(self.actors))]
        pool = ActorPool(self.actors)
        submit = lambda actor, item: getattr(actor, method).remote(*item)  # noqa: E731
        yield from pool.map(submit, items) if ordered else pool.map_unordered(submit, items)

    def tell_each(self, method: str) -> None:
        """``worker.<method>()`` on every started actor, after the calls it has queued; not awaited."""
        for actor in self.actors:
            getattr(actor, method).remote()

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


class LocalExecutor:
    """The same work, in order, in this process."""

    def map_actors(self, actor: type, kwargs: dict, items: list) -> Iterator:
        built = actor(**kwargs)
        for item in items:
            yield built(item)

    map_shared = staticmethod(serial_map)

    def workers(self, worker: type, args: tuple, most: int, cpus: float) -> LocalWorkers:
        return LocalWorkers(worker, args)

    def close(self) -> None:
        pass


class LocalWorkers:
    """One ``worker(*args)``, built when work first needs it."""

    def __init__(self, worker: type, args: tuple):
        self.worker, self.args = worker, args
        self.built = None

    def map(self, method: str, items: list[tuple]) -> Iterator:
        self.built = self.built or self.worker(*self.args)
        for item in items:
            yield getattr(self.built, method)(*item)

    def close(self) -> None:
        self.built = None


Executor = RayExecutor | LocalExecutor


def make_executor(cfg: RayConfig, use_ray: bool, address: str | None = None) -> Executor:
    return RayExecutor(cfg, address) if use_ray else LocalExecutor()
