"""Pipeline parallelism (parallel.pp) is the same optimization as no pipeline: with fp32, one seed and
one data order, 2 micro-batches per step and clipping on, 5 steps give the same per-step losses and
final weights (1e-5) as the unpipelined run of the same micro-batches, alone and with data
parallelism. Its checkpoints resume exactly at the same layout and, through DeepSpeed's universal
checkpoint, without the pipeline. Its export is the unsplit CLIP, which open_clip loads.

The logit scale starts above its bound (e^5 > 100): the clamp must reach the last stage, which holds it.
"""
from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import assert_same_weights, exported_weights, keys_per_step, losses, metrics, train
from vlmtrain.checkpoint import find_resume_point, load_exported
from vlmtrain.config import TrainConfig
from vlmtrain.configlib import from_dict
from vlmtrain.distributed.pipeline import source_names
from vlmtrain.engine import check_resumable
from vlmtrain.errors import CheckpointError
from vlmtrain.models.clip.spec import SPEC

pytestmark = pytest.mark.dist

STEPS, CLIP_AT, TOLERANCE = 5, 1.0, 1e-5


SETTINGS = (f"steps={STEPS}", "checkpoint.every=2", "data.batch_size=8", "optim.grad_accum_steps=2",
            f"optim.grad_clip={CLIP_AT}", "optim.warmup_steps=2", "model.init_logit_scale=5.0", "zero_stage=1",
            "data.shuffle_buffer=32", "data.record_keys=true", "log_every=1")


def run(corpus: Path, out_dir: Path, ranks: int, *extra: str) -> Path:
    train(corpus, out_dir, ranks, *SETTINGS, *extra)
    return out_dir


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    """Every launch of this module, once: two layouts against their references, a two-stage resume of
    a two-stage checkpoint, and a one-stage one."""
    mktemp = tmp_path_factory.mktemp
    out = {"pp2": run(small_corpus, mktemp("pp2"), 2, "parallel.pp=2"),
           "pp1": run(small_corpus, mktemp("pp1"), 1),
           "dp2_pp2": run(small_corpus, mktemp("dp2_pp2"), 4, "parallel.pp=2"),
           "dp2": run(small_corpus, mktemp("dp2"), 2)}

    out["pp2_from_pp2"] = run(small_corpus, mktemp("pp2_from_pp2"), 2, "parallel.pp=2",
                              f"resume={out['pp2'] / 'checkpoints' / 'step_0000002'}")
    out["pp1_from_pp2"] = run(small_corpus, mktemp("pp1_from_pp2"), 1,
                              f"resume={out['pp2'] / 'checkpoints' / 'step_0000002'}")
    return out


@pytest.mark.parametrize("pipelined, reference", [("pp2", "pp1"), ("dp2_pp2", "dp2")])
def test_losses_and_final_weights_match_the_unpipelined_run(runs, pipelined, reference):
    expected, actual = losses(runs[reference]), losses(runs[pipelined])
    assert sorted(actual) == sorted(expected) == list(range(1, STEPS + 1))
    assert abs(expected[STEPS] - expected[1]) > 0.05, "the loss did not move: agreement would prove little"
    assert [actual[s] for s in expected] == pytest.approx([expected[s] for s in expected], abs=TOLERANCE, rel=0)
    # The export gathers every stage under CLIP's own names: the unpipelined layout, the same values.
    assert_same_weights(exported_weights(runs[pipelined]), exported_weights(runs[reference]), atol=TOLERANCE)


@pytest.mark.parametrize("run", ["pp2", "dp2_pp2"])
def test_clipping_and_the_logit_scale_clamp_act_on_the_stages_that_hold_them(runs, run):
    records = metrics(runs[run])
    assert max(r["grad_norm"] for r in records) > CLIP_AT
    scales = [r["logit_scale"] for r in records]
    assert scales[0] == pytest.approx(100.0, abs=1e-3)  # clamped from e^5 ≈ 148 by the first step
    assert max(scales) <= 100.0 + 1e-3


