"""Specification of the zero-shot numeric core against open_clip and plain reference loops.

Every reference below is computed independently of vlmtrain.eval.zeroshot: either by
open_clip itself or by deliberately naive Python loops.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_classifier import build_zero_shot_classifier as open_clip_classifier

from vlmtrain.eval.zeroshot import (
    build_zero_shot_classifier,
    classification_metrics,
    embed_images,
    retrieval_metrics,
    zero_shot_classification,
    zero_shot_retrieval,
)

from .conftest import CLASSNAMES, TEMPLATES, tiny_clip

def as_open_clip_templates(templates: list[str]) -> list:
    """open_clip formats string templates positionally, so "{c}" templates must be callables there."""
    return [lambda c, t=t: t.format(c=c) for t in templates]


# ---------------------------------------------------------------- classifier


def test_classifier_equals_open_clip(model, tokenizer):
    ours = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES, "cpu", batch_size=4)
    reference = open_clip_classifier(model, tokenizer, CLASSNAMES, as_open_clip_templates(TEMPLATES), device="cpu")

    assert ours.shape == (32, len(CLASSNAMES))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_classifier_accepts_open_clip_callable_templates(model, tokenizer):
    callables = as_open_clip_templates(TEMPLATES)

    ours = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, callables, "cpu")
    reference = open_clip_classifier(model, tokenizer, CLASSNAMES, callables, device="cpu")

    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_classifier_depends_on_every_template(model, tokenizer):
    full = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES, "cpu")
    fewer = build_zero_shot_classifier(model, tokenizer, CLASSNAMES, TEMPLATES[:2], "cpu")

    assert not torch.allclose(full, fewer, atol=1e-4)


# ---------------------------------------------------------------- classification metrics


def plain_topk_accuracy(logits: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    hits = 0
    for row, target in zip(logits, targets.tolist()):
        if target in row.topk(k).indices.tolist():
            hits += 1
    return hits / len(targets)


def plain_mean_per_class_recall(logits: torch.Tensor, targets: torch.Tensor) -> float:
    predictions = logits.argmax(dim=1).tolist()
    recalls = []
    for cls in sorted(set(targets.tolist())):
        members = [i for i, t in enumerate(targets.tolist()) if t == cls]
        recalls.append(sum(predictions[i] == cls for i in members) / len(members))
    return sum(recalls) / len(recalls)


@pytest.fixture
def unbalanced_logits() -> tuple[torch.Tensor, torch.Tensor]:
    """9 classes, class 8 never occurs, class 0 dominates: acc1 and the balanced recall differ."""
    generator = torch.Generator().manual_seed(1)
    targets = torch.tensor([0] * 20 + [1, 1, 2, 3, 3, 3, 4, 5, 6, 7, 7])
    logits = torch.randn(len(targets), 9, generator=generator)
    logits[torch.arange(len(targets)), targets] += 1.0  # better than chance, still with misses
    return logits, targets


def test_classification_metrics_match_plain_reference(unbalanced_logits):
    logits, targets = unbalanced_logits

    metrics = classification_metrics(logits, targets)

    assert metrics["acc1"] == plain_topk_accuracy(logits, targets, 1)
    assert metrics["acc5"] == plain_topk_accuracy(logits, targets, 5)
    assert metrics["mean_per_class_recall"] == pytest.approx(plain_mean_per_class_recall(logits, targets), abs=1e-12)
    assert metrics["num_samples"] == len(targets)
    assert metrics["acc1"] != pytest.approx(metrics["mean_per_class_recall"])  # the fixture discriminates


def test_mean_per_class_recall_is_sklearn_balanced_accuracy(unbalanced_logits):
    """CLIP_benchmark reports sklearn's balanced_accuracy_score of the top-1 predictions."""
    metrics_module = pytest.importorskip("sklearn.metrics")
    logits, targets = unbalanced_logits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
        expected = metrics_module.balanced_accuracy_score(targets.numpy(), logits.argmax(dim=1).numpy())

    assert classification_metrics(logits, targets)["mean_per_class_recall"] == pytest.approx(expected, abs=1e-12)


def test_acc5_absent_with_fewer_than_five_classes():
    logits = torch.tensor([[0.9, 0.1, 0.0, 0.3], [0.2, 0.8, 0.1, 0.0], [0.1, 0.0, 0.2, 0.7]])
    targets = torch.tensor([0, 2, 3])

    metrics = classification_metrics(logits, targets)

    assert "acc5" not in metrics
    assert metrics["acc1"] == 2 / 3
    assert metrics["mean_per_class_recall"] == pytest.approx((1 + 0 + 1) / 3)


def test_acc5_present_with_exactly_five_classes():
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])

    assert classification_metrics(logits, torch.tensor([4]))["acc5"] == 1.0


def test_out_of_range_targets_are_rejected():
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 3]))


