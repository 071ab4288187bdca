"""`vlm-curate`: curate image-text pairs into webdataset shards, recording every decision."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline import registry
from data_pipeline.config import load_curate_config
from vlmtrain.errors import UserError, user_message

_COMMANDS = """\
commands:
  run CONFIG [key=value ...]     score → dedup → [embed] → write; a rerun after a kill resumes
  score | dedup | write CONFIG   one step (each needs the step before it to have run)
  report OUT                     funnel, histograms and rejected examples of a finished run
  embed SHARDS OUT --checkpoint RUN | --model NAME --pretrained FILE
                                 CLIP image/text embeddings (float16 .npy) + cosine score per sample
  bootstrap CONFIG --rounds R    train a scorer on a curated pool, prune it by CLIP score, retrain;
                                 a rounds table (JSON + PNG); a rerun resumes at the first unfinished round

stages, in order (config section; the reasons it records in decisions.parquet and the funnel):
"""
_STAGES_NOTE = """\
  the embedding stages (*) run only when their `embedding:` section enables them
  (configs/curate/embedding_stages.yaml): the embed step runs a CLIP model (embedding.model) over the
  rows heuristics and dedup kept; changing only the embedding section reuses the scored parts and the
  embeddings of the same model

outputs under output_dir:
  shards/shard-NNNNNN.tar   webdataset samples (jpg/png/webp, txt, json) ready for vlm-train
  decisions.parquet         one row per sample read: uid, sha256, source, scores, flags, kept, reason
  manifest.json             rows per stage, rejections per reason, shard list with sha256, config
  .work/                    per-input-file scored parts and their fingerprint files, duplicates, shard
                            plans, embeddings (what a rerun reuses)

examples:
  vlm-curate run configs/curate/demo.yaml output_dir=curated 'sources=[{format: webdataset, path: data/train}]'
  vlm-curate bootstrap configs/curate/bootstrap_demo.yaml --rounds 2 pool=curated output_dir=bootstrap
