"""What a run reports: FLOPs counted by torch match the transformer arithmetic; curves get drawn."""
import json

import pytest

from tests.helpers import CLIP_SPEC, clip_config
from vlmtrain.metrics import StepLog, count_flops_per_sample, plot_training_curves


def forward_flops(width: int, layers: int, tokens: int, mlp_ratio: float) -> int:
    """Multiply-adds × 2 of one tower: q/k/v/out and MLP projections, plus QKᵀ and AV."""
    projections = 2 * tokens * (4 * width * width + 2 * width * int(width * mlp_ratio))
    attention = 2 * 2 * tokens * tokens * width
    return layers * (projections + attention)


def test_counted_flops_are_three_forward_passes_of_both_towers():
    cfg = clip_config(embed_dim=32, vision={"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "heads": 2},
                      text={"context_length": 16, "width": 48, "layers": 3, "heads": 3})
    patches = (32 // 8) ** 2
    vision = (forward_flops(64, 2, patches + 1, 4.0) + 2 * patches * (3 * 8 * 8) * 64  # patch embedding
              + 2 * 64 * 32)  # projection of the class token
    text = forward_flops(48, 3, 16, 4.0) + 2 * 48 * 32
    # Backward costs two forwards (gradients of activations and of weights).
    assert count_flops_per_sample(CLIP_SPEC, cfg) == pytest.approx(3 * (vision + text), rel=0.02)


def test_a_resumed_log_drops_the_records_written_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = StepLog(path)
    for step in range(1, 8):
        log.write({"step": step, "loss": 1.0 / step})
    log.close()
    resumed = StepLog(path, resume_step=4)
    resumed.write({"step": 5, "loss": 0.0})
    resumed.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_training_curves_are_drawn_with_eval_metrics_in_their_own_panel(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 4 - s / 10, "lr": 1e-3, "samples_per_s": 900.0} for s in range(1, 21)]
    records += [{"step": 10, "eval/shapes/acc1": 0.2}, {"step": 20, "eval/shapes/acc1": 0.3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_training_curves(path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
