"""Each stage as a plain function over a pandas batch: no Ray involved."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from data_pipeline.config import SourceConfig, load_curate_config
from data_pipeline.registry import GLOBAL, Stage, run_stages
from data_pipeline.select import decide, funnel
from data_pipeline.sources import list_parts, read_part
from data_pipeline.stages.decode import DecodeConfig, check_image, decode_caption, normalize_caption, validate
from data_pipeline.stages.dedup import DedupConfig, find_duplicates, near_duplicate_of
from data_pipeline.stages.heuristics import (RULES, Heuristics, HeuristicsConfig, repeated_word_fraction,
                                             symbol_fraction)
from tests.conftest import run_tool
from tests.pipeline.conftest import bad_samples, encode, noise_image
from tests.pipeline.toy_stages import CaptionRepeatsConfig, caption_repeats
from vlmtrain.errors import ConfigError


def raw_rows(bad_input_dir, fmt: str, path: str) -> pd.DataFrame:
    source = SourceConfig(format=fmt, path=str(bad_input_dir / path))
    return pd.concat([read_part(p, source) for p in list_parts([source])], ignore_index=True)


def test_every_bad_webdataset_sample_gets_its_specific_reason_or_repair_note(bad_input_dir):
    rows = validate(raw_rows(bad_input_dir, "webdataset", "wds/bad-000.tar"), DecodeConfig())
    expected = [e for _, e in bad_samples()]
    assert len(rows) == len(expected)
    for (_, row), want in zip(rows.iterrows(), expected):
        if want is None:
            assert pd.isna(row["reason_validate"]), row["key"]
        elif want.startswith("note:"):
            assert pd.isna(row["reason_validate"]) and want[5:] in row["notes"], (row["key"], row["notes"])
            # Stored under the extension of what it really is (a repaired one in its own format, as RGB).
            assert row["width"] == 64 and row["image_out_ext"] == {"JPEG": "jpg", "PNG": "png"}[row["image_format"]]
        else:
            assert row["reason_validate"] == want, row["key"]


def test_truncated_tar_keeps_the_samples_before_the_cut_and_names_the_cut_one(bad_input_dir):
    rows = validate(raw_rows(bad_input_dir, "webdataset", "wds/bad-001.tar"), DecodeConfig())
    assert rows["key"].iloc[0] == "cut-0" and pd.isna(rows["reason_validate"].iloc[0])
    assert rows["reason_validate"].iloc[-1] == "truncated_tar"


def test_parquet_and_jsonl_readers_take_bytes_or_paths_and_record_what_is_missing(bad_input_dir):
    parquet = validate(raw_rows(bad_input_dir, "parquet", "parquet"), DecodeConfig()).set_index("key")
    assert pd.isna(parquet.loc["p0", "reason_validate"]) and parquet.loc["p0", "url"].endswith("p0.jpg")
    assert parquet.loc["p1", "reason_validate"] == "missing_image"
    assert parquet.loc["p2", "reason_validate"] == "undecodable_image"
    assert pd.isna(parquet.loc["q0", "reason_validate"]) and parquet.loc["q0", "image_format"] == "PNG"
    jsonl = validate(raw_rows(bad_input_dir, "jsonl", "jsonl/pairs.jsonl"), DecodeConfig())
    assert list(jsonl["reason_validate"].fillna("ok")) == ["ok", "image_file_not_found", "invalid_jsonl_line"]


def test_uids_are_stable_and_unique_and_sha256_is_of_the_image_bytes(bad_input_dir):
    first = raw_rows(bad_input_dir, "webdataset", "wds/bad-000.tar")
    again = raw_rows(bad_input_dir, "webdataset", "wds/bad-000.tar")
    assert list(first["uid"]) == list(again["uid"]) and first["uid"].is_unique
    import hashlib
    row = first.iloc[0]
    assert row["sha256"] == hashlib.sha256(row["image"]).hexdigest()


def test_bomb_is_refused_from_its_header_under_a_configured_pixel_limit():
    check = check_image(encode(noise_image(0, side=300), "PNG"), "png", max_pixels=200 * 200)
    assert check.reason == "decompression_bomb" and check.width == 300


def test_truncated_jpeg_is_a_reason():
    data = encode(noise_image(0), "JPEG")
    assert check_image(data[: len(data) // 2], "jpg", 10**8).reason in ("truncated_image", "undecodable_image")


def test_caption_decoding_normalizes_entities_and_whitespace_and_names_failures():
    assert normalize_caption("  Tom &amp; Jerry\t\n on&nbsp;TV \x00 ") == "Tom & Jerry on TV"
    assert decode_caption(b"\xff\xfe", 100) == (None, "caption_not_utf8")
    assert decode_caption(b"x" * 101, 100) == (None, "caption_too_large")
    assert decode_caption(None, 100) == (None, "missing_caption")


def heuristics_batch(captions, sides=(256, 256), urls=None, file_bytes=5000) -> pd.DataFrame:
    n = len(captions)
    return pd.DataFrame({"caption": captions, "width": pd.array([sides[0]] * n, dtype="Int64"),
                         "height": pd.array([sides[1]] * n, dtype="Int64"), "file_bytes": [file_bytes] * n,
                         "url": urls or [None] * n})


def test_default_heuristics_are_datacomp_basic():
    rules = Heuristics(HeuristicsConfig())
    out = rules(heuristics_batch(["a dog on a red sofa", "two words", "a dog", "un perro en un sofá rojo"]))
    assert list(out["reason_heuristics"].fillna("ok")) == ["ok", "caption_words", "caption_chars", "language"]
    assert list(rules(heuristics_batch(["a dog on a red sofa"], sides=(199, 400)))["reason_heuristics"]) == \
        ["image_side"]
    assert list(rules(heuristics_batch(["a dog on a red sofa"], sides=(200, 601)))["reason_heuristics"]) == \
        ["aspect_ratio"]


def test_each_optional_rule_records_its_own_flag():
    cfg = HeuristicsConfig(min_image_bytes=1000, max_repeated_word_fraction=0.5, max_symbol_fraction=0.2,
                           caption_blocklist=["forbidden words"], url_blocklist=["spam.example"],
                           max_caption_chars=40, languages=[])
    out = Heuristics(cfg)(heuristics_batch(
        ["buy buy buy buy buy now", "#$%& !!! ?? ok fine good", "these are forbidden words here", "a fine caption",
         "a caption that is much too long for the limit we set"],
        urls=[None, None, None, "http://spam.example/x.jpg", None]))
    assert list(out["reason_heuristics"]) == ["repeated_words", "symbols", "caption_blocklist", "url_blocklist",
                                              "caption_chars"]
    assert out["flag_image_bytes"].sum() == 0
    assert repeated_word_fraction("a b a b".split()) == 0.5 and symbol_fraction("ab!!") == 0.5


def test_language_rule_can_allow_captions_too_short_to_identify():
    out = Heuristics(HeuristicsConfig(min_caption_chars=1, min_caption_words=1, languages=["en", "und"]))(
        heuristics_batch(["7", "a blue square on the left", "il y a un cercle rouge à gauche"]))
    assert list(out["language"]) == ["und", "en", "fr"]
    assert list(out["reason_heuristics"].fillna("ok")) == ["ok", "ok", "language"]


def test_short_english_captions_are_kept_while_foreign_captions_are_still_caught():
    english = ["an orange star", "Digit one.", "a blue star", "digit zero", "a medium star in orange"]
    foreign = ["die Zahl null", "el número dos", "un dessin d'un triangle vert", "links ist ein Stern in Orange"]
    out = Heuristics(HeuristicsConfig(min_caption_chars=1, min_caption_words=1))(heuristics_batch(english + foreign))
    assert list(out["language"][:len(english)]) == ["en"] * len(english)
    assert list(out["reason_heuristics"].fillna("ok")) == ["ok"] * len(english) + ["language"] * len(foreign)


def dedup_rows(images, captions, sizes=None) -> pd.DataFrame:
    rows = pd.DataFrame({"uid": [f"u{i}" for i in range(len(images))], "image": images,
                         "caption_raw": [c.encode() for c in captions], "image_ext": ["png"] * len(images)})
    rows["sha256"] = [__import__("hashlib").sha256(b).hexdigest() for b in images]
    for column in ("json_raw", "url", "read_error"):
        rows[column] = None
    return validate(rows, DecodeConfig())


def test_exact_duplicates_keep_one_by_the_stated_rule_and_say_whether_the_caption_matched():
    a, b = encode(noise_image(1), "PNG"), encode(noise_image(2), "PNG")
    rows = dedup_rows([a, a, a, b], ["x", "x", "y", "z"])
    found = find_duplicates(rows, DedupConfig(near=False)).set_index("uid")
    assert dict(found["reason_dedup"]) == {"u1": "exact_duplicate_pair", "u2": "exact_duplicate_image"}
    assert set(found["duplicate_of"]) == {"u0"}  # equal size and bytes: the smallest uid stays


def scene(seed: int, side: int = 64) -> Image.Image:
    """A red disc at the same place on a shaded background of the seed's own colour, with pixel noise:
    look-alikes in the way the generator's pictures of one class and layout are."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:side, 0:side] / side
    shade = rng.uniform(40, 200, 3)
    pixels = shade + 40 * x[..., None] + rng.normal(0, 4, (side, side, 3))
    pixels[(x - 0.45) ** 2 + (y - 0.55) ** 2 < 0.04] = [220, 30, 30]
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def test_near_duplicates_catch_reencodes_resizes_and_crops_and_keep_the_larger_image():
    original = scene(3)
    copies = [encode(original, "JPEG", quality=55), encode(original.resize((80, 80)), "JPEG"),
              encode(original.resize((48, 48)), "JPEG"), encode(original.crop((6, 0, 64, 60)), "JPEG"),
              encode(original.crop((3, 5, 61, 64)), "JPEG")]
    rows = dedup_rows([encode(original, "PNG"), *copies], ["a"] * 6)
    found = find_duplicates(rows, DedupConfig(exact=False)).set_index("uid")
    # The 80 px resize has the most pixels, so it is the one kept.
    assert sorted(found.index) == ["u0", "u1", "u3", "u4", "u5"] and set(found["duplicate_of"]) == {"u2"}


