"""Evaluate one model on a suite of eval sets and report the results.

Records are shaped like CLIP_benchmark's output (dataset, model, task, metrics), plus what an
honest report needs: how many images were skipped as undecodable (and which), and for
classification the class names and the confusion matrix. ``evaluate_all`` is collective
under torch.distributed and returns the same records on every rank.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vlmtrain import atomic
from vlmtrain.configlib import from_dict, read_yaml_with_overrides
from vlmtrain.errors import ConfigError
from vlmtrain.eval.confusion import write_confusion_png
from vlmtrain.eval.datasets import (CLASSIFICATION, RETRIEVAL, DecodeReport, EvalDataError, EvalSet,
                                    discover_eval_sets, eval_batches, open_eval_set)
from vlmtrain.eval.zeroshot import NoImagesError, zero_shot_classification, zero_shot_retrieval


@dataclass
class EvalSetSpec:
    """One eval set as configured in YAML; everything but ``path`` is inferred when left out.

    ``classnames`` / ``templates``: a .txt/.json file or a built-in name (``imagenet``).
    """
    path: str = field(default="", metadata={"required": True})
    name: str | None = None
    kind: str | None = field(default=None, metadata={"choices": ("webdataset", "imagefolder", "csv", None)})
    task: str | None = field(default=None, metadata={"choices": (CLASSIFICATION, RETRIEVAL, None)})
    classnames: str | None = None
    templates: str | None = None

    def open(self) -> EvalSet:
        return open_eval_set(self.path, name=self.name, kind=self.kind, task=self.task,
                             classnames=self.classnames, templates=self.templates)


@dataclass
class SuiteConfig:
    """``tools/zeroshot_eval.py SUITE.yaml``: one model, many eval sets (see configs/eval/)."""
    datasets: list[EvalSetSpec] = field(default_factory=list, metadata={"required": True})
    checkpoint: str | None = None  # export dir, run dir or DeepSpeed checkpoint dir
    tag: str | None = None  # DeepSpeed checkpoint tag (default: the run's latest)
    model: str | None = None  # open_clip model name (or local-dir:PATH) instead of checkpoint
    pretrained: str | None = None  # local checkpoint file for `model`
    batch_size: int = field(default=256, metadata={"min": 1})
    device: str | None = None  # default: cuda when available, else cpu
    out: str | None = None  # results JSON; confusion PNGs go next to it


def load_suite_config(path: str | Path, overrides: Sequence[str] = ()) -> SuiteConfig:
    """Read a suite YAML, apply ``key=value`` overrides; mistakes name the key."""
    raw = read_yaml_with_overrides(path, overrides, what="suite file")
    suite = from_dict(SuiteConfig, raw)
    if (suite.checkpoint is None) == (suite.model is None):
        raise ConfigError(f"{path}: give exactly one of 'checkpoint' (our run/export/DeepSpeed checkpoint) "
                          f"or 'model' (an open_clip model name, with 'pretrained' FILE)")
    return suite


def resolve_eval_sets(datasets: Sequence[str | Path | EvalSet | EvalSetSpec], task: str | None = None,
                      **options: Any) -> list[EvalSet]:
    """Open every entry: a path is an eval set or a directory of eval sets (``options`` apply to each).

    With ``task``, directories contribute only their sets of that task; a set named on its own
    that has another task is an error.
    """
    sets: list[EvalSet] = []
    for entry in datasets:
        if isinstance(entry, EvalSet):
            found, explicit = [entry], True
        elif isinstance(entry, EvalSetSpec):
            found, explicit = [entry.open()], True
        else:
            found = discover_eval_sets(entry, **options)
            explicit = len(found) == 1 and Path(entry) == found[0].path
        if task is not None:
            wrong = [s for s in found if s.task != task]
            if explicit and wrong:
                raise EvalDataError(f"{wrong[0].path} is a {wrong[0].task} set, not {task}")
            found = [s for s in found if s.task == task]
        sets.extend(found)
    if not sets:
        raise EvalDataError(f"no {task or 'eval'} sets in {', '.join(str(d) for d in datasets)}")
    return sets


def evaluate_dataset(model: Any, tokenizer: Callable, transform: Callable, eval_set: EvalSet, model_name: str,
                     batch_size: int = 256, progress: bool = False, device: torch.device | str | None = None) -> dict:
    """One CLIP_benchmark-style record; collective under torch.distributed."""
    device = device or next(model.parameters()).device
    report = DecodeReport()
    batches = eval_batches(eval_set, transform, batch_size, report)
    try:
        if eval_set.task == CLASSIFICATION:
            metrics = zero_shot_classification(model, tokenizer, batches, eval_set.classnames, eval_set.templates,
                                               device, progress)
        else:
            metrics = zero_shot_retrieval(model, tokenizer, batches, device, progress)
    except NoImagesError:  # raised on every rank alike, so the gather below is safe
        raise EvalDataError(f"no decodable images in {eval_set.path}; {report.gathered().summary(limit=3)}") from None
    skipped = report.gathered().skipped
    confusion = metrics.pop("confusion_matrix", None)
    record = {"dataset": eval_set.name, "model": model_name, "task": eval_set.task, "metrics": metrics,
              "skipped_images": len(skipped),
              "skipped_keys": [{"key": s.key, "reason": s.reason} for s in skipped]}
    if confusion is not None:
        record["classnames"] = list(eval_set.classnames)
        record["confusion_matrix"] = confusion
    return record


def evaluate_all(model: Any, tokenizer: Callable, transform: Callable,
                 datasets: Sequence[str | Path | EvalSet | EvalSetSpec], *, model_name: str = "model",
                 batch_size: int = 256, progress: bool = False, device: torch.device | str | None = None,
                 task: str | None = None) -> list[dict]:
    """Evaluate ``model`` (anything with ``encode_image``/``encode_text``) on every set.

    ``datasets`` entries are eval-set paths, directories holding several, or ``EvalSetSpec``s.
    Under torch.distributed call it on every rank: each rank embeds its share, and every rank
    gets the same records, equal to a one-process evaluation. The model's train/eval mode is
    restored afterwards, so the training loop can call it every N steps.
    """
    eval_sets = resolve_eval_sets(datasets, task)
    return [evaluate_dataset(model, tokenizer, transform, s, model_name, batch_size, progress, device)
            for s in eval_sets]


def evaluate_and_report(eval_sets: Sequence[EvalSet], *, checkpoint: str | None, tag: str | None, model: str | None,
                        pretrained: str | None, out: str | Path | None, batch_size: int, progress: bool,
                        device: str | None, trust_checkpoint: bool = False) -> list[dict]:
    """Load a model (any kind ``load_eval_model`` takes), evaluate it on ``eval_sets``, print the
    table, and write the JSON and confusion PNGs to ``out`` when given. What the eval CLIs run."""
    from vlmtrain.eval.checkpoints import load_eval_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_eval_model(checkpoint, tag=tag, model=model, pretrained=pretrained, device=device,
                             trust_checkpoint=trust_checkpoint)
    records = evaluate_all(loaded.model, loaded.tokenizer, loaded.transform, eval_sets, model_name=loaded.name,
                           batch_size=batch_size, progress=progress, device=device)
    print(format_table(records))
    if out:
        pictures = write_results(records, out)
        print(f"\nresults: {out}" + "".join(f"\nconfusion matrix: {p}" for p in pictures))
    return records


def metrics_for_logging(records: list[dict], prefix: str = "eval") -> dict[str, float]:
    """Flat ``{"eval/<dataset>/<metric>": value}`` for a metrics log."""
    return {f"{prefix}/{r['dataset']}/{name}": float(value)
            for r in records for name, value in r["metrics"].items()}


def confusion_png_path(out: Path, dataset: str) -> Path:
    """``results.json`` → ``results_<dataset>_confusion.png`` next to it."""
    return out.with_name(f"{out.stem}_{dataset}_confusion.png")


def write_results(records: list[dict], out: str | Path) -> list[Path]:
    """Write the records as JSON and one confusion PNG per classification set; return the PNGs."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out, records)
    return [write_confusion_png(r["confusion_matrix"], r["classnames"], f"{r['dataset']} — {r['model']}",
                                confusion_png_path(out, r["dataset"]))
            for r in records if "confusion_matrix" in r]