def test_resume_at_two_stages_is_exact(runs):
    """(Kills at each point of a save are tested in test_exact_resume.py: the save sequence is the same.)"""
    straight, resumed = losses(runs["pp2"]), losses(runs["pp2_from_pp2"])
    assert sorted(resumed) == list(range(3, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], abs=1e-6), f"step {step}"
    assert_same_weights(exported_weights(runs["pp2_from_pp2"]), exported_weights(runs["pp2"]), atol=1e-6)
    # The resumed run trained on what the straight run did next, and both stages read the same samples.
    keys = keys_per_step(runs["pp2_from_pp2"])
    assert keys == {key: value for key, value in keys_per_step(runs["pp2"]).items() if key[1] > 2}
    assert all(keys[0, step] == keys[1, step] for step in range(3, STEPS + 1))


def test_a_two_stage_checkpoint_resumes_exactly_at_one_stage(runs):
    """Through DeepSpeed's universal checkpoint, renamed from the pipeline's layer names to CLIP's."""
    straight, resumed = losses(runs["pp2"]), losses(runs["pp1_from_pp2"])
    assert sorted(resumed) == list(range(3, STEPS + 1))
    for step in resumed:
        assert resumed[step] == pytest.approx(straight[step], abs=TOLERANCE), f"step {step}"
    assert_same_weights(exported_weights(runs["pp1_from_pp2"]), exported_weights(runs["pp2"]), atol=TOLERANCE)
    # It read on from the checkpoint's data cursor: the samples the two-stage run trained on next.
    assert keys_per_step(runs["pp1_from_pp2"], ranks=(0,)) == {
        (rank, step): keys for (rank, step), keys in keys_per_step(runs["pp2"]).items() if rank == 0 and step > 2}


def test_a_two_stage_checkpoint_is_refused_on_other_data_parallel_ranks(runs):
    """The data cursors belong to the data-parallel ranks: dp=1 cannot continue as dp=2."""
    point = find_resume_point("latest", runs["pp2"])
    raw = dict(point.sidecar["config"], model=SPEC.load(point.sidecar["config"]["model"]), parallel={"pp": 1})
    cfg = from_dict(TrainConfig, raw)
    with pytest.raises(CheckpointError) as refused:
        check_resumable(point.sidecar, cfg, cfg.parallel_dims(2), point.sidecar["data_fingerprint"])
    assert "written at dp=1 × tp=1 × pp=2, this run is dp=2 × tp=1 × pp=1" in str(refused.value)
    assert "init_from=<an export of that run" in str(refused.value)


@torch.no_grad()
def test_the_export_loads_into_open_clip_with_the_embeddings_of_the_trained_stages(runs, tmp_path):
    _, cfg, _ = load_exported(runs["pp2"])
    # The weights the stages trained, from the final DeepSpeed checkpoint's per-layer files: loading a
    # layer loads the CLIP it was split from, whose modules it holds.
    trained = SPEC.build(cfg).eval()
    checkpoint = runs["pp2"] / "checkpoints" / "step_0000005"
    for index, layer in enumerate(SPEC.pipeline_layers(trained)):
        layer.load_state_dict(torch.load(checkpoint / f"layer_{index:02d}-model_00-model_states.pt",
                                         weights_only=True))
    export = exported_weights(runs["pp2"])
    assert_same_weights(export, trained.state_dict(), atol=0)

    SPEC.adapter.write_dir(export, cfg, tmp_path / "openclip")
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'openclip'}")
    theirs.eval()
    images = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(0))
    tokens = SPEC.tokenizer(cfg)(["a red circle", "a blue square", "two green triangles", "7"])
    for ours, reference in ((trained.encode_image(images, normalize=True), theirs.encode_image(images, normalize=True)),
                            (trained.encode_text(tokens, normalize=True), theirs.encode_text(tokens, normalize=True))):
        torch.testing.assert_close(ours, reference, atol=TOLERANCE, rtol=0)
        assert F.pdist(ours).min() > 0.05  # distinct inputs, distinct embeddings: the match is not trivial


def test_the_pipeline_layers_in_sequence_are_the_model():
    """In one process: the layers compute CLIP's forward and name every CLIP weight exactly once."""
    cfg = SPEC.resolve({"preset": "tiny"})
    torch.manual_seed(0)
    model = SPEC.build(cfg).eval()
    layers = SPEC.pipeline_layers(model)
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = SPEC.tokenizer(cfg)(["a cat", "two dogs in the snow", "a red circle on the left"])
    x = (images, tokens)
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
        expected = model(images, tokens)
    assert x.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(x[name], expected[name], atol=0, rtol=0)
    names = [name for layer_names in source_names(model, layers) for name in layer_names.values()]
    assert sorted(names) == sorted(model.state_dict())
