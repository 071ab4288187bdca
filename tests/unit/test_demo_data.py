"""Tests for tools/make_demo_data.py, the deterministic demo corpus generator."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import sys
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from sklearn.datasets import load_digits

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tools" / "make_demo_data.py"

NUM_TRAIN = 1000
EVAL_PER_CLASS = 5
PER_SHARD = 300
IMAGE_SIZE = 64


def _load_module():
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


demo = _load_module()


def _generate(out: Path, seed: int = 0, num_train: int = NUM_TRAIN) -> Path:
    demo.generate(out, seed=seed, num_train=num_train, image_size=IMAGE_SIZE,
                  samples_per_shard=PER_SHARD, eval_per_class=EVAL_PER_CLASS)
    return out


def _file_hashes(root: Path, under: str = "") -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted((root / under).rglob("*"))
        if path.is_file()
    }


def _read_samples(shards: list[Path]) -> dict[str, dict[str, bytes]]:
    """All samples of some webdataset shards as {key: {extension: bytes}}."""
    samples: dict[str, dict[str, bytes]] = defaultdict(dict)
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples[key][ext] = tar.extractfile(member).read()
    return dict(samples)


def _decodes(data: bytes) -> Image.Image | None:
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image
    except Exception:
        return None


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _generate(tmp_path_factory.mktemp("seed0") / "demo")


@pytest.fixture(scope="module")
def index(corpus):
    return pq.read_table(corpus / "train" / "index.parquet").to_pandas()


@pytest.fixture(scope="module")
def train_samples(corpus):
    return _read_samples(sorted((corpus / "train").glob("shard-*.tar")))


def _eval_samples(corpus: Path, name: str) -> dict[str, dict[str, bytes]]:
    return _read_samples(sorted((corpus / "eval" / name / "test").glob("*.tar")))


# ----------------------------------------------------------------------------- determinism


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """Small corpora (100 train samples) for the seed comparisons."""
    root = tmp_path_factory.mktemp("small")
    return {name: _generate(root / name, seed=seed, num_train=100)
            for name, seed in (("seed0", 0), ("seed0_again", 0), ("seed1", 1))}


def test_same_seed_gives_byte_identical_files(small):
    assert _file_hashes(small["seed0"]) == _file_hashes(small["seed0_again"])


def test_different_seed_gives_different_train_and_eval_images(small):
    hashes_a, hashes_b = _file_hashes(small["seed0"]), _file_hashes(small["seed1"])
    assert hashes_a.keys() == hashes_b.keys()
    differing = {name for name in hashes_a if hashes_a[name] != hashes_b[name]}
    assert "train/shard-000000.tar" in differing
    assert {"eval/shapes/test/0.tar", "eval/digits/test/0.tar", "eval/retrieval/test/0.tar"} <= differing


def test_eval_sets_do_not_depend_on_num_train(corpus, small):
    assert _file_hashes(corpus, "eval") == _file_hashes(small["seed0"], "eval")


# ----------------------------------------------------------------------------- layout


def assert_clip_benchmark_split(split: Path) -> None:
    """CLIP_benchmark's wds loader reads test/nshards.txt, then exactly test/0.tar … test/{n-1}.tar."""
    count = int((split / "nshards.txt").read_text())
    assert count >= 1
    assert sorted(p.name for p in split.iterdir()) == sorted(["nshards.txt", *(f"{i}.tar" for i in range(count))])


def test_layout_matches_the_contract(corpus):
    assert sorted(p.name for p in (corpus / "train").iterdir()) == [
        "index.parquet", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "shard-000003.tar",
    ]
    for name in ("shapes", "digits"):
        root = corpus / "eval" / name
        assert (root / "classnames.txt").is_file()
        assert (root / "zeroshot_classification_templates.txt").is_file()
        assert_clip_benchmark_split(root / "test")
    assert_clip_benchmark_split(corpus / "eval" / "retrieval" / "test")
    assert (corpus / "eval" / "retrieval" / "dataset_type.txt").read_text().strip() == "retrieval"
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["seed"] == 0 and manifest["image_size"] == IMAGE_SIZE
    assert manifest["counts"]["train"] == NUM_TRAIN
    assert manifest["generator_version"] == demo.GENERATOR_VERSION
    assert sum(manifest["noise_counts"].values()) == NUM_TRAIN


