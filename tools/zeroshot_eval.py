"""Evaluate one checkpoint on a suite of zero-shot eval sets described in YAML.

    python tools/zeroshot_eval.py configs/eval/demo_suite.yaml
    python tools/zeroshot_eval.py SUITE.yaml checkpoint=runs/x/final out=results/x.json

The YAML names the model (``checkpoint`` — our export, run or DeepSpeed checkpoint directory —
or ``model`` + ``pretrained`` for open_clip) and lists ``datasets``, each with a ``path`` and
optional ``name``, ``kind``, ``task``, ``classnames``, ``templates`` (see configs/eval/demo_suite.yaml).
Prints a table; with ``out`` writes CLIP_benchmark-style JSON records and confusion PNGs next to it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from vlmtrain.cli import configure_runtime, user_errors  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", help="suite YAML, e.g. configs/eval/demo_suite.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="suite overrides, e.g. out=r.json")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = parser.parse_args(argv)

    configure_runtime()
    from vlmtrain.eval.suite import evaluate_and_report, load_suite_config, resolve_eval_sets

    with user_errors("zeroshot_eval"):
        suite = load_suite_config(args.suite, args.overrides)
        evaluate_and_report(resolve_eval_sets(suite.datasets), checkpoint=suite.checkpoint, tag=suite.tag,
                            model=suite.model, pretrained=suite.pretrained, out=suite.out,
                            batch_size=suite.batch_size, progress=not args.no_progress, device=suite.device)


if __name__ == "__main__":
    main()
