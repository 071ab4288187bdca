"""Specification of the three eval-set layouts: the same images stored as a webdataset, an
ImageNet-style image folder and a CSV give the same metrics; bad sets fail naming the culprit.

The webdataset reading itself is checked against tarfile/PIL/open_clip references in
test_eval_datasets.py, so agreeing with it here pins the other layouts to those references.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import open_clip
import pytest
import webdataset
from PIL import Image

from vlmtrain.eval.datasets import EvalDataError, discover_eval_sets, open_eval_set, shard_paths
from vlmtrain.eval.suite import evaluate_dataset

from .conftest import CLASSNAMES, TEMPLATES

CORRUPT = 4  # index of the image stored as bytes that are no image
CAPTIONS = [["a cat"], ["a dog", "a puppy on grass"], ["red car"], ["a tree", "an oak", "green leaves"],
            ["boat"], ["a plane", "a jet"], ["a house"], ["two cats", "cats"], ["a blue boat"]]


def blocky_jpeg(rng: np.random.Generator) -> bytes:
    pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(buffer, format="JPEG")
    return buffer.getvalue()


def eval_images(count: int = 21, seed: int = 0) -> tuple[list[bytes], list[int]]:
    """JPEG bytes and class labels; image CORRUPT is garbage."""
    rng = np.random.default_rng(seed)
    images = [b"not an image at all" if i == CORRUPT else blocky_jpeg(rng) for i in range(count)]
    labels = [int(rng.integers(0, len(CLASSNAMES))) for _ in range(count)]
    return images, labels


def write_metadata(root: Path) -> None:
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")


def write_webdataset(root: Path, samples: list[dict], per_shard: int = 6) -> Path:
    (root / "test").mkdir(parents=True)
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        with webdataset.TarWriter(str(root / "test" / f"{shard}.tar")) as sink:
            for sample in samples[start : start + per_shard]:
                sink.write(sample)
    return root


def write_classification_sets(root: Path, seed: int = 0) -> dict[str, Path]:
    """The same labelled images as webdataset, image folder and CSV (keys sort in storage order)."""
    images, labels = eval_images(seed=seed)
    wds = write_webdataset(root / "wds_set", [{"__key__": f"img_{i:03d}", "jpg": image, "cls": str(label).encode()}
                                              for i, (image, label) in enumerate(zip(images, labels))])
    write_metadata(wds)
    folder = root / "folder_set"
    for i, (image, label) in enumerate(zip(images, labels)):
        class_dir = folder / f"{label:02d}_{CLASSNAMES[label]}"
        class_dir.mkdir(parents=True, exist_ok=True)
        (class_dir / f"img_{i:03d}.jpg").write_bytes(image)
    write_metadata(folder)
    csv_dir = root / "csv_set"
    (csv_dir / "images").mkdir(parents=True)
    with (csv_dir / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["filepath", "label"])
        for i, (image, label) in enumerate(zip(images, labels)):
            (csv_dir / "images" / f"img_{i:03d}.jpg").write_bytes(image)
            writer.writerow([f"images/img_{i:03d}.jpg", CLASSNAMES[label] if i % 2 else label])  # names or indices
    write_metadata(csv_dir)
    return {"webdataset": wds, "imagefolder": folder, "csv": csv_dir / "labels.csv"}


def write_retrieval_sets(root: Path, seed: int = 1) -> dict[str, Path]:
    """The same multi-caption images as webdataset (txt lines) and CSV (one row per caption)."""
    images, _ = eval_images(len(CAPTIONS), seed=seed)
    wds = write_webdataset(root / "wds_retrieval", [
        {"__key__": f"r{i:03d}", "jpg": image, "txt": "\n".join(captions).encode()}
        for i, (image, captions) in enumerate(zip(images, CAPTIONS))], per_shard=4)
    csv_dir = root / "csv_retrieval"
    csv_dir.mkdir()
    rows = [(f"r{i:03d}.jpg", caption) for i, captions in enumerate(CAPTIONS) for caption in captions]
    rows.insert(3, rows.pop())  # rows of one image need not be adjacent
    for i, image in enumerate(images):
        (csv_dir / f"r{i:03d}.jpg").write_bytes(image)
    with (csv_dir / "captions.tsv").open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["filepath", "title"])
        writer.writerows(rows)
    return {"webdataset": wds, "csv": csv_dir / "captions.tsv"}


@pytest.fixture(scope="module")
def transform():
    return open_clip.image_transform(32, is_train=False)


def test_image_folder_and_csv_give_the_webdataset_metrics(tmp_path, model, tokenizer, transform):
    sets = write_classification_sets(tmp_path)

    records = {kind: evaluate_dataset(model, tokenizer, transform, open_eval_set(path), "tiny", batch_size=4)
               for kind, path in sets.items()}

    reference = records["webdataset"]
    assert reference["metrics"]["num_samples"] == 20 and reference["skipped_images"] == 1
    assert 0 < reference["metrics"]["acc1"] < 1
    for kind in ("imagefolder", "csv"):
        assert records[kind]["metrics"] == reference["metrics"], kind
        assert records[kind]["confusion_matrix"] == reference["confusion_matrix"], kind
        assert records[kind]["skipped_images"] == 1
    assert records["imagefolder"]["skipped_keys"][0]["key"].endswith(f"img_{CORRUPT:03d}.jpg")
    assert records["csv"]["skipped_keys"][0]["key"] == f"images/img_{CORRUPT:03d}.jpg"


def test_csv_with_several_rows_per_image_gives_the_webdataset_retrieval_metrics(tmp_path, model, tokenizer,
                                                                               transform):
    sets = write_retrieval_sets(tmp_path)

    wds = evaluate_dataset(model, tokenizer, transform, open_eval_set(sets["webdataset"]), "tiny", batch_size=3)
    from_csv = evaluate_dataset(model, tokenizer, transform, open_eval_set(sets["csv"]), "tiny", batch_size=3)

    assert wds["task"] == from_csv["task"] == "zeroshot_retrieval"
    assert wds["metrics"]["num_images"] == len(CAPTIONS) - 1  # the corrupt image and its captions are out
    assert wds["metrics"]["num_texts"] == sum(map(len, CAPTIONS)) - len(CAPTIONS[CORRUPT])
    assert from_csv["metrics"] == wds["metrics"]


def test_image_folder_class_names_default_to_folder_names(tmp_path):
    (tmp_path / "sea_lion").mkdir()
    (tmp_path / "sea_lion" / "a.jpg").write_bytes(blocky_jpeg(np.random.default_rng(0)))
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "b.png").write_bytes(b"")

    eval_set = open_eval_set(tmp_path, templates="imagenet_simple")

    assert (eval_set.kind, eval_set.task) == ("imagefolder", "zeroshot_classification")
    assert eval_set.classnames == ["cat", "sea lion"]


def test_image_folder_with_wrong_number_of_class_names_is_rejected(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(b"")

    with pytest.raises(EvalDataError, match="3 class folders but 1000 class names"):
        open_eval_set(tmp_path, classnames="imagenet", templates="imagenet")


def test_directory_of_sets_is_discovered_in_name_order(tmp_path):
    write_classification_sets(tmp_path)
    write_retrieval_sets(tmp_path)

    names = [(s.name, s.kind, s.task) for s in discover_eval_sets(tmp_path)]

    assert names == [("folder_set", "imagefolder", "zeroshot_classification"),
                     ("wds_retrieval", "webdataset", "zeroshot_retrieval"),
                     ("wds_set", "webdataset", "zeroshot_classification")]


def test_csv_label_that_is_no_class_names_the_line(tmp_path, transform, model, tokenizer):
    write_metadata(tmp_path)
    (tmp_path / "a.jpg").write_bytes(blocky_jpeg(np.random.default_rng(0)))
    (tmp_path / "set.csv").write_text("filepath,label\na.jpg,cat\na.jpg,zebra\n")

    with pytest.raises(EvalDataError, match=r"set.csv line 3: label 'zebra' is neither a class index nor"):
        evaluate_dataset(model, tokenizer, transform, open_eval_set(tmp_path / "set.csv"), "tiny")


def test_csv_class_index_out_of_range_names_the_line(tmp_path, transform, model, tokenizer):
    write_metadata(tmp_path)
    (tmp_path / "a.jpg").write_bytes(blocky_jpeg(np.random.default_rng(0)))
    (tmp_path / "set.csv").write_text("filepath,label\na.jpg,7\n")

    with pytest.raises(EvalDataError, match=r"line 2 .*class index 7 is outside \[0, 7\)"):
        evaluate_dataset(model, tokenizer, transform, open_eval_set(tmp_path / "set.csv"), "tiny")


def test_csv_missing_image_file_names_the_path(tmp_path, transform, model, tokenizer):
    write_metadata(tmp_path)
    (tmp_path / "set.csv").write_text("filepath,label\nmissing.jpg,0\n")

    with pytest.raises(EvalDataError, match=r"set.csv line 2: cannot read image file .*missing.jpg"):
        evaluate_dataset(model, tokenizer, transform, open_eval_set(tmp_path / "set.csv"), "tiny")


def test_csv_without_image_column_lists_the_accepted_names(tmp_path):
    (tmp_path / "set.csv").write_text("picture,caption\na.jpg,a cat\n")

    with pytest.raises(EvalDataError, match="no image path column: expected one of filepath, image, path"):
        list(open_eval_set(tmp_path / "set.csv").samples())


def test_classification_csv_without_class_names_says_where_they_are_expected(tmp_path):
    (tmp_path / "set.csv").write_text("filepath,label\na.jpg,0\n")

    with pytest.raises(EvalDataError, match=r"no class names for dataset 'set': expected .*classnames.txt"):
        open_eval_set(tmp_path / "set.csv")


def test_path_that_is_no_eval_set_is_a_data_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")

    with pytest.raises(EvalDataError, match="no eval sets in"):
        discover_eval_sets(tmp_path)


def test_clip_benchmark_layout_reads_exactly_the_counted_shards_and_the_declared_task(tmp_path):
    samples = [{"__key__": f"{i:03d}", "jpg": blocky_jpeg(np.random.default_rng(i)), "txt": b"a cat"}
               for i in range(14)]
    root = write_webdataset(tmp_path / "captions", samples)  # 0.tar 1.tar 2.tar (6 + 6 + 2 samples)
    write_metadata(root)  # class names present, yet dataset_type.txt says retrieval
    (root / "dataset_type.txt").write_text("retrieval\n")
    (root / "test" / "nshards.txt").write_text("2\n")  # CLIP_benchmark reads 0.tar and 1.tar only
    assert [Path(p).name for p in shard_paths(root)] == ["0.tar", "1.tar"]
    assert open_eval_set(root).task == "zeroshot_retrieval"
    (root / "test" / "nshards.txt").write_text("4\n")
    with pytest.raises(EvalDataError, match=r"nshards.txt says 4 shards .* 3.tar is missing"):
        shard_paths(root)
