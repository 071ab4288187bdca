"""Tensor parallelism (DeepSpeed AutoTP) is the same optimization as the unsharded model: fp32, one seed
and one data order, 5 steps with clipping on, per-step losses and final weights equal to 1e-5.

Like is compared with like: tp=2 on 2 ranks is one data-parallel replica, so its reference is 1 rank at
the same batch; dp=2 × tp=2 on 4 ranks is compared with dp=2 on 2 ranks. Runs start on first use and
are shared by the tests of this module.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from tests.helpers import exported_weights, losses, metrics, train
from vlmtrain.checkpoint import load_exported
from vlmtrain.config import load_train_config
from vlmtrain.distributed.parallel_dims import ParallelDims
from vlmtrain.engine import check_resumable
from vlmtrain.errors import CheckpointError
from vlmtrain.models.clip.openclip import write_openclip_dir
from vlmtrain.models.clip.parallelize import TP_PLAN

pytestmark = pytest.mark.dist

STEPS, CLIP_AT = 5, 1.0
COMMON = (f"steps={STEPS}", "log_every=1", "data.batch_size=8", "optim.warmup_steps=2", "optim.lr=2e-3",
          f"optim.grad_clip={CLIP_AT}")
TP2 = "parallel.tp=2"
# name: (ranks, overrides). The runs that checkpoint every 2 steps are where the resume tests start.
RUNS = {
    "tp1_clip": (1, ["zero_stage=0"]),
    "tp2_zero0": (2, [TP2, "zero_stage=0"]),
    "tp2_zero2": (2, [TP2, "zero_stage=2", "checkpoint.every=2"]),
    "tp2_zero3": (2, [TP2, "zero_stage=3"]),
    "tp1_siglip": (1, ["model.loss=siglip", "zero_stage=1", "checkpoint.every=2"]),
    "tp2_siglip": (2, ["model.loss=siglip", TP2, "zero_stage=1"]),
    "dp2": (2, ["zero_stage=1"]),
    "dp2_tp2": (4, [TP2, "zero_stage=1"]),
}
ATOL = RTOL = 1e-5


class Runs:
    """Each run of ``RUNS`` at most once per module, started when a test first asks for it."""

    def __init__(self, corpus: Path, tmp_path_factory):
        self.corpus, self.tmp = corpus, tmp_path_factory
        self.dirs: dict[str, Path] = {}

    def __getitem__(self, name: str) -> Path:
        if name not in self.dirs:
            ranks, overrides = RUNS[name]
            out = self.tmp.mktemp(name)
            train(self.corpus, out, ranks, *COMMON, *overrides)
            self.dirs[name] = out
        return self.dirs[name]


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory) -> Runs:
    return Runs(small_corpus, tmp_path_factory)


def assert_same_run(run: Path, reference: Path) -> None:
    """Same per-step losses and final weights, and the loss moved (so agreement means something)."""
    expected, actual = losses(reference), losses(run)
    assert sorted(actual) == sorted(expected) == list(range(1, STEPS + 1))
    assert [actual[s] for s in expected] == pytest.approx([expected[s] for s in expected], abs=ATOL, rel=RTOL)
    assert max(expected.values()) - min(expected.values()) > 0.1, "the loss did not move"
    # AdamW hardly sees a gradient scaled as a whole (a replicated weight's gradient summed over tp
    # peers): the gradient norm does, where both runs report it. (Rounding reaches 1e-5 of it by step 5;
    # a doubled share of the gradient would move it by tens of percent.)
    norms = [(a["grad_norm"], e["grad_norm"]) for a, e in zip(metrics(run), metrics(reference))
             if "grad_norm" in a and "grad_norm" in e]
    assert [a for a, _ in norms] == pytest.approx([e for _, e in norms], rel=10 * RTOL)
    assert_same_weights(exported_weights(run), exported_weights(reference))


def assert_same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Each tensor equal to 1e-5 of its norm, and no element off by more than 1e-4.

    Tensor parallelism sums a layer's partial products in another order, and AdamW divides by
    sqrt(v) + 1e-6: where an embedding row's gradient is a near-cancelling sum no larger than that eps,
    rounding in the fifth digit of the gradient moves that element's update by ~1e-5 (seen: one of 3.2M
    token-embedding elements, 1.3e-5, the tensor 4e-7 of its norm, the gradient norms equal to 1e-7).
    A shard missing or misplaced moves a tensor far beyond these bounds (a gradient scaled as a whole is
    caught by the gradient norms in ``assert_same_run``).
    """
    assert actual.keys() == expected.keys()
    for name in expected:  # the same (full) shapes: a tp=2 export is not a shard
        assert actual[name].shape == expected[name].shape, name
        assert (actual[name] - expected[name]).norm() <= RTOL * expected[name].norm() + ATOL, name
        torch.testing.assert_close(actual[name], expected[name], atol=10 * ATOL, rtol=RTOL, msg=name)


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tp2_equals_one_unsharded_rank(runs, loss):
    run, reference = ("tp2_zero0", "tp1_clip") if loss == "clip" else ("tp2_siglip", "tp1_siglip")
    assert_same_run(runs[run], runs[reference])
    assert json.loads((runs[run] / "train_summary.json").read_text())["parallel"] == {"dp": 1, "tp": 2, "pp": 1}


