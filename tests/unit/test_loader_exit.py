"""Loader workers and signals: SLURM's scancel sends SIGTERM to every process of a job step, so the
workers must survive it (their rank saves first), and a rank must still exit whatever ends it."""
import signal
import subprocess
import sys
import textwrap
import time

import psutil

from tests.conftest import REPO
from tests.unit.test_train_data import write_shards

RANK = textwrap.dedent("""
    import sys, time
    from tests.helpers import loader_inputs
    from vlmtrain.config import DataConfig
    from vlmtrain.data import build_train_loader

    cfg = DataConfig(train_shards=sys.argv[1], batch_size=4, workers=2, shuffle_buffer=8)
    batches = build_train_loader(cfg, *loader_inputs(), dp_rank=0, dp_size=1, seed=0)
    next(batches)
    print("loading", flush=True)
    if sys.argv[2] == "crash":
        raise RuntimeError("the rank fails while its workers are alive")
    time.sleep(60)
""")


def alive(process: psutil.Process) -> bool:
    """Running, not only waiting to be reaped (an orphan's parent is init, which reaps it in its own time)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_rank(shards, mode: str) -> tuple[subprocess.Popen, list[psutil.Process]]:
    rank = subprocess.Popen([sys.executable, "-c", RANK, str(shards), mode], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert rank.stdout.readline().strip() == "loading", rank.stderr.read()
    workers = psutil.Process(rank.pid).children()
    assert len(workers) == 2
    return rank, workers


def test_loader_workers_survive_the_sigterm_that_scancel_sends_to_every_process(tmp_path):
    rank, workers = start_rank(write_shards(tmp_path / "a", "a", shards=2, per_shard=16), "wait")
    try:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert all(alive(worker) for worker in workers)
    finally:
        rank.kill()
        rank.wait()


def test_a_rank_that_fails_with_live_loader_workers_exits_instead_of_hanging(tmp_path):
    rank, workers = start_rank(write_shards(tmp_path / "a", "a", shards=2, per_shard=16), "crash")
    try:
        assert rank.wait(timeout=30) == 1
    finally:
        rank.kill()
    assert "the rank fails while its workers are alive" in rank.stderr.read()
    assert not any(alive(worker) for worker in workers)


def test_the_loader_workers_of_a_rank_killed_by_a_signal_die_with_it_at_once(tmp_path):
    """They hold the rank's gloo sockets (forked after the process group was made): alive, they would hide
    the dead rank from its peers until torch's watchdog in each worker noticed the orphan (every 5 s)."""
    rank, workers = start_rank(write_shards(tmp_path / "a", "a", shards=2, per_shard=16), "wait")
    rank.kill()
    rank.wait()
    deadline = time.monotonic() + 1.0
    while any(alive(worker) for worker in workers) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(alive(worker) for worker in workers)


def test_closing_the_loader_stops_its_workers(tmp_path):
    from tests.helpers import loader_inputs
    from vlmtrain.config import DataConfig
    from vlmtrain.data import build_train_loader

    cfg = DataConfig(train_shards=str(write_shards(tmp_path / "a", "a", shards=2, per_shard=16)), batch_size=4,
                     workers=2, shuffle_buffer=8)
    before = set(psutil.Process().children())
    batches = build_train_loader(cfg, *loader_inputs(), dp_rank=0, dp_size=1, seed=0)
    next(batches)
    workers = list(set(psutil.Process().children()) - before)
    assert len(workers) == 2
    batches.close()
    psutil.wait_procs(workers, timeout=10)
    assert not any(alive(worker) for worker in workers)
