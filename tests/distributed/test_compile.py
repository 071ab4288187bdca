"""``compile=true`` trains the model ``vlm-train`` would train eagerly: the same 1-process run (ZeRO 0, the
lean-step layout: row gradients for the embedding, the trainer's clip) with the model compiled by
torch.compile gives the same losses step by step and the same exported weights, under the same names.

Tolerance: inductor fuses the layer norms, softmaxes and GELUs and sums them in another order, so the
fp32 results differ in the last bits (measured: ≤ 1e-6 on the loss, ≤ 3e-7 on a gradient); after AdamW's
steps that stays within 1e-5 per step's loss and 1e-5 of each weight. The model is the smallest one
that keeps every part (one block per tower, width 16), so compiling it costs as little as it can.
"""
import pytest

from tests.helpers import exported_weights, losses, train

pytestmark = pytest.mark.dist

STEPS = 4
SMALL = ("zero_stage=0", f"steps={STEPS}", "log_every=1", "data.batch_size=8", "optim.warmup_steps=1",
         "optim.grad_clip=1.0", "model.embed_dim=16", "model.vision.width=16", "model.vision.layers=1",
         "model.text.width=16", "model.text.layers=1", "model.text.context_length=8")


@pytest.fixture(scope="module")
def runs(small_corpus, tmp_path_factory):
    """By name: the run directory and the completed ``vlm-train`` process."""
    runs = {}
    for name in ("eager", "compiled"):
        out = tmp_path_factory.mktemp(name)
        runs[name] = (out, train(small_corpus, out, 1, *SMALL, f"compile={name == 'compiled'}"))
    return runs


def test_the_compiled_run_compiled_its_model(runs):
    _, result = runs["compiled"]
    assert "vlm-train: compiling the model (torch.compile)" in result.stdout
    assert "compiling" not in runs["eager"][1].stdout


def test_compiled_losses_equal_eager_step_by_step(runs):
    eager, compiled = losses(runs["eager"][0]), losses(runs["compiled"][0])
    assert list(compiled) == list(eager) == list(range(1, STEPS + 1))
    assert list(compiled.values()) == pytest.approx(list(eager.values()), abs=1e-5, rel=0)
    assert abs(eager[STEPS] - eager[1]) > 0.01  # the loss moved: agreement means something


def test_compiled_export_has_the_eager_names_and_weights(runs):
    import torch

    eager, compiled = exported_weights(runs["eager"][0]), exported_weights(runs["compiled"][0])
    assert compiled.keys() == eager.keys()  # no "_orig_mod." prefixes: compiled in place
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], atol=1e-5, rtol=0, msg=name)
