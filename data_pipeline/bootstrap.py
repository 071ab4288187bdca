"""`vlm-curate bootstrap`: train a CLIP scorer on the pool, prune the pool by its CLIP scores, retrain.

Round 0 trains on the pool as ``vlm-curate run`` left it (heuristics + dedup), or reuses a finished
run that trained exactly so (``round0_run``, checked against the config). Round k ≥ 1 is that
``vlm-curate run`` again (``pipeline.run``, the pool's own config from its manifest) with round k−1's
model as ``embedding.model`` and the CLIP-score stage on with the bootstrap's rule: the pipeline
embeds the rows the pool kept, prunes them and writes the shards round k trains on. Any other
embedding stage the pool's config enables runs again too, with round k−1's model. Every round trains
with the same config and step budget, so the rounds table compares like with like: round 0 is the
unpruned baseline. Layout under ``output_dir``:

  round-NN/run/                 the vlm-train run (its export in run/final is round NN's model);
                                round 0 has none when it reuses ``round0_run``
  round-NN/eval.json            vlm-eval zero-shot results on ``eval_sets``
  round-NN/curated/             (k ≥ 1) the round's vlm-curate run: decisions.parquet (one row per pool
                                row read: clip_score, flag_clip_score, kept, reason), shards/ (round k's
                                training data), manifest.json, .work/embeddings/ (the pool embedded by
                                round k−1's model)
  round-NN/round.json           the round's row of the table, written last: the round is finished
  rounds.json, rounds.png       the table of all finished rounds

A round's curation starts from the pool's scored parts (linked into its .work with the pipeline's
stamp, which the pipeline checks: changed inputs or stage settings make it start over), so the
pool is not scored again; its input files must still exist. A rerun resumes at the first round
without ``round.json``; inside it, the curation resumes as any ``vlm-curate run`` does (finished
embeddings and shards are reused), and vlm-train resumes from its latest checkpoint. A finished
round 0 that reused a run is refused if that run has been retrained since (its train summary changed).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pandas as pd

from data_pipeline import pipeline
from data_pipeline.config import BootstrapConfig, ClipScoreConfig, CurateConfig
from data_pipeline.inputs import refuse_inputs_inside
from vlmtrain import atomic
from vlmtrain.configlib import from_dict, to_dict
from vlmtrain.errors import UserError
from vlmtrain.runlock import RunLock

MISMATCHED, CLEAN = "mismatched_caption", "clean"
CURATED = "curated"  # round-NN/curated: the round's vlm-curate run


class BootstrapError(UserError):
    """The bootstrap cannot run: no finished pool, an empty pool, a failed training or eval."""


@dataclass
class Pool:
    """A finished ``vlm-curate run``: its manifest and decisions (one row per row read)."""
    path: Path
    manifest: dict
    decisions: pd.DataFrame

    @classmethod
    def load(cls, path: str | Path) -> Pool:
        path = Path(path)
        if not (path / "manifest.json").is_file():
            raise BootstrapError(f"pool {path} is not a finished curation run (no manifest.json): "
                                 f"run `vlm-curate run CONFIG output_dir={path}` first")
        decisions = pd.read_parquet(path / "decisions.parquet")
        kept = int(decisions["kept"].sum())
        if kept == 0:
            raise BootstrapError(f"pool {path} is empty: curation kept 0 of {len(decisions)} rows read, "
                                 f"so there is nothing to train a scorer on")
        return cls(path, json.loads((path / "manifest.json").read_text()), decisions)


def run_bootstrap(cfg: BootstrapConfig, rounds: int, use_ray: bool = True,
                  log: Callable[[str], None] = print, quiet_tools: bool = False,
                  trust_checkpoint: bool = False) -> list[dict]:
    """Run rounds 0..rounds−1, resuming at the first unfinished one; return the rounds table.
    ``trust_checkpoint``: load the scorers' DeepSpeed files fully (``--trust-checkpoint``)."""
    if rounds < 1:
        raise BootstrapError(f"--rounds must be at least 1 (round 0 trains the first scorer), got {rounds}")
    out = Path(cfg.output_dir)
    refuse_inputs_inside(out, [("pool", cfg.pool), ("round0_run", cfg.round0_run), ("train_config", cfg.train_config),
                               ("ground_truth", cfg.ground_truth),
                               *((f"eval_sets[{i}]", path) for i, path in enumerate(cfg.eval_sets))])
    pool = Pool.load(cfg.pool)
    reused = check_round0_run(cfg, pool) if cfg.round0_run else None
    truth = load_ground_truth(cfg.ground_truth) if cfg.ground_truth else None
    with RunLock(out):
        return _run_rounds(cfg, pool, reused, truth, rounds, use_ray, log, quiet_tools, trust_checkpoint)


