"""MaskVLM trained for real (DeepSpeed on gloo, the generated corpus), in three launches:

- a 2-rank run of the tiny preset, tensor-parallel (tp=2) under ZeRO-3, that lowers the ITC, MLM and MIM
  terms (ITM stays at chance, ln 2, until the modalities are aligned: the unit tests train it on one
  batch, and the 300-step benchmark run lowers it), checkpoints at the half, exports, and is
  evaluated by ``vlm-eval``;
- one unsharded rank under ZeRO-0 on the same batches: equal per-step losses (1e-5) and final weights,
  so tensor parallelism (the decoders' cross-attention included) and ZeRO-3's gathering (each encoder
  and decoder runs more than once per step) change nothing;
- the 2-rank run resumed from its half-way checkpoint in another directory: the same losses and
  weights (the masks come from the samples' positions and the ITM swaps from the per-step seed, so
  both replay).
"""
from __future__ import annotations

import json

import pytest

from tests.conftest import run_tool
from tests.helpers import assert_same_weights, exported_weights, losses, metrics, train

pytestmark = pytest.mark.dist

COMMON = ("log_every=1", "data.batch_size=8", "optim.warmup_steps=2", "optim.lr=2e-3")
STEPS, HALF = 10, 5
TERMS = ("loss/itc", "loss/itm", "loss/mlm", "loss/mim")
LEARNED_IN_A_SHORT_RUN = ("loss/itc", "loss/mlm", "loss/mim")
TP2 = ("parallel.tp=2", "zero_stage=3", f"checkpoint.every={HALF}")


def maskvlm_train(corpus, out, ranks, *overrides):
    return train(corpus, out, ranks, *COMMON, f"steps={STEPS}", *overrides, config="configs/train/maskvlm_tiny.yaml")


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    runs = {name: tmp_path_factory.mktemp(name) for name in ("tp2_zero3", "tp1_zero0", "tp2_resumed")}
    maskvlm_train(small_corpus, runs["tp2_zero3"], 2, *TP2)
    maskvlm_train(small_corpus, runs["tp1_zero0"], 1, "zero_stage=0")
    runs["resume_log"] = maskvlm_train(small_corpus, runs["tp2_resumed"], 2, *TP2, "resume=" + str(
        runs["tp2_zero3"] / "checkpoints" / f"step_{HALF:07d}")).stdout
    return runs


def test_tp2_zero3_equals_one_unsharded_rank_at_zero0(runs):
    reference, run = runs["tp1_zero0"], runs["tp2_zero3"]
    for term in ("loss", *TERMS):
        expected = [r[term] for r in metrics(reference)]
        assert [r[term] for r in metrics(run)] == pytest.approx(expected, abs=1e-5, rel=1e-5), term
    assert json.loads((run / "train_summary.json").read_text())["parallel"] == {"dp": 1, "tp": 2, "pp": 1}
    expected = exported_weights(reference)
    actual = exported_weights(run)
    assert actual.keys() == expected.keys()
    for name in expected:  # as test_tensor_parallel: 1e-5 of each tensor's norm, 1e-4 per element
        assert actual[name].shape == expected[name].shape, name
        assert (actual[name] - expected[name]).norm() <= 1e-5 * expected[name].norm() + 1e-5, name
    assert_same_weights(actual, expected, atol=1e-4)


def test_a_two_rank_run_lowers_the_loss_terms(runs):
    records = metrics(runs["tp2_zero3"])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(abs(r["loss/itm"] - 0.693) < 0.05 for r in records)  # at chance, finite
    for term in LEARNED_IN_A_SHORT_RUN:
        values = [r[term] for r in records]
        first, last = sum(values[:3]) / 3, sum(values[-3:]) / 3
        assert last < first, f"{term}: {values}"
    assert json.loads((runs["tp2_zero3"] / "final" / "vlmtrain.json").read_text())["family"] == "maskvlm"


def test_a_resumed_run_continues_exactly(runs):
    assert f"at step {HALF}" in runs["resume_log"]
    straight, resumed = losses(runs["tp2_zero3"]), losses(runs["tp2_resumed"])
    assert sorted(resumed) == list(range(HALF + 1, STEPS + 1))
    assert [resumed[s] for s in sorted(resumed)] == pytest.approx([straight[s] for s in sorted(resumed)], abs=1e-6)
    assert_same_weights(exported_weights(runs["tp2_resumed"]), exported_weights(runs["tp2_zero3"]), atol=1e-6)


def test_vlm_eval_evaluates_the_export(runs, small_corpus, tmp_path):
    out = tmp_path / "results.json"
    result = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(runs["tp2_zero3"]), "--data",
                      str(small_corpus / "eval"), "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["dataset"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"shapes", "digits", "retrieval"}
    for name in ("shapes", "digits"):
        assert 0.0 <= records[name]["metrics"]["acc1"] <= 1.0 and records[name]["metrics"]["num_samples"] > 0
