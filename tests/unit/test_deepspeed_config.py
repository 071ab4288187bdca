"""The DeepSpeed config the trainer builds: buckets sized to the model, and where the trainer alone
handles gradients."""
from vlmtrain.config import load_train_config
from vlmtrain.distributed.deepspeed_config import (BUCKET_ELEMENTS, bucket_elements, build_deepspeed_config,
                                                   trainer_owns_gradients)
from vlmtrain.models.registry import spec_of


def demo(*overrides: str):
    return load_train_config("configs/train/demo.yaml", ["data.train_shards=unused", *overrides])


def test_zero_buckets_hold_a_small_model_whole_and_stop_at_5e7_elements():
    cfg = demo("zero_stage=2")
    spec = spec_of(cfg.model)
    model = spec.build(cfg.model)
    numel = sum(p.numel() for p in model.parameters())
    zero = build_deepspeed_config(cfg, cfg.parallel_dims(2), spec.tp_plan, model)["zero_optimization"]
    # Not DeepSpeed's 5e7 elements for a 3.4M-element model: ZeRO 1/2 allocate the bucket every step.
    assert zero["reduce_bucket_size"] == zero["allgather_bucket_size"] == bucket_elements(numel)
    assert numel <= bucket_elements(numel) < numel + 4096 and bucket_elements(numel) % 4096 == 0
    assert bucket_elements(10**9) == BUCKET_ELEMENTS


def test_only_one_process_at_zero_0_leaves_gradients_to_the_trainer():
    zero0, zero1, tp2 = demo("zero_stage=0"), demo("zero_stage=1"), demo("zero_stage=0", "parallel.tp=2")
    assert trainer_owns_gradients(zero0, zero0.parallel_dims(1))
    assert not trainer_owns_gradients(zero0, zero0.parallel_dims(2))  # DeepSpeed all-reduces them
    assert not trainer_owns_gradients(zero1, zero1.parallel_dims(1))  # DeepSpeed partitions them
    assert not trainer_owns_gradients(tp2, tp2.parallel_dims(2))  # DeepSpeed reduces the replicated ones
