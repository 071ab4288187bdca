"""The one place that turns a run configuration into DeepSpeed's config dict."""
from __future__ import annotations

from vlmtrain.config import TrainConfig


def build_deepspeed_config(cfg: TrainConfig) -> dict:
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.precision == "bf16"},
        # We pass a torch AdamW (no JIT Adam build); DeepSpeed asks us to opt in for ZeRO.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # our own logger reports progress
        "wall_clock_breakdown": False,
    }
