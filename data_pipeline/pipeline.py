"""Compose the curation stages on Ray Data; the only module that knows Ray.

Four steps, each resumable, all under ``output_dir``:
  score   every input file ("part") is read, decoded/validated, filtered by the heuristics and
          hashed by Ray Data actors; each part lands in ``.work/parts/<part>.parquet``, written
          atomically, so a rerun scores only the parts that are missing.
  dedup   exact and near-duplicate search over the small columns (sha256, 32×32 thumbnails) of all
          parts (dedup is global: every row must meet every other): candidate pairs on the driver,
          their verification split over Ray tasks → ``.work/duplicates.parquet``.
  embed   only with an ``embedding`` section naming a model: CLIP embeddings of the rows still kept
          (and of the eval/seed sets the stages need) on Ray actors → ``.work/embeddings/``
          (``data_pipeline.embed_step``; finished jobs are reused).
  write   selection (the only step that drops rows: ``select.decide``, then the enabled embedding
          stages of ``select_embeddings``) → ``decisions.parquet``, webdataset shards in
          ``shards/`` (written by Ray tasks, each atomically; existing ones are kept) and
          ``manifest.json``.
A rerun after a kill produces byte-identical outputs: every step is a pure function of its inputs,
the row order is the input order, and nothing records wall-clock time.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict
from functools import reduce
from pathlib import Path
from typing import Callable, Iterable, Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_pipeline import embed_step, inputs
from data_pipeline.config import CurateConfig, to_dict
from data_pipeline.ray_runtime import ensure_ray
from data_pipeline.select import decide, eligible_for_dedup, funnel
from data_pipeline.registry import row_reason, row_stages, run_stages
from data_pipeline.select_embeddings import select_by_embeddings
from data_pipeline.shards import ShardPlan, file_sha256, plan_shards, write_shard
from data_pipeline.sources import Part, list_parts, read_part
from data_pipeline.stages.dedup import find_duplicates
from data_pipeline.stages.near_duplicates import serial_map
from vlmtrain import atomic
from vlmtrain.errors import UserError
from vlmtrain.runlock import RunLock

STEPS = ("score", "dedup", "embed", "write")
# Raw bytes the later steps never need: a 1 MB caption must not travel further than the decoder.
_DROPPED_AFTER_SCORING = ["caption_raw", "json_raw"]
_METADATA_EXCLUDED = {"image", "image_out", "thumbnail", "signature"}
_DEDUP_COLUMNS = {"thumbnail", "signature"}
STAMP_VERSION = 2  # .work/fingerprint.json: version 1 compared names and sizes only


class PipelineError(UserError):
    """A step cannot run (e.g. the step before it has not run yet)."""


# ------------------------------------------------------------------ plain functions (workers and driver)


def row_stage_functions(cfg: CurateConfig) -> list[Callable[[pd.DataFrame], pd.DataFrame]]:
    """The registry's row-wise stages built for this run, in order (once per worker: some are costly)."""
    return [stage.build(cfg) for stage in row_stages()]


def score_part(part: Part, cfg: CurateConfig, functions: list[Callable[[pd.DataFrame], pd.DataFrame]],
               parts_dir: Path) -> dict:
    """Read one input file, run every row-wise stage, store the scored rows; return a summary."""
    raw = read_part(part, cfg.sources[part.source_index])
    batches = [reduce(lambda batch, function: function(batch), functions, raw.iloc[start:start + cfg.batch_rows])
               for start in range(0, max(len(raw), 1), cfg.batch_rows)]
    scored = pd.concat(batches, ignore_index=True).drop(columns=_DROPPED_AFTER_SCORING)
    scored.insert(0, "part_id", part.part_id)
    with atomic.replacing(parts_dir / f"{part.part_id}.parquet") as tmp:
        pq.write_table(pa.Table.from_pandas(scored, preserve_index=False), tmp)
    reasons = row_reason(scored).dropna()
    return {"part_id": part.part_id, "rows": len(scored), "rejected": dict(Counter(reasons))}


