"""The memory planner's arithmetic, checked by hand on small censuses, and its census of a real model."""
import torch

from tests.helpers import clip_config
from vlmtrain.config import DataConfig, TrainConfig
from vlmtrain.models.clip.parallelize import TP_PLAN
from vlmtrain.models.registry import spec_of
from vlmtrain.planner import (Census, Layout, ParamInfo, Split, census, grads_held_by_partition, plan,
                              pipeline_stages, rank_memory, tp_splits)

BUCKET = 1000


def tiny_run() -> TrainConfig:
    return TrainConfig(model=clip_config(), data=DataConfig(train_shards="unused"), output_dir="unused")


def two_blocks() -> Census:
    """Pipeline layers: an embedding of 200 elements, then two blocks of 400 (300 split by tp). Per
    sample each block saves 10 bytes (6 split), the rest of the model 4; a block's input is 2 bytes."""
    params = (ParamInfo("embed", 200, False, layer=0),
              ParamInfo("b0.w", 300, True, layer=1), ParamInfo("b0.n", 100, False, layer=1),
              ParamInfo("b1.w", 300, True, layer=2), ParamInfo("b1.n", 100, False, layer=2))
    return Census(params, batch=1, saved=(Split(6, 4), Split(6, 4)), rest=Split(0, 4), block_inputs=(2, 2),
                  block_layers=(1, 2), layers=3)


def test_zero_0_holds_everything_in_fp32_and_a_flat_copy_of_the_gradients():
    m = rank_memory(two_blocks(), Layout(zero=0, tp=1, pp=1, dp=2, micro_batch=3), bf16=False, bucket=BUCKET)
    assert (m.parameters, m.gradients, m.buffers) == (4 * 1000, 4 * 1000, 4 * 1000)
    assert m.optimizer == 8 * 1000  # AdamW m and v
    assert m.activations == 3 * (10 + 10 + 4)
    assert m.activations_checkpointed == 3 * (2 + 2 + 4) + 3 * 10  # inputs + rest, then one block again


def test_zero_stages_shard_optimizer_then_gradients_then_parameters_over_dp():
    layout = dict(tp=1, pp=1, dp=4, micro_batch=1)
    z1, z2, z3 = (rank_memory(two_blocks(), Layout(zero=z, **layout), bf16=False, bucket=BUCKET) for z in (1, 2, 3))
    assert z1.optimizer == z2.optimizer == z3.optimizer == 12 * 250  # m, v and the fp32 master of 1000/4
    assert z1.parameters == z2.parameters == 4 * 1000
    # ZeRO-3: a quarter of each parameter, plus the small ones DeepSpeed keeps whole (all of these).
    assert z3.parameters == 4 * (250 + 1000)
    assert z3.gradients == 4 * 250 and z3.buffers == 4 * BUCKET


def test_bf16_halves_working_copies_and_keeps_fp32_optimizer_state_and_master():
    m = rank_memory(two_blocks(), Layout(zero=3, tp=1, pp=1, dp=2, micro_batch=1), bf16=True, bucket=BUCKET)
    assert m.parameters == 2 * (500 + 1000)
    assert m.gradients == 2 * 500
    assert m.optimizer == 12 * 500
    assert m.buffers == 2 * BUCKET


def test_tensor_parallel_divides_only_what_its_plan_splits():
    m = rank_memory(two_blocks(), Layout(zero=0, tp=2, pp=1, dp=1, micro_batch=1), bf16=False, bucket=BUCKET)
    assert m.parameters == 4 * (200 + 2 * (150 + 100))
    assert m.activations == 2 * (3 + 4) + 4


