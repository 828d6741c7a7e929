"""The closed-form affine cross-entropy (LWS/MARC step) against a float64 numpy computation."""
import numpy as np
import pytest
import torch

from lt_rebalance.heads import losses
from lt_rebalance.heads.losses import affine_cross_entropy


def numpy_affine_ce(z, y, a, c):
    """Loss and (dL/da, dL/dc) of mean CE(z * a + c) in float64, written out by hand."""
    z = z.astype(np.float64)
    u = z * a + c
    u_max = u.max(1, keepdims=True)
    p = np.exp(u - u_max)
    p /= p.sum(1, keepdims=True)
    B = len(y)
    loss = np.mean(np.log(np.exp(u - u_max).sum(1)) + u_max[:, 0] - u[np.arange(B), y])
    G = p.copy()
    G[np.arange(B), y] -= 1
    G /= B
    return loss, (G * z).sum(0), G.sum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("block_rows", [None, 1, 5])  # None: the whole batch in one block
def test_matches_numpy(dtype, shift, block_rows, monkeypatch):
    if block_rows is not None:  # blocks of rows that do not divide the batch
        monkeypatch.setattr(losses, "BLOCK_LOGITS", block_rows * 11)
    rng = np.random.default_rng(0)
    B, C = 37, 11
    z = torch.from_numpy(rng.normal(0, 4, (B, C))).to(dtype)
    y = torch.from_numpy(rng.integers(0, C, B))
    y[:5] = 3  # repeated labels: the one-hot part of the gradient accumulates
    a = torch.from_numpy(rng.uniform(0.5, 1.5, C)).float().requires_grad_()
    c = torch.from_numpy(rng.normal(0, 1, C)).float().requires_grad_() if shift else None
    loss = affine_cross_entropy(z, y, a, c)
    loss.backward()
    ref_loss, ref_ga, ref_gc = numpy_affine_ce(z.float().numpy(), y.numpy(), a.detach().double().numpy(),
                                               c.detach().double().numpy() if shift else 0.0)
    assert loss.dtype == torch.float32
    np.testing.assert_allclose(loss.item(), ref_loss, rtol=1e-6)
    np.testing.assert_allclose(a.grad.numpy(), ref_ga, rtol=1e-5, atol=1e-7)
    if shift:
        np.testing.assert_allclose(c.grad.numpy(), ref_gc, rtol=1e-5, atol=1e-7)


def test_chain_rule_through_parameters():
    """a and c computed from parameters (MARC: c = beta * norms) get their gradients by autograd."""
    rng = np.random.default_rng(1)
    z = torch.from_numpy(rng.normal(0, 2, (20, 6))).float()
    y = torch.from_numpy(rng.integers(0, 6, 20))
    omega = torch.ones(6, requires_grad=True)
    beta = torch.zeros(6, requires_grad=True)
    norms = torch.from_numpy(rng.uniform(1, 3, 6)).float()
    affine_cross_entropy(z, y, omega, beta * norms).backward()
    _, ga, gc = numpy_affine_ce(z.numpy(), y.numpy(), np.ones(6), np.zeros(6))
    np.testing.assert_allclose(omega.grad.numpy(), ga, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(beta.grad.numpy(), gc * norms.numpy(), rtol=1e-5, atol=1e-7)


def test_extreme_logits_stay_finite_and_normal():
    """Logit gaps far beyond exp's range: loss exact, gradients free of NaN and of denormals."""
    z = torch.tensor([[0.0, -500.0, -90.0, 1000.0], [3.0, 2.0, -1e4, 0.0]])
    y = torch.tensor([0, 1])
    a = torch.ones(4, requires_grad=True)
    c = torch.zeros(4, requires_grad=True)
    loss = affine_cross_entropy(z, y, a, c)
    loss.backward()
    # row 0: -log p_0 = 1000 (up to e^-1000 terms); row 1: logsumexp(3, 2, 0) - 2
    ref = (1000.0 + (np.log(np.exp(3) + np.exp(2) + 1) - 2)) / 2
    np.testing.assert_allclose(loss.item(), ref, rtol=1e-6)
    for g in (a.grad, c.grad):
        assert torch.isfinite(g).all()
        tiny = torch.finfo(torch.float32).tiny
        assert not ((g != 0) & (g.abs() < tiny)).any()


def test_weights_of_the_loss_scale_the_gradient():
    """backward with an upstream gradient g scales both closed-form gradients by g."""
    z = torch.randn(8, 5, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 5
    a = torch.ones(5, requires_grad=True)
    (3.0 * affine_cross_entropy(z, y, a)).backward()
    g3 = a.grad.clone()
    a.grad = None
    affine_cross_entropy(z, y, a).backward()
    torch.testing.assert_close(g3, 3 * a.grad)