class PartScorer:
    """A Ray Data actor: builds the row-wise stages (the language model) once, then scores parts."""

    def __init__(self, cfg: CurateConfig, parts_dir: str):
        self.cfg, self.parts_dir = cfg, Path(parts_dir)
        self.functions = row_stage_functions(cfg)

    def __call__(self, batch: dict) -> dict:
        summaries = [score_part(Part(part_id, int(source), path), self.cfg, self.functions, self.parts_dir)
                     for part_id, source, path in zip(batch["part_id"], batch["source_index"], batch["path"])]
        return {"summary": [json.dumps(s) for s in summaries]}


def _write_shard_batch(batch: dict, parts_dir: str, out_dir: str) -> dict:
    infos = []
    for plan in batch["plan"]:
        raw = json.loads(plan)
        infos.append(write_shard(ShardPlan(raw["name"], raw["members"]), Path(parts_dir), Path(out_dir)))
    return {"info": [json.dumps(i) for i in infos]}


# ------------------------------------------------------------------ executors


class RayExecutor:
    """Runs the parallel steps on Ray Data: actors with fractional CPUs for scoring, tasks for writing."""

    def __init__(self, cfg: CurateConfig, address: str | None):
        import ray

        self.ray, self.cfg = ray, cfg
        self.started = ensure_ray(cfg.ray.num_cpus, address)

    def score(self, parts: list[Part], parts_dir: Path) -> Iterator[dict]:
        ray = self.ray
        items = [asdict(p) for p in parts]
        dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            PartScorer, fn_constructor_kwargs={"cfg": self.cfg, "parts_dir": str(parts_dir)}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=min(self.cfg.ray.workers, len(items))),
            num_cpus=self.cfg.ray.cpus_per_worker)
        for row in dataset.iter_rows():
            yield json.loads(row["summary"])

    def write_shards(self, plans: list[ShardPlan], parts_dir: Path, out_dir: Path) -> list[dict]:
        items = [{"plan": json.dumps(asdict(p))} for p in plans]
        dataset = self.ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _write_shard_batch, fn_kwargs={"parts_dir": str(parts_dir), "out_dir": str(out_dir)},
            batch_size=1, num_cpus=self.cfg.ray.cpus_per_worker)
        infos = [json.loads(row["info"]) for row in dataset.iter_rows()]
        return sorted(infos, key=lambda info: info["name"])

    def map_shared(self, function: Callable, shared, items: list[tuple]) -> list:
        """``function(shared, *item)`` per item as Ray tasks; ``shared`` goes to the object store once."""
        remote = self.ray.remote(num_cpus=self.cfg.ray.cpus_per_worker)(function)
        shared_ref = self.ray.put(shared)
        return self.ray.get([remote.remote(shared_ref, *item) for item in items])

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


class LocalExecutor:
    """The same stage functions in this one Python process (the benchmark's reference, debugging)."""

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg

    def score(self, parts: list[Part], parts_dir: Path) -> Iterator[dict]:
        functions = row_stage_functions(self.cfg)
        for part in parts:
            yield score_part(part, self.cfg, functions, parts_dir)

    def write_shards(self, plans: list[ShardPlan], parts_dir: Path, out_dir: Path) -> list[dict]:
        return [write_shard(plan, parts_dir, out_dir) for plan in plans]

    map_shared = staticmethod(serial_map)

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ the run


