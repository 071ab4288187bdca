"""Compose the curation steps: what the registry lists, in order, on the executor (Ray, or this process).

Four steps, each resumable, all under ``output_dir``:
  score   every input file ("part") is read and the registry's row stages (validate, heuristics, ...)
          run over it on the executor's actors; each part lands in ``.work/parts/<part>.parquet``,
          written atomically, so a rerun scores only the parts that are missing.
  dedup   the global stages (exact and near dedup, ...) over the rows the row stages kept, each over
          the rows still kept when its turn comes (every row must meet every other): they read the
          parts' columns and fingerprint files themselves and spread their searches over the
          executor's tasks → their verdicts in ``.work/verdicts.parquet`` (``verdicts``: the driver
          holds a few integers per candidate, no string: candidates are (part, row) positions).
  embed   only with an ``embedding`` section naming a model: CLIP embeddings of the rows still kept
          (and of the reference folders the enabled embedding stages name) on the executor's model
          workers → ``.work/embeddings/`` (``data_pipeline.embed``; finished jobs are reused).
  write   selection (the only step that drops rows: ``select.decide``, then the enabled embedding
          stages over the embeddings) → ``decisions.parquet``, webdataset shards in ``shards/``
          (written by the executor's tasks, each atomically; existing ones are kept) and
          ``manifest.json``. Without embedding stages the parts are decided ``output.stream_rows``
          rows at a time (``write_stream``): the driver's memory does not grow with the pool.
No step names a stage: each runs the registry's stages of its kind. A rerun after a kill produces
byte-identical outputs: every step is a pure function of its inputs, the row order is the input
order, and nothing records wall-clock time.
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

from data_pipeline import fingerprints, inputs, registry
from data_pipeline import verdicts as global_verdicts
from data_pipeline.candidates import Candidates, ScoredParts
from data_pipeline.config import CurateConfig, to_dict
from data_pipeline.embed import plan as embed_plan
from data_pipeline.embed.store import EmbeddingsMissing, load
from data_pipeline.executor import Executor, make_executor
from data_pipeline.registry import row_reason, row_stages, run_stages, section_of
from data_pipeline.select import apply_stages, decide, funnel_of, passed_row_stages
from data_pipeline.shards import file_sha256, write_shard_run
from data_pipeline.sources import Part, list_parts, read_part
from data_pipeline.write_stream import DecisionsFile, ShardPlanner
from vlmtrain import atomic
from vlmtrain.errors import UserError
from vlmtrain.runlock import RunLock

STEPS = ("score", "dedup", "embed", "write")
# Raw bytes the later steps never need: a 1 MB caption must not travel further than the decoder.
_DROPPED_AFTER_SCORING = ["caption_raw", "json_raw"]
_METADATA_EXCLUDED = {"image", "image_out", "thumbnail", "signature"}
# .work/fingerprint.json: version 1 compared names and sizes only; version 2 parts have no fingerprint files
STAMP_VERSION = 3


class PipelineError(UserError):
    """A step cannot run (e.g. the step before it has not run yet)."""


# ------------------------------------------------------------------ plain functions (workers and driver)


def row_stage_functions(cfg: CurateConfig) -> list[Callable[[pd.DataFrame], pd.DataFrame]]:
    """The registry's row stages built for this run, in order (once per worker: some are costly)."""
    return [stage.function(section_of(cfg, stage)) for stage in row_stages()]


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
    """The score step's actor: builds the row stages (the language model) once, then scores parts."""

    def __init__(self, cfg: CurateConfig, parts_dir: str):
        self.cfg, self.parts_dir = cfg, Path(parts_dir)
        self.functions = row_stage_functions(cfg)

    def __call__(self, part: dict) -> dict:
        return score_part(Part(**part), self.cfg, self.functions, self.parts_dir)


# ------------------------------------------------------------------ the run