def test_index_has_the_contract_columns_and_one_row_per_sample(index, train_samples):
    contract = {"key", "shard", "caption", "kind", "shape", "colour", "size", "position", "digit",
                "noise", "duplicate_of", "width", "height", "sha256"}
    assert contract <= set(index.columns)
    assert len(index) == NUM_TRAIN == len(train_samples)
    assert list(index.key) == [f"train-{i:07d}" for i in range(NUM_TRAIN)]
    assert set(index.noise) <= set(demo.NOISE_KINDS)
    assert set(index.kind) == {"scene", "digit"}


def test_train_shards_hold_jpg_txt_json_consistent_with_the_index(index, train_samples):
    for row in index.itertuples():
        sample = train_samples[row.key]
        assert set(sample) == {"jpg", "txt", "json"}
        assert hashlib.sha256(sample["jpg"]).hexdigest() == row.sha256
        assert sample["txt"].decode("utf-8") == row.caption
        meta = json.loads(sample["json"])
        assert meta["noise"] == row.noise and meta["key"] == row.key
        assert row.shard == f"shard-{int(row.key[-7:]) // PER_SHARD:06d}.tar"


def test_scene_rows_have_attributes_and_digit_rows_have_a_digit(index):
    scenes, digits = index[index.kind == "scene"], index[index.kind == "digit"]
    assert scenes[["shape", "colour", "size", "position"]].notna().all().all()
    assert scenes.digit.isna().all()
    assert digits[["shape", "colour", "size", "position"]].isna().all().all()
    assert digits.digit.between(0, 9).all()


def test_train_pool_is_about_three_quarters_scenes(index):
    assert (index.kind == "digit").mean() == pytest.approx(0.45, abs=0.02)


# ----------------------------------------------------------------------------- noise


def test_noise_fractions_are_close_to_the_targets(index):
    fractions = index.noise.value_counts(normalize=True)
    assert fractions["mismatched_caption"] == pytest.approx(0.20, abs=0.02)
    assert fractions["near_duplicate"] == pytest.approx(0.10, abs=0.02)
    junk = ["tiny_image", "empty_caption", "garbage_caption", "non_english_caption", "corrupt_image"]
    assert sum(fractions.get(kind, 0.0) for kind in junk) == pytest.approx(0.04, abs=0.01)
    assert all(fractions.get(kind, 0.0) > 0 for kind in junk)


def test_corrupt_images_fail_to_decode_and_clean_ones_decode_to_the_image_size(index, train_samples):
    for row in index.itertuples():
        image = _decodes(train_samples[row.key]["jpg"])
        if row.noise == "corrupt_image":
            assert image is None, row.key
            assert np.isnan(row.width)
        elif row.noise == "tiny_image":
            assert image.size == (12, 12)
        elif row.noise == "near_duplicate":
            assert image is not None and image.size == (row.width, row.height)
        else:
            assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"


def test_caption_noise_kinds_have_the_advertised_captions(index):
    assert (index[index.noise == "empty_caption"].caption == "").all()
    assert (index[index.noise != "empty_caption"].caption != "").all()
    english_words = {"the", "circle", "square", "star", "digit", "number", "handwritten", "there", "of"}
    for text in index[index.noise == "non_english_caption"].caption:
        assert not english_words & set(text.lower().split()), text


def test_clean_scene_captions_name_the_colour_and_shape(index):
    clean = index[(index.noise == "clean") & (index.kind == "scene")]
    for row in clean.itertuples():
        assert row.colour in row.caption.lower() and row.shape in row.caption.lower(), row.caption


def test_mismatched_scene_captions_do_not_describe_the_image(index):
    mismatched = index[(index.noise == "mismatched_caption") & (index.kind == "scene")]
    for row in mismatched.itertuples():
        text = row.caption.lower()
        assert not (f"{row.colour} {row.shape}" in text), row.caption


def test_near_duplicates_point_to_an_existing_clean_original_with_the_same_content(index):
    by_key = index.set_index("key")
    duplicates = index[index.noise == "near_duplicate"]
    assert index[index.noise != "near_duplicate"].duplicate_of.isna().all()
    for row in duplicates.itertuples():
        original = by_key.loc[row.duplicate_of]
        assert original.noise == "clean"
        assert row.sha256 != original.sha256
        for column in ("kind", "shape", "colour", "size", "position", "digit", "source_index"):
            assert str(getattr(row, column)) == str(original[column])