@pytest.mark.parametrize("stage", [2, 3])  # (ZeRO 1 with tp=2: the siglip runs above)
def test_tp2_with_zero_stage_equals_zero_0(runs, stage):
    assert_same_run(runs[f"tp2_zero{stage}"], runs["tp2_zero0"])


def test_the_tp2_runs_clipped_gradients(runs):
    # The global norm spans both shards of each split weight: clipping at the wrong norm would show
    # as a loss mismatch above from step 2 on. (ZeRO 0 reports no norm.)
    assert max(r["grad_norm"] for r in metrics(runs["tp2_zero2"])) > CLIP_AT


def test_dp2_tp2_on_4_ranks_equals_dp2(runs):
    """Catches a loss gathered over the wrong group, or data sharded by global rank (tp peers would
    then read different batches, which DeepSpeed's first-step input check would also refuse)."""
    assert_same_run(runs["dp2_tp2"], runs["dp2"])
    summary = json.loads((runs["dp2_tp2"] / "train_summary.json").read_text())
    assert summary["parallel"] == {"dp": 2, "tp": 2, "pp": 1} and summary["global_batch"] == 16


def test_a_tp2_checkpoint_resumes_exactly_at_tp2(runs, small_corpus, tmp_path):
    """Continued from step 2 into a new run directory. (Kills at each point of a save are tested at
    ZeRO-3 in test_exact_resume.py: the sequence does not depend on the layout.)"""
    ranks, overrides = RUNS["tp2_zero2"]
    source = runs["tp2_zero2"]
    result = train(small_corpus, tmp_path, ranks, *COMMON, *overrides,
                   f"resume={source / 'checkpoints' / 'step_0000002'}")
    assert "at step 2" in result.stdout
    straight, resumed = losses(source), losses(tmp_path)
    assert sorted(resumed) == list(range(3, STEPS + 1))
    assert [resumed[s] for s in resumed] == pytest.approx([straight[s] for s in resumed], abs=ATOL, rel=RTOL)
    assert_same_weights(exported_weights(tmp_path), exported_weights(source))


# A checkpoint resumed at another tp: (the run that wrote it, ranks and overrides of the resumed run).
RELAYOUTS = {"tp2_to_tp1": ("tp2_zero2", 1, ["zero_stage=2"]),
             "tp1_to_tp2": ("tp1_siglip", 2, ["model.loss=siglip", TP2, "zero_stage=1"])}


