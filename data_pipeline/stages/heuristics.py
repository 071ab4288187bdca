"""Heuristic filters: each rule is named, configurable, and records its own flag.

Adds the scores (caption_chars, caption_words, min_side, aspect_ratio, language,
language_confidence, repeated_word_fraction, symbol_fraction), one boolean ``flag_<rule>`` per rule
(True = the rule rejects the row) and reason_heuristics: the first failing rule in RULES order.
Language id is lingua's, restricted to ``language_candidates``; it ships its models in the wheel.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from vlmtrain.errors import ConfigError

RULES = ("caption_chars", "caption_words", "image_side", "aspect_ratio", "image_bytes", "language",
         "repeated_words", "symbols", "caption_blocklist", "url_blocklist")
UNDETERMINED = "und"
_WORD = re.compile(r"\w+", re.UNICODE)


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
    # Short captions share words across languages: one with fewer than `language_full_letters` letters
    # is rejected as another language only when lingua's confidence (0-1) in it beats the best
    # allowed language by `language_margin` (LanguageIdentifier, below).
    language_margin: float = field(default=0.1, metadata={"min": 0.0, "max": 1.0})
    language_full_letters: int = field(default=20, metadata={"min": 0})
    max_repeated_word_fraction: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    max_symbol_fraction: float = field(default=0.0, metadata={"min": 0.0, "max": 1.0})
    caption_blocklist: list[str] = field(default_factory=list)  # case-insensitive whole words/phrases
    url_blocklist: list[str] = field(default_factory=list)  # substrings of the URL (e.g. domains)


def repeated_word_fraction(words: list[str]) -> float:
    """Share of words that repeat an earlier one ("buy buy buy now" → 0.5)."""
    return 1.0 - len(set(words)) / len(words) if len(words) > 1 else 0.0


def symbol_fraction(text: str) -> float:
    """Share of non-space characters that are punctuation or symbols (garbage captions score high)."""
    visible = [ch for ch in text if not ch.isspace()]
    if not visible:
        return 0.0
    return sum(unicodedata.category(ch)[0] in "PS" for ch in visible) / len(visible)


class LanguageIdentifier:
    """lingua over a fixed candidate set; 'und' when a caption has nothing to identify.

    A caption shorter than ``full_letters`` letters is put in a language outside ``allowed`` only when
    lingua's confidence in it beats its confidence in the best allowed language by ``margin``; else it
    goes to that allowed language. Two to four words are often valid in several languages ("an orange
    star" is German too, "digit zero" Italian-looking), and lingua then picks among near-equal
    confidences; longer captions are identified reliably, so there the top language stands.
    """

    def __init__(self, candidates: list[str], allowed: list[str] = (), margin: float = 0.0,
                 full_letters: int = 0):
        from lingua import LanguageDetectorBuilder

        languages = [_lingua_language(code) for code in candidates]
        if len(languages) < 2:
            raise ConfigError("heuristics.language_candidates needs at least two languages")
        self._detector = LanguageDetectorBuilder.from_languages(*languages).build()
        self._allowed = {language for code, language in zip(candidates, languages) if code in allowed}
        self._margin, self._full_letters = margin, full_letters

    def __call__(self, text: str) -> tuple[str, float]:
        values = self._detector.compute_language_confidence_values(text)
        if not values or values[0].value == 0.0:
            return UNDETERMINED, 0.0
        chosen = values[0]
        if chosen.language not in self._allowed and sum(ch.isalpha() for ch in text) < self._full_letters:
            best_allowed = next((v for v in values if v.language in self._allowed), None)
            if best_allowed is not None and chosen.value - best_allowed.value < self._margin:
                chosen = best_allowed
        # lingua sums in hash-map order, which differs between processes in the last bits; rounding
        # keeps reruns byte-identical.
        return chosen.language.iso_code_639_1.name.lower(), round(chosen.value, 4)


def _lingua_language(code: str):
    from lingua import IsoCode639_1, Language

    try:
        return Language.from_iso_code_639_1(getattr(IsoCode639_1, code.upper()))
    except AttributeError:
        raise ConfigError(f"heuristics.language_candidates: unknown ISO 639-1 code {code!r}") from None


class Heuristics:
    """A stage object: building the language detector once per worker is the expensive part."""

    def __init__(self, cfg: HeuristicsConfig):
        self.cfg = cfg
        self._identify = LanguageIdentifier(cfg.language_candidates, cfg.languages, cfg.language_margin,
                                            cfg.language_full_letters) if cfg.languages else None
        self._caption_block = _phrase_pattern(cfg.caption_blocklist)
        self._url_block = [entry.lower() for entry in cfg.url_blocklist]

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        cfg = self.cfg
        out = batch.copy()
        captions = [c if isinstance(c, str) else "" for c in batch["caption"]]
        words = [_WORD.findall(c.lower()) for c in captions]
        width = batch["width"].fillna(0).astype("int64")
        height = batch["height"].fillna(0).astype("int64")
        out["caption_chars"] = [len(c) for c in captions]
        out["caption_words"] = [len(w) for w in words]
        out["min_side"] = pd.concat([width, height], axis=1).min(axis=1)
        out["aspect_ratio"] = [max(w, h) / min(w, h) if min(w, h) > 0 else 0.0 for w, h in zip(width, height)]
        out["repeated_word_fraction"] = [repeated_word_fraction(w) for w in words]
        out["symbol_fraction"] = [symbol_fraction(c) for c in captions]
        if self._identify is not None:
            languages = [self._identify(c) if c else (UNDETERMINED, 0.0) for c in captions]
        else:
            languages = [(UNDETERMINED, 0.0)] * len(captions)
        out["language"] = [lang for lang, _ in languages]
        out["language_confidence"] = [conf for _, conf in languages]

        flags = {
            "caption_chars": _outside(out["caption_chars"], cfg.min_caption_chars, cfg.max_caption_chars),
            "caption_words": _outside(out["caption_words"], cfg.min_caption_words, cfg.max_caption_words),
            "image_side": out["min_side"] < cfg.min_image_side,
            "aspect_ratio": (out["aspect_ratio"] > cfg.max_aspect_ratio) if cfg.max_aspect_ratio else False,
            "image_bytes": out["file_bytes"] < cfg.min_image_bytes,
            "language": ~out["language"].isin(cfg.languages) if cfg.languages else False,
            "repeated_words": (out["repeated_word_fraction"] > cfg.max_repeated_word_fraction
                               if cfg.max_repeated_word_fraction else False),
            "symbols": out["symbol_fraction"] > cfg.max_symbol_fraction if cfg.max_symbol_fraction else False,
            "caption_blocklist": [bool(self._caption_block and self._caption_block.search(c)) for c in captions],
            "url_blocklist": [isinstance(u, str) and any(b in u.lower() for b in self._url_block)
                              for u in batch["url"]],
        }
        for rule in RULES:
            out[f"flag_{rule}"] = np.zeros(len(out), dtype=bool) | np.asarray(flags[rule], dtype=bool)
        out["reason_heuristics"] = _first_flag(out)
        return out


def _first_flag(out: pd.DataFrame) -> list[str | None]:
    columns = [out[f"flag_{rule}"].to_numpy() for rule in RULES]
    return [next((rule for rule, flags in zip(RULES, columns) if flags[i]), None) for i in range(len(out))]


def _outside(values: pd.Series, minimum: int, maximum: int) -> pd.Series:
    too_many = values > maximum if maximum else False
    return (values < minimum) | too_many


def _phrase_pattern(phrases: list[str]) -> re.Pattern | None:
    if not phrases:
        return None
    return re.compile(r"\b(?:" + "|".join(re.escape(p.lower()) for p in phrases) + r")\b", re.IGNORECASE)
