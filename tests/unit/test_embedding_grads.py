"""Row gradients of the token embedding (``vlmtrain/embedding_grads.py``) are nn.Embedding's dense
gradients: the same values for the clip and the optimizer, through gradient accumulation and across
steps whose batches touch different rows."""
import copy

import torch

from tests.helpers import CLIP_SPEC, TINY_CLIP, build_clip
from vlmtrain.embedding_grads import EmbeddingGradients
from vlmtrain.optim import GradientClipper

MICRO_BATCHES = 2


def batches(steps: int, size: int = 4):
    """Per step, micro-batches whose captions share tokens within and across micro-batches, and
    steps that draw from different rows (so rows written one step must be cleared the next)."""
    generator = torch.Generator().manual_seed(0)
    context = TINY_CLIP.text.context_length
    for step in range(steps):
        low = 1 + 40 * step
        micro = []
        for _ in range(MICRO_BATCHES):
            tokens = torch.randint(low, low + 60, (size, context), generator=generator)
            tokens[:, -1] = TINY_CLIP.text.vocab_size - 1  # the end-of-text token the text tower pools at
            micro.append((torch.randn(size, 3, 32, 32, generator=generator), tokens))
        yield micro


def train(model, steps: int, max_norm: float | None, embedding_grads: EmbeddingGradients | None = None):
    """Per step: each parameter's gradient as the clip receives it, the norm, and the weights after AdamW."""
    loss_fn = CLIP_SPEC.build_loss(TINY_CLIP, None)
    clipper = GradientClipper(model, max_norm, embedding_grads) if max_norm else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    history = []
    for micro_batches in batches(steps):
        for images, tokens in micro_batches:
            (loss_fn(model(images, tokens))["loss"] / MICRO_BATCHES).backward()
            if embedding_grads:
                embedding_grads.accumulate()
        if embedding_grads:
            embedding_grads.install()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        if clipper:
            clipper.clip()
        history.append({"grads": grads, "norm": clipper.norm() if clipper else None,
                        "clipped": {name: p.grad.clone() for name, p in model.named_parameters()}})
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history[-1]["weights"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    return history


def twins():
    torch.manual_seed(0)
    dense = build_clip(TINY_CLIP)
    rows = copy.deepcopy(dense)
    return dense, rows, EmbeddingGradients(rows)


def test_the_installed_gradient_is_nn_embeddings_dense_gradient_bit_for_bit():
    dense, rows, embedding_grads = twins()
    expected, actual = train(dense, 3, None), train(rows, 3, None, embedding_grads)
    for step_expected, step_actual in zip(expected, actual):
        for name in step_expected["grads"]:
            assert torch.equal(step_actual["grads"][name], step_expected["grads"][name]), name
            assert torch.equal(step_actual["weights"][name], step_expected["weights"][name]), name
    assert rows.text.token_embedding.weight.grad is None  # cleared by the step, as a dense gradient is


def test_clipping_the_touched_rows_is_clip_grad_norm_on_the_whole_table():
    dense, rows, embedding_grads = twins()
    expected, actual = train(dense, 3, 0.5, embedding_grads=None), train(rows, 3, 0.5, embedding_grads)
    assert expected[0]["norm"] > 0.5  # the clip scaled the gradients at least once
    for step_expected, step_actual in zip(expected, actual):
        # The same squares summed in another order: the norm agrees to rounding.
        assert abs(step_actual["norm"] - step_expected["norm"]) <= 1e-6 * step_expected["norm"]
        for name in step_expected["clipped"]:
            torch.testing.assert_close(step_actual["clipped"][name], step_expected["clipped"][name],
                                       rtol=1e-6, atol=0.0)
            torch.testing.assert_close(step_actual["weights"][name], step_expected["weights"][name],
                                       rtol=1e-6, atol=1e-9)


def test_an_embedding_left_out_of_a_step_gets_no_gradient_as_with_nn_embedding():
    model = torch.nn.ModuleDict({"used": torch.nn.Embedding(10, 4), "unused": torch.nn.Embedding(10, 4)})
    embedding_grads = EmbeddingGradients(model)
    model["used"](torch.tensor([1, 1, 3])).sum().backward()
    embedding_grads.accumulate()
    embedding_grads.install()
    assert model["unused"].weight.grad is None
    assert torch.equal(model["used"].weight.grad[:, 0], torch.tensor([0., 2., 0., 1., 0., 0., 0., 0., 0., 0.]))
