"""The curation stamp: what a resumed run must match to reuse its scored parts."""
from __future__ import annotations

from data_pipeline.config import load_curate_config


def stamp(*overrides: str) -> str:
    return load_curate_config(None, ["sources=[{format: webdataset, path: pool}]", "output_dir=out",
                                     *overrides]).stage_fingerprint()


def test_the_stamp_covers_what_scores_rows_not_where_the_run_writes():
    assert stamp("output_dir=elsewhere/out") == stamp("output_dir=./out") == stamp()
    assert stamp("output.samples_per_shard=7", "ray.workers=1", "progress=false",
                 "embedding.clip_score.enabled=true", "embedding.model.checkpoint=run") == stamp()
    assert stamp("heuristics.min_caption_words=5") != stamp()
    assert stamp("sources=[{format: webdataset, path: other}]") != stamp()
