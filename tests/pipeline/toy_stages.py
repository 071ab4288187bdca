"""Two stages a test adds to the registry (tests/pipeline/test_stage_registry.py): each is its config
dataclass and its function, all a new stage's module needs."""
from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from data_pipeline.candidates import Candidates, Verdict


@dataclass
class NoCoffeeConfig:
    word: str = "coffee"


def no_coffee(cfg: NoCoffeeConfig):
    """A row stage: rejects captions that mention ``cfg.word``."""
    def stage(batch: pd.DataFrame) -> pd.DataFrame:
        out = batch.copy()
        mentions = out["caption"].fillna("").str.contains(cfg.word, regex=False)
        out["reason_no_coffee"] = mentions.map({True: "mentions_coffee", False: None})
        return out
    return stage


@dataclass
class CaptionRepeatsConfig:
    max_repeats: int = field(default=1, metadata={"min": 1})


def caption_repeats(candidates: Candidates, cfg: CaptionRepeatsConfig) -> Verdict:
    """A global stage: a caption may appear ``max_repeats`` times among the candidates; later rows with it are
    rejected and name the first."""
    captions = pd.concat([rows["caption"] for rows in candidates.columns(["caption"])], ignore_index=True)
    seen = captions.groupby(captions).cumcount().to_numpy()
    first = captions.groupby(captions).transform(lambda group: group.index[0]).to_numpy()
    keep = seen < cfg.max_repeats
    return Verdict.of(keep, "repeated_caption", {"caption_first_seen": candidates.references_to(first, ~keep)})
