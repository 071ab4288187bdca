"""Fault injection for tests: die at a named point, as a node failure would.

``reached(name, where)`` SIGKILLs this process when the environment variable ``VLMTRAIN_FAILPOINT``
equals ``name`` or ``name@where`` (e.g. ``renamed@step_0000012``) and this is global rank 0; otherwise
it does nothing. Tests use it to kill a run at exact points of the checkpoint sequence (the launcher
then kills the other ranks), which polling the file system cannot hit reliably. Never set it outside
tests.
"""
from __future__ import annotations

import os
import signal

_ARMED = os.environ.get("VLMTRAIN_FAILPOINT")  # read once: an unarmed run pays one comparison per point


def reached(name: str, where: str = "") -> None:
    if _ARMED and _ARMED in (name, f"{name}@{where}") and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
