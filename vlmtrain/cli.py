"""Command-line entry points: ``vlm-train`` and ``vlm-eval``.

User mistakes (bad config, missing data, unreadable checkpoint) end in one ``error:`` line and
exit code 2, before any worker process starts where that is possible.
"""
from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import warnings
from contextlib import contextmanager

from vlmtrain.checkpoint import CheckpointError
from vlmtrain.config import ConfigError
from vlmtrain.data import DataError
from vlmtrain.eval.datasets import EvalDataError

USER_ERRORS = (ConfigError, DataError, CheckpointError, EvalDataError)

TRAIN_EPILOG = """\
overrides:
  Any config key can be set as key.sub=value after the options, e.g.
    vlm-train --config configs/train/demo.yaml steps=200 optim.lr=5e-4 zero_stage=1
  Values are parsed as YAML. Unknown keys and invalid values are rejected before training starts.

launching:
  Under torchrun or the deepspeed launcher, vlm-train runs as one worker of the job.
  Started on its own it launches --nproc-per-node local ranks itself (gloo on CPU).
"""


@contextmanager
def user_errors(prog: str):
    """Turn the exceptions we raise for user mistakes into one clear line and exit code 2."""
    try:
        yield
    except USER_ERRORS as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        sys.exit(2)


def configure_runtime() -> None:
    """Quiet, CPU-friendly defaults; set before DeepSpeed is imported anywhere."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 still calls collectives that torch 2.14 deprecates; not actionable by users.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def train_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vlm-train", description="Train a CLIP model with DeepSpeed ZeRO.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/train/demo.yaml")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="ranks to launch locally when not already under a launcher (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)

    from vlmtrain.config import load_train_config
    from vlmtrain.data import check_enough_shards, resolve_shards
    from vlmtrain.dist import free_port, is_launched

    with user_errors("vlm-train"):
        cfg = load_train_config(args.config, args.overrides)
        world_size = int(os.environ.get("WORLD_SIZE", args.nproc_per_node))
        check_enough_shards(resolve_shards(cfg.data.train_shards), world_size, cfg.data.workers)
        if is_launched() or args.nproc_per_node == 1:
            configure_runtime()
            from vlmtrain.engine import train

            train(cfg)
            return
    if args.nproc_per_node < 1:
        parser.error("--nproc-per-node must be >= 1")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc_per_node}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               "-m", "vlmtrain.cli", "--config", args.config, *args.overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    sys.exit(subprocess.call(command, env=env))


def eval_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vlm-eval", description="Evaluate a trained model zero-shot (CLIP_benchmark conventions).")
    commands = parser.add_subparsers(dest="command", required=True)
    zeroshot = commands.add_parser(
        "zeroshot", help="zero-shot classification and retrieval on eval sets",
        description="Classification sets (classnames.txt + zeroshot_classification_templates.txt + "
                    "test/*.tar with cls) get top-1/top-5/mean-per-class recall; retrieval sets "
                    "(test/*.tar with several captions per image in txt) get recall@1/5/10 both ways.")
    zeroshot.add_argument("--checkpoint", required=True,
                          help="a vlm-train run directory, or its exported final/ directory")
    zeroshot.add_argument("--data", required=True, nargs="+",
                          help="eval dataset directories, or directories holding several")
    zeroshot.add_argument("--out", help="write the results as JSON here")
    zeroshot.add_argument("--batch-size", type=int, default=256)
    zeroshot.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    configure_runtime()
    import json
    from pathlib import Path

    from vlmtrain.checkpoint import load_exported
    from vlmtrain.data import make_image_transform, make_tokenizer
    from vlmtrain.eval.suite import evaluate_all, format_table

    with user_errors("vlm-eval"):
        model, model_cfg, _ = load_exported(args.checkpoint)
        records = evaluate_all(model, make_tokenizer(model_cfg.text),
                               make_image_transform(model_cfg.vision, train=False), args.data,
                               model_name=str(args.checkpoint), batch_size=args.batch_size,
                               progress=not args.no_progress)
    print(format_table(records))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    train_main()
