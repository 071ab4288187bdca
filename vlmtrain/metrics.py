"""What a run reports: throughput, counted FLOPs and MFU, memory; JSONL, TensorBoard and a PNG.

Rank 0 writes. ``metrics.jsonl`` is the source of truth (one record per log step); TensorBoard
gets the same scalars, and ``training_curves.png`` is drawn from the JSONL at the end of a run.
"""
from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path

import torch

from vlmtrain import atomic

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"

# Dense bf16 peak of one device, TFLOP/s (vendor data sheets), matched against the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "V100": 125.0}


def count_flops_per_sample(spec, model_cfg, batch: int = 2) -> float:
    """FLOPs of one training sample (forward + backward), counted by torch on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = spec.build(model_cfg)
        inputs = spec.example_inputs(model_cfg, batch)
    with FlopCounterMode(display=False) as counter:
        out = model(**inputs)
        # The losses are small next to the model (CLIP's: local × global logits), so a plain sum of
        # the outputs stands in for them.
        sum(value.sum() for value in out.values() if value.requires_grad).backward()
    return counter.get_total_flops() / batch


def device_peak_tflops(configured: float) -> float | None:
    """The configured peak, else the GPU's from the table; None on CPU (no meaningful peak)."""
    if configured > 0:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak
    return None


def peak_memory_gb() -> float:
    """Peak accelerator memory on GPU; peak resident set size of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class StepLog:
    """A JSONL file of per-step records. A run resumed from step s first drops the records past s
    (written after that checkpoint by the run that died), so the file reads as one run."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = path.read_text().splitlines(keepends=True) if path.is_file() else []
        if lines and not lines[-1].endswith("\n"):  # cut off mid-write (a full disk, a kill)
            log.warning("%s: dropping its last line, cut off mid-write: %r", path, lines.pop()[:80])
        atomic.write_text(path, "".join(line for line in lines if json.loads(line)["step"] <= resume_step))
        self._file = path.open("a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsLogger:
    """Rank 0's metrics: ``metrics.jsonl``, TensorBoard scalars, and the curves PNG at the end."""

    def __init__(self, run_dir: Path, active: bool, tensorboard: bool, resume_step: int = 0):
        self.active = active
        self._log = StepLog(run_dir / METRICS_FILE, resume_step) if active else None
        self._writer = None
        if active and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1)

    def log(self, record: dict) -> None:
        if not self.active:
            return
        self._log.write(record)
        if self._writer:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if not self.active:
            return
        self._log.close()
        if self._writer:
            self._writer.close()
        plot_training_curves(self._log.path, self._log.path.with_name(CURVES_FILE))


CURVES = (("loss", "loss"), ("lr", "learning rate"), ("logit_scale", "logit scale (exp)"),
          ("samples_per_s", "samples / s"), ("data_wait_frac", "fraction of step waiting for data"),
          ("eval", "zero-shot eval"))


def plot_training_curves(metrics_file: Path, out_png: Path) -> None:
    """One panel per curve, step on the x axis; eval metrics (``eval/...``) share a panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    panels = [(key, title) for key, title in CURVES
              if any(k == key or k.startswith(f"{key}/") for r in records for k in r)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        series = sorted({k for r in records for k in r if k == key or k.startswith(f"{key}/")})
        for name in series:
            points = [(r["step"], r[name]) for r in records if name in r]
            ax.plot(*zip(*points), marker="." if len(points) < 30 else None,
                    label=name.removeprefix(f"{key}/") if name != key else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(series) > 1:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
