"""Which Ray a run works on (``ensure_ray``): the cluster it is given or ``$RAY_ADDRESS``, else a local
instance of its own. Ray alone joins the cluster that ``ray start`` last ran on this machine (an
address file in Ray's temp dir), even one long gone, and refuses the CPU count a local run asks for."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from tests.conftest import REPO

CPUS_OF_THE_RAY_JOINED = ("from data_pipeline.executor import ensure_ray; import ray; ensure_ray(1); "
                          "print(ray.cluster_resources()['CPU'])")


def cpus_of_the_ray_joined(**env: str) -> float:
    done = subprocess.run([sys.executable, "-c", CPUS_OF_THE_RAY_JOINED], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return float(done.stdout.split()[-1])


def test_a_local_run_starts_its_own_ray_after_a_ray_start_on_this_machine_has_ended():
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    try:
        with open(os.path.join(temp, "ray_current_cluster"), "w") as handle:
            handle.write("127.0.0.1:9")  # what a `ray start` that has since stopped leaves behind
        assert cpus_of_the_ray_joined(RAY_TMPDIR=temp) == 1.0
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_address_in_the_environment_is_the_cluster_joined(local_ray):
    assert cpus_of_the_ray_joined(RAY_ADDRESS=local_ray) == 2.0  # local_ray has 2 CPUs; the run asked for 1
