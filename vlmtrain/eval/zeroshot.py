"""Numeric core of zero-shot evaluation, kept faithful to CLIP_benchmark / open_clip.

Numbers produced here are meant to be comparable with published CLIP_benchmark
results, so every convention (prompt ensembling, the 100x logit scale, metric
names and definitions) follows those projects. Deliberate deviations are called
out where they happen.

The model is anything exposing ``encode_image(images)`` and ``encode_text(tokens)``
returning ``[B, D]`` features; the tokenizer maps ``list[str]`` to ``LongTensor[B, L]``.
All returned features, classifiers and metrics live on the CPU in float32, so the
metric code does not depend on where (or in which precision) the model ran.

Under torch.distributed every function here is collective: each rank encodes its share
(a contiguous slice of the texts; the images its batches hold), the features are gathered
to every rank in sample order, and every rank computes the same metrics as one process would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from vlmtrain.distributed.collectives import rank_and_size
from vlmtrain.eval.distributed import contiguous_share, gather_or_raise

Template = str | Callable[[str], str]
Tokenizer = Callable[[list[str]], torch.Tensor]

# Same scale as open_clip_train.zero_shot.run and CLIP_benchmark: it only changes the
# logits' magnitude, never a ranking, but keeps saved logits comparable.
LOGIT_SCALE = 100.0


class NoImagesError(ValueError):
    """The batches held no image at all (on any rank)."""


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run in eval mode without grads, then restore the caller's train/eval flag.

    Evaluation is often called from inside a training loop, which must not find its
    model silently switched to eval mode afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def render_prompt(template: Template, classname: str) -> str:
    """Fill one template with a class name.

    Strings accept both placeholder styles in the wild: CLIP_benchmark's named
    ``"{c}"`` (its template files use it) and open_clip's positional ``"{}"``.
    Callables are open_clip's ``OPENAI_IMAGENET_TEMPLATES`` style.
    """
    if isinstance(template, str):
        return template.format(classname, c=classname)
    return template(classname)


def _show_progress(progress: bool) -> bool:
    """Bars on rank 0 only: one bar per rank would garble the terminal."""
    return progress and rank_and_size()[0] == 0


def encode_texts(
    model: Any,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    device: torch.device | str,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalised text features ``[len(texts), D]`` (CPU, float32), encoded in batches."""
    if not texts:
        raise ValueError("encode_texts got no texts to encode")
    share = list(texts[contiguous_share(len(texts))])
    world = rank_and_size()[1]

    def encode_share() -> torch.Tensor | None:
        features = []
        with _eval_mode(model), tqdm(total=len(texts), unit="text", desc="texts",
                                     disable=not _show_progress(progress)) as bar:
            for start in range(0, len(share), batch_size):
                chunk = share[start : start + batch_size]
                tokens = tokenizer(chunk).to(device)
                features.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
                bar.update(len(chunk) * world)  # shares are equal: rank 0 shows the whole job
        return torch.cat(features) if features else None

    return torch.cat([part for part in gather_or_raise(encode_share) if part is not None])