# ----------------------------------------------------------------------------- digits


def _source_hashes(indices) -> set[str]:
    images = load_digits().images
    return {hashlib.sha256(images[int(i)].tobytes()).hexdigest() for i in indices}


def test_held_out_digits_never_appear_in_train(corpus, index):
    train_sources = set(index.source_index.dropna().astype(int))
    eval_sources = set()
    for name in ("digits", "retrieval"):
        for sample in _eval_samples(corpus, name).values():
            meta = json.loads(sample["json"])
            if meta["kind"] == "digit":
                eval_sources.add(meta["source_index"])
    assert eval_sources and not train_sources & eval_sources
    # Compare the source pixels too, in case two indices held the same drawing.
    assert not _source_hashes(train_sources) & _source_hashes(eval_sources)
    pool, held_out = demo.split_digits(0, 1797)
    assert train_sources <= set(pool) and eval_sources <= set(held_out)
    assert len(pool) == pytest.approx(0.7 * 1797, abs=1)


# ----------------------------------------------------------------------------- eval sets


def test_shape_eval_has_24_colour_shape_classes_and_templates(corpus):
    root = corpus / "eval" / "shapes"
    classnames = (root / "classnames.txt").read_text().splitlines()
    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    shapes = ["circle", "square", "triangle", "star"]
    assert len(classnames) == 24
    assert set(classnames) == {f"{c} {s}" for c in colours for s in shapes}
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert 5 <= len(templates) <= 8 and all("{c}" in t for t in templates)


def test_digit_eval_classnames_are_number_words(corpus):
    root = corpus / "eval" / "digits"
    assert (root / "classnames.txt").read_text().splitlines() == [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ]
    templates = (root / "zeroshot_classification_templates.txt").read_text().splitlines()
    assert 4 <= len(templates) <= 8 and all("{c}" in t for t in templates)


@pytest.mark.parametrize("name,num_classes", [("shapes", 24), ("digits", 10)])
def test_classification_eval_samples_are_clean_and_balanced(corpus, name, num_classes):
    samples = _eval_samples(corpus, name)
    classnames = (corpus / "eval" / name / "classnames.txt").read_text().splitlines()
    counts = np.zeros(num_classes, int)
    for sample in samples.values():
        assert {"jpg", "cls", "txt"} <= set(sample)
        cls = int(sample["cls"].decode("ascii"))
        counts[cls] += 1
        assert _decodes(sample["jpg"]).size == (IMAGE_SIZE, IMAGE_SIZE)
        meta = json.loads(sample["json"])
        label = f"{meta['colour']} {meta['shape']}" if name == "shapes" else classnames[meta["digit"]]
        assert label == classnames[cls]
    assert (counts == EVAL_PER_CLASS).all()


def test_eval_images_are_fresh_draws_not_copies_of_train(corpus, index):
    train_hashes = set(index.sha256)
    for name in ("shapes", "digits", "retrieval"):
        for sample in _eval_samples(corpus, name).values():
            assert hashlib.sha256(sample["jpg"]).hexdigest() not in train_hashes


def test_retrieval_images_have_two_different_captions(corpus):
    samples = _eval_samples(corpus, "retrieval")
    assert len(samples) == demo.RETRIEVAL_SIZE
    kinds = set()
    for sample in samples.values():
        captions = sample["txt"].decode().split("\n")
        assert len(captions) == 2 and captions[0] != captions[1] and all(captions)
        kinds.add(json.loads(sample["json"])["kind"])
    assert kinds == {"scene", "digit"}


# ----------------------------------------------------------------------------- CLI


def test_cli_refuses_a_non_empty_out_dir_without_force(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("user data")
    assert demo.main(["--out", str(tmp_path), "--seed", "0", "--num-train", "10"]) == 2
    error = capsys.readouterr().err
    assert len(error.strip().splitlines()) == 1 and "--force" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_force_replaces_generated_outputs_but_keeps_other_files(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "shard-000099.tar").write_bytes(b"stale")
    argv = ["--out", str(tmp_path), "--seed", "0", "--num-train", "20", "--eval-per-class", "1", "--force"]
    assert demo.main(argv) == 0
    assert (tmp_path / "keep.txt").read_text() == "user data"
    assert not (tmp_path / "train" / "shard-000099.tar").exists()
    assert (tmp_path / "manifest.json").is_file()
