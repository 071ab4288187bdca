"""Evaluate one model on a set of eval datasets and report the results.

A dataset directory in CLIP_benchmark's webdataset layout is a classification set when it has
``classnames.txt`` and a retrieval set otherwise. Records are shaped like CLIP_benchmark's
output (dataset, model, task, metrics).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from vlmtrain.eval.datasets import (CLASSNAMES_FILE, SPLIT_DIR, DecodeReport, EvalDataError,
                                    classification_batches, load_classnames_and_templates,
                                    retrieval_batches)
from vlmtrain.eval.zeroshot import zero_shot_classification, zero_shot_retrieval


def is_dataset_dir(path: Path) -> bool:
    return (path / SPLIT_DIR).is_dir() or (path / CLASSNAMES_FILE).is_file()


def discover_datasets(root: str | Path) -> list[Path]:
    """``root`` itself when it is a dataset, else its dataset subdirectories (sorted)."""
    root = Path(root)
    if not root.is_dir():
        raise EvalDataError(f"eval data directory does not exist: {root}")
    if is_dataset_dir(root):
        return [root]
    found = sorted(p for p in root.iterdir() if p.is_dir() and is_dataset_dir(p))
    if not found:
        raise EvalDataError(f"no eval datasets in {root}: expected test/*.tar (and classnames.txt for "
                            f"classification) in it or in its subdirectories")
    return found


def evaluate_dataset(model: Any, tokenizer: Callable, transform: Callable, dataset_dir: Path,
                     model_name: str, batch_size: int = 256, progress: bool = False) -> dict:
    device = next(model.parameters()).device
    report = DecodeReport()
    if (dataset_dir / CLASSNAMES_FILE).is_file():
        classnames, templates = load_classnames_and_templates(dataset_dir)
        batches = classification_batches(dataset_dir, transform, batch_size, report)
        metrics = zero_shot_classification(model, tokenizer, batches, classnames, templates, device, progress)
        task = "zeroshot_classification"
    else:
        batches = retrieval_batches(dataset_dir, transform, batch_size, report)
        metrics = zero_shot_retrieval(model, tokenizer, batches, device, progress)
        task = "zeroshot_retrieval"
    confusion = metrics.pop("confusion_matrix", None)
    record = {"dataset": dataset_dir.name, "model": model_name, "task": task, "metrics": metrics,
              "skipped_images": len(report.skipped),
              "skipped_keys": [{"key": key, "reason": reason} for key, reason in report.skipped]}
    if confusion is not None:
        record["confusion_matrix"] = confusion
    return record


@torch.inference_mode()
def evaluate_all(model: Any, tokenizer: Callable, transform: Callable, roots: list[str | Path],
                 model_name: str, batch_size: int = 256, progress: bool = False) -> list[dict]:
    datasets = [d for root in roots for d in discover_datasets(root)]
    return [evaluate_dataset(model, tokenizer, transform, d, model_name, batch_size, progress) for d in datasets]


def format_table(records: list[dict]) -> str:
    """A fixed-width table: classification top-1/top-5/mean-per-class recall, retrieval R@1/5/10."""
    lines = [f"{'dataset':<14}{'task':<16}{'n':>6}  metrics", "-" * 78]
    for record in records:
        m = record["metrics"]
        if record["task"] == "zeroshot_classification":
            n = m["num_samples"]
            top5 = f"{m['acc5']:.3f}" if "acc5" in m else "  -  "
            text = f"top1 {m['acc1']:.3f}  top5 {top5}  mean-per-class {m['mean_per_class_recall']:.3f}"
            task = "classification"
        else:
            n = m["num_images"]
            i2t = "/".join(f"{m[f'text_retrieval_recall@{k}']:.2f}" for k in (1, 5, 10))
            t2i = "/".join(f"{m[f'image_retrieval_recall@{k}']:.2f}" for k in (1, 5, 10))
            text = f"image→text R@1/5/10 {i2t}  text→image {t2i}"
            task = "retrieval"
        if record["skipped_images"]:
            text += f"  ({record['skipped_images']} undecodable skipped)"
        lines.append(f"{record['dataset']:<14}{task:<16}{n:>6}  {text}")
    return "\n".join(lines)