def build_zero_shot_classifier(
    model: Any,
    tokenizer: Tokenizer,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Prompt-ensembled class weights ``[D, C]`` (CPU, float32), as open_clip builds them.

    Each template embedding is normalised *before* averaging, so every prompt gets
    the same vote; the mean is renormalised so logits are cosine similarities.
    ``batch_size`` counts prompts (classes x templates), not classes.
    """
    if not classnames or not templates:
        raise ValueError("build_zero_shot_classifier needs at least one class name and one template")
    prompts = [render_prompt(template, name) for name in classnames for template in templates]
    features = encode_texts(model, tokenizer, prompts, device, batch_size, progress)
    per_class = features.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T.contiguous()


def embed_images(
    model: Any,
    batches: Iterable[tuple],
    device: torch.device | str,
    progress: bool = False,
) -> tuple[torch.Tensor, list[Any]]:
    """Encode every batch; return L2-normalised features ``[N, D]`` and the labels, in sample order.

    A batch is ``(images, labels)`` or ``(images, labels, positions)``: labels (class targets,
    caption lists, ids) are passed through so callers keep features and labels aligned whatever
    the batch iterator skipped. Positions order the samples of all ranks; without them a batch's
    samples follow the previous batch's, which only one process can know.
    """
    rank, world = rank_and_size()

    def embed_share() -> tuple[torch.Tensor | None, list[Any], list[int]]:
        features, labels, positions = [], [], []
        with _eval_mode(model), tqdm(unit="img", desc="images", disable=not _show_progress(progress)) as bar:
            for batch in batches:
                images, batch_labels, batch_positions = _with_positions(batch, len(labels), world)
                if len(batch_labels) != len(images) or len(batch_positions) != len(images):
                    raise ValueError(f"batch has {len(images)} images but {len(batch_labels)} labels "
                                     f"and {len(batch_positions)} positions")
                encoded = model.encode_image(images.to(device))
                features.append(F.normalize(encoded.float(), dim=-1).cpu())
                labels.extend(batch_labels.tolist() if torch.is_tensor(batch_labels) else list(batch_labels))
                positions.extend(batch_positions)
                bar.update(len(images) * world)  # shares are about equal: rank 0 shows the whole job
        return (torch.cat(features) if features else None), labels, positions

    shares = gather_or_raise(embed_share)
    features = [part for part, _, _ in shares if part is not None]
    if not features:
        raise NoImagesError("embed_images got no batches: the evaluation set yielded no images")
    labels = [label for _, share_labels, _ in shares for label in share_labels]
    positions = torch.tensor([p for _, _, share_positions in shares for p in share_positions])
    if len(positions.unique()) != len(positions):
        raise ValueError("two batches claim the same sample position: each sample must be in exactly one batch")
    order = positions.argsort()
    return torch.cat(features)[order], [labels[i] for i in order.tolist()]


def _with_positions(batch: tuple, seen: int, world: int) -> tuple[torch.Tensor, Any, list[int]]:
    if len(batch) == 3:
        images, labels, positions = batch
        return images, labels, torch.as_tensor(positions).tolist()
    if world > 1:
        raise ValueError("under torch.distributed every batch needs sample positions: (images, labels, positions)")
    images, labels = batch
    return images, labels, list(range(seen, seen + len(images)))


def zero_shot_logits(image_features: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Class logits ``[N, C]`` = 100 * cosine similarity, as open_clip and CLIP_benchmark compute them."""
    return LOGIT_SCALE * image_features @ classifier


def _check_targets(targets: torch.Tensor, num_classes: int) -> None:
    """Reject labels outside ``[0, C)``: they would silently count as misses."""
    if targets.numel() == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
        raise ValueError(
            f"targets must lie in [0, {num_classes}) (one per class name), "
            f"got min {int(targets.min())} and max {int(targets.max())}"
        )


def confusion_matrix(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Counts ``[C, C]``: row = true class, column = predicted class."""
    flat = targets.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def mean_per_class_recall(confusion: torch.Tensor) -> float:
    """Mean recall over the classes that occur in the targets.

    This is sklearn's ``balanced_accuracy_score``, which CLIP_benchmark reports as
    ``mean_per_class_recall``: classes absent from the targets have undefined recall
    and are left out of the mean rather than counted as zero.
    """
    support = confusion.sum(dim=1)
    present = (support > 0).nonzero().flatten().tolist()
    recalls = [int(confusion[c, c]) / int(support[c]) for c in present]
    return sum(recalls) / len(recalls)


def classification_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float | int]:
    """``acc1``, ``acc5`` (only when C >= 5), ``mean_per_class_recall`` and ``num_samples``.

    Accuracies are fractions in [0, 1] like CLIP_benchmark's. CLIP_benchmark writes
    ``acc5 = NaN`` below five classes (top-5 would be trivially 1.0); we omit the key
    instead, because NaN is not valid JSON. Top-1 predictions for the recall come from
    the same ``topk`` call as the accuracies, so ``acc1`` always equals the confusion
    matrix trace / N even under exact ties.
    """
    return _classification_metrics_and_confusion(logits, targets)[0]


def _classification_metrics_and_confusion(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[dict[str, float | int], torch.Tensor]:
    """Compute the metrics and the confusion matrix they were derived from."""
    num_samples, num_classes = logits.shape
    targets = targets.long()
    _check_targets(targets, num_classes)
    ranked = logits.topk(min(5, num_classes), dim=1).indices
    hits = ranked == targets[:, None]
    metrics: dict[str, float | int] = {"acc1": int(hits[:, :1].sum()) / num_samples}
    if num_classes >= 5:
        metrics["acc5"] = int(hits[:, :5].sum()) / num_samples
    confusion = confusion_matrix(ranked[:, 0], targets, num_classes)
    metrics["mean_per_class_recall"] = mean_per_class_recall(confusion)
    metrics["num_samples"] = num_samples
    return metrics, confusion


def zero_shot_classification(
    model: Any,
    tokenizer: Tokenizer,
    batches: Iterable[tuple],
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str,
    progress: bool = False,
    text_batch_size: int = 256,
) -> dict[str, Any]:
    """Zero-shot classify ``(images, targets[, positions])`` batches (see ``embed_images``).

    Returns ``classification_metrics`` plus ``"confusion_matrix"``: a nested list of ints,
    ``[C][C]``, rows = true class, columns = predicted class (JSON-ready; pop it for
    large label sets where it would dominate the output file).
    """
    classifier = build_zero_shot_classifier(model, tokenizer, classnames, templates, device, text_batch_size, progress)
    image_features, targets = embed_images(model, batches, device, progress)
    logits = zero_shot_logits(image_features, classifier)
    metrics, confusion = _classification_metrics_and_confusion(logits, torch.tensor(targets, dtype=torch.long))
    return {**metrics, "confusion_matrix": confusion.tolist()}


def _check_caption_index(text_to_image: torch.Tensor, num_images: int) -> None:
    """Every text must point at an image and every image must own a caption.

    An image without captions can never be retrieved correctly (CLIP_benchmark turns
    its 0/0 recall into a silent miss), so it is an error in the data, not a miss.
    """
    if text_to_image.numel() == 0:
        raise ValueError("retrieval needs at least one caption")
    if int(text_to_image.min()) < 0 or int(text_to_image.max()) >= num_images:
        raise ValueError(f"text_to_image must index images in [0, {num_images})")
    captions_per_image = torch.bincount(text_to_image, minlength=num_images)
    if bool((captions_per_image == 0).any()):
        missing = (captions_per_image == 0).nonzero().flatten().tolist()
        raise ValueError(f"images without any caption (indices {missing[:10]}); every image needs one")


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k in both directions with CLIP_benchmark's key names.

    ``image_retrieval_recall@k``: a text query hits when its image is among the k
    highest-scoring images. ``text_retrieval_recall@k``: an image query hits when ANY
    of its captions is among the k highest-scoring texts (the CLIP-paper convention,
    not the fraction of its captions retrieved). Scores are ``image @ text.T``;
    rankings come from ``torch.topk``. A k larger than the candidate pool is capped to
    the pool size (everything is retrieved: recall 1.0) where CLIP_benchmark would crash.
    """
    text_to_image = text_to_image.long()
    num_images = len(image_features)
    _check_caption_index(text_to_image, num_images)
    scores = image_features.float() @ text_features.float().T
    image_ids = torch.arange(num_images)
    metrics: dict[str, float] = {}
    for k in ks:
        top_images = scores.T.topk(min(k, num_images), dim=1).indices
        text_hits = (top_images == text_to_image[:, None]).any(dim=1)
        top_texts = scores.topk(min(k, len(text_to_image)), dim=1).indices
        image_hits = (text_to_image[top_texts] == image_ids[:, None]).any(dim=1)
        metrics[f"image_retrieval_recall@{k}"] = int(text_hits.sum()) / len(text_hits)
        metrics[f"text_retrieval_recall@{k}"] = int(image_hits.sum()) / len(image_hits)
    return metrics


def _flatten_captions(captions: Sequence[Sequence[str]]) -> tuple[list[str], torch.Tensor]:
    """All captions in order, plus the index of the image each one belongs to."""
    texts = [text for caption_list in captions for text in caption_list]
    owners = [image for image, caption_list in enumerate(captions) for _ in caption_list]
    return texts, torch.tensor(owners, dtype=torch.long)


def zero_shot_retrieval(
    model: Any,
    tokenizer: Tokenizer,
    batches: Iterable[tuple],
    device: torch.device | str,
    progress: bool = False,
    ks: Sequence[int] = (1, 5, 10),
    text_batch_size: int = 256,
) -> dict[str, float | int]:
    """Image-text retrieval over ``(images, captions_per_image[, positions])`` batches.

    Returns ``retrieval_metrics`` plus ``num_images`` and ``num_texts``.
    """
    image_features, captions = embed_images(model, batches, device, progress)
    texts, text_to_image = _flatten_captions(captions)
    text_features = encode_texts(model, tokenizer, texts, device, text_batch_size, progress)
    metrics: dict[str, float | int] = dict(retrieval_metrics(image_features, text_features, text_to_image, ks))
    metrics["num_images"] = len(image_features)
    metrics["num_texts"] = len(texts)
    return metrics
