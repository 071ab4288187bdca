"""Joining Ray the same way everywhere: a cluster when given its address, else a local instance.

Our own progress bars report the work, so Ray's INFO chatter on the console (instance start, Ray
Data execution plans, its progress bars) is turned down to warnings; Ray's log files keep it.
"""
from __future__ import annotations

import logging


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