def _run_rounds(cfg: BootstrapConfig, pool: Pool, reused: dict | None, truth: pd.DataFrame | None, rounds: int,
                use_ray: bool, log: Callable[[str], None], quiet_tools: bool, trust_checkpoint: bool) -> list[dict]:
    out = Path(cfg.output_dir)
    table = []
    for number in range(rounds):
        round_dir = out / f"round-{number:02d}"
        done = round_dir / "round.json"
        if done.is_file():
            log(f"round {number}: finished in an earlier run ({done})")
            if number == 0:
                _check_finished_round0(json.loads(done.read_text()), cfg, reused, out)
        else:
            row = _run_round(cfg, pool, truth, number, round_dir, use_ray, log, quiet_tools, trust_checkpoint)
            atomic.write_json(done, row)
        table.append(json.loads(done.read_text()))
        log(format_round(table[-1]))
        write_rounds_table(table, out)
    return table


def _run_round(cfg: BootstrapConfig, pool: Pool, truth: pd.DataFrame | None, number: int, round_dir: Path,
               use_ray: bool, log: Callable[[str], None], quiet: bool, trust: bool) -> dict:
    round_dir.mkdir(parents=True, exist_ok=True)
    row: dict = {"round": number, "scorer": None, "rule": None, "cutoff": None,
                 "pool_rows": int(pool.decisions["kept"].sum()),
                 "reused_run": cfg.round0_run if number == 0 and cfg.round0_run else None}
    if number == 0:
        decisions, shards_dir = pool.decisions, pool.path / "shards"
    else:
        scorer = round_run(cfg, number - 1)
        curated = curate_round(cfg, pool, scorer, round_dir / CURATED, use_ray, log, trust)
        decisions, shards_dir = pd.read_parquet(curated / "decisions.parquet"), curated / "shards"
        row.update(scorer=str(scorer), rule=cfg.clip_score.rule, cutoff=clip_score_cutoff(decisions, cfg.clip_score))
    row["kept"] = int(decisions["kept"].sum())
    if truth is not None:
        row["ground_truth"] = removed_pair_quality(decisions, truth)
    run_dir = round_run(cfg, number)
    if row["reused_run"]:
        log(f"train: round 0 reuses {run_dir} (trained on the pool with this config)")
    else:
        train(cfg, shards_dir, run_dir, quiet, log)
    row["checkpoint"] = str(run_dir / "final")
    row["train_summary"] = json.loads((run_dir / "train_summary.json").read_text())
    row["zero_shot"] = evaluate(cfg, run_dir, round_dir / "eval.json", quiet, log, trust) if cfg.eval_sets else {}
    return row


def round_run(cfg: BootstrapConfig, number: int) -> Path:
    """The vlm-train run that is round ``number``'s model."""
    if number == 0 and cfg.round0_run:
        return Path(cfg.round0_run)
    return Path(cfg.output_dir) / f"round-{number:02d}" / "run"


# ------------------------------------------------------------------ reusing a finished run as round 0

# Keys of a run's resolved config that do not change what it trains: where it writes, resuming, its bar.
NOT_TRAINING_KEYS = frozenset({"output_dir", "resume", "overwrite", "progress"})