"""


def stage_table() -> str:
    """One line per registered stage: name (* = embedding stage), config section, summary, reasons."""
    lines = []
    for stage in registry.STAGES:
        name = f"{stage.name}{'*' if stage.kind == registry.EMBEDDING else ''}"
        reasons = ", ".join(stage.reasons) or "missing_image, truncated_tar, undecodable_image, ..."
        lines += [f"  {name:<15} [{stage.section}] {stage.summary}", f"  {'':<15} {reasons}"]
    return "\n".join(lines) + "\n"


EPILOG = _COMMANDS + stage_table() + _STAGES_NOTE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-curate", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Read raw image-text pairs, validate, filter and deduplicate them on Ray, and write "
                    "webdataset shards plus a record of why each sample was kept or rejected.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run_help = ("all steps, resuming finished work: score, dedup, embed (CLIP embeddings, when the config has "
                "an embedding section) and write (selection: the stages below, in order)")
    for name, text in (("run", run_help), ("score", "read, decode, filter, hash"),
                       ("dedup", "exact and near-duplicate search"), ("write", "select, write shards + manifest")):
        step = commands.add_parser(name, help=text, description=text)
        step.add_argument("config", type=Path, help="curation YAML (see configs/curate/)")
        step.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (YAML values)")
        step.add_argument("--ray-address", default=None,
                          help="Ray cluster to join (e.g. auto or host:6379); default: $RAY_ADDRESS when set, else a "
                               "local Ray for this run")
        step.add_argument("--no-ray", action="store_true", help="run the stages in this process (debugging)")
    report = commands.add_parser("report", help="PNG charts and an HTML page for a finished run")
    report.add_argument("out", type=Path, help="the run's output_dir")
    _add_embed_parser(commands)
    _add_bootstrap_parser(commands)
    return parser


def _add_embed_parser(commands) -> None:
    embed = commands.add_parser(
        "embed", help="CLIP embeddings and image-text cosine of every sample in webdataset shards",
        description="Embed images and captions with a CLIP model on a Ray actor pool (the model's own eval "
                    "transform and tokenizer). Writes image-/text-<shard>.npy (float16, L2-normalised), "
                    "index-<shard>.parquet (uid, key, row, clip_score) and OUT/index.parquet; a rerun skips "
                    "finished shards.")
    embed.add_argument("shards", type=Path, help="a folder of .tar shards (e.g. a curated run's shards/)")
    embed.add_argument("out", type=Path, help="where the embeddings go")
    model = embed.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint", help="a vlm-train run, export or DeepSpeed checkpoint")
    model.add_argument("--model", help="an open_clip model name (with --pretrained FILE) or local-dir:DIR")
    embed.add_argument("--pretrained", default="", help="local weights file for --model")
    _add_trust_flag(embed)
    embed.add_argument("--batch-size", type=int, default=256, help="images per forward (default 256)")
    embed.add_argument("--workers", type=int, default=2, help="model actors (default 2)")
    embed.add_argument("--cpus-per-worker", type=float, default=0.5,
                       help="Ray CPUs per actor (default 0.5: fractional, so the actors and a curation run's "
                            "workers share a small machine)")
    embed.add_argument("--no-ray", action="store_true", help="embed in this process (debugging)")


def _add_bootstrap_parser(commands) -> None:
    bootstrap = commands.add_parser(
        "bootstrap", help="bootstrapped CLIP-score pruning: train a scorer, prune, retrain",
        description="Round 0 trains a CLIP model (vlm-train) on a curated pool, or reuses a finished run that trained "
                    "so (round0_run=RUN); round k runs the pool's curation again (vlm-curate run, "
                    "from the pool's scored parts) with round k-1's model as the scorer and the CLIP-score stage on "
                    "(clip_score.rule), then trains on its shards with the same budget. Each round's checkpoint, cutoff, kept count, zero-shot metrics (vlm-eval) and, with "
                    "ground_truth, precision/recall of the removed pairs go into OUT/rounds.json and rounds.png.")
    bootstrap.add_argument("config", type=Path, help="bootstrap YAML (see configs/curate/bootstrap_demo.yaml)")
    bootstrap.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (YAML values)")
    bootstrap.add_argument("--rounds", type=int, default=2, help="rounds including round 0 (default 2)")
    bootstrap.add_argument("--no-ray", action="store_true", help="embed in this process (debugging)")
    _add_trust_flag(bootstrap)


def _add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle the DeepSpeed checkpoint files of the scoring model fully, which can run code "
                             "stored in them: only for checkpoints you wrote (by default only tensors and "
                             "DeepSpeed's own types load)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "bootstrap" and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides += extra  # overrides after --rounds (argparse has already closed the positional list)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return _run_command(args)
    except (UserError, OSError) as err:  # user errors and a full disk; anything else is a bug: its traceback shows
        message = user_message(err)
        if message is None:
            raise
        print(f"vlm-curate: error: {message}", file=sys.stderr)
        return 2


def _run_command(args: argparse.Namespace) -> int:
    if args.command in ("embed", "bootstrap"):
        return _scoring_main(args)
    if args.command == "report":
        from data_pipeline.report import write_report

        print(f"report: {write_report(args.out)}")
        return 0
    from data_pipeline.pipeline import STEPS, run

    cfg = load_curate_config(args.config, args.overrides)
    steps = STEPS if args.command == "run" else (args.command,)
    manifest = run(cfg, steps, ray_address=args.ray_address, use_ray=not args.no_ray)
    if manifest is not None:
        print(format_funnel(manifest["funnel"]))
    return 0


def _scoring_main(args: argparse.Namespace) -> int:
    """``embed`` and ``bootstrap``."""
    from vlmtrain.runlock import RunLock

    from data_pipeline.bootstrap import run_bootstrap
    from data_pipeline.config import EmbedConfig, ModelSpec, load_bootstrap_config
    from data_pipeline.embed.jobs import EmbedError
    from data_pipeline.embed.workers import embed_pool
    from data_pipeline.inputs import refuse_inputs_inside

    if args.command == "bootstrap":
        run_bootstrap(load_bootstrap_config(args.config, args.overrides), args.rounds, use_ray=not args.no_ray,
                      trust_checkpoint=args.trust_checkpoint)
        return 0
    if not args.shards.is_dir():
        raise EmbedError(f"shards folder not found: {args.shards}")
    refuse_inputs_inside(args.out, [("SHARDS", args.shards), ("--checkpoint", args.checkpoint or "")])
    spec = ModelSpec(checkpoint=args.checkpoint or "", open_clip_model=args.model or "", pretrained=args.pretrained,
                     trust_checkpoint=args.trust_checkpoint)
    cfg = EmbedConfig(batch_size=args.batch_size, workers=args.workers, cpus_per_worker=args.cpus_per_worker)
    with RunLock(args.out):
        index = embed_pool(sorted(str(p) for p in args.shards.glob("*.tar")), args.out, spec, cfg,
                           use_ray=not args.no_ray)
    print(f"clip_score over {len(index)} samples: mean {index['clip_score'].mean():.4f}, "
          f"median {index['clip_score'].median():.4f}")
    return 0


def format_funnel(funnel: dict) -> str:
    """Rows after each stage the run had (the embedding stages only when enabled), then rejections by reason."""
    rows = funnel["rows"]
    lines = ["funnel: " + " → ".join(f"{stage} {count}" for stage, count in rows.items() if stage != "kept"),
             f"kept {rows['kept']} of {rows['read']} ({rows['kept'] / max(rows['read'], 1):.1%}); rejected by reason:"]
    lines += [f"  {reason:<24}{count:>7}" for reason, count in
              sorted(funnel["rejected_by_reason"].items(), key=lambda item: -item[1])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