class Run:
    """Paths and resume bookkeeping of one output directory."""

    def __init__(self, cfg: CurateConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.work = self.out / ".work"
        self.parts_dir = self.work / "parts"
        self.verdicts = self.work / "verdicts.parquet"  # the global stages'
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

    def candidates(self, executor: Executor, chunks: int) -> Candidates:
        """The rows every row stage kept: the global stages' candidates (their searches on ``executor``)."""
        part, row = [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
        for index, start, rows in self.scored_batches([stage.reason_column for stage in row_stages()]):
            eligible = np.flatnonzero(passed_row_stages(rows).to_numpy())
            part.append(np.full(len(eligible), index, np.int32))
            row.append((start + eligible).astype(np.int32))
        return Candidates(np.concatenate(part), np.concatenate(row), self.scored_parts(), executor.map_shared, chunks)

    def scored_parts(self) -> ScoredParts:
        return ScoredParts(str(self.parts_dir), [p.part_id for p in self.parts], self.cfg.output.stream_rows)


def run(cfg: CurateConfig, steps: Iterable[str] = STEPS, ray_address: str | None = None,
        use_ray: bool = True, log: Callable[[str], None] = print) -> dict | None:
    """Run the given steps (skipping finished work); return the manifest when the write step ran.
    Inputs are checked before anything is written, and the output directory is held for this run."""
    started = time.perf_counter()
    if cfg.embedding.model.is_set():
        embed_plan.check_inputs(cfg)  # a mistyped folder fails now, not after scoring the pool
    state = Run(cfg)
    inputs.refuse_inputs_inside(state.out, [
        *((f"sources[{p.source_index}].path", p.path) for p in state.parts),
        *((f"sources[{i}].image_root", s.image_root) for i, s in enumerate(cfg.sources)),
        *(embed_plan.input_paths(cfg) if cfg.embedding.model.is_set() else [])])
    with RunLock(state.out):
        state.prepare(log)
        return _run_steps(cfg, state, list(steps), ray_address, use_ray, log, started)


def _run_steps(cfg: CurateConfig, state: Run, steps: list[str], ray_address: str | None, use_ray: bool,
               log: Callable[[str], None], started: float) -> dict | None:
    executor = None

    def executor_started() -> Executor:  # Ray starts once, when the first step needs it
        nonlocal executor
        executor = executor or make_executor(cfg.ray, use_ray, ray_address)
        return executor

    try:
        if "score" in steps:
            pending = state.missing_parts()
            if pending:
                _score(executor_started(), pending, state, cfg)
            log(f"score: {len(state.parts)} part(s) scored ({len(state.parts) - len(pending)} from an earlier run)")
        tasks = 2 * cfg.ray.workers if use_ray else 1  # a step's tasks: for every worker to work in parallel
        if "dedup" in steps:
            candidates = state.candidates(executor_started(), tasks)
            verdicts = global_verdicts.apply_global(registry.of_kind(registry.GLOBAL), candidates, cfg, log)
            global_verdicts.write(verdicts, candidates, state.verdicts)
            log(f"dedup: {verdicts.dropped} of {len(candidates)} candidate rows dropped by the global stages")
            del candidates, verdicts
        if "embed" not in steps and "write" not in steps:
            return None
        if not global_verdicts.readable(state.verdicts):
            raise PipelineError("the dedup step has not run yet (or ran before verdicts were stored by position): "
                                "run `vlm-curate dedup` or `vlm-curate run`")
        plan = None
        if cfg.embedding.model.is_set():
            kept = pd.DataFrame([(state.parts[index].part_id, uid) for index, _, frame in _decided(state)
                                 for uid in frame["uid"][frame["kept"]]], columns=["part_id", "uid"])
            plan = embed_plan.plan(cfg, kept, state.parts_dir, state.work)
            if plan.pool is None:
                log("embed: no rows left after heuristics and dedup; the embed step and the embedding stages "
                    "are skipped")
            elif "embed" in steps:
                embed_plan.embed(plan, cfg, executor_started(), log)
        if "write" not in steps:
            return None
        embedded = plan is not None and plan.pool is not None  # the embedding stages count only when they ran
        pieces = _decided(state)
        if embedded:
            pieces = _selected_by_embeddings(list(pieces), plan, state, executor_started(), cfg, log)
        plans_file = state.work / "shard_plans.jsonl"
        with DecisionsFile(state.decisions) as decisions, \
                ShardPlanner(plans_file, cfg.output.samples_per_shard) as planner:
            for index, _, frame in pieces:
                decisions.write(frame)
                planner.add(state.parts[index].part_id, list(frame["uid"][frame["kept"].to_numpy()]))
        _reset_shards_if_replanned(state, planner.digest)
        infos = _write_shards(executor_started(), plans_file, planner.offsets, tasks, state)
        manifest = {
            "funnel": funnel_of(decisions.counts, run_stages(cfg, embedded)),
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


def _decided(state: Run) -> Iterator[tuple[int, int, pd.DataFrame]]:
    """(part index, first row in the part, decisions) of every scored batch, in input order, with the global
    stages' verdicts of its rows."""
    verdicts = global_verdicts.VerdictReader(state.verdicts)
    for index, start, rows in state.scored_batches():
        yield index, start, decide(rows, verdicts.of(index, start, len(rows)))


def _selected_by_embeddings(pieces: list[tuple[int, int, pd.DataFrame]], plan: embed_plan.EmbedPlan, state: Run,
                            executor: Executor, cfg: CurateConfig,
                            log: Callable[[str], None]) -> Iterator[tuple[int, int, pd.DataFrame]]:
    """The embedding stages work on the whole pool at once; their decisions go out in the same pieces."""
    try:
        pool = load(plan.pool)
        references = {name: [load(s, reference=True) for s in sets] for name, sets in plan.references.items()}
    except EmbeddingsMissing as err:
        raise PipelineError(str(err)) from None
    whole = pd.concat([frame for _, _, frame in pieces], ignore_index=True)
    # Every candidate carries its CLIP score, whichever stages run.
    whole = whole.merge(pd.DataFrame({"uid": pool.ids, "clip_score": pool.clip_score}), on="uid", how="left",
                        validate="one_to_one")
    at = np.flatnonzero(whole["kept"].to_numpy())
    by_uid = pd.Series(np.arange(len(pool.ids)), index=pool.ids).loc[whole["uid"].to_numpy()[at]].to_numpy()
    part = np.concatenate([np.full(len(frame), index, np.int32) for index, _, frame in pieces])
    row = np.concatenate([start + np.arange(len(frame), dtype=np.int32) for _, start, frame in pieces])
    candidates = Candidates(part[at], row[at], state.scored_parts(), executor.map_shared, 1, pool.vectors[by_uid],
                            pool.clip_score[by_uid])
    stages = [s for s in registry.of_kind(registry.EMBEDDING) if registry.enabled(cfg, s)]
    selected = apply_stages(stages, whole, at, candidates, cfg, log, references)
    offset = 0
    for index, start, frame in pieces:
        yield index, start, selected.iloc[offset:offset + len(frame)].reset_index(drop=True)
        offset += len(frame)


def _score(executor: Executor, pending: list[Part], state: Run, cfg: CurateConfig) -> None:
    rejected: Counter = Counter()
    items = [asdict(p) for p in pending]
    summaries = executor.map_actors(PartScorer, {"cfg": cfg, "parts_dir": str(state.parts_dir)}, items)
    with tqdm(desc="score", unit="rows", disable=not cfg.progress, dynamic_ncols=True) as bar:
        for done, summary in enumerate(summaries, start=1):
            rejected.update(summary["rejected"])
            bar.update(summary["rows"])
            top = ", ".join(f"{k}={v}" for k, v in rejected.most_common(3))
            bar.set_postfix_str(f"parts {done}/{len(pending)}, rejected {sum(rejected.values())} ({top})")


def _write_shards(executor: Executor, plans_file: Path, offsets: list[int], tasks: int, state: Run) -> list[dict]:
    """The shards written in ``tasks`` runs of consecutive plans, each task reading its own plans (the driver
    sends byte offsets, not uids): few calls, so each worker reads long runs of plans."""
    runs = [run for run in np.array_split(np.arange(len(offsets)), min(tasks, len(offsets)) or 1) if len(run)]
    written = executor.map_shared(write_shard_run, (str(plans_file), str(state.parts_dir), str(state.shards_dir)),
                                  [(offsets[run[0]], len(run)) for run in runs])
    return [info for infos in written for info in infos]


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