def test_zero_shot_classification_matches_open_clip_pipeline(model, tokenizer):
    generator = torch.Generator().manual_seed(2)
    images = torch.rand(12, 3, 32, 32, generator=generator) * 4 - 2
    targets = torch.randint(0, len(CLASSNAMES), (12,), generator=generator)
    batches = [(images[:5], targets[:5]), (images[5:], targets[5:])]

    result = zero_shot_classification(model, tokenizer, batches, CLASSNAMES, TEMPLATES, "cpu")

    with torch.no_grad():
        classifier = open_clip_classifier(model, tokenizer, CLASSNAMES, as_open_clip_templates(TEMPLATES), device="cpu")
        logits = 100.0 * F.normalize(model.encode_image(images), dim=-1) @ classifier
    assert result["acc1"] == plain_topk_accuracy(logits, targets, 1)
    assert result["acc5"] == plain_topk_accuracy(logits, targets, 5)
    assert result["num_samples"] == 12
    predictions = logits.argmax(dim=1).tolist()
    expected_confusion = [[0] * len(CLASSNAMES) for _ in CLASSNAMES]
    for target, prediction in zip(targets.tolist(), predictions):
        expected_confusion[target][prediction] += 1
    assert result["confusion_matrix"] == expected_confusion


# ---------------------------------------------------------------- embedding


def test_embed_images_normalises_and_keeps_order(model):
    images = torch.rand(6, 3, 32, 32)
    ids = torch.arange(6)

    features, returned_ids = embed_images(model, [(images[:4], ids[:4]), (images[4:], ids[4:])], "cpu", progress=True)

    with torch.no_grad():
        expected = F.normalize(model.encode_image(images), dim=-1)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-6)
    assert returned_ids == list(range(6))
    assert not features.requires_grad


def test_embed_images_restores_train_mode():
    model = tiny_clip().train()

    embed_images(model, [(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))], "cpu")

    assert model.training


def test_embed_images_rejects_empty_input(model):
    with pytest.raises(ValueError, match="no images"):
        embed_images(model, [], "cpu")


# ---------------------------------------------------------------- retrieval


def brute_force_recalls(image_features, text_features, text_to_image, k):
    """Per-query loops: text->image hits if its image is in the top k; image->text if any caption is."""
    scores = image_features @ text_features.T
    owners = text_to_image.tolist()
    text_hits = 0
    for text in range(len(owners)):
        top_images = torch.topk(scores[:, text], min(k, len(image_features))).indices.tolist()
        text_hits += owners[text] in top_images
    image_hits = 0
    for image in range(len(image_features)):
        top_texts = torch.topk(scores[image], min(k, len(owners))).indices.tolist()
        image_hits += any(owners[text] == image for text in top_texts)
    return text_hits / len(owners), image_hits / len(image_features)


def test_retrieval_recalls_match_brute_force_with_several_captions_per_image():
    generator = torch.Generator().manual_seed(3)
    captions_per_image = [1, 3, 2, 5, 1, 2, 4, 1, 2, 3, 1, 2]
    text_to_image = torch.tensor([i for i, n in enumerate(captions_per_image) for _ in range(n)])
    image_features = F.normalize(torch.randn(len(captions_per_image), 16, generator=generator), dim=-1)
    # captions are noisy copies of their image, so recalls are neither 0 nor 1
    noise = 1.2 * torch.randn(len(text_to_image), 16, generator=generator)
    text_features = F.normalize(image_features[text_to_image] + noise, dim=-1)

    metrics = retrieval_metrics(image_features, text_features, text_to_image, ks=(1, 2, 5))

    assert set(metrics) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 2, 5)}
    for k in (1, 2, 5):
        image_recall, text_recall = brute_force_recalls(image_features, text_features, text_to_image, k)
        assert metrics[f"image_retrieval_recall@{k}"] == image_recall
        assert metrics[f"text_retrieval_recall@{k}"] == text_recall
    assert 0 < metrics["text_retrieval_recall@1"] < 1
    assert metrics["text_retrieval_recall@1"] != metrics["image_retrieval_recall@1"]


def test_retrieval_k_beyond_pool_size_retrieves_everything():
    features = F.normalize(torch.randn(3, 8), dim=-1)

    metrics = retrieval_metrics(features, features, torch.tensor([0, 1, 2]), ks=(10,))

    assert metrics == {"image_retrieval_recall@10": 1.0, "text_retrieval_recall@10": 1.0}


def test_retrieval_rejects_image_without_caption():
    features = torch.randn(3, 8)

    with pytest.raises(ValueError, match="without any caption"):
        retrieval_metrics(features, features[:2], torch.tensor([0, 2]))


def test_zero_shot_retrieval_matches_brute_force_on_model_features(model, tokenizer):
    generator = torch.Generator().manual_seed(4)
    images = torch.rand(5, 3, 32, 32, generator=generator) * 4 - 2
    captions = [["a cat"], ["a dog", "a puppy on grass"], ["red car"], ["a tree", "an oak", "green leaves"], ["boat"]]
    batches = [(images[:2], captions[:2]), (images[2:], captions[2:])]

    metrics = zero_shot_retrieval(model, tokenizer, batches, "cpu", ks=(1, 2))

    flat = [text for group in captions for text in group]
    owners = torch.tensor([i for i, group in enumerate(captions) for _ in group])
    with torch.no_grad():
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(flat)), dim=-1)
    for k in (1, 2):
        image_recall, text_recall = brute_force_recalls(image_features, text_features, owners, k)
        assert metrics[f"image_retrieval_recall@{k}"] == image_recall
        assert metrics[f"text_retrieval_recall@{k}"] == text_recall
    assert metrics["num_images"] == 5
    assert metrics["num_texts"] == len(flat)
