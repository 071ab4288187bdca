"""The demo behind `make demo`: generate a corpus, curate it, train a tiny CLIP on 2 ranks, evaluate zero-shot.

Each phase is the real command-line tool a user would run. A rerun reuses finished phases
(the corpus when its seed and size match, the trained model when its resolved config matches),
so an interrupted demo picks up where it stopped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.cli import format_funnel  # noqa: E402
from data_pipeline.config import load_curate_config  # noqa: E402
from vlmtrain.config import load_train_config, to_dict  # noqa: E402

DEMO_CONFIG = REPO / "configs" / "train" / "demo.yaml"
CURATE_CONFIG = REPO / "configs" / "curate" / "demo.yaml"


def tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def run(phase: str, command: list[str]) -> float:
    print(f"\n== {phase}: {' '.join(command)}", flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO)
    if result.returncode != 0:
        sys.exit(f"demo: {phase} failed with exit code {result.returncode}")
    return time.perf_counter() - started


def corpus_is_current(data: Path, seed: int, num_train: int) -> bool:
    manifest = data / "manifest.json"
    if not manifest.is_file():
        return False
    written = json.loads(manifest.read_text())
    return written.get("seed") == seed and written.get("counts", {}).get("train") == num_train


def run_is_current(run_dir: Path, overrides: list[str]) -> bool:
    done = run_dir / "train_summary.json"
    saved = run_dir / "config.json"
    if not (done.is_file() and saved.is_file()):
        return False
    return json.loads(saved.read_text()) == to_dict(load_train_config(DEMO_CONFIG, overrides))


def curation_is_current(curated: Path, overrides: list[str]) -> bool:
    manifest = curated / "manifest.json"
    if not manifest.is_file():
        return False
    return json.loads(manifest.read_text())["config"] == to_dict(load_curate_config(CURATE_CONFIG, overrides))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="where the corpus, run and results go")
    parser.add_argument("--seed", type=int, default=0, help="corpus and training seed")
    parser.add_argument("--num-train", type=int, default=12000, help="training pairs to generate")
    parser.add_argument("--nproc", type=int, default=2, help="data-parallel ranks (CPU processes)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="extra vlm-train overrides")
    args = parser.parse_args(argv)

    out = Path(args.out).resolve()
    data, curated, run_dir, results = out / "data", out / "curated", out / "run", out / "results.json"
    curate_overrides = [f"output_dir={curated}", f"sources=[{{format: webdataset, path: '{data / 'train'}'}}]"]
    overrides = [f"data.train_shards={curated / 'shards'}", f"output_dir={run_dir}", f"seed={args.seed}",
                 *args.overrides]
    timings: dict[str, float] = {}
    started = time.perf_counter()

    if corpus_is_current(data, args.seed, args.num_train):
        print(f"== data: reusing {data} (same seed and size)")
    else:
        timings["data"] = run("data", [sys.executable, str(REPO / "tools" / "make_demo_data.py"),
                                       "--out", str(data), "--seed", str(args.seed),
                                       "--num-train", str(args.num_train), "--force"])
    if "data" not in timings and curation_is_current(curated, curate_overrides):
        print(f"== curate: reusing {curated} (same config)")
    else:
        timings["curate"] = run("curate", [tool("vlm-curate"), "run", str(CURATE_CONFIG), *curate_overrides])
    if run_is_current(run_dir, overrides):
        print(f"== train: reusing {run_dir} (same resolved config); delete it to retrain")
    else:
        timings["train"] = run("train", [tool("vlm-train"), "--config", str(DEMO_CONFIG),
                                         "--nproc-per-node", str(args.nproc), *overrides])
    timings["eval"] = run("eval", [tool("vlm-eval"), "zeroshot", "--checkpoint", str(run_dir),
                                   "--data", str(data / "eval"), "--out", str(results)])

    print(summary(json.loads(results.read_text()), json.loads((run_dir / "train_summary.json").read_text()),
                  timings, time.perf_counter() - started))
    funnel = json.loads((curated / "manifest.json").read_text())["funnel"]
    print(f"\ncuration ({curated}):\n{format_funnel(funnel)}")


def summary(records: list[dict], train: dict, timings: dict[str, float], total: float) -> str:
    lines = ["", "== demo results", "",
             f"{'zero-shot classification':<26}{'top-1':>7}{'top-5':>7}{'mean/cls':>9}{'chance':>8}{'top-1/chance':>14}"]
    for record in records:
        if record["task"] != "zeroshot_classification":
            continue
        m = record["metrics"]
        classes = len(record["confusion_matrix"])
        ratio = m["acc1"] * classes
        lines.append(f"  {record['dataset']:<24}{m['acc1']:>7.3f}{m.get('acc5', float('nan')):>7.3f}"
                     f"{m['mean_per_class_recall']:>9.3f}{1 / classes:>8.3f}{ratio:>13.1f}×")
    lines.append(f"\n{'zero-shot retrieval':<26}{'R@1':>7}{'R@5':>7}{'R@10':>7}")
    for record in records:
        if record["task"] != "zeroshot_retrieval":
            continue
        m = record["metrics"]
        for direction, key in (("image→text", "text_retrieval"), ("text→image", "image_retrieval")):
            lines.append(f"  {record['dataset'] + ' ' + direction:<24}"
                         + "".join(f"{m[f'{key}_recall@{k}']:>7.3f}" for k in (1, 5, 10)))
    lines.append(f"\ntraining: {train['steps']} steps × global batch {train['global_batch']} on "
                 f"{train['world_size']} ranks, {train['samples_per_s']:.0f} samples/s, "
                 f"final loss {train['final_loss']:.3f}, {train['skipped_samples']} corrupt samples skipped")
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    lines.append(f"wall time: {total:.0f} s ({phases})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