class Run:
    """Paths and resume bookkeeping of one output directory."""

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.work = self.out / ".work"
        self.parts_dir = self.work / "parts"
        self.duplicates = self.work / "duplicates.parquet"
        self.shards_dir = self.out / "shards"
        self.decisions = self.out / "decisions.parquet"
        self.manifest = self.out / "manifest.json"
        self.parts = list_parts(cfg.sources)
        self.inputs: list[dict] = []  # path, size, sha256 and cheap key of each part: set by prepare()

    def prepare(self, log: Callable[[str], None]) -> None:
        """Start over when the inputs' contents or the stage settings differ from the run found on disk;
        fail when an input file that run read is gone (restoring it, or starting over, is the user's call)."""
        stamp_file = self.work / "fingerprint.json"
        old = json.loads(stamp_file.read_text()) if stamp_file.is_file() else None
        previous = old["inputs"] if old and old.get("version") == STAMP_VERSION else []
        gone = [entry["path"] for entry in previous if not os.path.exists(entry["path"])]
        if gone:
            raise PipelineError(f"{len(gone)} input file(s) read by the earlier run in {self.out} are gone "
                                f"(first: {gone[0]}); restore them, or delete {self.out} to start over without them")
        self.inputs = inputs.fingerprint([p.path for p in self.parts], previous)
        stamp = {"version": STAMP_VERSION, "stages": self.cfg.stage_fingerprint(), "inputs": self.inputs}
        if old is not None and (old.get("version") != STAMP_VERSION or old["stages"] != stamp["stages"]
                                or inputs.content(previous) != inputs.content(self.inputs)):
            log(f"{self.out}: inputs or settings changed since the last run; starting over")
            shutil.rmtree(self.work)
            shutil.rmtree(self.shards_dir, ignore_errors=True)
            for path in (self.decisions, self.manifest):
                path.unlink(missing_ok=True)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(stamp_file, stamp)

    def missing_parts(self) -> list[Part]:
        return [p for p in self.parts if not (self.parts_dir / f"{p.part_id}.parquet").is_file()]

    def scored_rows(self, with_thumbnails: bool = False) -> pd.DataFrame:
        """Every scored row without image bytes (with the thumbnails and content signatures when asked,
        for dedup)."""
        missing = self.missing_parts()
        if missing:
            raise PipelineError(f"{len(missing)} part(s) are not scored yet (first: {missing[0].path}); "
                                f"run `vlm-curate score` or `vlm-curate run` first")
        frames = []
        for part in self.parts:
            path = self.parts_dir / f"{part.part_id}.parquet"
            columns = [c for c in pq.read_schema(path).names
                       if c not in _METADATA_EXCLUDED or (with_thumbnails and c in _DEDUP_COLUMNS)]
            frames.append(pq.read_table(path, columns=columns).to_pandas())
        return pd.concat(frames, ignore_index=True)


def run(cfg: CurateConfig, steps: Iterable[str] = STEPS, ray_address: str | None = None,
        use_ray: bool = True, log: Callable[[str], None] = print) -> dict | None:
    """Run the given steps (skipping finished work); return the manifest when the write step ran.
    Inputs are checked before anything is written, and the output directory is held for this run."""
    started = time.perf_counter()
    if cfg.embedding.model.is_set():
        embed_step.check_inputs(cfg)  # a mistyped folder fails now, not after scoring the pool
    state = Run(cfg)
    inputs.refuse_inputs_inside(state.out, [
        *((f"sources[{p.source_index}].path", p.path) for p in state.parts),
        *((f"sources[{i}].image_root", s.image_root) for i, s in enumerate(cfg.sources)),
        *(embed_step.input_paths(cfg) if cfg.embedding.model.is_set() else [])])
    with RunLock(state.out):
        state.prepare(log)
        return _run_steps(cfg, state, list(steps), ray_address, use_ray, log, started)


