"""Our ClipLoss and SigLipLoss equal open_clip's on the same features: loss and gradients."""
import open_clip
import torch
import torch.nn.functional as F

from vlmtrain.models.clip.loss import ClipLoss, SigLipLoss


def features(n=12, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1).requires_grad_()
    scale = torch.tensor([14.3], requires_grad=True)
    return image, text, scale


def loss_and_grads(loss_fn, image, text, scale):
    loss = loss_fn(image, text, scale)
    grads = torch.autograd.grad(loss, (image, text, scale))
    return loss.detach(), grads


def test_clip_loss_matches_open_clip_loss_and_gradients():
    ours = loss_and_grads(ClipLoss(), *features())
    theirs = loss_and_grads(open_clip.loss.ClipLoss(), *features())
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    for g_ours, g_theirs in zip(ours[1], theirs[1]):
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-5, rtol=1e-5)


def test_clip_loss_is_low_for_aligned_pairs_and_high_for_shuffled():
    image, _, scale = features()
    aligned = ClipLoss()(image, image, scale)
    shuffled = ClipLoss()(image, image.roll(1, dims=0), scale)
    assert aligned < 0.1 < shuffled


def test_siglip_loss_matches_open_clip_loss_and_gradients():
    image, text, _ = features()
    scale, bias = torch.tensor([10.0], requires_grad=True), torch.tensor([-10.0], requires_grad=True)

    def run(loss_fn):
        loss = loss_fn(image, text, scale, bias)
        return loss.detach(), torch.autograd.grad(loss, (image, text, scale, bias))

    ours, theirs = run(SigLipLoss()), run(open_clip.loss.SigLipLoss())
    torch.testing.assert_close(ours[0], theirs[0], atol=1e-5, rtol=1e-5)
    for g_ours, g_theirs in zip(ours[1], theirs[1]):
        torch.testing.assert_close(g_ours, g_theirs, atol=1e-5, rtol=1e-5)


def test_siglip_loss_is_low_for_aligned_pairs_and_high_for_shuffled():
    image, _, _ = features()
    scale, bias = torch.tensor([30.0]), torch.tensor([-10.0])
    aligned = SigLipLoss()(image, image, scale, bias)
    shuffled = SigLipLoss()(image, image.roll(1, dims=0), scale, bias)
    assert aligned < shuffled
