"""Report of a finished run: funnel, histograms and rejected examples as PNGs plus one HTML page."""
from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipeline.pipeline import PipelineError  # noqa: E402
from data_pipeline.stages.decode import THUMBNAIL_SIDE  # noqa: E402

EXAMPLES_PER_REASON = 8


def write_report(out: str | Path) -> Path:
    out = Path(out)
    manifest_file = out / "manifest.json"
    if not manifest_file.is_file():
        raise PipelineError(f"{manifest_file} not found: run `vlm-curate run` for {out} first")
    manifest = json.loads(manifest_file.read_text())
    decisions = pd.read_parquet(out / "decisions.parquet")
    report = out / "report"
    report.mkdir(exist_ok=True)
    figures = [_funnel(manifest["funnel"], report / "funnel.png"),
               _histograms(decisions, report / "histograms.png")]
    examples = _rejected_examples(out, decisions, report)
    page = report / "index.html"
    page.write_text(_html(manifest, figures, examples))
    return page


def _funnel(funnel: dict, path: Path) -> Path:
    rows = funnel["rows"]
    reasons = sorted(funnel["rejected_by_reason"].items(), key=lambda item: item[1])
    stages = [stage for stage in rows if stage != "kept"]  # the run's own stages, embedding ones included
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.2 + 0.15 * len(stages)))
    left.barh(stages[::-1], [rows[s] for s in stages][::-1], color="#4c72b0")
    left.set_title("rows after each stage")
    right.barh([r for r, _ in reasons], [c for _, c in reasons], color="#c44e52")
    right.set_title("rejected rows by reason")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# Histogram per column, when the run has it (the embedding stages add theirs).
HISTOGRAMS = (("caption_chars", "caption length (chars)"), ("min_side", "image short side (px)"),
              ("aspect_ratio", "aspect ratio"), ("clip_score", "CLIP score (image-text cosine)"),
              ("eval_similarity", "cosine to the nearest eval image"))


def histogram_columns(decisions: pd.DataFrame) -> list[tuple[str, str]]:
    """(column, title) of the histograms a run gets: the columns it has values in."""
    return [(column, title) for column, title in HISTOGRAMS if column in decisions and decisions[column].notna().any()]


def _histograms(decisions: pd.DataFrame, path: Path) -> Path:
    shown = histogram_columns(decisions)
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 3.5), squeeze=False)
    for axis, (column, title) in zip(axes[0], shown):
        for kept, colour in ((True, "#4c72b0"), (False, "#c44e52")):
            values = decisions.loc[decisions["kept"] == kept, column].dropna().to_numpy(dtype=float)
            if len(values):
                axis.hist(np.clip(values, 0, np.percentile(values, 99.5)), bins=40, alpha=0.6, color=colour,
                          label="kept" if kept else "rejected")
        axis.set_title(title)
        axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _rejected_examples(out: Path, decisions: pd.DataFrame, report: Path) -> dict[str, list[tuple[str, str]]]:
    """Per reason, a few (thumbnail PNG name or '', caption) pairs from the scored parts."""
    rejected = decisions[~decisions["kept"]].groupby("reason").head(EXAMPLES_PER_REASON)
    wanted = set(rejected["uid"])
    thumbs: dict[str, tuple[bytes | None, str | None]] = {}
    for part in sorted((out / ".work" / "parts").glob("*.parquet")):
        table = pq.read_table(part, columns=["uid", "thumbnail", "caption"]).to_pandas()
        for row in table[table["uid"].isin(wanted)].itertuples():
            thumbs[row.uid] = (row.thumbnail, row.caption)
    examples: dict[str, list[tuple[str, str]]] = {}
    for row in rejected.itertuples():
        thumbnail, caption = thumbs.get(row.uid, (None, None))
        name = ""
        if thumbnail is not None:
            name = f"example-{row.uid}.png"
            pixels = np.frombuffer(thumbnail, np.uint8).reshape(THUMBNAIL_SIDE, THUMBNAIL_SIDE, 3)
            Image.fromarray(pixels).resize((96, 96), Image.NEAREST).save(report / name)
        examples.setdefault(row.reason, []).append((name, caption if isinstance(caption, str) else "(no caption)"))
    return examples


def _html(manifest: dict, figures: list[Path], examples: dict[str, list[tuple[str, str]]]) -> str:
    rows = manifest["funnel"]["rows"]
    parts = ["<!doctype html><meta charset='utf-8'><title>vlm-curate report</title>",
             "<style>body{font-family:sans-serif;margin:2em}figure{display:inline-block;margin:4px;"
             "width:110px;font-size:11px;vertical-align:top}</style>",
             "<h1>vlm-curate report</h1>",
             f"<p>read {rows['read']} rows, kept {rows['kept']} in {len(manifest['shards'])} shard(s).</p>"]
    parts += [f"<img src='{f.name}' alt='{f.stem}'>" for f in figures]
    parts.append("<h2>Rejected examples by reason</h2>")
    for reason, items in sorted(examples.items()):
        parts.append(f"<h3>{html.escape(reason)} ({manifest['funnel']['rejected_by_reason'].get(reason, 0)})</h3><div>")
        for image, caption in items:
            picture = f"<img src='{image}' width=96 height=96>" if image else "<div>(no image)</div>"
            parts.append(f"<figure>{picture}<figcaption>{html.escape(caption[:120])}</figcaption></figure>")
        parts.append("</div>")
    return "\n".join(parts) + "\n"