def test_look_alikes_with_their_own_pixels_are_not_near_duplicates():
    # Same disc, place and background ramp; each has its own background colour and noise.
    look_alikes = [encode(scene(seed), "PNG") for seed in range(20)]
    rows = dedup_rows(look_alikes, ["a"] * 20)
    assert find_duplicates(rows, DedupConfig(exact=False)).empty
    # More verification chunks than candidate pairs, and a single row: nothing to find, no error.
    assert find_duplicates(rows.iloc[:2], DedupConfig(exact=False), chunks=8).empty
    assert find_duplicates(rows.iloc[:1], DedupConfig(exact=False)).empty


def test_letterboxed_low_structure_pictures_are_told_apart_by_content_and_their_copies_still_caught():
    # The benchmark's set: distinct noise, gradients and small objects on flat backgrounds, letterboxed
    # to 64 px like img2dataset's resize_mode=border, a quarter with a re-encoded/resized true copy.
    result = run_tool("tools/bench_near_duplicates.py", "--distinct", "600", "--seed", "0", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)["letterbox"]
    assert figures["true_duplicates"] > 100
    assert figures["false_positive_rate"] <= 0.005, figures
    assert figures["recall"] >= 0.95, figures


def test_keep_one_resolution_matches_a_brute_force_reference():
    rng = np.random.default_rng(0)
    n = 300
    pairs = np.unique(np.sort(rng.integers(0, n, (600, 2)), axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    got = near_duplicate_of(pairs, n)
    linked = {(int(a), int(b)) for a, b in pairs}
    expected = np.full(n, -1)
    for i in range(n):
        for j in range(i):
            if expected[j] < 0 and (j, i) in linked:
                expected[i] = j
                break
    np.testing.assert_array_equal(got, expected)


def test_selection_gives_the_first_reason_in_pipeline_order_and_counts_add_up():
    rows = pd.DataFrame({"uid": ["a", "b", "c", "d"], "reason_validate": [None, "empty_image", None, None],
                         "reason_heuristics": [None, "caption_chars", "language", None]})
    for column in ("sha256", "source", "file", "key", "notes", "width", "height", "image_format", "image_mode",
                   "file_bytes", "url", "caption_chars", "caption_words", "min_side", "aspect_ratio", "language",
                   "language_confidence", "repeated_word_fraction", "symbol_fraction"):
        rows[column] = None
    for rule in RULES:
        rows[f"flag_{rule}"] = [False, rule == "caption_chars", rule == "language", False]
    decisions = decide(rows, pd.DataFrame({"uid": ["d"], "reason_global": ["near_duplicate"], "duplicate_of": ["a"]}))
    assert list(decisions["reason"].fillna("kept")) == ["kept", "empty_image", "language", "near_duplicate"]
    counts = funnel(decisions)
    assert counts["rows"] == {"read": 4, "validate": 3, "heuristics": 2, "exact_dedup": 2, "near_dedup": 1, "kept": 1}
    assert sum(counts["rejected_by_reason"].values()) + counts["rows"]["kept"] == 4


def test_the_funnel_is_the_registry_order_and_a_new_stage_counts_with_its_entry_alone():
    # A toy stage after near-duplicate removal: its registry entry is all the funnel needs.
    toy = Stage("toy_filter", "toy", CaptionRepeatsConfig, ("toy_reason",), "a stage this test adds", GLOBAL,
                caption_repeats)
    decisions = pd.DataFrame({"reason": [None, "unreadable_tar: boom", "language", "near_duplicate", "toy_reason"]})
    decisions["kept"] = decisions["reason"].isna()
    for rule in RULES:
        decisions[f"flag_{rule}"] = decisions["reason"] == rule
    counts = funnel(decisions, [*run_stages(), toy])
    assert counts["rows"] == {"read": 5, "validate": 4, "heuristics": 3, "exact_dedup": 3, "near_dedup": 2,
                              "toy_filter": 1, "kept": 1}
    # Without embedding settings a run has no embedding stage; with them, the enabled ones in order.
    assert [s.name for s in run_stages()] == ["validate", "heuristics", "exact_dedup", "near_dedup"]
    enabled = load_curate_config(None, ["output_dir=x", "sources=[{path: a}]", "embedding.model.checkpoint=m",
                                        "embedding.balance.enabled=true", "embedding.balance.target_size=10",
                                        "embedding.copy_dedup.enabled=true"])
    assert [s.name for s in run_stages(enabled, embedded=True)][4:] == ["copy_dedup", "balance"]
    assert [s.name for s in run_stages(enabled, embedded=False)] == [s.name for s in run_stages()]


def test_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="heuristics.min_image_sid"):
        load_curate_config(None, ["output_dir=x", "sources=[{path: a}]", "heuristics.min_image_sid=3"])
    with pytest.raises(ConfigError, match="sources"):
        load_curate_config(None, ["output_dir=x"])
    with pytest.raises(ConfigError, match=r"sources\[0\].format"):
        load_curate_config(None, ["output_dir=x", "sources=[{path: a, format: zip}]"])


def test_a_near_duplicate_pairs_check_does_not_depend_on_which_other_pairs_are_checked_with_it():
    # The search tasks verify the pairs they found, 4096 at a time: which pairs share a larger image in one
    # call depends on the pool's split into tasks (pool size, CPUs). The coarse check's errors came from a
    # matrix product over those pairs, whose rounding depends on how many there are (~1e-3 RMS after the
    # cancellation in |w|² - 2·t·w + |t|²): two splits of one pool verified a borderline pair differently.
    from data_pipeline.stages.dedup import thumbnail_array
    from data_pipeline.stages.near_duplicates import coarse_residual, fine_residual

    rows = dedup_rows([encode(scene(seed), "PNG") for seed in range(24)], ["a"] * 24)
    thumbnails = thumbnail_array(rows["thumbnail"])
    larger, smaller = np.triu_indices(len(thumbnails), 1)  # every pair, 23 with the first as the larger image
    together = coarse_residual(thumbnails, larger, smaller, 0.1)
    alone = [coarse_residual(thumbnails, larger[i:i + 1], smaller[i:i + 1], 0.1) for i in range(len(larger))]
    np.testing.assert_array_equal(together[0], np.concatenate([a[0] for a in alone]))  # bitwise
    np.testing.assert_array_equal(together[1], np.concatenate([a[1] for a in alone]))
    shuffled = np.random.default_rng(0).permutation(len(larger))
    fine = fine_residual(thumbnails, larger, smaller, together[1], 0.1)
    fine_shuffled = fine_residual(thumbnails, larger[shuffled], smaller[shuffled], together[1][shuffled], 0.1)
    np.testing.assert_array_equal(fine[0][shuffled], fine_shuffled[0])
    np.testing.assert_array_equal(fine[1][shuffled], fine_shuffled[1])
