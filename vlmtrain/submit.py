"""``vlm-submit``: render a SLURM batch script from resource flags and a train or curate command,
save it into the run directory and submit it with ``sbatch`` (``--dry-run`` prints it instead).

The script is the template from ``slurm/`` (train.sbatch or curate.sbatch) below a header that
vlm-submit writes: the ``#SBATCH`` lines, the working directory and the command's arguments. Every
user value in the shell part goes through ``shlex.quote`` and arrives literally; ``#SBATCH`` lines
are read by sbatch, not by a shell, and cannot be quoted, so their values are restricted to a safe
character set instead. The request and the run's config are validated before anything is submitted.
"""
from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vlmtrain.errors import UserError

TEMPLATES = Path(__file__).resolve().parents[1] / "slurm"
SBATCH_SAFE = re.compile(r"[A-Za-z0-9._+,:=@%/\[\]&|!*-]+")
# sbatch --time: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
TIME_FORMAT = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")

EPILOG = """\
commands:
  train --config CONFIG [key=value ...]   vlm-train's arguments; resume=latest is added, so a
                                          requeued job continues the run
  curate CONFIG [key=value ...]           vlm-curate run's arguments, on a Ray cluster over the nodes

examples:
  vlm-submit --nodes 2 --gpus-per-node 8 --time 24:00:00 --partition gpu --job-name clip-b16 \\
      train --config configs/train/demo.yaml model.preset=vit_b_16 parallel.tp=2 output_dir=runs/b16
  vlm-submit --nodes 4 --cpus-per-node 64 --time 2:00:00 curate configs/curate/demo.yaml
  vlm-submit --dry-run ... train ...     print the script, submit nothing

The script is saved as OUTPUT_DIR/slurm/<job-name>-<time>.sbatch and the job's log goes next to it.
Layout: parallel.tp must divide the ranks per node (tensor-parallel peers are consecutive ranks:
one node), data parallelism spans the nodes. See the README's SLURM guide.
"""


class SubmitError(UserError):
    """A job request that cannot be submitted; the message names the flag and the fix."""


@dataclass(frozen=True)
class JobRequest:
    command: str                  # "train" or "curate"
    args: tuple[str, ...]         # vlm-train's arguments, or vlm-curate run's
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_node: int | None = None
    ranks_per_node: int | None = None  # train: ranks on each node (default: one per GPU, else 1)
    launcher: str = "srun"        # train: srun (a task per rank) or torchrun (a task per node)
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    sbatch: tuple[str, ...] = ()  # extra #SBATCH lines, e.g. --mail-type=END
    signal_seconds: int = 120     # USR1 this long before the time limit: time to save
    requeue: bool = True
    profile: str | None = None    # the environment profile the job sources

    @property
    def ranks(self) -> int:
        return self.ranks_per_node or self.gpus_per_node or 1

    @property
    def name(self) -> str:
        return self.job_name or f"vlm-{self.command}"


def check_sbatch_value(flag: str, value: str) -> str:
    if not SBATCH_SAFE.fullmatch(value):
        bad = sorted({repr(c) for c in value if not SBATCH_SAFE.fullmatch(c)}) or ["an empty value"]
        raise SubmitError(f"{flag} {value!r}: #SBATCH lines cannot be quoted, so their values may hold only "
                          f"letters, digits and ._+,:=@%/[]&|!*- (found {', '.join(bad)})")
    return value