def check_round0_run(cfg: BootstrapConfig, pool: Pool) -> dict:
    """``round0_run`` must be the run round 0 would train: the same resolved vlm-train config (train_config,
    train_overrides, the pool's shards), ranks and shard files. Returns its train summary."""
    from vlmtrain.checkpoint import find_resume_point
    from vlmtrain.config import load_train_config
    from vlmtrain.configlib import to_dict
    from vlmtrain.data import data_fingerprint, resolve_sources

    run = Path(cfg.round0_run)
    if not (run / "train_summary.json").is_file() or not (run / "config.json").is_file():
        raise BootstrapError(f"round0_run {run} is not a finished vlm-train run (no train_summary.json "
                             f"or config.json)")
    wanted = load_train_config(cfg.train_config, round_train_overrides(cfg, pool.path / "shards", run))
    theirs = _flat_config(json.loads((run / "config.json").read_text()))
    ours = _flat_config(json.loads(json.dumps(to_dict(wanted))))
    differing = [f"{key} ({theirs.get(key)!r} there, {ours.get(key)!r} here)"
                 for key in sorted(theirs.keys() | ours.keys())
                 if key not in NOT_TRAINING_KEYS and theirs.get(key) != ours.get(key)]
    summary = json.loads((run / "train_summary.json").read_text())
    if summary["world_size"] != cfg.nproc:
        differing.append(f"nproc ({summary['world_size']} ranks there, {cfg.nproc} here)")
    if differing:
        raise BootstrapError(f"round0_run {run} did not train as round 0 would (train_config {cfg.train_config} + "
                             f"train_overrides on {pool.path / 'shards'}); differing: {'; '.join(differing)}")
    last = find_resume_point("latest", run)
    if last is None:
        raise BootstrapError(f"round0_run {run} has no checkpoint left to check which shard files it trained on")
    if last.sidecar["data_fingerprint"] != data_fingerprint(wanted.data, resolve_sources(wanted.data)):
        raise BootstrapError(f"round0_run {run}: the shard files in {pool.path / 'shards'} changed since it trained "
                             f"(names or sizes differ from its checkpoint's data fingerprint)")
    return summary


