#!/usr/bin/env python
"""End-to-end check of bootstrapped CLIP-score pruning on the generated demo pool (too slow for CI).

Generates the demo corpus (12k pairs, 20% mismatched captions flagged in train/index.parquet),
curates it with configs/curate/demo.yaml, then runs `vlm-curate bootstrap` with
configs/curate/bootstrap_demo.yaml: round 0 trains the tiny CLIP on the curated pool, round k
prunes the pool by round k−1's CLIP scores and trains again with the same step budget. Prints the
rounds table and the two targets of issue 6:
  1. the pruning removes ≥ 80% of the mismatched captions and keeps ≥ 90% of the clean pairs;
  2. the model trained on the pruned pool beats round 0 (the unpruned pool) in zero-shot top-1.
Finished phases are reused on a rerun (the bootstrap resumes at its first unfinished round).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def phase(name: str, command: list[str], done: Path) -> None:
    if done.exists():
        print(f"== {name}: reusing {done}", flush=True)
        return
    print(f"== {name}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    if subprocess.run(command, cwd=REPO).returncode != 0:
        sys.exit(f"bench_bootstrap: {name} failed")
    print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "build" / "bench_bootstrap")
    parser.add_argument("--num-train", type=int, default=12000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="rounds including round 0 (the unpruned baseline)")
    parser.add_argument("--steps", type=int, default=300, help="vlm-train steps per round (the same every round)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--top-fraction", type=float, default=0.75)
    args = parser.parse_args()

    out = args.out.resolve()
    data, curated, boot = out / "data", out / "curated", out / "bootstrap"
    phase("data", [sys.executable, str(REPO / "tools" / "make_demo_data.py"), "--out", str(data), "--seed",
                   str(args.seed), "--num-train", str(args.num_train), "--force"], data / "manifest.json")
    phase("curate", [tool("vlm-curate"), "run", str(REPO / "configs" / "curate" / "demo.yaml"), f"output_dir={curated}",
                     f"sources=[{{format: webdataset, path: '{data / 'train'}'}}]", "progress=false"],
          curated / "manifest.json")
    phase("bootstrap", [tool("vlm-curate"), "bootstrap", str(REPO / "configs" / "curate" / "bootstrap_demo.yaml"),
                        "--rounds", str(args.rounds), f"pool={curated}", f"output_dir={boot}", f"nproc={args.nproc}",
                        f"eval_sets=[{data / 'eval'}]", f"ground_truth={data / 'train' / 'index.parquet'}",
                        f"train_overrides=[steps={args.steps}, progress=false, seed={args.seed}]",
                        f"clip_score.top_fraction={args.top_fraction}", "embed.progress=false"],
          boot / f"round-{args.rounds - 1:02d}" / "round.json")
    report(json.loads((boot / "rounds.json").read_text())["rounds"], boot)


def report(rounds: list[dict], boot: Path) -> None:
    datasets = sorted({n.split("/")[0] for r in rounds for n in r["zero_shot"] if n.endswith("/acc1")})
    print(f"\n{'round':<7}{'kept':>7}{'cutoff':>9}{'recall':>8}{'precision':>10}{'clean kept':>11}"
          + "".join(f"{d + ' top-1':>16}" for d in datasets))
    for r in rounds:
        truth = r.get("ground_truth") or {}

        def number(value, width, fmt=".3f"):
            return f"{value:>{width}{fmt}}" if value is not None else f"{'-':>{width}}"

        print(f"{r['round']:<7}{r['kept']:>7}{number(r['cutoff'], 9, '.4f')}{number(truth.get('recall'), 8)}"
              f"{number(truth.get('precision'), 10)}{number(truth.get('clean_kept'), 11)}"
              + "".join(f"{r['zero_shot'].get(d + '/acc1', float('nan')):>16.4f}" for d in datasets))
    print(f"(table: {boot / 'rounds.json'}, plot: {boot / 'rounds.png'})\n")
    base = rounds[0]
    for r in rounds[1:]:
        truth = r["ground_truth"]
        print(f"round {r['round']}: removed {truth['removed_mismatched']} of {truth['mismatched_in_pool']} mismatched "
              f"pairs ({truth['recall']:.1%}, target >= 80%), kept {truth['clean_kept']:.1%} of clean pairs "
              f"(target >= 90%)")
        for d in datasets:
            mine, theirs = r["zero_shot"][f"{d}/acc1"], base["zero_shot"][f"{d}/acc1"]
            print(f"round {r['round']}: {d} top-1 {mine:.4f} vs unpruned {theirs:.4f} "
                  f"({'higher' if mine > theirs else 'NOT higher'})")


if __name__ == "__main__":
    main()
