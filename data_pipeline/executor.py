"""Where the parallel work of a curation runs: on Ray (``RayExecutor``) or in this one process
(``LocalExecutor``, the benchmark's reference and for debugging). The only module that knows Ray.

Both offer the same three shapes of work, and the steps name no executor:
  map_actors   an object built once per worker (costly: a language model), then called on one item
               at a time (Ray Data actors with fractional CPUs): the score step
  map_shared   ``function(shared, *item)`` per item, ``shared`` sent once (Ray tasks, all started at
               once): dedup's searches, writing shards
  workers      long-lived workers that keep their state between calls (Ray actors): the embed step's
               model workers, which load the model once and serve every set of one run

Ray is joined the same way everywhere (``ensure_ray``): a cluster when given its address, else a
local instance. Our own progress bars report the work, so Ray's INFO chatter on the console
(instance start, Ray Data execution plans, its progress bars) is turned down to warnings; Ray's log
files keep it.
"""
from __future__ import annotations

import logging
from typing import Callable, Iterator

from data_pipeline.config import RayConfig
from data_pipeline.stages.near_duplicates import serial_map


def ensure_ray(num_cpus: int = 0, address: str | None = None) -> bool:
    """Start or join Ray unless this process already has; True when this call did (and should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    quiet = {"logging_level": logging.WARNING, "log_to_driver": False}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=num_cpus or None, include_dashboard=False, **quiet)
    ray.data.DataContext.get_current().enable_progress_bars = False
    for handler in logging.getLogger("ray.data").handlers:  # the console only: Ray Data's log file keeps it all
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)
    return True


def _rows(batch: dict) -> Iterator[dict]:
    """The rows of a column batch ``{field: [values]}``."""
    names = list(batch)
    return (dict(zip(names, values)) for values in zip(*(batch[name] for name in names)))


class RayExecutor:
    """Joins the Ray cluster at ``address`` (default: starts a local Ray for this run)."""

    def __init__(self, cfg: RayConfig, address: str | None = None):
        import ray

        self.ray, self.cfg = ray, cfg
        self.started = ensure_ray(cfg.num_cpus, address)

    def map_actors(self, actor: type, kwargs: dict, items: list[dict]) -> Iterator[dict]:
        """``actor(**kwargs)`` on each of ``cfg.workers`` actors, called with one item at a time as a batch
        (``{field: [value]}``); the rows of its batches, as they finish."""
        ray = self.ray
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            actor, fn_constructor_kwargs=kwargs, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(self.cfg.workers, len(items))),
            num_cpus=self.cfg.cpus_per_worker)
        yield from dataset.iter_rows()

    def map_shared(self, function: Callable, shared, items: list[tuple]) -> list:
        """``function(shared, *item)`` per item as Ray tasks; ``shared`` goes to the object store once."""
        remote = self.ray.remote(num_cpus=self.cfg.cpus_per_worker)(function)
        shared_ref = self.ray.put(shared)
        return self.ray.get([remote.remote(shared_ref, *item) for item in items])

    def workers(self, worker: type, args: tuple, most: int, cpus: float) -> RayWorkers:
        return RayWorkers(self.ray, worker, args, most, cpus)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class RayWorkers:
    """Up to ``most`` Ray actors, each ``worker(*args)``, started when work first needs them; each item goes
    to whichever actor is free (``ray.util.ActorPool``), so only items and results travel through Ray."""

    def __init__(self, ray, worker: type, args: tuple, most: int, cpus: float):
        self.ray, self.args, self.most = ray, args, most
        self.remote = ray.remote(num_cpus=cpus)(worker)
        self.actors: list = []

    def map(self, method: str, items: list[tuple]) -> Iterator:
        """``worker.<method>(*item)`` per item; the results in completion order."""
        from ray.util import ActorPool

        wanted = min(self.most, len(items))
        self.actors += [self.remote.remote(*self.args) for _ in range(wanted - len(self.actors))]
        pool = ActorPool(self.actors)
        yield from pool.map_unordered(lambda actor, item: getattr(actor, method).remote(*item), items)

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []


class LocalExecutor:
    """The same work, in order, in this process."""

    def map_actors(self, actor: type, kwargs: dict, items: list[dict]) -> Iterator[dict]:
        built = actor(**kwargs)
        for item in items:
            yield from _rows(built({name: [value] for name, value in item.items()}))

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