def _flat_config(config: dict) -> dict:
    """``{"data": {"batch_size": 128}}`` → ``{"data.batch_size": 128}``, with the shard path made absolute."""
    def flatten(tree: dict, prefix: str) -> dict:
        flat = {}
        for key, value in tree.items():
            flat.update(flatten(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return flat

    flat = flatten(config, "")
    if flat.get("data.train_shards"):
        flat["data.train_shards"] = os.path.realpath(flat["data.train_shards"])
    return flat


def _check_finished_round0(row: dict, cfg: BootstrapConfig, reused_summary: dict | None, out: Path) -> None:
    """Later rounds were scored by the finished round 0's model: it must still be the one this config names."""
    if cfg.round0_run and row.get("train_summary") != reused_summary:
        raise BootstrapError(f"round 0 in {out} finished with another model than round0_run {cfg.round0_run} now "
                             f"holds (retrained since?), so the later rounds are stale: delete {out} to start over")
    if row.get("reused_run") and not cfg.round0_run:
        raise BootstrapError(f"round 0 in {out} reused the run {row['reused_run']}: pass round0_run="
                             f"{row['reused_run']} again, or use another output_dir")


# ------------------------------------------------------------------ ground truth


def load_ground_truth(path: str | Path) -> pd.DataFrame:
    """key → noise kind, from the generator's ``train/index.parquet``."""
    path = Path(path)
    if not path.is_file():
        raise BootstrapError(f"ground_truth file not found: {path} (tools/make_demo_data.py writes train/index.parquet)")
    truth = pd.read_parquet(path)
    missing = {"key", "noise"} - set(truth.columns)
    if missing:
        raise BootstrapError(f"ground_truth {path} lacks column(s) {', '.join(sorted(missing))}")
    return truth[["key", "noise"]]


def removed_pair_quality(decisions: pd.DataFrame, truth: pd.DataFrame) -> dict:
    """How the CLIP-score rule did on the rows that reached it, against the generator's labels.

    precision: share of removed pairs whose caption was mismatched; recall: share of the mismatched
    pairs that reached the rule which it removed; clean_kept: share of clean pairs it kept.
    """
    table = decisions.merge(truth, on="key", how="left", validate="one_to_one")
    unknown = table["noise"].isna()
    if unknown.any():
        raise BootstrapError(f"ground truth has no row for key {table['key'][unknown].iloc[0]!r} "
                             f"({int(unknown.sum())} keys missing): is it the index of this pool?")
    pruned = "flag_clip_score" in table  # round 0 has no rule: counts only
    removed = table["flag_clip_score"].fillna(False).astype(bool) if pruned else pd.Series(False, index=table.index)
    reached = table["kept"] | removed
    mismatched, clean = reached & (table["noise"] == MISMATCHED), reached & (table["noise"] == CLEAN)
    caught = int((removed & mismatched).sum())
    return {"mismatched_in_pool": int(mismatched.sum()), "clean_in_pool": int(clean.sum()),
            "removed": int(removed.sum()), "removed_mismatched": caught,
            "precision": caught / int(removed.sum()) if removed.any() else None,
            "recall": caught / int(mismatched.sum()) if pruned and mismatched.any() else None,
            "clean_kept": int((clean & ~removed).sum()) / int(clean.sum()) if pruned and clean.any() else None}


# ------------------------------------------------------------------ round k's curation: the pipeline


def curate_round(cfg: BootstrapConfig, pool: Pool, scorer: Path, out: Path, use_ray: bool,
                 log: Callable[[str], None], trust: bool) -> Path:
    """Run round k's ``vlm-curate run`` into ``out`` (scored by ``scorer``, round k−1's run); return ``out``.

    Its shards are as large as ``_samples_per_shard`` allows for the rows kept, which only the write step
    knows: planned for the rows the pool kept (or an earlier attempt's size, so a resumed round keeps
    the shards its training reads), the write step is redone when the rule kept fewer.
    """
    gone = [entry["path"] for entry in pool.manifest.get("inputs", []) if not os.path.exists(entry["path"])]
    if gone:
        raise BootstrapError(f"pool {pool.path}: {len(gone)} of the input files it was curated from are gone "
                             f"(first: {gone[0]}); round {out.parent.name} curates them again with its scorer: "
                             f"restore them")
    earlier = out / "manifest.json"
    per_shard = (json.loads(earlier.read_text())["config"]["output"]["samples_per_shard"] if earlier.is_file()
                 else _samples_per_shard(cfg, int(pool.decisions["kept"].sum())))
    round_cfg = round_curate_config(cfg, pool, scorer, out, per_shard, trust)
    _start_from_pool_scoring(pool, round_cfg)
    kept = pipeline.run(round_cfg, use_ray=use_ray, log=log)["funnel"]["rows"]["kept"]
    if _samples_per_shard(cfg, kept) != per_shard:
        round_cfg.output.samples_per_shard = _samples_per_shard(cfg, kept)
        pipeline.run(round_cfg, steps=("write",), use_ray=use_ray, log=log)
    return out


def round_curate_config(cfg: BootstrapConfig, pool: Pool, scorer: Path, out: Path, per_shard: int,
                        trust: bool) -> CurateConfig:
    """The pool's curation config with ``scorer`` as the embedding model and the CLIP-score stage on with
    the bootstrap's rule; output in ``out``, ``per_shard`` samples a shard."""
    raw = copy.deepcopy(pool.manifest["config"])
    raw["output_dir"] = str(out)
    raw.setdefault("output", {})["samples_per_shard"] = per_shard
    raw.setdefault("embedding", {}).update(
        model={"checkpoint": str(scorer), "trust_checkpoint": trust}, embed=to_dict(cfg.embed),
        clip_score={**to_dict(cfg.clip_score), "enabled": True})
    round_cfg = from_dict(CurateConfig, raw)
    round_cfg.check()
    return round_cfg


def _start_from_pool_scoring(pool: Pool, round_cfg: CurateConfig) -> None:
    """A new round's run starts with the pool's ``.work`` (its scored parts): the same inputs and stage
    settings score the same, so scoring again would only repeat the pool's work. The pipeline's stamp
    comes along and is checked as on any resume. Hard links where possible: the pipeline replaces its
    files, it never writes into them. The pool's embeddings, if any, stay behind (another model's)."""
    ours, theirs = pipeline.Run(round_cfg).work, pipeline.Run(replace(round_cfg, output_dir=str(pool.path))).work
    if ours.exists() or not theirs.is_dir():
        return
    tmp = ours.with_name(ours.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(theirs, tmp, ignore=shutil.ignore_patterns("embeddings"), copy_function=_link_or_copy)
    os.replace(tmp, ours)


def _link_or_copy(source: str, target: str) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copy2(source, target)


def _samples_per_shard(cfg: BootstrapConfig, kept: int) -> int:
    """Small enough that every vlm-train reader slot (ranks × loader workers) gets a shard."""
    from vlmtrain.config import load_train_config

    workers = load_train_config(cfg.train_config, cfg.train_overrides).data.workers
    return max(1, min(cfg.samples_per_shard, math.ceil(kept / (cfg.nproc * max(workers, 1)))))


def clip_score_cutoff(decisions: pd.DataFrame, cfg: ClipScoreConfig) -> float:
    """The cutoff the CLIP-score stage applied (``stages.clip_score.passes_clip_score``), read back from its
    decisions: the threshold, or the lowest score it let through (NaN when none)."""
    if cfg.rule == "threshold":
        return cfg.threshold
    passed = decisions["clip_score"][decisions["clip_score"].notna() & ~decisions["flag_clip_score"]]
    return float(passed.min()) if len(passed) else float("nan")


# ------------------------------------------------------------------ training and evaluation (the real CLIs)


def _tool(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _call(command: list[str], what: str, quiet: bool, log: Callable[[str], None]) -> None:
    log(f"{what}: {' '.join(command)}")
    result = subprocess.run(command, capture_output=quiet, text=True)
    if result.returncode != 0:
        detail = f":\n{result.stderr[-3000:]}" if quiet else ""
        raise BootstrapError(f"{what} failed with exit code {result.returncode}{detail}")


def round_train_overrides(cfg: BootstrapConfig, shards_dir: Path, run_dir: Path) -> list[str]:
    """What every round passes to vlm-train after ``--config train_config``. Paths go as JSON strings (valid
    YAML), so ``#``, ``: `` or quotes in them arrive literally."""
    return [*cfg.train_overrides, f"data.train_shards={json.dumps(str(shards_dir))}",
            f"output_dir={json.dumps(str(run_dir))}", "resume=latest"]


def train(cfg: BootstrapConfig, shards_dir: Path, run_dir: Path, quiet: bool, log: Callable[[str], None]) -> None:
    if (run_dir / "train_summary.json").is_file():
        log(f"train: {run_dir} finished in an earlier run")
        return
    _call([_tool("vlm-train"), "--config", cfg.train_config, "--nproc-per-node", str(cfg.nproc),
           *round_train_overrides(cfg, shards_dir, run_dir)], "train", quiet, log)


def evaluate(cfg: BootstrapConfig, run_dir: Path, out: Path, quiet: bool, log: Callable[[str], None],
             trust: bool = False) -> dict:
    """vlm-eval zero-shot → {"<dataset>/<metric>": value}."""
    _call([_tool("vlm-eval"), "zeroshot", "--checkpoint", str(run_dir), "--data", *cfg.eval_sets,
           "--out", str(out), "--no-progress", *(["--trust-checkpoint"] if trust else [])], "eval", quiet, log)
    return {f"{record['dataset']}/{name}": value for record in json.loads(out.read_text())
            for name, value in record["metrics"].items() if not name.startswith("num_")}


# ------------------------------------------------------------------ the rounds table


def format_round(row: dict) -> str:
    parts = [f"round {row['round']}: kept {row['kept']} of {row['pool_rows']}"]
    if row["cutoff"] is not None:
        parts.append(f"{row['rule']} cutoff {row['cutoff']:.4f}")
    truth = row.get("ground_truth")
    if truth and truth["removed"]:
        parts.append(f"removed {truth['removed_mismatched']} of {truth['mismatched_in_pool']} mismatched pairs "
                     f"(recall {truth['recall']:.3f}, precision {truth['precision']:.3f}), "
                     f"kept {truth['clean_kept']:.1%} of clean pairs")
    top1 = [f"{name.split('/')[0]} {value:.3f}" for name, value in row["zero_shot"].items() if name.endswith("/acc1")]
    if top1:
        parts.append("zero-shot top-1 " + ", ".join(top1))
    return "; ".join(parts)


def write_rounds_table(table: list[dict], out: Path) -> None:
    atomic.write_json(out / "rounds.json", {"rounds": table})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [row["round"] for row in table]
    fig, (kept, quality, zero_shot) = plt.subplots(1, 3, figsize=(13, 3.6))
    kept.bar(rounds, [row["kept"] for row in table], color="#4c72b0")
    kept.set_title("training pairs kept")
    for key, colour in (("recall", "#c44e52"), ("precision", "#dd8452"), ("clean_kept", "#55a868")):
        values = [(row.get("ground_truth") or {}).get(key) for row in table]
        points = [(r, v) for r, v in zip(rounds, values) if v is not None]
        if points:
            quality.plot(*zip(*points), marker="o", color=colour, label=key)
    quality.set_title("removed pairs vs ground truth")
    quality.set_ylim(0, 1.05)
    names = sorted({name for row in table for name in row["zero_shot"] if name.endswith("/acc1")})
    for name in names:
        zero_shot.plot(rounds, [row["zero_shot"].get(name, float("nan")) for row in table], marker="o", label=name)
    zero_shot.set_title("zero-shot top-1")
    for axis in (kept, quality, zero_shot):
        axis.set_xlabel("round")
        axis.set_xticks(rounds)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "rounds.png", dpi=90)
    plt.close(fig)