@pytest.mark.parametrize("change", RELAYOUTS)
def test_a_checkpoint_resumes_at_another_tp_through_the_universal_checkpoint(runs, small_corpus, tmp_path, change):
    """Works (DeepSpeed 0.19.8 converts AutoTP ZeRO checkpoints, and slices a tp=1 one): the losses after
    the resume point and the final weights are the uninterrupted run's. From step 2 the learning rate is
    still > 0 for two steps, so the restored Adam moments and schedule are checked, not only the weights."""
    source_run, ranks, overrides = RELAYOUTS[change]
    source = runs[source_run]
    result = train(small_corpus, tmp_path, ranks, *COMMON, *overrides,
                   f"resume={source / 'checkpoints' / 'step_0000002'}")
    assert "at step 2" in result.stdout
    expected = {step: loss for step, loss in losses(source).items() if step > 2}
    assert losses(tmp_path) == pytest.approx(expected, abs=ATOL, rel=RTOL)
    assert_same_weights(exported_weights(tmp_path), exported_weights(source))
    assert not (tmp_path / "checkpoints" / ".universal").exists()  # the converted copy is removed


def test_a_tp2_checkpoint_without_zero_optimizer_files_is_refused_at_tp1(runs, small_corpus):
    """ZeRO 0 writes no ZeRO optimizer files to convert: the message names the way that works."""
    sidecar = json.loads((runs["tp2_zero0"] / "checkpoints" / "step_0000005" / "vlmtrain_state.json").read_text())
    cfg = load_train_config("configs/train/demo.yaml", [f"data.train_shards={small_corpus / 'train'}", *COMMON,
                                                        "zero_stage=0"])
    with pytest.raises(CheckpointError, match=r"dp=1 × tp=2 × pp=1.*zero_stage >= 1.*only tp changed.*init_from="):
        check_resumable(sidecar, cfg, ParallelDims(1), sidecar["data_fingerprint"])


def split_dim(name: str) -> int | None:
    """How the plan splits a tensor: column-parallel weights and biases by output features (0),
    row-parallel weights by input features (1); None for a replicated one."""
    weight = re.sub(r"\.bias$", ".weight", name)
    if any(re.match(pattern, weight) for pattern in TP_PLAN.column):
        return 0
    if name.endswith(".weight") and any(re.match(pattern, name) for pattern in TP_PLAN.row):
        return 1
    return None


def shards_in_checkpoint(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The weights as the two tensor-parallel ranks held them, concatenated along their split."""
    parts = [torch.load(checkpoint_dir / f"mp_rank_{tp_rank:02d}_model_states.pt", weights_only=False)["module"]
             for tp_rank in range(2)]
    full = {}
    for name, first in parts[0].items():
        dim = split_dim(name)
        if dim is None:  # both ranks must hold the same values
            torch.testing.assert_close(parts[1][name], first, atol=0, rtol=0, msg=name)
            full[name] = first
        else:
            full[name] = torch.cat([first, parts[1][name]], dim=dim)
    assert sum(split_dim(name) is not None for name in full) > 0
    return {name: tensor.float() for name, tensor in full.items()}


def test_the_tp2_export_loads_into_open_clip_with_the_training_weights_embeddings(runs, tmp_path):
    run = runs["tp2_zero2"]
    trained = shards_in_checkpoint(run / "checkpoints" / "step_0000005")
    assert_same_weights(exported_weights(run), trained)

    ours, cfg, _ = load_exported(run / "final")
    write_openclip_dir(ours.state_dict(), cfg, tmp_path / "oc")
    theirs, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    ours.load_state_dict(trained)
    images = torch.randn(4, 3, cfg.vision.image_size, cfg.vision.image_size, generator=torch.Generator().manual_seed(7))
    tokens = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(
        ["a red circle", "a blue square", "two green triangles", "a yellow star"])
    with torch.no_grad():
        for encode, data in (("encode_image", images), ("encode_text", tokens)):
            expected = getattr(ours.eval(), encode)(data, normalize=True)
            torch.testing.assert_close(getattr(theirs.eval(), encode)(data, normalize=True), expected,
                                       atol=ATOL, rtol=0, msg=encode)
            assert F.pdist(expected).min() > 0.01  # distinct inputs give distinct embeddings
