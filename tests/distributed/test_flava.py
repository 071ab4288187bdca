"""FLAVA trained by vlm-train on a generated demo corpus, in three launches shared by the tests:

- ``dp2``: 2 data-parallel ranks at ZeRO 0, 5 steps, checkpointing at step 2 (the reference);
- ``dp2_tp2_zero3``: 4 ranks, dp=2 × tp=2 under ZeRO 3, equal to the reference in every loss term at every
  step and in its final weights (fp32, 1e-5). ZeRO 3 partitions each parameter over the 2 data-parallel ranks
  and must gather each encoder's for both of its calls per step; tp=2 ≡ tp=1 at dp=2; and the contrastive
  loss is gathered over the data-parallel group (over all 4 ranks it would count each tp pair twice);
- ``trained``: the reference resumed from step 2 in a new directory and trained on to step 60: steps 3–5
  are the reference's (exact resume: masks and ITM swaps replay), every loss term goes down, and
  ``vlm-eval`` evaluates its export.

Warm-up lasts the 5 parity steps, so their learning rates do not depend on the run's length. lr 1e-3 (the
config says 2e-3): at 2e-3, runs equal to an ulp for 3 steps drifted apart chaotically by step 5 (3e-5 in
the contrastive term with the gradient norms still equal to 2e-6).

ITM swaps 10% of the pairs (``itm_negative_prob``): in 60 steps the term falls from a coin flip (ln 2) to
about the entropy of that rate (0.33), i.e. the head learns how often a pair is swapped. Learning which
pairs are needs towers the contrastive term has aligned first: it had not begun after 200 steps of 16
pairs (in-process runs, 2026-12-06). MaskVLM's balanced ITM shows that learning (test_maskvlm_training).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import failure_text, run_tool
from tests.helpers import (PARITY_STEPS, assert_dp2_tp2_zero3_equals_dp2, assert_resume_continues_exactly,
                           family_layout_runs, records_by_step, train_command)

pytestmark = pytest.mark.dist

TRAINED_STEPS, WINDOW = 60, 10
TERMS = tuple(f"loss/{name}" for name in ("contrastive", "mim", "mlm", "mmm_image", "mmm_text", "itm"))
CONFIG = "configs/train/flava_tiny.yaml"
COMMON = ("log_every=1", "data.shuffle_buffer=32", "optim.grad_clip=1.0", "data.batch_size=8",
          f"optim.warmup_steps={PARITY_STEPS}", "optim.lr=1e-3")
ATOL = RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory) -> dict:
    return family_layout_runs(small_corpus, tmp_path_factory, CONFIG, COMMON, TRAINED_STEPS)


def test_dp2_tp2_under_zero3_on_4_ranks_equals_dp2_at_zero0(runs):
    assert_dp2_tp2_zero3_equals_dp2(runs, TERMS, global_batch=16, rtol=RTOL, atol=ATOL)


def test_a_resumed_run_continues_exactly(runs):
    assert_resume_continues_exactly(runs, TERMS)


def test_every_loss_term_goes_down(runs):
    """Mean of the last 10 steps below the mean of the first 10 (steps 1–2 from the run it resumed), for
    each term; the contrastive one below chance, ln 16 (global batch 16): the towers began to align, not
    only forgot their initial spread. ITM: see the module's docstring."""
    records = records_by_step(runs["dp2"], runs["trained"])
    assert sorted(records) == list(range(1, TRAINED_STEPS + 1))
    for term in TERMS:
        values = [records[step][term] for step in sorted(records)]
        assert torch.isfinite(torch.tensor(values)).all(), term
        first, last = sum(values[:WINDOW]) / WINDOW, sum(values[-WINDOW:]) / WINDOW
        assert last < first, f"{term}: {values}"
    last = {term: sum(records[s][term] for s in range(TRAINED_STEPS - WINDOW + 1, TRAINED_STEPS + 1)) / WINDOW
            for term in TERMS}
    assert last["loss/contrastive"] < math.log(16)
    assert abs(records[1]["loss/itm"] - math.log(2)) < 0.1 and last["loss/itm"] < 0.45


def test_vlm_eval_evaluates_the_export(runs, small_corpus, tmp_path):
    meta = json.loads((runs["trained"] / "final" / "vlmtrain.json").read_text())
    assert meta["family"] == "flava" and meta["model"]["fusion"]["layers"] == 1
    out = tmp_path / "results.json"
    result = run_tool("vlm-eval", "zeroshot", "--checkpoint", str(runs["trained"]), "--data",
                      str(small_corpus / "eval"), "--out", str(out), "--batch-size", "64", "--no-progress")
    assert result.returncode == 0, failure_text(result)
    records = {r["dataset"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"shapes", "digits", "retrieval"}
    assert 0.0 <= records["shapes"]["metrics"]["acc1"] <= 1.0


def test_pipeline_parallelism_is_refused_before_launch(small_corpus, tmp_path):
    result = run_tool(*train_command(small_corpus, tmp_path, 2, "parallel.pp=2", "zero_stage=1", config=CONFIG))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "vlm-train: error: model.family=flava cannot be pipelined: set parallel.pp=1"]
    assert not any(tmp_path.iterdir())  # nothing launched, nothing written
