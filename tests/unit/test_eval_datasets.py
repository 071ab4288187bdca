"""Specification of reading CLIP_benchmark-style webdataset eval sets, end to end.

Datasets are written in each test with webdataset.TarWriter; reference numbers are
computed by reading the tar with the standard library, open_clip's classifier and
plain Python loops, never through vlmtrain.eval.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F
import webdataset
from open_clip.zero_shot_classifier import build_zero_shot_classifier as open_clip_classifier
from PIL import Image

from vlmtrain.eval.datasets import DecodeReport, EvalDataError, eval_batches, open_eval_set
from vlmtrain.eval.metadata import resolve_classnames_and_templates
from vlmtrain.eval.suite import evaluate_dataset
from vlmtrain.eval.zeroshot import zero_shot_classification, zero_shot_retrieval

from .conftest import CLASSNAMES, TEMPLATES

CORRUPT_KEY = "sample_0005"


@pytest.fixture(scope="module")
def transform():
    return open_clip.image_transform(32, is_train=False)


def blocky_jpeg(rng: np.random.Generator) -> bytes:
    """A high-contrast 4x4 colour pattern upscaled to 32x32, JPEG-encoded."""
    pixels = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shards(root: Path, samples: list[dict], per_shard: int) -> None:
    (root / "test").mkdir(parents=True)
    for shard, start in enumerate(range(0, len(samples), per_shard)):
        with webdataset.TarWriter(str(root / "test" / f"{shard}.tar")) as sink:
            for sample in samples[start : start + per_shard]:
                sink.write(sample)


def write_metadata(root: Path, classnames: list[str], templates: list[str]) -> None:
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")


@pytest.fixture
def classification_dir(tmp_path: Path) -> Path:
    """24 samples over 3 shards (so shard order matters); sample_0005 holds bytes that are no image."""
    rng = np.random.default_rng(0)
    samples = []
    for index in range(24):
        key = f"sample_{index:04d}"
        image = b"definitely not a jpeg" if key == CORRUPT_KEY else blocky_jpeg(rng)
        samples.append({"__key__": key, "jpg": image, "cls": str(int(rng.integers(0, len(CLASSNAMES)))).encode()})
    write_shards(tmp_path, samples, per_shard=10)
    write_metadata(tmp_path, CLASSNAMES, TEMPLATES)
    return tmp_path


def read_tar_reference(root: Path, transform, skip_key: str) -> tuple[torch.Tensor, list[bytes]]:
    """Transformed images and raw labels (cls or txt) in storage order, via tarfile + PIL (< 10 shards)."""
    members: dict[str, dict[str, bytes]] = {}
    for shard in sorted((root / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, extension = member.name.split(".", 1)
                members.setdefault(key, {})[extension] = tar.extractfile(member).read()
    kept = [fields for key, fields in members.items() if key != skip_key]
    images = [transform(Image.open(io.BytesIO(fields["jpg"])).convert("RGB")) for fields in kept]
    return torch.stack(images), [fields.get("cls", fields.get("txt")) for fields in kept]


def classification_batches(root: Path, transform, batch_size: int, report: DecodeReport | None = None):
    """(images, targets) pairs of a classification set, positions dropped.

    Sets written without metadata files get the built-in ImageNet class names and templates.
    """
    own_metadata = (root / "classnames.txt").exists()
    eval_set = open_eval_set(root, task="zeroshot_classification", classnames=None if own_metadata else "imagenet",
                             templates=None if own_metadata else "imagenet")
    return [(images, targets) for images, targets, _ in eval_batches(eval_set, transform, batch_size, report)]


def retrieval_batches(root: Path, transform, batch_size: int, report: DecodeReport | None = None):
    eval_set = open_eval_set(root, task="zeroshot_retrieval")
    return [(images, captions) for images, captions, _ in eval_batches(eval_set, transform, batch_size, report)]


def load_classnames_and_templates(root: Path) -> tuple[list, list]:
    return resolve_classnames_and_templates(root, "set")


# ---------------------------------------------------------------- classification end to end


def test_zero_shot_classification_on_tar_equals_open_clip_reference(classification_dir, model, tokenizer, transform):
    classnames, templates = load_classnames_and_templates(classification_dir)
    report = DecodeReport()
    result = zero_shot_classification(
        model, tokenizer, classification_batches(classification_dir, transform, 4, report), classnames, templates, "cpu"
    )

    images, labels = read_tar_reference(classification_dir, transform, CORRUPT_KEY)
    targets = [int(label) for label in labels]
    with torch.no_grad():
        templates_as_callables = [lambda c, t=t: t.format(c=c) for t in TEMPLATES]
        classifier = open_clip_classifier(model, tokenizer, CLASSNAMES, templates_as_callables, device="cpu")
        logits = 100.0 * F.normalize(model.encode_image(images), dim=-1) @ classifier
    predictions = logits.argmax(dim=1).tolist()
    top5 = [row.topk(5).indices.tolist() for row in logits]
    recalls = []
    for cls in sorted(set(targets)):
        members = [i for i, t in enumerate(targets) if t == cls]
        recalls.append(sum(predictions[i] == cls for i in members) / len(members))

    assert result["num_samples"] == 23
    assert result["acc1"] == sum(p == t for p, t in zip(predictions, targets)) / 23
    assert result["acc5"] == sum(t in top for top, t in zip(top5, targets)) / 23
    assert result["mean_per_class_recall"] == pytest.approx(sum(recalls) / len(recalls), abs=1e-12)
    assert len(set(predictions)) > 2  # the tiny model is not predicting a constant
    assert [s.key for s in report.skipped] == [CORRUPT_KEY]


def test_classification_batches_follow_shard_and_sample_order(classification_dir, transform):
    batches = list(classification_batches(classification_dir, transform, batch_size=4))

    images, labels = read_tar_reference(classification_dir, transform, CORRUPT_KEY)
    assert [len(targets) for _, targets in batches] == [4, 4, 4, 4, 4, 3]
    assert torch.cat([targets for _, targets in batches]).tolist() == [int(label) for label in labels]
    torch.testing.assert_close(torch.cat([images for images, _ in batches]), images)


def test_shards_are_read_in_numeric_order(tmp_path, transform):
    rng = np.random.default_rng(1)
    (tmp_path / "test").mkdir()
    for shard in (10, 2, 1):  # lexicographic order would be 1, 10, 2
        with webdataset.TarWriter(str(tmp_path / "test" / f"{shard}.tar")) as sink:
            sink.write({"__key__": f"s{shard}", "jpg": blocky_jpeg(rng), "cls": str(shard).encode()})

    batches = list(classification_batches(tmp_path, transform, batch_size=8))

    assert batches[0][1].tolist() == [1, 2, 10]


# ---------------------------------------------------------------- undecodable images


def test_corrupt_image_is_skipped_reported_and_not_counted(classification_dir, transform):
    report = DecodeReport()

    batches = list(classification_batches(classification_dir, transform, 8, report))

    assert sum(len(targets) for _, targets in batches) == 23
    assert len(report.skipped) == 1
    key, reason, position = report.skipped[0]
    assert key == CORRUPT_KEY
    assert "UnidentifiedImageError" in reason
    assert position == 5
    assert report.summary().startswith(f"skipped 1 undecodable images: {CORRUPT_KEY} (UnidentifiedImageError")


def test_truncated_jpeg_is_skipped(tmp_path, transform):
    rng = np.random.default_rng(2)
    whole = blocky_jpeg(rng)
    write_shards(
        tmp_path,
        [
            {"__key__": "whole", "jpg": whole, "cls": b"0"},
            {"__key__": "truncated", "jpg": whole[: len(whole) // 2], "cls": b"1"},
        ],
        per_shard=10,
    )
    report = DecodeReport()

    batches = list(classification_batches(tmp_path, transform, 8, report))

    assert batches[0][1].tolist() == [0]
    assert [s.key for s in report.skipped] == ["truncated"]


def test_all_images_undecodable_is_a_data_error(tmp_path, transform, model, tokenizer):
    write_shards(tmp_path, [{"__key__": "bad", "jpg": b"garbage", "cls": b"0"}], per_shard=10)
    write_metadata(tmp_path, CLASSNAMES, TEMPLATES)

    with pytest.raises(EvalDataError, match="no decodable images.*bad"):
        evaluate_dataset(model, tokenizer, transform, open_eval_set(tmp_path), "tiny")


# ---------------------------------------------------------------- retrieval end to end


def test_zero_shot_retrieval_on_tar_with_multi_caption_images(tmp_path, model, tokenizer, transform):
    rng = np.random.default_rng(3)
    captions = [
        ["a cat"], ["a dog", "a puppy on grass", "two dogs"], ["red car", "a car"], ["a tree"], ["boat", "ship"]
    ]
    samples = [
        {"__key__": f"r{i}", "jpg": blocky_jpeg(rng), "txt": "\n".join(group).encode()}
        for i, group in enumerate(captions)
    ]
    samples.insert(2, {"__key__": "broken", "jpg": b"\xff\xd8 nope", "txt": b"lost caption"})
    write_shards(tmp_path, samples, per_shard=3)
    report = DecodeReport()

    batches = list(retrieval_batches(tmp_path, transform, 2, report))
    metrics = zero_shot_retrieval(model, tokenizer, batches, "cpu", ks=(1, 2))

    assert [group for _, groups in batches for group in groups] == captions
    assert [s.key for s in report.skipped] == ["broken"]
    images, _ = read_tar_reference(tmp_path, transform, "broken")
    flat = [text for group in captions for text in group]
    owners = [i for i, group in enumerate(captions) for _ in group]
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(images), dim=-1)
        scores = image_features @ F.normalize(model.encode_text(tokenizer(flat)), dim=-1).T
    for k in (1, 2):
        text_queries_hit = sum(owners[t] in scores[:, t].topk(k).indices.tolist() for t in range(len(flat)))
        image_queries_hit = sum(
            any(owners[t] == i for t in scores[i].topk(k).indices.tolist()) for i in range(len(captions))
        )
        assert metrics[f"image_retrieval_recall@{k}"] == text_queries_hit / len(flat)
        assert metrics[f"text_retrieval_recall@{k}"] == image_queries_hit / len(captions)
    assert (metrics["num_images"], metrics["num_texts"]) == (5, len(flat))


def test_retrieval_sample_without_caption_is_a_data_error(tmp_path, transform):
    write_shards(tmp_path, [{"__key__": "mute", "jpg": blocky_jpeg(np.random.default_rng(4)), "txt": b"\n \n"}], 10)

    with pytest.raises(EvalDataError, match="'mute'.*empty .txt"):
        list(retrieval_batches(tmp_path, transform, 4))


# ---------------------------------------------------------------- metadata and layout errors


def test_classnames_and_templates_are_read_line_by_line(tmp_path):
    (tmp_path / "classnames.txt").write_text("cat\n  sea lion \ndog\n\n")
    (tmp_path / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n{c}\n")

    assert load_classnames_and_templates(tmp_path) == (["cat", "sea lion", "dog"], ["a photo of a {c}.", "{c}"])


def test_missing_classnames_names_the_file(tmp_path):
    (tmp_path / "zeroshot_classification_templates.txt").write_text("{c}\n")

    with pytest.raises(EvalDataError, match="no class names for dataset 'set': expected .*classnames.txt"):
        load_classnames_and_templates(tmp_path)


def test_missing_templates_names_the_file(tmp_path):
    (tmp_path / "classnames.txt").write_text("cat\n")

    with pytest.raises(EvalDataError, match="no prompt templates .*zeroshot_classification_templates.txt"):
        load_classnames_and_templates(tmp_path)


def test_empty_classnames_names_the_file(tmp_path):
    write_metadata(tmp_path, [], ["{c}"])

    with pytest.raises(EvalDataError, match="classnames.txt is empty"):
        load_classnames_and_templates(tmp_path)


def test_blank_line_inside_classnames_is_rejected(tmp_path):
    write_metadata(tmp_path, ["cat", "", "dog"], ["{c}"])

    with pytest.raises(EvalDataError, match="classnames.txt line 2 is blank"):
        load_classnames_and_templates(tmp_path)


def test_template_without_placeholder_is_rejected(tmp_path):
    write_metadata(tmp_path, ["cat"], ["a photo of a {c}.", "a photo"])

    with pytest.raises(EvalDataError, match="line 2.*placeholder"):
        load_classnames_and_templates(tmp_path)


@pytest.mark.parametrize("make_split_dir", [False, True])
def test_directory_without_shards_is_a_data_error(tmp_path, transform, make_split_dir):
    if make_split_dir:
        (tmp_path / "test").mkdir()

    with pytest.raises(EvalDataError, match=r"no shards found.*test/\*\.tar" if make_split_dir else "not an eval set"):
        open_eval_set(tmp_path)


def test_non_integer_class_label_names_the_sample(tmp_path, transform):
    write_shards(tmp_path, [{"__key__": "odd", "jpg": blocky_jpeg(np.random.default_rng(5)), "cls": b"cat"}], 10)

    with pytest.raises(EvalDataError, match="'odd'.*integer class index"):
        list(classification_batches(tmp_path, transform, 4))


def test_sample_without_image_names_the_sample(tmp_path, transform):
    write_shards(tmp_path, [{"__key__": "blind", "cls": b"0"}], 10)

    with pytest.raises(EvalDataError, match="'blind'.*has no image"):
        list(classification_batches(tmp_path, transform, 4))