def validate(req: JobRequest) -> None:
    """Refuse a request SLURM would reject or run wrongly, before anything is written or submitted."""
    if req.nodes < 1:
        raise SubmitError(f"--nodes {req.nodes}: a job needs at least 1 node")
    if req.gpus_per_node < 0:
        raise SubmitError(f"--gpus-per-node {req.gpus_per_node}: must be >= 0")
    if req.cpus_per_node is not None and req.cpus_per_node < 1:
        raise SubmitError(f"--cpus-per-node {req.cpus_per_node}: must be >= 1")
    if req.ranks < 1:
        raise SubmitError(f"--ranks-per-node {req.ranks}: must be >= 1")
    if req.gpus_per_node and req.ranks != req.gpus_per_node:
        raise SubmitError(f"--ranks-per-node {req.ranks} with --gpus-per-node {req.gpus_per_node}: "
                          f"vlm-train runs one rank per GPU")
    if req.command == "train" and req.launcher == "srun" and req.cpus_per_node and req.cpus_per_node % req.ranks:
        raise SubmitError(f"--cpus-per-node {req.cpus_per_node} cannot be split evenly over {req.ranks} "
                          f"ranks per node")
    if req.launcher not in ("srun", "torchrun"):
        raise SubmitError(f"--launcher {req.launcher}: choose srun or torchrun")
    if req.time is not None and not TIME_FORMAT.fullmatch(req.time):
        raise SubmitError(f"--time {req.time!r}: use minutes, HH:MM:SS or D-HH:MM:SS (e.g. 90, 12:00:00, 2-00:00:00)")
    if req.signal_seconds < 1:
        raise SubmitError(f"--signal-seconds {req.signal_seconds}: must be >= 1")
    for flag, value in (("--job-name", req.job_name), ("--partition", req.partition),
                        ("--account", req.account), ("--time", req.time)):
        if value is not None:
            check_sbatch_value(flag, value)
    for line in req.sbatch:
        if not line.startswith("-"):
            raise SubmitError(f"--sbatch {line!r}: give an sbatch option, e.g. --sbatch=--mail-type=END")
        check_sbatch_value("--sbatch", line)


def sbatch_lines(req: JobRequest, log_dir: Path) -> list[str]:
    tasks = 1 if req.command == "curate" or req.launcher == "torchrun" else req.ranks
    lines = [f"--job-name={req.name}", f"--nodes={req.nodes}", f"--ntasks-per-node={tasks}"]
    if req.gpus_per_node:
        lines.append(f"--gpus-per-node={req.gpus_per_node}")
    if req.cpus_per_node:
        lines.append(f"--cpus-per-task={req.cpus_per_node // tasks}")
    lines += [f"--{flag}={value}" for flag, value in
              (("time", req.time), ("partition", req.partition), ("account", req.account)) if value]
    if req.command == "train":
        lines.append(f"--signal=B:USR1@{req.signal_seconds}")
        if req.requeue:
            lines.append("--requeue")
    lines.append("--open-mode=append")  # a requeued job appends to its log
    if SBATCH_SAFE.fullmatch(str(log_dir)):  # otherwise sbatch's default: slurm-JOBID.out in the workdir
        lines.append(f"--output={log_dir}/%x-%j.out")
    return lines + list(req.sbatch)


def render(req: JobRequest, run_dir: Path, workdir: Path, python: str) -> str:
    """The complete batch script."""
    template = (TEMPLATES / f"{req.command}.sbatch").read_text()
    body = template.split("\n", 1)[1]  # below the template's shebang
    q = shlex.quote
    header = ["#!/bin/bash", *(f"#SBATCH {line}" for line in sbatch_lines(req, run_dir / "slurm")),
              f"# Written by vlm-submit {time.strftime('%Y-%m-%d %H:%M:%S')}; the template follows the arguments.",
              f"cd -- {q(str(workdir))} || exit 1",
              f"export VLM_PYTHON={q(python)} VLM_LAUNCHER={q(req.launcher)} VLM_RANKS_PER_NODE={req.ranks}"]
    if req.profile:
        header.append(f"export VLM_SLURM_PROFILE={q(str(Path(req.profile).resolve()))}")
    header.append("set -- " + " ".join(q(arg) for arg in req.args))
    return "\n".join(header) + "\n" + body


