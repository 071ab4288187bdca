"""Compose the curation stages on Ray Data; the only module that knows Ray.

Four steps, each resumable, all under ``output_dir``:
  score   every input file ("part") is read, decoded/validated, filtered by the heuristics and
          hashed by Ray Data actors; each part lands in ``.work/parts/<part>.parquet``, written
          atomically, so a rerun scores only the parts that are missing.
  dedup   exact and near-duplicate search over compact columns of all parts (dedup is global: every
          row must meet every other; ``stages.dedup``): the driver streams the parts' small columns,
          the candidate search and the verification of candidate pairs (which reads thumbnails and
          content signatures from the parts' fingerprint files) run as Ray tasks
          → ``.work/duplicates.parquet``.
  embed   only with an ``embedding`` section naming a model: CLIP embeddings of the rows still kept
          (and of the eval/seed sets the stages need) on Ray actors → ``.work/embeddings/``
          (``data_pipeline.embed_step``; finished jobs are reused).
  write   selection (the only step that drops rows: ``select.decide``, then the enabled embedding
          stages of ``select_embeddings``) → ``decisions.parquet``, webdataset shards in
          ``shards/`` (written by Ray tasks, each atomically; existing ones are kept) and
          ``manifest.json``. Without embedding stages the parts are decided ``output.stream_rows``
          rows at a time (``write_stream``): the driver's memory does not grow with the pool.
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

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from data_pipeline import embed_step, fingerprints, inputs
from data_pipeline.config import CurateConfig, to_dict
from data_pipeline.ray_runtime import ensure_ray
from data_pipeline.select import decide, eligible_for_dedup, funnel_of
from data_pipeline.registry import row_reason, row_stages, run_stages
from data_pipeline.select_embeddings import select_by_embeddings
from data_pipeline.shards import ShardPlan, file_sha256, write_shard
from data_pipeline.sources import Part, list_parts, read_part
from data_pipeline.stages.dedup import Compact, OnDisk, compact, duplicates_of
from data_pipeline.stages.near_duplicates import serial_map
from data_pipeline.write_stream import DecisionsFile, ShardPlanner, read_plans
from vlmtrain import atomic
from vlmtrain.errors import UserError
from vlmtrain.runlock import RunLock

STEPS = ("score", "dedup", "embed", "write")
# Raw bytes the later steps never need: a 1 MB caption must not travel further than the decoder.
_DROPPED_AFTER_SCORING = ["caption_raw", "json_raw"]
_METADATA_EXCLUDED = {"image", "image_out", "thumbnail", "signature"}
_DEDUP_COLUMNS = ["uid", "sha256", "caption", "width", "height", "file_bytes"]
# .work/fingerprint.json: version 1 compared names and sizes only; version 2 parts have no fingerprint files
STAMP_VERSION = 3
_SHARD_PLANS_PER_TASK_BATCH = 256


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
    fingerprints.write(parts_dir, part.part_id, scored)  # before the parquet: a part that exists is complete
    with atomic.replacing(parts_dir / f"{part.part_id}.parquet") as tmp:
        pq.write_table(pa.Table.from_pandas(scored, preserve_index=False), tmp,
                       row_group_size=cfg.output.stream_rows)
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

    def check_scored(self) -> None:
        missing = self.missing_parts()
        if missing:
            raise PipelineError(f"{len(missing)} part(s) are not scored yet (first: {missing[0].path}); "
                                f"run `vlm-curate score` or `vlm-curate run` first")

    def scored_batches(self, columns: list[str] | None = None) -> Iterator[tuple[int, int, pd.DataFrame]]:
        """(part index, first row in the part, rows) of every scored part, ``output.stream_rows`` rows at a
        time, in input order; ``columns``: those (default: all but image bytes, thumbnails, signatures)."""
        self.check_scored()
        for index, part in enumerate(self.parts):
            scored = pq.ParquetFile(self.parts_dir / f"{part.part_id}.parquet")
            wanted = columns or [c for c in scored.schema_arrow.names if c not in _METADATA_EXCLUDED]
            if scored.metadata.num_rows == 0:
                yield index, 0, scored.schema_arrow.empty_table().select(wanted).to_pandas()
            start = 0
            for batch in scored.iter_batches(batch_size=self.cfg.output.stream_rows, columns=wanted):
                rows = batch.to_pandas()
                yield index, start, rows
                start += len(rows)

    def dedup_inputs(self) -> tuple[Compact, OnDisk]:
        """The eligible rows' compact columns, and where their fingerprints are."""
        columns = _DEDUP_COLUMNS + [stage.reason_column for stage in row_stages()]
        pieces, part, row = [], [], []
        for index, start, rows in self.scored_batches(columns):
            eligible = np.flatnonzero(eligible_for_dedup(rows).to_numpy())
            codes = fingerprints.gather(self.parts_dir, [p.part_id for p in self.parts],
                                        np.full(len(eligible), index), start + eligible, "code")
            pieces.append(compact(rows.iloc[eligible], codes))
            part.append(np.full(len(eligible), index, np.int32))
            row.append((start + eligible).astype(np.int32))
        return Compact.concat(pieces), OnDisk(str(self.parts_dir), [p.part_id for p in self.parts],
                                              np.concatenate(part), np.concatenate(row))


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
            table, source = state.dedup_inputs()
            # Tasks for every worker to search and verify in parallel (one in a plain run).
            chunks = 2 * cfg.ray.workers if use_ray else 1
            duplicates = duplicates_of(table, source, cfg.dedup, executor_started().map_shared, chunks)
            _write_parquet(duplicates, state.duplicates)
            log(f"dedup: {len(duplicates)} duplicate(s) among {len(table)} eligible rows")
            del table, source
        if "embed" not in steps and "write" not in steps:
            return None
        if not state.duplicates.is_file():
            raise PipelineError("deduplication has not run yet: run `vlm-curate dedup` or `vlm-curate run`")
        duplicates = pd.read_parquet(state.duplicates).set_index("uid")
        plan = None
        if cfg.embedding.model.is_set():
            candidates = pd.DataFrame([(part_id, uid) for part_id, frame in _decided(state, duplicates)
                                       for uid in frame["uid"][frame["kept"]]], columns=["part_id", "uid"])
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
        pieces = _decided(state, duplicates)
        if plan is not None and plan.pool is not None:
            pieces = _selected_by_embeddings(list(pieces), plan, cfg, log)
            embedding = cfg.embedding
        plans_file = state.work / "shard_plans.jsonl"
        with DecisionsFile(state.decisions) as decisions, \
                ShardPlanner(plans_file, cfg.output.samples_per_shard) as planner:
            for part_id, frame in pieces:
                decisions.write(frame)
                planner.add(part_id, list(frame["uid"][frame["kept"].to_numpy()]))
        _reset_shards_if_replanned(state, planner.digest)
        infos = [info for batch in read_plans(plans_file, _SHARD_PLANS_PER_TASK_BATCH)
                 for info in executor_started().write_shards(batch, state.parts_dir, state.shards_dir)]
        manifest = {
            "funnel": funnel_of(decisions.counts, run_stages(embedding)),
            "shards": infos,
            "decisions": {"path": state.decisions.name, "sha256": file_sha256(state.decisions)},
            "inputs": [{k: entry[k] for k in ("path", "size", "sha256")} for entry in state.inputs],
            "config": to_dict(cfg),
        }
        atomic.write_json(state.manifest, manifest)
        log(f"write: {manifest['funnel']['rows']['kept']} of {manifest['funnel']['rows']['read']} rows kept in "
            f"{len(infos)} shard(s) under {state.shards_dir} ({time.perf_counter() - started:.1f} s)")
        return manifest
    finally:
        if executor is not None:
            executor.close()


