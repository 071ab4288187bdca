"""The demo behind `make demo`: generate a corpus, curate it, train a tiny CLIP on 2 ranks, evaluate zero-shot,
then one round of bootstrapped CLIP-score pruning: the trained model scores the curated pool, the lowest-scoring
quarter is removed, and the same training on the pruned pool is evaluated against it.

Each phase is the real command-line tool a user would run. A rerun reuses finished phases
(the corpus when its seed and size match, the trained model when its resolved config matches,
finished bootstrap rounds), so an interrupted demo picks up where it stopped.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_pipeline.cli import format_funnel  # noqa: E402
from data_pipeline.config import load_curate_config  # noqa: E402
from vlmtrain.config import load_train_config  # noqa: E402
from vlmtrain.configlib import to_dict  # noqa: E402

DEMO_CONFIG = REPO / "configs" / "train" / "demo.yaml"
CURATE_CONFIG = REPO / "configs" / "curate" / "demo.yaml"
BOOTSTRAP_CONFIG = REPO / "configs" / "curate" / "bootstrap_demo.yaml"


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
    boot = out / "bootstrap"
    curate_overrides = [f"output_dir={curated}", f"sources=[{{format: webdataset, path: '{data / 'train'}'}}]"]
    # overwrite=true: a demo run whose config changed is retrained from scratch.
    overrides = [f"data.train_shards={curated / 'shards'}", f"output_dir={run_dir}", f"seed={args.seed}",
                 "overwrite=true", *args.overrides]
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
    if "curate" not in timings and run_is_current(run_dir, overrides):
        print(f"== train: reusing {run_dir} (same resolved config); delete it to retrain")
    else:
        timings["train"] = run("train", [tool("vlm-train"), "--config", str(DEMO_CONFIG),
                                         "--nproc-per-node", str(args.nproc), *overrides])
    timings["eval"] = run("eval", [tool("vlm-eval"), "zeroshot", "--checkpoint", str(run_dir),
                                   "--data", str(data / "eval"), "--out", str(results), "--no-progress"])
    if "train" in timings:
        shutil.rmtree(boot, ignore_errors=True)  # its rounds were scored and compared with the model just replaced
    # Round 0 is the run above (not trained again); round 1 trains on the pruned pool with the same overrides.
    timings["bootstrap"] = run("bootstrap", [
        tool("vlm-curate"), "bootstrap", str(BOOTSTRAP_CONFIG), "--rounds", "2", f"pool={curated}",
        f"output_dir={boot}", f"round0_run={run_dir}", f"nproc={args.nproc}",
        f"train_overrides={json.dumps([f'seed={args.seed}', *args.overrides])}",
        f"eval_sets={json.dumps([str(data / 'eval')])}", f"ground_truth={data / 'train' / 'index.parquet'}",
        "embed.progress=false"])

    print(summary(json.loads(results.read_text()), json.loads((run_dir / "train_summary.json").read_text())))
    funnel = json.loads((curated / "manifest.json").read_text())["funnel"]
    print(f"\ncuration ({curated}):\n{format_funnel(funnel)}")
    print(bootstrap_summary(json.loads((boot / "rounds.json").read_text())["rounds"], boot))
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in timings.items())
    print(f"\nwall time: {time.perf_counter() - started:.0f} s ({phases})")


def summary(records: list[dict], train: dict) -> str:
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
    return "\n".join(lines)


def bootstrap_summary(rounds: list[dict], boot: Path) -> str:
    """Round 1 against round 0 (the model above): what its pruning removed, and zero-shot top-1 after it."""
    unpruned, pruned = rounds[0], rounds[1]
    truth = pruned["ground_truth"]
    lines = [f"\nbootstrapped CLIP-score pruning, one round ({boot}):",
             f"  the model above scored the curated pool; kept the top {pruned['kept'] / pruned['pool_rows']:.0%} "
             f"by image-text cosine ({pruned['kept']} of {pruned['pool_rows']}, cut-off {pruned['cutoff']:.3f})",
             f"  removed {truth['removed_mismatched']} of {truth['mismatched_in_pool']} mismatched pairs "
             f"(recall {truth['recall']:.3f}, precision {truth['precision']:.3f}: {truth['removed_mismatched']} of "
             f"{truth['removed']} removed); kept {truth['clean_kept']:.1%} of clean pairs",
             f"  {'zero-shot top-1':<24}{'unpruned':>9}{'pruned':>9}"]
    for name in sorted(name for name in unpruned["zero_shot"] if name.endswith("/acc1")):
        lines.append(f"  {name.split('/')[0]:<24}{unpruned['zero_shot'][name]:>9.3f}"
                     f"{pruned['zero_shot'].get(name, float('nan')):>9.3f}")
    train = pruned["train_summary"]
    lines.append(f"  both trained {train['steps']} steps × global batch {train['global_batch']}, same config; "
                 f"plot: {boot / 'rounds.png'}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
