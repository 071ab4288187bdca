"""The one place that turns a run configuration into DeepSpeed's config dict."""
from __future__ import annotations

from torch import nn

from vlmtrain.config import TrainConfig
from vlmtrain.distributed.parallel_dims import ParallelDims
from vlmtrain.models.spec import TensorParallelPlan

BUCKET_ELEMENTS = 50_000_000


def build_deepspeed_config(cfg: TrainConfig, dims: ParallelDims, tp_plan: TensorParallelPlan, model: nn.Module,
                           load_universal: bool = False) -> dict:
    """DeepSpeed's config for ``model`` (what this process hands to ``deepspeed.initialize``)."""
    bucket = bucket_elements(sum(p.numel() for p in model.parameters()))
    zero: dict = {"stage": cfg.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    if cfg.optim.offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    config = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        # Under pipeline parallelism these are the micro-batches of one pipelined step.
        "gradient_accumulation_steps": cfg.optim.grad_accum_steps,
        # Explicit: DeepSpeed's default is 1.0. Off where the trainer clips itself (see below).
        "gradient_clipping": 0.0 if trainer_clips_gradients(cfg, dims) else cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        # We pass a torch AdamW (no JIT Adam build); DeepSpeed asks us to opt in for ZeRO, and
        # for offload, where it would otherwise insist on its own CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # our own logger reports progress
        "wall_clock_breakdown": False,
    }
    if dims.tp > 1:
        config["tensor_parallel"] = autotp_config(dims.tp, tp_plan)
    if load_universal:  # the checkpoint to resume was converted for another layout
        config["checkpoint"] = {"load_universal": True}
    return config


def bucket_elements(model_numel: int, limit: int = BUCKET_ELEMENTS) -> int:
    """DeepSpeed's gradient-reduction and all-gather bucket, in elements: ``limit`` (5e7), or the
    whole model where it is smaller, rounded up to 4096 elements (DeepSpeed wants a multiple of its
    alignment factor). DeepSpeed's default (5e8) pins ~1.9 GiB per rank at ZeRO-3 whatever the model
    (measured for ViT-B/16 in BENCHMARKS.md). And ZeRO 1/2 allocate a fresh bucket every step: on CPU
    one above glibc's largest mmap threshold (32 MiB) is mapped anew and page-faulted as it fills,
    every step (3,600 faults and ~10 ms of CPU a step for the tiny CLIP, 2 ranks, ZeRO 2). A bucket
    that holds the whole model reduces the same gradients in the same one message."""
    return min(limit, -(-model_numel // 4096) * 4096)


def trainer_clips_gradients(cfg: TrainConfig, dims: ParallelDims) -> bool:
    """Whether the trainer clips gradients instead of DeepSpeed: without ZeRO and without model
    parallelism every rank holds whole gradients, and one fused norm over them costs a fraction of
    DeepSpeed's ZeRO-0 clipping (a norm kernel and a Python step per parameter: 10 ms of CPU per step
    for the tiny CLIP, 40% of the step's fixed cost). Same rule: scale by min(1, max / (norm + 1e-6))."""
    return cfg.optim.grad_clip > 0 and cfg.zero_stage == 0 and dims.tp == 1 and dims.pp == 1


def trainer_owns_gradients(cfg: TrainConfig, dims: ParallelDims) -> bool:
    """Whether nothing but the trainer reads or writes gradients between backward and the update:
    one process at ZeRO 0, where DeepSpeed neither reduces (the trainer turns its one-replica
    all-reduce off), partitions nor clips them. The trainer may then keep them as it likes
    (``embedding_grads.EmbeddingGradients``)."""
    return cfg.zero_stage == 0 and dims.dp * dims.tp * dims.pp == 1


def autotp_config(tp: int, plan: TensorParallelPlan) -> dict:
    """AutoTP with explicit layer specs: on a custom module DeepSpeed cannot infer a policy."""
    return {"autotp_size": tp,
            "partition_config": {"use_default_specs": False, "layer_specs": [
                {"patterns": list(plan.column), "partition_type": "column"},
                {"patterns": list(plan.row), "partition_type": "row"}]}}
