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


# -- class weights (GRW) and label-aware smoothing: the authors' formulas in numpy ------------------
def numpy_grw(counts, rho):
    """DisAlign's / MARC's ``GRWCrossEntropyLoss._init_weights``: 1 / (n / N)^rho, normalised to sum C."""
    ratio = np.asarray(counts, np.float64) / np.sum(counts)
    w = 1 / ratio**rho
    return w / w.sum() * len(counts)


def numpy_las(counts, head, tail, shape):
    """MiSLAS ``LabelAwareSmoothing.__init__``."""
    n = np.asarray(counts, np.float64)
    n1, nK = n.max(), n.min()
    if shape == "concave":
        return tail + (head - tail) * np.sin((n - nK) * np.pi / (2 * (n1 - nK)))
    if shape == "linear":
        return tail + (head - tail) * (n - nK) / (n1 - nK)
    return head + (head - tail) * np.sin(1.5 * np.pi + (n - nK) * np.pi / (2 * (n1 - nK)))


def numpy_weighted_smoothed_ce(z, y, a, c, w, eps):
    """Loss and (dL/da, dL/dc) of sum_i w_yi [(1 - e_yi) nll_i + e_yi mean_j(-log p_ij)] / sum_i w_yi."""
    z = z.astype(np.float64)
    u = z * a + c
    B, C = u.shape
    logp = u - u.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    e, wy = eps[y], w[y]
    per_row = (1 - e) * -logp[np.arange(B), y] + e * -logp.mean(1)
    q = e[:, None] / C + (1 - e)[:, None] * np.eye(C)[y]
    G = wy[:, None] * (np.exp(logp) - q) / wy.sum()
    return (wy * per_row).sum() / wy.sum(), (G * z).sum(0), G.sum(0)


def test_grw_weights_and_las_smoothing_match_the_authors():
    counts = [1280, 600, 40, 7, 5, 5]
    for rho in (0.0, 0.5, 1.2, 2.0):
        np.testing.assert_allclose(losses.grw_weights(counts, rho).numpy(), numpy_grw(counts, rho), rtol=1e-6)
    for shape in ("concave", "linear", "convex"):
        eps = losses.las_smoothing(counts, 0.3, 0.05, shape).numpy()
        np.testing.assert_allclose(eps, numpy_las(counts, 0.3, 0.05, shape), rtol=1e-6, atol=1e-7)
        assert eps[0] == pytest.approx(0.3) and eps[-1] == pytest.approx(0.05)
    assert losses.las_smoothing([9, 9, 9], 0.4, 0.1).tolist() == pytest.approx([0.4] * 3)  # equal counts: head
    # an empty class counts as one row (the authors' code gives it 1 / 0 = inf, and NaN for all)
    np.testing.assert_allclose(losses.grw_weights([0, 10, 100], 1.2).numpy(), numpy_grw([1, 10, 100], 1.2), rtol=1e-6)
    assert torch.isfinite(losses.grw_weights([1, 10**6], 80.0)).all()  # log space: no overflow
    with pytest.raises(ValueError, match="concave, linear, convex"):
        losses.las_smoothing(counts, 0.3, 0.0, "exp")


@pytest.mark.parametrize("weighted,smoothed", [(True, False), (False, True), (True, True)])
@pytest.mark.parametrize("block_rows", [None, 4])
def test_weighted_smoothed_affine_ce_matches_numpy(weighted, smoothed, block_rows, monkeypatch):
    if block_rows is not None:
        monkeypatch.setattr(losses, "BLOCK_LOGITS", block_rows * 7)
    rng = np.random.default_rng(1)
    B, C = 29, 7
    z = rng.normal(0, 3, (B, C)).astype(np.float32)
    y = rng.integers(0, C, B)
    a, c = rng.uniform(0.5, 1.5, C), rng.normal(0, 1, C)
    counts = rng.integers(1, 500, C)
    w = numpy_grw(counts, 1.2) if weighted else np.ones(C)
    eps = numpy_las(counts, 0.4, 0.1, "concave") if smoothed else np.zeros(C)
    at, ct = (torch.tensor(v, dtype=torch.float32, requires_grad=True) for v in (a, c))
    kw = {"class_weights": losses.grw_weights(counts, 1.2) if weighted else None,
          "smoothing": losses.las_smoothing(counts, 0.4, 0.1) if smoothed else None}
    loss = affine_cross_entropy(torch.from_numpy(z), torch.from_numpy(y), at, ct, **kw)
    loss.backward()
    ref, ga, gc = numpy_weighted_smoothed_ce(z, y, a, c, w, eps)
    assert loss.item() == pytest.approx(ref, rel=1e-5)
    np.testing.assert_allclose(at.grad.numpy(), ga, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ct.grad.numpy(), gc, rtol=1e-4, atol=1e-6)
    # the autograd version (cRT, DisAlign) is the same loss
    u = torch.from_numpy(z).double() * torch.from_numpy(a) + torch.from_numpy(c)
    kw64 = {k: None if v is None else v.double() for k, v in kw.items()}
    ref_auto = losses.weighted_cross_entropy(u, torch.from_numpy(y), **kw64)
    assert ref_auto.item() == pytest.approx(ref, rel=1e-6)
    if weighted and not smoothed:  # PyTorch's own weighted mean
        F_ref = torch.nn.functional.cross_entropy(u, torch.from_numpy(y), weight=torch.from_numpy(w))
        assert F_ref.item() == pytest.approx(ref, rel=1e-9)
