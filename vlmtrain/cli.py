"""Command-line entry points: ``vlm-train`` and ``vlm-eval``.

User mistakes (bad config, missing data, unreadable checkpoint, a full disk) end in one ``error:`` line and
exit code 2, before any worker process starts where that is possible.
"""
from __future__ import annotations

import argparse
import faulthandler
import gc
import logging
import os
import sys
import warnings
from pathlib import Path
from contextlib import contextmanager

from vlmtrain.errors import UserError, user_message

TRAIN_EPILOG = """\
overrides:
  Any config key can be set as key.sub=value after the options, e.g.
    vlm-train --config configs/train/demo.yaml steps=200 optim.lr=5e-4 zero_stage=1
  Values are parsed as YAML. Unknown keys and invalid values are rejected before training starts.
  Often used: model.preset=tiny|vit_b_32|vit_b_16|vit_l_14, model.loss=siglip, zero_stage=0..3,
  precision=bf16, optim.grad_accum_steps=N, optim.grad_clip=1.0, optim.offload=true,
  checkpoint.every=N, checkpoint.keep=K, eval.every=N eval.datasets=[DIR,...],
  data.sources=[{shards: DIR, weight: W},...], data.resample=true.

layout:
  parallel.tp=T (tensor parallel: each layer split over T consecutive ranks, keep T within a node)
  and parallel.pp=P (pipeline stages) split the ranks; data parallelism takes the rest:
  dp = world / (T * P). Data is sharded by data-parallel rank, and contrastive losses gather over
  the data-parallel group. pp > 1 needs zero_stage <= 1; grad_accum_steps is then the number of
  micro-batches a pipelined step runs. A layout that cannot work is refused before launch.

resuming:
  resume=latest continues the run in output_dir from its newest complete checkpoint (or starts
  it when there is none), exactly: same data order, same losses. resume=RUN/checkpoints/step_N
  picks a checkpoint. SIGTERM or SIGUSR1 (SLURM's pre-emption warning) saves at the end of the
  current step and exits; rerun with resume=latest. Under SLURM, SIGUSR1 also requeues the job
  (scontrol requeue), whose script (vlm-submit's passes resume=latest) then continues the run.
  A checkpoint also resumes at another parallel.tp (same data-parallel size, zero_stage >= 1),
  through DeepSpeed's universal checkpoint; other layout changes are refused (init_from=RUN/final
  starts from the weights instead).

launching:
  Under torchrun, the deepspeed launcher or srun (one task per GPU; see slurm/ and vlm-submit),
  vlm-train runs as one worker of the job.
  Started on its own it launches --nproc-per-node local ranks itself (gloo on CPU).
"""


@contextmanager
def user_errors(prog: str):
    """Turn the exceptions we raise for user mistakes into one clear line and exit code 2."""
    try:
        yield
    except (UserError, OSError) as err:
        message = user_message(err)
        if message is None:
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def configure_runtime() -> None:
    """Quiet, CPU-friendly defaults; set before DeepSpeed is imported anywhere."""
    import torch

    # A crash in native code (a rank's SIGSEGV, glibc's abort on a corrupt heap) prints every thread's
    # Python stack. Not torch's C++ stack printer: it allocates inside the handler, and after glibc's abort
    # (which holds the heap's lock) it deadlocked the rank instead of letting it die.
    faulthandler.enable(all_threads=True)
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed 0.19 still calls collectives that torch 2.14 deprecates; not actionable by users.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


PLAN_EPILOG = """\
what it counts, per rank (GiB):
  params    working parameters (bf16 or fp32); ZeRO-3 shards them over dp, keeping parameters of
            <= 1e5 elements whole as DeepSpeed does
  grads     all gradients (ZeRO 0) or those of this rank's partition (ZeRO 1-3)
  optim     AdamW m and v in fp32, plus ZeRO's fp32 master weights; sharded over dp at ZeRO >= 1
  buffers   DeepSpeed's gradient buckets (5e7 elements, or the stage's model if smaller, at ZeRO
            1-3; a flat copy of the gradients at ZeRO 0)
  act       bytes saved for backward by one micro-batch (measured by a forward and the loss on the
            meta device; attention as memory-efficient kernels run it); act_ckpt with activation
            checkpointing per transformer block (block inputs plus one block's recompute)
  tensor parallelism splits what the model family's tp plan names (and the activations between a
  column- and a row-parallel layer); pipeline parallelism counts the heaviest stage, with its
  in-flight micro-batches (1F1B). Transient copies inside the optimizer step, ZeRO-3's gathered
  parameters and the framework's own workspace are not counted: keep some headroom.
  fits: yes, ckpt (only with activation checkpointing) or no.

example:
  vlm-train plan configs/train/demo.yaml --world 64 --gpu-mem 80 --global-batch 32768 \\
      model.preset=vit_l_14 precision=bf16
"""


