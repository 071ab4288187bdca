"""Visible-token encoding and FLIP patch dropout equal the full encoder with an attention mask that
hides the left-out patches; left-out patches never reach the transformer; compute-skipping drop-path
is exact at rate 0, unbiased at rate r, and runs its branches on the kept rows only."""
import pytest
import torch

from tests.helpers import build_clip, clip_config
from vlmtrain.errors import ConfigError
from vlmtrain.metrics import count_flops_per_sample
from vlmtrain.models.common import masking
from vlmtrain.models.common.blocks import Block, Transformer, drop_path_rates, residual
from vlmtrain.models.common.vision import VisionConfig, VisionTower
from vlmtrain.models.registry import get_spec
from vlmtrain.rng import micro_batch_seed, seed_model_rng

CFG = VisionConfig(image_size=32, patch_size=8, width=32, layers=2, heads=2)  # 16 patches


def tower(**keys) -> VisionTower:
    torch.manual_seed(0)
    return VisionTower(VisionConfig(**{**CFG.__dict__, **keys}), 16)


def masked_full_encoder(model: VisionTower, images: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Every token through the blocks, attending only to the class token and ``keep``'s patches;
    returns the rows of those tokens after ln_post, [B, 1+K, width]."""
    batch = images.shape[0]
    rows = torch.cat([torch.zeros(batch, 1, dtype=torch.long), keep + 1], dim=1)  # positions in the full sequence
    full = model.embed(images, keep=torch.arange(16).expand(batch, 16))  # all patches, no dropout
    visible = torch.zeros(batch, 17, dtype=torch.bool).scatter_(1, rows, True)
    attn_mask = visible[:, None, None, :].expand(batch, 1, 17, 17)
    out = model.ln_post(model.transformer(full, attn_mask=attn_mask))
    return out.gather(1, rows[..., None].expand(-1, -1, out.shape[-1]))


def transformer_inputs(model: VisionTower) -> list[torch.Tensor]:
    seen = []
    model.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(args[0].detach().clone()),
                                                with_kwargs=True)
    return seen


def test_visible_token_encoding_equals_the_masked_full_encoder_and_never_sees_masked_patches():
    model = tower().eval()
    images = torch.randn(3, 3, 32, 32)
    masks = torch.stack([masking.random_mask(16, 0.75, torch.Generator().manual_seed(i)) for i in range(3)])
    keep = masking.visible_index(masks)
    # Masked patches carry NaN: any of them reaching the blocks would poison every output.
    poisoned = images.clone()
    for b in range(3):
        for patch in masks[b].nonzero().flatten().tolist():
            i, j = divmod(patch, 4)
            poisoned[b, :, 8 * i:8 * i + 8, 8 * j:8 * j + 8] = float("nan")
    seen = transformer_inputs(model)
    tokens = model.encode_tokens(poisoned, keep)
    assert seen[0].shape == (3, 1 + 4, 32) and torch.isfinite(seen[0]).all()
    assert torch.isfinite(tokens).all()
    torch.testing.assert_close(tokens, masked_full_encoder(model, images, keep), atol=1e-5, rtol=0)
    torch.testing.assert_close(model.proj(tokens[:, 0]), model(images, keep), atol=1e-6, rtol=0)


def test_patch_dropout_in_training_equals_the_masked_full_encoder_and_all_patches_at_eval():
    model = tower(patch_dropout=0.5)
    images = torch.randn(4, 3, 32, 32)
    seen = transformer_inputs(model)
    torch.manual_seed(11)
    tokens = model.encode_tokens(images)
    torch.manual_seed(11)  # the same draw as the tower's
    keep = masking.patch_dropout_keep(4, 16, 0.5, torch.device("cpu"))
    assert seen[-1].shape == (4, 1 + 8, 32)
    torch.testing.assert_close(tokens, masked_full_encoder(model, images, keep), atol=1e-5, rtol=0)
    model.eval()
    full = model.encode_tokens(images)
    assert seen[-1].shape == (4, 17, 32)
    reference = tower().eval()  # the same weights without patch dropout
    torch.testing.assert_close(full, reference.encode_tokens(images), atol=0, rtol=0)


def test_embed_adds_positions_before_the_gather_like_the_old_layout():
    model = tower().eval()
    images = torch.randn(2, 3, 32, 32)
    x = model.patch_embed(images).flatten(2).transpose(1, 2)
    cls = model.class_embedding.expand(2, 1, -1)
    old = model.ln_pre(torch.cat([cls, x], dim=1) + model.positional_embedding)  # open_clip's order
    assert torch.equal(model.embed(images), old)
    keep = torch.tensor([[3, 7], [0, 15]])
    assert torch.equal(model.embed(images, keep), old[torch.arange(2)[:, None], torch.cat(
        [torch.zeros(2, 1, dtype=torch.long), keep + 1], dim=1)])


def test_clip_takes_patch_dropout_from_its_config_and_checks_it():
    cfg = clip_config(vision={"patch_dropout": 0.5, "drop_path": 0.1}, text={"drop_path": 0.2})
    model = build_clip(cfg)
    assert model.visual.patch_dropout == 0.5
    assert [b.drop_path for b in model.text.transformer.blocks] == pytest.approx([0.1, 0.2])
    for key in ("vision.patch_dropout", "vision.drop_path", "text.drop_path"):
        section, name = key.split(".")
        for bad in (1.0, -0.1):
            with pytest.raises(ConfigError, match=f"model.{section}.{name}"):
                clip_config(**{section: {name: bad}})


def test_flops_are_counted_on_the_meta_device_with_patch_dropout():
    spec = get_spec("clip")
    full = count_flops_per_sample(spec, clip_config())
    dropped = count_flops_per_sample(spec, clip_config(vision={"patch_dropout": 0.5}))
    assert 0 < dropped < full


# ---------------------------------------------------------------- drop-path


def test_drop_path_rates_rise_linearly_to_the_rate():
    assert drop_path_rates(0.3, 3) == pytest.approx([0.1, 0.2, 0.3])
    assert drop_path_rates(0.2, 1) == [0.2]


def test_rate_zero_is_exactly_no_drop_path():
    torch.manual_seed(0)
    plain = Transformer(32, 2, 2, 4.0)
    torch.manual_seed(0)
    zero = Transformer(32, 2, 2, 4.0, drop_path=0.0).train()
    x = torch.randn(5, 7, 32)
    expected = x
    for block in plain.blocks:  # the pre-norm block written out
        expected = expected + block.attn(block.ln_1(expected))
        expected = expected + block.mlp(block.ln_2(expected))
    assert torch.equal(zero(x), expected)


def test_a_dropped_path_runs_its_branch_on_the_kept_rows_only_and_is_unbiased():
    x = torch.randn(8, 3, 4)
    calls = []

    def branch(h, mask):
        calls.append(h.shape[0])
        return 2 * h + 1

    kept, draws = torch.zeros(8), 1000
    torch.manual_seed(0)
    for _ in range(draws):
        out = residual(x, branch, None, 0.5)
        changed = (out != x).flatten(1).any(dim=1)
        assert int(changed.sum()) == 4  # int(8 · 0.5) rows ran the branch, the rest passed through
        assert torch.equal(out[~changed], x[~changed])
        torch.testing.assert_close(out[changed], x[changed] + 2 * (2 * x[changed] + 1))  # scaled by 8/4
        kept += changed
    assert calls == [4] * draws
    # Each row ran the branch with probability 4/8 (randperm: uniform subsets) and was scaled by 8/4,
    # so its expected output is x + branch(x).
    assert (kept / draws - 0.5).abs().max() < 0.07


def test_a_block_with_drop_path_skips_its_branches_for_dropped_samples():
    torch.manual_seed(0)
    block = Block(32, 2, 4.0, drop_path=0.75).train()
    rows = []
    for part in (block.attn, block.mlp):
        part.register_forward_pre_hook(lambda module, args, kwargs: rows.append(args[0].shape[0]), with_kwargs=True)
    block(torch.randn(8, 5, 32))
    assert rows == [2, 2]
    block.eval()
    rows.clear()
    block(torch.randn(8, 5, 32))
    assert rows == [8, 8]


def test_per_sample_attention_masks_follow_the_kept_rows():
    torch.manual_seed(0)
    block = Block(32, 2, 4.0, drop_path=0.5).train()
    x = torch.randn(4, 5, 32)
    attn_mask = torch.rand(4, 1, 5, 5) > 0.3
    attn_mask[..., 0] = True  # every query sees at least one key
    torch.manual_seed(3)
    out = block(x, attn_mask=attn_mask)
    # The same draws, composed by hand: each kept row attends with its own mask.
    torch.manual_seed(3)
    kept_attn = torch.randperm(4)[:2]
    kept_mlp = torch.randperm(4)[:2]
    y = x.clone()
    y[kept_attn] += 2 * block.attn(block.ln_1(x[kept_attn]), attn_mask=attn_mask[kept_attn])
    z = y.clone()
    z[kept_mlp] += 2 * block.mlp(block.ln_2(y[kept_mlp]))
    torch.testing.assert_close(out, z, atol=1e-6, rtol=0)


# ---------------------------------------------------------------- the model's RNG per micro-batch


def test_micro_batch_seeds_differ_by_step_micro_batch_and_replica_and_replay():
    seeds = {micro_batch_seed(0, step, micro, rank) for step in range(1, 5) for micro in range(3) for rank in range(4)}
    assert len(seeds) == 4 * 3 * 4
    seed_model_rng(0, 7, 1, 2)
    first = torch.rand(3)
    torch.rand(100)
    seed_model_rng(0, 7, 1, 2)
    assert torch.equal(torch.rand(3), first)


def test_clips_pipeline_layers_draw_the_patch_dropout_the_model_draws():
    from vlmtrain.models.clip.parallelize import pipeline_layers

    cfg = clip_config(vision={"patch_dropout": 0.5})
    model = build_clip(cfg).train()
    images = torch.randn(4, 3, 32, 32)
    tokens = get_spec("clip").tokenizer(cfg)(["a red circle", "two dogs", "a cat", "7"])
    torch.manual_seed(5)
    expected = model(images, tokens)
    torch.manual_seed(5)
    x = (images, tokens)
    for layer in pipeline_layers(model):
        x = layer(x)
    for name in expected:
        assert torch.equal(x[name], expected[name]), name
    torch.manual_seed(6)  # another draw, other patches: the dropout is live in the pipeline's layers
    assert not torch.equal(model(images, tokens)["image_features"], expected["image_features"])


def test_a_checkpoint_written_before_the_new_model_keys_still_resumes():
    from vlmtrain.config import load_train_config
    from vlmtrain.configlib import to_dict
    from vlmtrain.distributed.parallel_dims import ParallelDims
    from vlmtrain.engine import check_resumable
    from vlmtrain.errors import CheckpointError

    cfg = load_train_config("configs/train/demo.yaml", ["data.train_shards=unused"])
    old = to_dict(cfg)
    for tower in ("vision", "text"):  # as written before these keys existed
        old["model"][tower].pop("drop_path")
    old["model"]["vision"].pop("patch_dropout")
    sidecar = {"config": old, "parallel": {"dp": 1, "tp": 1, "pp": 1}, "world_size": 1, "data_fingerprint": "f"}
    check_resumable(sidecar, cfg, ParallelDims(1), "f")
    old["model"]["vision"]["patch_dropout"] = 0.5
    with pytest.raises(CheckpointError, match="model"):
        check_resumable(sidecar, cfg, ParallelDims(1), "f")
