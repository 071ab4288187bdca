"""`vlm-curate`: curate image-text pairs into webdataset shards, recording every decision."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data_pipeline.config import ConfigError, load_curate_config
from data_pipeline.sources import SourceError

EPILOG = """\
commands:
  run CONFIG [key=value ...]     score → dedup → write; a rerun after a kill resumes
  score | dedup | write CONFIG   one step (each needs the step before it to have run)
  report OUT                     funnel, histograms and rejected examples of a finished run

outputs under output_dir:
  shards/shard-NNNNNN.tar   webdataset samples (jpg/png/webp, txt, json) ready for vlm-train
  decisions.parquet         one row per sample read: uid, sha256, source, scores, flags, kept, reason
  manifest.json             rows per stage, rejections per reason, shard list with sha256, config
  .work/                    per-input-file scored parts and duplicates (what a rerun reuses)

example:
  vlm-curate run configs/curate/demo.yaml output_dir=curated 'sources=[{format: webdataset, path: data/train}]'
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-curate", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Read raw image-text pairs, validate, filter and deduplicate them on Ray Data, and write "
                    "webdataset shards plus a record of why each sample was kept or rejected.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (("run", "all steps, resuming finished work"), ("score", "read, decode, filter, hash"),
                       ("dedup", "exact and near-duplicate search"), ("write", "select, write shards + manifest")):
        step = commands.add_parser(name, help=text, description=text)
        step.add_argument("config", type=Path, help="curation YAML (see configs/curate/)")
        step.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides (YAML values)")
        step.add_argument("--ray-address", default=None,
                          help="Ray cluster to join (e.g. auto or host:6379); default: a local Ray for this run")
        step.add_argument("--no-ray", action="store_true", help="run the stages in this process (debugging)")
    report = commands.add_parser("report", help="PNG charts and an HTML page for a finished run")
    report.add_argument("out", type=Path, help="the run's output_dir")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "report":
            from data_pipeline.report import write_report

            page = write_report(args.out)
            print(f"report: {page}")
            return 0
        cfg = load_curate_config(args.config, args.overrides)
        from data_pipeline.pipeline import STEPS, PipelineError, run

        steps = STEPS if args.command == "run" else (args.command,)
        manifest = run(cfg, steps, ray_address=args.ray_address, use_ray=not args.no_ray)
    except (ConfigError, SourceError, FileNotFoundError, ValueError) as err:
        print(f"vlm-curate: error: {err}", file=sys.stderr)
        return 2
    except PipelineError as err:
        print(f"vlm-curate: error: {err}", file=sys.stderr)
        return 2
    if manifest is not None:
        print(format_funnel(manifest["funnel"]))
    return 0


def format_funnel(funnel: dict) -> str:
    rows = funnel["rows"]
    lines = ["funnel: " + " → ".join(f"{stage} {rows[stage]}" for stage in
                                     ("read", "validate", "heuristics", "exact_dedup", "near_dedup")),
             f"kept {rows['kept']} of {rows['read']} ({rows['kept'] / max(rows['read'], 1):.1%}); rejected by reason:"]
    lines += [f"  {reason:<24}{count:>7}" for reason, count in
              sorted(funnel["rejected_by_reason"].items(), key=lambda item: -item[1])]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
