"""Real jobs on the local 2-node SLURM cluster, all started at once to share the waiting:

- a training job (2 nodes × 2 ranks, tp=2) submitted with vlm-submit gets USR1 mid-run, saves,
  requeues and resumes; it must match an uninterrupted local dp=2 × tp=2 run (losses, final weights
  to 1e-6, the samples of every step), keep each tp group inside a node, and its export evaluates;
- a curation job on Ray over both nodes, rendered by `vlm-submit --dry-run` with hostile paths and
  run with sbatch: the paths arrive literally and the result equals a local run of the same config.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import REPO, cli_env, failure_text, run_tool
from tests.helpers import assert_same_weights, exported_weights, losses, train
from tests.slurm.conftest import CONF, PROFILE, Cluster

pytestmark = [pytest.mark.dist, pytest.mark.e2e]

STEPS = 8
TRAIN = (f"steps={STEPS}", "log_every=1", "data.batch_size=8", "optim.warmup_steps=2", "parallel.tp=2",
         "zero_stage=1", "data.record_keys=true", "data.shuffle_buffer=16", "model.text.context_length=16")
# Shell-hostile text for names and paths: quotes, command substitutions (that would create MARKERS).
HOSTILE = "a b \"dq\" 'sq' $(touch {m}1) `touch {m}2`"


def submit_tool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vlmtrain.submit", *args], cwd=cwd,
                          env={**cli_env(), "SLURM_CONF": str(CONF)},
                          capture_output=True, text=True, timeout=300)


def shard_contents(out: Path) -> dict[str, list[tuple[str, str]]]:
    """Each output shard: its members (name, sha256 of the bytes), in order."""
    shards = {}
    for shard in sorted(out.rglob("*.tar")):
        with tarfile.open(shard) as tar:
            shards[shard.name] = [(m.name, hashlib.sha256(tar.extractfile(m).read()).hexdigest())
                                  for m in tar if m.isfile()]
    return shards


@dataclass
class Jobs:
    train_dir: Path
    train_job: dict
    reference_dir: Path
    curate_out: Path
    curate_job: dict
    curate_log: str
    local_curate_out: Path
    markers: Path


@pytest.fixture(scope="module")
def jobs(slurm_cluster: Cluster, small_corpus, tmp_path_factory) -> Jobs:
    root = tmp_path_factory.mktemp("slurm")
    train_dir, reference_dir = root / "train", root / "reference"
    submitted = submit_tool("--nodes", "2", "--ranks-per-node", "2", "--job-name", "vlm-test-train",
                            "--profile", str(PROFILE), "train", "--config", "configs/train/demo.yaml",
                            f"data.train_shards={small_corpus / 'train'}", f"output_dir={train_dir}",
                            "metrics.tensorboard=false", "progress=false", *TRAIN)
    assert submitted.returncode == 0, failure_text(submitted)
    train_job = submitted.stdout.split("submitted job ")[1].split(";")[0]

    # Curation: hostile config path (with a newline) and output_dir, rendered by --dry-run, run by sbatch.
    markers = root / "marker"
    hostile = root / (HOSTILE.format(m=markers) + "\nline")
    hostile.mkdir(parents=True)
    config = hostile / "curate.yaml"
    config.write_text((REPO / "configs" / "curate" / "demo.yaml").read_text())
    pool = root / "pool"
    pool.mkdir()
    (pool / "shard-000000.tar").write_bytes(next(iter(sorted((small_corpus / "train").glob("*.tar")))).read_bytes())
    curate_out = root / ("out " + HOSTILE.format(m=markers))
    overrides = [f"sources=[{{format: webdataset, path: {pool}}}]", "progress=false", "output.samples_per_shard=60"]
    rendered = submit_tool("--dry-run", "--nodes", "2", "--cpus-per-node", "2", "--job-name", "vlm-test-curate",
                           "--profile", str(PROFILE), "curate", str(config), f"output_dir={curate_out}", *overrides,
                           cwd=root)
    assert rendered.returncode == 0, failure_text(rendered)
    script = root / "curate.sbatch"
    script.write_text(rendered.stdout)
    sbatch = slurm_cluster.run("sbatch", "--parsable", str(script), cwd=root)
    assert sbatch.returncode == 0, sbatch.stderr
    curate_job = sbatch.stdout.strip()

    # Pre-emption: USR1 to the batch script once training runs, as --signal=B:USR1@T would send it.
    metrics = train_dir / "metrics.jsonl"
    deadline = time.monotonic() + 600
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        assert time.monotonic() < deadline, f"the training job did not start: {slurm_cluster.job(train_job)}"
        assert slurm_cluster.job(train_job).get("JobState") in ("PENDING", "RUNNING"), slurm_cluster.job(train_job)
        time.sleep(0.2)
    signalled = slurm_cluster.run("scancel", "--signal=USR1", "--batch", train_job)
    assert signalled.returncode == 0, signalled.stderr

    # The references, while the jobs run: the same training on 4 local ranks, the same curation here.
    train(small_corpus, reference_dir, 4, *TRAIN)
    from data_pipeline.config import load_curate_config
    from data_pipeline.pipeline import run

    local_curate_out = root / "local_curate"
    run(load_curate_config(config, [f"output_dir={local_curate_out}", *overrides]), use_ray=False, log=lambda _: None)

    train_info, curate_info = slurm_cluster.wait(train_job), slurm_cluster.wait(curate_job)
    curate_log = "".join(p.read_text(errors="replace") for p in root.glob(f"slurm-{curate_job}.out"))
    return Jobs(train_dir, train_info, reference_dir, curate_out, curate_info, curate_log, local_curate_out, markers)


def test_a_two_node_tp2_job_keeps_tp_groups_in_a_node_and_matches_a_local_run(jobs, small_corpus, tmp_path):
    log = "".join(p.read_text() for p in (jobs.train_dir / "slurm").glob("*.out"))
    assert jobs.train_job["JobState"] == "COMPLETED", log[-3000:]
    rank_map = json.loads((jobs.train_dir / "rank_map.json").read_text())
    assert [(r["rank"], r["launcher"]) for r in rank_map] == [(rank, "srun") for rank in range(4)]
    assert len({r["node"] for r in rank_map}) == 2
    for dp_rank in (0, 1):
        group = [r for r in rank_map if r["dp"] == dp_rank]
        assert sorted(r["tp"] for r in group) == [0, 1] and len({r["node"] for r in group}) == 1, rank_map
    assert losses(jobs.train_dir) == pytest.approx(losses(jobs.reference_dir), abs=1e-6)

    out = tmp_path / "eval.json"
    evaluated = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(jobs.train_dir), "--data",
                         str(small_corpus / "eval" / "shapes"), "--out", str(out), "--batch-size", "64", "--no-progress")
    assert evaluated.returncode == 0, failure_text(evaluated)
    assert "acc1" in json.loads(out.read_text())[0]["metrics"]


def test_usr1_saves_requeues_and_the_job_resumes_to_the_uninterrupted_weights(jobs):
    log = "".join(p.read_text() for p in (jobs.train_dir / "slurm").glob("*.out"))
    assert jobs.train_job["Restarts"] == "1", log[-3000:]
    saved = int(log.split("stop requested: saved step ")[1].split(";")[0])
    assert 2 <= saved < STEPS and f"at step {saved}" in log
    assert_same_weights(exported_weights(jobs.train_dir), exported_weights(jobs.reference_dir), atol=1e-6)

    def keys(run: Path) -> dict[tuple[int, int], list[str]]:
        steps = {}
        for rank in range(4):
            for line in (run / "sample_keys" / f"rank{rank}.jsonl").read_text().splitlines():
                record = json.loads(line)
                assert (rank, record["step"]) not in steps, f"rank {rank} logged step {record['step']} twice"
                steps[rank, record["step"]] = record["keys"]
        return steps

    trained, reference = keys(jobs.train_dir), keys(jobs.reference_dir)
    assert trained == reference and len(trained) == 4 * STEPS
    replica_keys = [key for (rank, _), batch in trained.items() if rank in (0, 2) for key in batch]
    assert len(replica_keys) == len(set(replica_keys)), "a sample was trained twice"


def test_ray_on_slurm_curation_takes_hostile_paths_literally_and_matches_a_local_run(jobs):
    assert jobs.curate_job["JobState"] == "COMPLETED", jobs.curate_log[-3000:]
    assert "Ray head at" in jobs.curate_log
    assert not list(jobs.markers.parent.glob(jobs.markers.name + "*")), "a hostile value ran as a command"
    assert (jobs.curate_out / "decisions.parquet").is_file()

    def kept(out: Path) -> set[str]:
        decisions = pd.read_parquet(out / "decisions.parquet")
        return set(decisions.loc[decisions["kept"], "key"])

    assert kept(jobs.curate_out) == kept(jobs.local_curate_out) and kept(jobs.curate_out)
    assert shard_contents(jobs.curate_out) == shard_contents(jobs.local_curate_out) != {}