def _decided(state: Run, duplicates: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame]]:
    """(part id, decisions) of every scored batch, in input order; ``duplicates``: indexed by uid."""
    for index, _, rows in state.scored_batches():
        found = duplicates.reindex(rows["uid"]).dropna(how="all").reset_index()
        yield state.parts[index].part_id, decide(rows, found)


def _selected_by_embeddings(pieces: list[tuple[str, pd.DataFrame]], plan: embed_step.EmbedPlan, cfg: CurateConfig,
                            log: Callable[[str], None]) -> Iterator[tuple[str, pd.DataFrame]]:
    """The embedding stages work on the whole pool at once; their decisions go out in the same pieces."""
    try:
        pool = embed_step.load(plan.pool)
        eval_sets = embed_step.load_references(plan.eval_sets)
        seed_sets = [embed_step.load(s, reference=True) for s in plan.seed_sets]
    except embed_step.EmbeddingsMissing as err:
        raise PipelineError(str(err)) from None
    whole = pd.concat([frame for _, frame in pieces], ignore_index=True)
    selected = select_by_embeddings(whole, pool, eval_sets, seed_sets, cfg.embedding, log)
    start = 0
    for part_id, frame in pieces:
        yield part_id, selected.iloc[start:start + len(frame)].reset_index(drop=True)
        start += len(frame)


def _score(executor, pending: list[Part], state: Run, progress: bool) -> None:
    rejected: Counter = Counter()
    with tqdm(desc="score", unit="rows", disable=not progress, dynamic_ncols=True) as bar:
        for done, summary in enumerate(executor.score(pending, state.parts_dir), start=1):
            rejected.update(summary["rejected"])
            bar.update(summary["rows"])
            top = ", ".join(f"{k}={v}" for k, v in rejected.most_common(3))
            bar.set_postfix_str(f"parts {done}/{len(pending)}, rejected {sum(rejected.values())} ({top})")


def _reset_shards_if_replanned(state: Run, digest: str) -> None:
    """Existing shards are reused only if they were written for exactly this plan (its digest)."""
    plan_file = state.shards_dir / ".plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) != {"sha256": digest}:
        shutil.rmtree(state.shards_dir)
    state.shards_dir.mkdir(parents=True, exist_ok=True)
    if not plan_file.is_file():
        for stale in state.shards_dir.glob("*.tar*"):
            stale.unlink()
        atomic.write_json(plan_file, {"sha256": digest})


def _write_parquet(frame: pd.DataFrame, path: Path) -> None:
    with atomic.replacing(path) as tmp:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp)