def run_directory(req: JobRequest) -> Path:
    """Load and check the run's config as the job will (a mistake fails here, not in the queue); its output_dir."""
    if req.command == "train":
        from vlmtrain.config import load_train_config
        from vlmtrain.data import check_enough_shards, resolve_sources

        train = argparse.ArgumentParser(prog="vlm-submit train", add_help=False)
        train.add_argument("--config", required=True)
        train.add_argument("overrides", nargs="*")
        parsed, unknown = train.parse_known_args(list(req.args))
        if unknown:
            raise SubmitError(f"train: unexpected argument(s) {' '.join(unknown)}: give --config CONFIG key=value ...")
        cfg = load_train_config(parsed.config, parsed.overrides)
        dims = cfg.parallel_dims(req.nodes * req.ranks)
        if req.ranks % dims.tp:
            raise SubmitError(f"parallel.tp={dims.tp} does not divide the {req.ranks} ranks of a node: a "
                              f"tensor-parallel group must stay inside one node")
        check_enough_shards(cfg.data, resolve_sources(cfg.data), dims.dp)
        return Path(cfg.output_dir)
    from data_pipeline.config import load_curate_config

    if not req.args:
        raise SubmitError("curate: give the curation config, e.g. curate configs/curate/demo.yaml")
    return Path(load_curate_config(req.args[0], list(req.args[1:])).output_dir)


def submit(script: Path, workdir: Path) -> str:
    """sbatch the saved script; the job id."""
    try:
        result = subprocess.run(["sbatch", "--parsable", str(script)], cwd=workdir, capture_output=True,
                                text=True, timeout=120)
    except FileNotFoundError:
        raise SubmitError("sbatch not found: run vlm-submit on a SLURM login node (or --dry-run)") from None
    if result.returncode:
        raise SubmitError(f"sbatch refused the job: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-submit", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Render a SLURM batch script for vlm-train or vlm-curate from slurm/'s templates, save it "
                    "into the run directory and submit it with sbatch.")
    parser.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node; train runs one rank per GPU")
    parser.add_argument("--cpus-per-node", type=int, help="CPUs per node (split over the node's tasks)")
    parser.add_argument("--ranks-per-node", type=int,
                        help="train without GPUs: ranks per node (default: --gpus-per-node, else 1)")
    parser.add_argument("--launcher", default="srun", choices=("srun", "torchrun"),
                        help="train: srun starts one task per rank (default); torchrun one task per node")
    parser.add_argument("--time", help="time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    parser.add_argument("--partition")
    parser.add_argument("--account")
    parser.add_argument("--job-name", help="default vlm-train / vlm-curate")
    parser.add_argument("--sbatch", action="append", default=[], metavar="OPTION",
                        help="an extra #SBATCH option, e.g. --sbatch=--mail-type=END (repeatable)")
    parser.add_argument("--signal-seconds", type=int, default=120,
                        help="train: USR1 this many seconds before the time limit, to save and requeue (default 120)")
    parser.add_argument("--no-requeue", action="store_true", help="train: do not requeue after a pre-emption save")
    parser.add_argument("--profile", help="environment profile the job sources (default slurm/profile.sh)")
    parser.add_argument("--dry-run", action="store_true", help="print the script; write and submit nothing")
    parser.add_argument("command", choices=("train", "curate"))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's arguments")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.gpus_per_node and args.cpus_per_node:
        build_parser().error("give --gpus-per-node or --cpus-per-node, not both")
    req = JobRequest(command=args.command, args=tuple(args.args), nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     cpus_per_node=args.cpus_per_node, ranks_per_node=args.ranks_per_node, launcher=args.launcher,
                     time=args.time, partition=args.partition, account=args.account, job_name=args.job_name,
                     sbatch=tuple(args.sbatch), signal_seconds=args.signal_seconds, requeue=not args.no_requeue,
                     profile=args.profile)
    from vlmtrain.cli import user_errors

    with user_errors("vlm-submit"):
        validate(req)
        workdir = Path.cwd()
        run_dir = workdir / run_directory(req)
        script = render(req, run_dir, workdir, sys.executable)
        if args.dry_run:
            sys.stdout.write(script)
            if "--output=" in script:
                print(f"vlm-submit: to sbatch this yourself, create {run_dir / 'slurm'} first (the job's log "
                      f"goes there)", file=sys.stderr)
            return
        saved = run_dir / "slurm" / f"{req.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(script)
        job_id = submit(saved, workdir)
        print(f"vlm-submit: submitted job {job_id}; script {saved}", flush=True)


if __name__ == "__main__":
    main()
