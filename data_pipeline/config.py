"""Typed curation configuration: dataclasses loaded from YAML plus ``key.sub=value`` overrides.

The generic loading (``from_dict``, ``apply_override``, ``ConfigError``) is vlmtrain's, so both
halves of the project validate keys the same way and name the offending key.
The defaults of ``HeuristicsConfig`` reproduce DataComp's "basic" filter.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vlmtrain.config import ConfigError, apply_override, from_dict, to_dict

SOURCE_FORMATS = ("webdataset", "parquet", "jsonl")


@dataclass
class SourceConfig:
    """One input. ``path``: a directory, a file or a glob (webdataset ``*.tar``, img2dataset ``*.parquet``,
    ``*.jsonl``). jsonl rows name their image relative to ``image_root`` (default: the jsonl's folder)."""
    format: str = field(default="webdataset", metadata={"choices": SOURCE_FORMATS})
    path: str = field(default="", metadata={"required": True})
    name: str = ""  # label in decisions.parquet; default "<format>:<path>"
    image_root: str = ""
    image_column: str = "image"  # parquet column with image bytes, or jsonl/parquet field with a path
    caption_column: str = "caption"
    url_column: str = "url"

    def label(self) -> str:
        return self.name or f"{self.format}:{self.path}"


@dataclass
class DecodeConfig:
    max_pixels: int = field(default=89_478_485, metadata={"min": 1})  # PIL's own bomb limit
    max_caption_bytes: int = field(default=65_536, metadata={"min": 1})  # larger is not a caption


@dataclass
class HeuristicsConfig:
    """Every rule is named after its field; 0 (or an empty list) switches a limit off."""
    min_caption_chars: int = field(default=6, metadata={"min": 0})  # DataComp basic: > 5 characters
    max_caption_chars: int = field(default=0, metadata={"min": 0})
    min_caption_words: int = field(default=3, metadata={"min": 0})  # DataComp basic: > 2 words
    max_caption_words: int = field(default=0, metadata={"min": 0})
    min_image_side: int = field(default=200, metadata={"min": 0})  # DataComp basic: ≥ 200 px
    max_aspect_ratio: float = field(default=3.0, metadata={"min": 0.0})  # DataComp basic: ≤ 3
    min_image_bytes: int = field(default=0, metadata={"min": 0})
    # ISO 639-1 codes; "und" allows captions with too few letters to identify (e.g. "7").
    languages: list[str] = field(default_factory=lambda: ["en"])
    # Languages the detector chooses among: fewer candidates, fewer mistakes on short captions.
    language_candidates: list[str] = field(
        default_factory=lambda: ["en", "es", "fr", "de", "it", "pt", "nl", "ru", "zh", "ja"])
    max_repeated_word_fraction: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    max_symbol_fraction: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    caption_blocklist: list[str] = field(default_factory=list)  # case-insensitive whole words/phrases
    url_blocklist: list[str] = field(default_factory=list)  # substrings of the URL (e.g. domains)


@dataclass
class DedupConfig:
    exact: bool = True  # same image bytes (sha256) → keep one
    near: bool = True
    # Near duplicates: 64-bit DCT perceptual hash within `hamming` bits AND mean colours of the
    # 2×2 image quadrants within `colour` (0-255) — the colour check separates a red from a green
    # shape that a luminance hash cannot tell apart.
    hamming: int = field(default=12, metadata={"min": 0, "max": 64})
    colour: float = field(default=15.0, metadata={"min": 0.0})


@dataclass
class OutputConfig:
    samples_per_shard: int = field(default=1000, metadata={"min": 1})


@dataclass
class RayConfig:
    workers: int = field(default=2, metadata={"min": 1})  # scoring actors
    # Fractional CPUs per actor: actors asking a whole CPU each starve Ray Data's own tasks on a
    # small machine (a silent deadlock on 2 cores).
    cpus_per_worker: float = field(default=0.5, metadata={"min": 0.01})
    num_cpus: int = field(default=0, metadata={"min": 0})  # local Ray only; 0 = all cores


@dataclass
class CurateConfig:
    sources: list[SourceConfig] = field(default_factory=list)
    output_dir: str = field(default="", metadata={"required": True})
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    heuristics: HeuristicsConfig = field(default_factory=HeuristicsConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    batch_rows: int = field(default=256, metadata={"min": 1})  # rows per stage call inside a worker
    progress: bool = True

    def check(self) -> None:
        if not self.sources:
            raise ConfigError("config key 'sources' needs at least one source "
                              "(e.g. sources=[{format: webdataset, path: data/train}])")
        for i, source in enumerate(self.sources):
            if not source.path:
                raise ConfigError(f"config key 'sources[{i}].path' is required")

    def stage_fingerprint(self) -> str:
        """Hash of everything that changes per-row results: a resumed run must match it."""
        stages = {k: v for k, v in to_dict(self).items() if k not in ("ray", "progress", "output")}
        return hashlib.sha256(json.dumps(stages, sort_keys=True).encode()).hexdigest()[:16]


def load_curate_config(path: str | Path | None, overrides: list[str] = ()) -> CurateConfig:
    """Read a YAML file (or start from defaults), apply overrides, build and validate."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(CurateConfig, raw)
    cfg.check()
    return cfg
