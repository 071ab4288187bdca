"""One writer per directory: a held directory refuses a second process at once, naming the holder's pid,
and the lock goes away with its holder, even one killed with SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env
from vlmtrain.runlock import DirectoryLockedError, RunLock

TAKE = "from vlmtrain.runlock import RunLock; import sys; RunLock(sys.argv[1]).acquire()"
HOLD = TAKE + "; print('held', flush=True); import time; time.sleep(600)"


def python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=REPO, env=cli_env(), text=True, **kwargs)


def test_a_second_process_fails_at_once_naming_the_holders_pid(tmp_path):
    with RunLock(tmp_path / "out", what="test holder"):
        other = python(TAKE, str(tmp_path / "out"), stderr=subprocess.PIPE)
        _, err = other.communicate(timeout=60)
    assert other.returncode != 0
    assert "DirectoryLockedError" in err and f"pid {os.getpid()}: test holder" in err


def test_the_lock_is_released_when_the_holder_is_killed(tmp_path):
    holder = python(HOLD, str(tmp_path), stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryLockedError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    with RunLock(tmp_path):  # no stale lock: the kernel dropped it with the process
        pass


def test_a_released_directory_can_be_taken_again_by_another_process(tmp_path):
    with RunLock(tmp_path):
        pass
    taker = python(TAKE, str(tmp_path))
    assert taker.wait(timeout=60) == 0