def format_table(records: list[dict]) -> str:
    """A fixed-width table: classification top-1/top-5/mean-per-class recall, retrieval R@1/5/10."""
    lines = []
    classification = [r for r in records if r["task"] == CLASSIFICATION]
    retrieval = [r for r in records if r["task"] == RETRIEVAL]
    if classification:
        lines.append(f"{'classification':<22}{'n':>7}{'classes':>8}{'top-1':>8}{'top-5':>8}{'mean/cls':>9}"
                     f"{'skipped':>9}")
        for r in classification:
            m = r["metrics"]
            top5 = f"{m['acc5']:>8.4f}" if "acc5" in m else f"{'-':>8}"
            lines.append(f"{r['dataset']:<22}{m['num_samples']:>7}{len(r['classnames']):>8}{m['acc1']:>8.4f}{top5}"
                         f"{m['mean_per_class_recall']:>9.4f}{r['skipped_images']:>9}")
    if retrieval:
        if lines:
            lines.append("")
        lines.append(f"{'retrieval':<22}{'images':>7}{'texts':>8}  {'image→text R@1/5/10':<22}"
                     f"{'text→image R@1/5/10':<22}{'skipped':>7}")
        for r in retrieval:
            m = r["metrics"]
            i2t = "/".join(f"{m[f'text_retrieval_recall@{k}']:.3f}" for k in (1, 5, 10))
            t2i = "/".join(f"{m[f'image_retrieval_recall@{k}']:.3f}" for k in (1, 5, 10))
            lines.append(f"{r['dataset']:<22}{m['num_images']:>7}{m['num_texts']:>8}  {i2t:<22}{t2i:<22}"
                         f"{r['skipped_images']:>7}")
    return "\n".join(lines)