def test_pipeline_counts_the_heaviest_stage_with_its_in_flight_micro_batches():
    layout = Layout(zero=1, tp=1, pp=2, dp=1, micro_batch=1, micro_batches=4)
    assert pipeline_stages(two_blocks(), 2) == [range(0, 2), range(2, 3)]  # embedding + block 0 | block 1
    m = rank_memory(two_blocks(), layout, bf16=False, bucket=BUCKET)
    assert m.parameters == 4 * (200 + 400)  # stage 0
    assert m.activations == 2 * (10 + 4)  # stage 0 holds pp = 2 micro-batches (1F1B)


def test_pipeline_stages_balance_blocks_and_place_other_layers_as_deepspeed_does():
    # CLIP's layers: image embed, 4 image blocks, image pool, text embed, 4 text blocks, text pool, head.
    layers = ["embed", *"BBBB", "pool", "embed", *"BBBB", "pool", "head"]
    blocks = tuple(i for i, kind in enumerate(layers) if kind == "B")
    clip = Census((), 1, (Split(),) * 8, Split(), (0,) * 8, block_layers=blocks, layers=len(layers))
    # Four blocks a stage; the text embedding stays with the image tower's stage.
    assert pipeline_stages(clip, 2) == [range(0, 7), range(7, 13)]


def test_zero_1_2_ranks_keep_whole_gradients_of_every_parameter_their_slice_touches():
    # One group of 10 + 30 + 20 elements over 2 ranks: slices [0, 30) and [30, 60); the 30-element
    # parameter straddles the boundary, so both ranks hold it.
    assert grads_held_by_partition([[10, 30, 20]], dp=2) == 50
    assert grads_held_by_partition([[10, 20, 30]], dp=2) == 30


def test_the_clip_tensor_parallel_plan_splits_projections_and_column_biases():
    assert tp_splits("visual.transformer.blocks.0.attn.q_proj.bias", TP_PLAN)  # column: bias split too
    assert tp_splits("text.transformer.blocks.1.mlp.down_proj.weight", TP_PLAN)
    assert not tp_splits("text.transformer.blocks.1.mlp.down_proj.bias", TP_PLAN)  # added after the all-reduce
    assert not tp_splits("visual.transformer.blocks.0.ln_1.weight", TP_PLAN)


def test_census_counts_the_real_model_and_its_saved_activations_scale_with_the_batch():
    cfg = tiny_run()
    one, four = census(cfg, 1), census(cfg, 4)
    with torch.device("meta"):
        model = spec_of(cfg.model).build(cfg.model)
    assert sum(p.numel for p in one.params) == sum(p.numel() for p in model.parameters())
    assert one.blocks == cfg.model.vision.layers + cfg.model.text.layers
    assert four.saved[0].per_rank(1) == 4 * one.saved[0].per_rank(1)
    # A block's input: batch × tokens × width fp32 (vision: 16 patches + the class token).
    assert one.block_inputs[0] == 17 * cfg.model.vision.width * 4
    # Between column- and row-parallel layers (q, k, v, attention, MLP hidden) most of a block is split.
    assert one.saved[0].split > one.saved[0].whole


def test_plan_lists_every_layout_of_the_world_and_says_why_one_is_refused():
    cfg = tiny_run()
    rows = plan(cfg, world=2)
    assert {(r.zero, r.tp, r.pp) for r in rows} == {(z, tp, pp) for z in range(4) for tp, pp in
                                                    ((1, 1), (2, 1), (1, 2))}
    zero3_pp2 = next(r for r in rows if (r.zero, r.pp) == (3, 2))
    assert zero3_pp2.memory is None and "zero_stage" in zero3_pp2.excluded
    assert all(r.memory for r in rows if r.pp == 1)


def test_a_global_batch_sets_each_layouts_micro_batch():
    cfg = tiny_run()
    rows = {(r.zero, r.tp, r.pp): r for r in plan(cfg, world=4, global_batch=64) if r.memory}
    assert rows[(0, 1, 1)].layout.micro_batch == 16 and rows[(0, 2, 1)].layout.micro_batch == 32
    assert rows[(0, 1, 2)].layout.micro_batch == 32  # two stages: two data-parallel replicas