def _run_steps(cfg: CurateConfig, state: Run, steps: list[str], ray_address: str | None, use_ray: bool,
               log: Callable[[str], None], started: float) -> dict | None:
    executor = None

    def executor_started():  # Ray starts once, when the first step needs it
        nonlocal executor
        executor = executor or (RayExecutor(cfg, ray_address) if use_ray else LocalExecutor(cfg))
        return executor

    try:
        if "score" in steps:
            pending = state.missing_parts()
            if pending:
                _score(executor_started(), pending, state, cfg.progress)
            log(f"score: {len(state.parts)} part(s) scored ({len(state.parts) - len(pending)} from an earlier run)")
        if "dedup" in steps:
            rows = state.scored_rows(with_thumbnails=True)
            # Chunks for every worker to verify near-duplicate candidates in parallel (one in a plain run).
            chunks = 2 * cfg.ray.workers if use_ray else 1
            duplicates = find_duplicates(rows[eligible_for_dedup(rows)], cfg.dedup, executor_started().map_shared,
                                         chunks)
            _write_parquet(duplicates, state.duplicates)
            log(f"dedup: {len(duplicates)} duplicate(s) among {int(eligible_for_dedup(rows).sum())} eligible rows")
        if "embed" not in steps and "write" not in steps:
            return None
        if not state.duplicates.is_file():
            raise PipelineError("deduplication has not run yet: run `vlm-curate dedup` or `vlm-curate run`")
        if "dedup" not in steps:
            rows = state.scored_rows()
        decisions = decide(rows, pd.read_parquet(state.duplicates))
        plan = None
        if cfg.embedding.model.is_set():
            candidates = rows.loc[decisions["kept"].to_numpy(), ["part_id", "uid"]]
            plan = embed_step.plan(cfg, candidates, state.parts_dir, state.work)
            if plan.pool is None:
                log("embed: no rows left after heuristics and dedup; the embed step and the embedding stages "
                    "are skipped")
            elif "embed" in steps:
                if use_ray:
                    executor_started()  # the model actors join this run's Ray
                embed_step.embed(plan, cfg, use_ray, log)
        if "write" not in steps:
            return None
        embedding = None  # the embedding stages count in the funnel only when they ran
        if plan is not None and plan.pool is not None:
            decisions = _select_by_embeddings(decisions, plan, cfg, log)
            embedding = cfg.embedding
        kept = rows.loc[decisions["kept"].to_numpy(), ["part_id", "uid"]]
        plans = plan_shards(kept, cfg.output.samples_per_shard)
        _reset_shards_if_replanned(state, plans)
        infos = executor_started().write_shards(plans, state.parts_dir, state.shards_dir) if plans else []
        _write_parquet(decisions, state.decisions)
        manifest = {
            "funnel": funnel(decisions, run_stages(embedding)),
            "shards": infos,
            "decisions": {"path": state.decisions.name, "sha256": file_sha256(state.decisions)},
            "inputs": [{k: entry[k] for k in ("path", "size", "sha256")} for entry in state.inputs],
            "config": to_dict(cfg),
        }
        atomic.write_json(state.manifest, manifest)
        log(f"write: {manifest['funnel']['rows']['kept']} of {len(decisions)} rows kept in {len(infos)} "
            f"shard(s) under {state.shards_dir} ({time.perf_counter() - started:.1f} s)")
        return manifest
    finally:
        if executor is not None:
            executor.close()


def _select_by_embeddings(decisions: pd.DataFrame, plan: embed_step.EmbedPlan, cfg: CurateConfig,
                          log: Callable[[str], None]) -> pd.DataFrame:
    try:
        pool = embed_step.load(plan.pool)
        eval_sets = embed_step.load_references(plan.eval_sets)
        seed_sets = [embed_step.load(s, reference=True) for s in plan.seed_sets]
    except embed_step.EmbeddingsMissing as err:
        raise PipelineError(str(err)) from None
    return select_by_embeddings(decisions, pool, eval_sets, seed_sets, cfg.embedding, log)


def _score(executor, pending: list[Part], state: Run, progress: bool) -> None:
    rejected: Counter = Counter()
    with tqdm(desc="score", unit="rows", disable=not progress, dynamic_ncols=True) as bar:
        for done, summary in enumerate(executor.score(pending, state.parts_dir), start=1):
            rejected.update(summary["rejected"])
            bar.update(summary["rows"])
            top = ", ".join(f"{k}={v}" for k, v in rejected.most_common(3))
            bar.set_postfix_str(f"parts {done}/{len(pending)}, rejected {sum(rejected.values())} ({top})")


def _reset_shards_if_replanned(state: Run, plans: list[ShardPlan]) -> None:
    """Existing shards are reused only if they were written for exactly this plan."""
    plan_file = state.shards_dir / ".plan.json"
    plan = [asdict(p) for p in plans]
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        shutil.rmtree(state.shards_dir)
    state.shards_dir.mkdir(parents=True, exist_ok=True)
    if not plan_file.is_file():
        for stale in state.shards_dir.glob("*.tar*"):
            stale.unlink()
        atomic.write_json(plan_file, plan)


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic.replacing(path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
