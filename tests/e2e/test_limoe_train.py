"""LIMoE through ``vlm-train`` on 2 gloo ranks with its experts split over both (parallel.ep=2): a short
run on the generated corpus learns, logs and draws its routing and evaluates zero-shot; a run
SIGKILLed while it writes a checkpoint resumes to the same losses and weights."""
from __future__ import annotations

import json

import pytest

from tests.helpers import assert_same_weights, exported_weights, kill_while_writing, losses, metrics, train, train_command

pytestmark = [pytest.mark.e2e, pytest.mark.dist]
CONFIG = "configs/train/limoe_tiny.yaml"
STEPS = 8
COMMON = (f"steps={STEPS}", "log_every=1", "data.batch_size=16", "optim.warmup_steps=2", "optim.lr=5e-4",
          "checkpoint.every=2", "model.moe.capacity_factor=2.0")


@pytest.fixture(scope="module")
def straight(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("limoe_ep2")
    train(small_corpus, out, 2, *COMMON, f"eval.every={STEPS}", f"eval.datasets=[{small_corpus / 'eval' / 'shapes'}]",
          config=CONFIG)
    return out


def test_a_short_ep2_run_learns_and_draws_its_routing(straight):
    records = metrics(straight)
    contrastive = [r["loss/contrastive"] for r in records if "loss/contrastive" in r]
    assert sum(contrastive[-2:]) / 2 < contrastive[0] - 0.2
    assert (straight / "routing.png").stat().st_size > 10_000
    assert json.loads((straight / "train_summary.json").read_text())["parallel"] == {"dp": 2, "tp": 1, "pp": 1, "ep": 2}
    for term in ("l_aux", "image_local_entropy", "image_global_entropy", "text_local_entropy", "text_global_entropy"):
        assert all(f"loss/{term}" in r for r in records if "loss" in r)
    # Every expert of the MoE block served tokens, and the counts are totals over both ranks' batches.
    routed = [r for r in records if "routing/image/block1/tokens_e0" in r]
    assert len(routed) == STEPS
    for expert in range(4):
        assert sum(r[f"routing/{m}/block1/tokens_e{expert}"] for r in routed for m in ("image", "text")) > 0
    kept = sum(routed[0][f"routing/image/block1/tokens_e{e}"] for e in range(4))
    assert kept == pytest.approx(2 * 16 * 16 * (1 - routed[0]["routing/image/block1/dropped_frac"]))
    assert any(key.startswith("eval/") for r in records for key in r)  # zero-shot on the gathered experts
    # The export holds every expert under its 1-rank name, and loads as a model on its own.
    weights = exported_weights(straight)
    assert {k.split("deepspeed_experts.")[1].split(".")[0] for k in weights if "deepspeed_experts" in k} == set("0123")


def test_an_ep2_run_killed_mid_checkpoint_resumes_exactly(straight, small_corpus, tmp_path):
    command = train_command(small_corpus, tmp_path, 2, *COMMON, config=CONFIG)
    assert kill_while_writing(command, tmp_path / "checkpoints", "step_0000004")
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_0000002"
    result = train(small_corpus, tmp_path, 2, *COMMON, "resume=latest", config=CONFIG)
    assert "at step 2" in result.stdout
    expected = {r["step"]: r["loss"] for r in metrics(straight) if "loss" in r}  # not the eval record
    resumed = losses(tmp_path)
    assert [resumed[s] for s in range(3, STEPS + 1)] == pytest.approx([expected[s] for s in range(3, STEPS + 1)],
                                                                      abs=1e-5, rel=1e-5)
    assert_same_weights(exported_weights(tmp_path), exported_weights(straight), atol=1e-5)