def plan_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="vlm-train plan", description="Per-rank memory (parameters, gradients, optimizer state, "
        "activations with and without checkpointing) of every ZeRO stage × tp × pp layout of a run on "
        "--world ranks, from the model built on the meta device. Nothing is allocated or launched.",
        epilog=PLAN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="YAML run config, e.g. configs/train/demo.yaml")
    parser.add_argument("--world", type=int, required=True, help="number of ranks (GPUs) of the run")
    parser.add_argument("--gpu-mem", type=float, help="memory of one GPU in GiB: marks the layouts that fit")
    parser.add_argument("--global-batch", type=int,
                        help="samples per optimizer step: each layout's micro-batch is this / (dp × "
                        "grad_accum_steps) (default: the config's data.batch_size for every layout)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may come before or after the options
    if args.world < 1:
        parser.error("--world must be >= 1")

    from vlmtrain.config import load_train_config
    from vlmtrain.planner import format_table, plan

    with user_errors("vlm-train plan"):
        cfg = load_train_config(args.config, args.overrides)
        rows = plan(cfg, args.world, args.global_batch)
    print(f"{args.world} ranks, {cfg.model.family} preset {cfg.model.preset}, {cfg.precision}, "
          f"grad_accum_steps {cfg.optim.grad_accum_steps}; GiB per rank (pp: its heaviest stage)")
    print(format_table(rows, args.gpu_mem))


def train_main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plan"]:
        plan_main(argv[1:])
        return
    parser = argparse.ArgumentParser(
        prog="vlm-train", description="Train a vision-language model (model.family: clip, flava, maskvlm or "
        "limoe) with DeepSpeed: ZeRO 0-3, data × tensor × pipeline × expert parallel.",
        epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="vlm-train --config CONFIG [--nproc-per-node N] [key.sub=value ...]\n"
              "       vlm-train plan CONFIG --world N [--gpu-mem GiB] [key.sub=value ...]  "
              "(per-rank memory of every layout; see vlm-train plan --help)")
    parser.add_argument("--config", required=True, help="YAML run config, e.g. configs/train/demo.yaml")
    parser.add_argument("--nproc-per-node", type=int, default=1,
                        help="ranks to launch locally when not already under a launcher (default 1)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)

    from vlmtrain.checkpoint import check_output_dir
    from vlmtrain.config import load_train_config
    from vlmtrain.data import check_enough_shards, resolve_sources
    from vlmtrain.distributed.env import free_port, is_launched, read_env

    with user_errors("vlm-train"):
        cfg = load_train_config(args.config, args.overrides)
        dims = cfg.parallel_dims(read_env(os.environ).world_size if is_launched() else args.nproc_per_node)
        check_enough_shards(cfg.data, resolve_sources(cfg.data), dims.dp)
        check_output_dir(Path(cfg.output_dir), cfg.resume, cfg.overwrite)
        if cfg.eval.every:
            from vlmtrain.eval.suite import resolve_eval_sets

            resolve_eval_sets(cfg.eval.datasets)  # a wrong path fails now, not at the first eval
        if is_launched() or args.nproc_per_node == 1:
            configure_runtime()
            from vlmtrain.engine import train

            train(cfg)
            return
    if args.nproc_per_node < 1:
        parser.error("--nproc-per-node must be >= 1")
    launch_local_ranks(args.nproc_per_node, ["--config", args.config, *args.overrides], free_port())


def launch_local_ranks(nproc: int, rank_argv: list[str], port: int) -> None:
    """torchrun's agent, in this process (it has torch imported already; a torchrun child would import it
    again): starts ``nproc`` ranks of ``vlmtrain.cli`` and exits with 0, or 1 when a rank failed."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    # torch stays loaded until this process exits: out of the cyclic collector's sight, it costs no full
    # collection at exit (half a second of CPU).
    gc.freeze()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        torchrun([f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1", f"--master_port={port}",
                  "-m", "vlmtrain.cli", *rank_argv])
    except ChildFailedError as failed:
        print(failed, file=sys.stderr)  # which rank failed and how (an exit code, a signal), as torchrun prints it
        sys.exit(1)
    sys.exit(0)


EVAL_EPILOG = """\
models (one of):
  --checkpoint RUN                   a vlm-train run: its export (RUN/final), else its latest DeepSpeed checkpoint
  --checkpoint RUN/final             an exported model (model.safetensors + vlmtrain.json)
  --checkpoint RUN/checkpoints [--tag step_0000900]   a DeepSpeed checkpoint (ZeRO 0-3), newest tag by default
  --model ViT-B-32 --pretrained FILE an open_clip model with a local weights file
  --model local-dir:DIR              an open_clip folder (open_clip_config.json + weights)

eval sets (--data, one or more; a directory holding several sets is searched one level deep):
  DIR/test/*.tar            webdataset in CLIP_benchmark's layout; classification when DIR has
                            classnames.txt/.json (+ zeroshot_classification_templates.txt/.json)
  DIR/<class>/<image>       ImageNet-style image folder (classes = sorted folder names)
  FILE.csv / FILE.tsv       filepath + label (classification) or filepath + caption (retrieval)

--classnames / --templates take a .txt (one per line) or CLIP_benchmark-style .json file, or a
built-in name: imagenet (OpenAI's 1000 class names / 80 templates), imagenet_simple (templates).
They apply to every classification set given; use tools/zeroshot_eval.py for per-set settings.
"""


def _add_eval_arguments(parser: argparse.ArgumentParser, classification: bool) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="a vlm-train run, export or DeepSpeed checkpoint directory")
    source.add_argument("--model", help="an open_clip model name (with --pretrained FILE) or local-dir:DIR")
    parser.add_argument("--pretrained", help="local weights file for --model")
    parser.add_argument("--tag", help="DeepSpeed checkpoint tag (default: the newest, from 'latest')")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle DeepSpeed checkpoint files fully, which can run code stored in them: only "
                             "for checkpoints you wrote (by default only tensors and DeepSpeed's own types load)")
    parser.add_argument("--data", required=True, nargs="+", help="eval sets, or directories holding several")
    if classification:
        parser.add_argument("--classnames", help="class names: .txt/.json file or built-in name (imagenet)")
        parser.add_argument("--templates", help="prompt templates: .txt/.json file or built-in name (imagenet)")
    parser.add_argument("--out", help="write the results as JSON here (confusion PNGs go next to it)")
    parser.add_argument("--batch-size", type=int, default=256, help="images (and texts) per forward (default 256)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def eval_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="vlm-eval", description="Evaluate a model zero-shot, with CLIP_benchmark's metrics and conventions.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text, description in (
        ("zeroshot", "zero-shot classification and retrieval",
         "Classification sets get top-1/top-5/mean-per-class recall (template-ensemble classifier, "
         "logits = 100 * image . class weight); retrieval sets get recall@1/5/10 both ways."),
        ("retrieval", "image-text retrieval only",
         "Retrieval sets get image->text and text->image recall@1/5/10 (an image may have several "
         "captions: it is a hit when any of them is in the top k)."),
    ):
        command = commands.add_parser(name, help=help_text, description=description, epilog=EVAL_EPILOG,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_eval_arguments(command, classification=name == "zeroshot")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    if args.pretrained and not args.model:
        parser.error("--pretrained goes with --model (an open_clip model name)")

    configure_runtime()
    from vlmtrain.eval.datasets import RETRIEVAL
    from vlmtrain.eval.suite import evaluate_and_report, resolve_eval_sets

    with user_errors("vlm-eval"):
        options = ({"classnames": args.classnames, "templates": args.templates} if args.command == "zeroshot"
                   else {})
        eval_sets = resolve_eval_sets(args.data, RETRIEVAL if args.command == "retrieval" else None, **options)
        evaluate_and_report(eval_sets, checkpoint=args.checkpoint, tag=args.tag, model=args.model,
                            pretrained=args.pretrained, out=args.out, batch_size=args.batch_size,
                            progress=not args.no_progress, device=args.device,
                            trust_checkpoint=args.trust_checkpoint)


if __name__ == "__main__":
    train_main()
