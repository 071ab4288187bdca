"""Rank discovery from each launcher's environment, SLURM's compressed node lists, and the requeue
after a pre-emption save (pure functions: the environment is passed in)."""
import os
import signal

import pytest

from vlmtrain.distributed.env import expand_nodelist, port_for_job, read_env
from vlmtrain.distributed.requeue import SlurmRequeue
from vlmtrain.errors import ConfigError


def test_torchrun_ranks_come_from_its_variables():
    env = read_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.5",
                    "MASTER_PORT": "29400", "GROUP_RANK": "1", "TORCHELASTIC_RUN_ID": "x"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (3, 8, 1, "torchrun")
    assert (env.master_addr, env.master_port) == ("10.0.0.5", 29400)


def test_the_deepspeed_launcher_exports_the_same_variables():
    env = read_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": "29500", "CROSS_RANK": "0", "CROSS_SIZE": "1", "LOCAL_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank) == (1, 2, 1)


def test_an_srun_task_reads_slurm_and_meets_the_others_on_the_first_node():
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NODEID": "2",
             "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-09,12]",
             "SLURMD_NODENAME": "gpu09"}
    env = read_env(slurm)
    assert (env.rank, env.world_size, env.local_rank, env.node, env.launcher) == (5, 8, 1, "gpu09", "srun")
    assert env.master_addr == "gpu07"
    assert env.master_port == port_for_job("123456") == 20000 + 123456 % 10000
    assert port_for_job("123457") != env.master_port  # the next job on the same node gets another port
    # The environment profile may name the first node's address (another interface).
    assert read_env({**slurm, "MASTER_ADDR": "10.1.0.7"}).master_addr == "10.1.0.7"


def test_torchrun_inside_srun_wins_and_the_batch_script_is_no_rank():
    slurm = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_JOB_ID": "7",
             "SLURM_JOB_NODELIST": "node[1-2]"}
    assert read_env(slurm).launcher == "none"  # the batch script: SLURM_PROCID=0 but no step
    inside = read_env({**slurm, "SLURM_STEP_ID": "0", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (inside.launcher, inside.rank, inside.world_size) == ("torchrun", 3, 4)


@pytest.mark.parametrize("nodelist, hosts", [
    ("node[1-3,5]", ["node1", "node2", "node3", "node5"]),
    ("gpu[007-009],login1", ["gpu007", "gpu008", "gpu009", "login1"]),
    ("a1,b2", ["a1", "b2"]),
    ("rack1-n[9-10]-ib", ["rack1-n9-ib", "rack1-n10-ib"]),
    ("x[2],y[01-02]", ["x2", "y01", "y02"]),
])
def test_compressed_node_lists_expand_like_scontrol_show_hostnames(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_an_unreadable_node_list_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"node\[a-b\].*'a-b'"):
        expand_nodelist("node[a-b]")


def test_the_requeue_object_exists_only_in_a_slurm_job():
    assert SlurmRequeue.from_env({}) is None
    requeue = SlurmRequeue.from_env({"SLURM_JOB_ID": "42"})
    assert requeue.command() == ["scontrol", "requeue", "42"] and requeue.flag_file is None


def test_under_the_template_rank_0_leaves_the_requeue_to_the_job_script(tmp_path):
    flag = tmp_path / "vlm-requeue-42"
    requeue = SlurmRequeue.from_env({"SLURM_JOB_ID": "42", "VLM_REQUEUE_FLAG": str(flag)})
    assert "requeued by its script" in requeue.request()
    assert flag.read_text() == "42"


def test_usr1_asks_for_a_stop_and_a_requeue_sigterm_only_for_a_stop():
    from vlmtrain.engine import StopRequest

    saved = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        for signum, requeue in ((signal.SIGTERM, False), (signal.SIGUSR1, True)):
            stop = StopRequest()
            assert not stop.agreed()
            os.kill(os.getpid(), signum)
            assert not stop.agreed()  # the vote of the step the signal arrived in is read one step later
            assert stop.agreed() and stop.requeue is requeue
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
