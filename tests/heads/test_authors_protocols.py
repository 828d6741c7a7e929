"""The authors' protocols of MARC and weight balancing, step for step against small numpy
re-implementations of their training loops (microsoft/robustlearn ``marc/``, ShadeAlsha/LTR-weight-balancing)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from lt_rebalance.heads import MARC, WeightBalancing
from lt_rebalance.heads.training import FewStepsWarning

pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              pytest.mark.filterwarnings("ignore::lt_rebalance.heads.training.FewStepsWarning")]


def data(counts, dim=4, seed=0, spread=1.0):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(len(counts)), counts)
    X = rng.normal(size=(len(counts), dim))[y] * 2 + spread * rng.normal(size=(len(y), dim))
    return X.astype(np.float32), y, rng


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def permutations(n, epochs, seed=0):
    """The shuffled order of each epoch (a seeded shuffle: the data order both loops are fed)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(n, generator=g).numpy() for _ in range(epochs)]


class NumpySGD:
    """torch.optim.SGD(momentum, weight_decay) written out."""

    def __init__(self, momentum, wd):
        self.m, self.wd, self.bufs = momentum, wd, None

    def step(self, params, grads, lr):
        d = [g + self.wd * p for g, p in zip(grads, params)]
        self.bufs = d if self.bufs is None else [self.m * b + di for b, di in zip(self.bufs, d)]
        return [p - lr * b for p, b in zip(params, self.bufs)]


# -- MARC, the authors' loop ------------------------------------------------------------------------
def numpy_marc_authors(X, y, W, b, epochs, B, lr, wd, rho=1.2, momentum=0.9):
    """robustlearn marc: MARCLinear (a ⊙ z + b ⊙ ‖w‖), GRWCrossEntropyLoss (weights 1 / (n/N)^rho,
    normalised to sum C; the weighted mean), SGD, CosineAnnealingLR stepped after each epoch, a
    shuffled DataLoader and ``step += 1; if step == epoch_steps: break`` with epoch_steps = int(N / B)."""
    C = W.shape[0]
    counts = np.bincount(y, minlength=C)
    w = 1 / (counts / counts.sum()) ** rho
    w = w / w.sum() * C
    z, norms = X @ W.T + b, np.linalg.norm(W, axis=1)
    omega, beta = np.ones(C), np.zeros(C)
    opt, epoch_steps, n_steps = NumpySGD(momentum, wd), int(len(y) / B), 0
    for epoch, perm in enumerate(permutations(len(y), epochs)):
        lr_e = 0.5 * lr * (1 + math.cos(math.pi * epoch / epochs))
        step = 0
        for start in range(0, len(y), B):  # the DataLoader's batches (the last may be partial)
            step += 1
            if step == epoch_steps:
                break
            idx = perm[start:start + B]
            zb, yb = z[idx], y[idx]
            G = w[yb][:, None] * (softmax(omega * zb + beta * norms) - np.eye(C)[yb]) / w[yb].sum()
            omega, beta = opt.step([omega, beta], [(G * zb).sum(0), G.sum(0) * norms], lr_e)
            n_steps += 1
    return omega, beta, n_steps


@pytest.mark.parametrize("N,B,epochs", [(11, 3, 2), (12, 4, 1), (9, 2, 2)])
def test_marc_authors_protocol_step_for_step(N, B, epochs):
    counts = [N - N // 3 - 1, N // 3, 1]
    X, y, rng = data(counts)
    W, b = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    lr, wd = 0.5, 5e-4
    head = MARC(W, b, protocol="authors", epochs=epochs, lr=lr, batch_size=B, weight_decay=wd, keep_best=False,
                cache_dtype="float32", device="cpu").fit(X, y)
    omega, beta, steps = numpy_marc_authors(X.astype(np.float64), y, W.astype(np.float64), b.astype(np.float64),
                                            epochs, B, lr, wd)
    assert head.schedule_.steps == steps == epochs * (N // B - 1)
    np.testing.assert_allclose(head.omega_.numpy(), omega, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(head.beta_.numpy(), beta, rtol=1e-4, atol=1e-6)
    p = head.protocol_params_
    assert (p["protocol"], p["sampler"], p["loss"], p["rho"], p["lr"], p["steps_per_epoch"]) == (
        "authors", "ib", "grw", 1.2, lr, N // B - 1)


def test_marc_protocol_defaults():
    X, y, rng = data([300, 200, 60, 20], seed=1)
    W = rng.normal(size=(4, 4)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FewStepsWarning)  # "auto" never warns
        paper = MARC(W, device="cpu").fit(X, y).protocol_params_
        authors = MARC(W, protocol="authors", device="cpu").fit(X, y).protocol_params_
    assert (paper["lr"], paper["sampler"], paper["loss"], paper["epoch_batches"]) == (0.2, "cb", "ce", "full")
    assert (authors["lr"], authors["sampler"], authors["loss"], authors["epoch_batches"]) == (
        0.05, "ib", "grw", "drop-last")
    assert authors["batch_size"] == len(y) // 8 and authors["steps"] >= 500  # "auto" on a small file
    # explicit settings win over the protocol's
    explicit = MARC(W, protocol="authors", lr=0.1, sampler="cb", loss="ce", epochs=2, batch_size=64,
                    device="cpu").fit(X, y).protocol_params_
    assert (explicit["lr"], explicit["sampler"], explicit["loss"], explicit["steps"]) == (0.1, "cb", "ce", 2 * 8)
    with pytest.raises(ValueError, match="protocol"):
        MARC(W, protocol="official").fit(X, y)


def test_marc_authors_implied_prior():
    X, y, rng = data([300, 200, 60, 20], seed=1)
    head = MARC(rng.normal(size=(4, 4)), protocol="authors", epochs=1, device="cpu").fit(X, y)
    n = np.array([300.0, 200, 60, 20])
    torch.testing.assert_close(head.implied_prior(n), torch.from_numpy(n**-0.2 / (n**-0.2).sum()))
    paper = MARC(rng.normal(size=(4, 4)), epochs=1, device="cpu").fit(X, y)
    torch.testing.assert_close(paper.implied_prior(n), torch.full((4,), 0.25, dtype=torch.float64))


# -- weight balancing, the authors' loop ------------------------------------------------------------
def np_cb_weights(counts, beta):
    w = (1 - beta) / (1 - beta ** counts.astype(np.float64))
    return w / w.sum() * len(counts)


def np_cb_bce_grad(Z, y, cw):
    """d/dZ of the authors' CB_loss(..., 'softmax'): -mean over n x C of w_y [t log p + (1 - t) log(1 - p)]."""
    n, C = Z.shape
    p, t = softmax(Z), np.eye(C)[y]
    A = -(cw[y][:, None] / (n * C)) * (t / p - (1 - t) / (1 - p))  # dL/dp
    return p * (A - (A * p).sum(1, keepdims=True))  # through the softmax


def numpy_wb_authors(X, y, W, b, epochs, B, lr, wd, thresh, beta=0.9999, momentum=0.9):
    """LTR-weight-balancing train_model: per epoch schedulerW.step() first (CosineAnnealingLR, so
    epoch e runs at lr/2 (1 + cos(pi (e + 1) / T))), a shuffled DataLoader with its partial last
    batch, SGD on fc weight and bias, then MaxNorm_via_PGD.PGD once (rows of W longer than r scaled
    back to r; r = min‖w‖ + thresh (max‖w‖ − min‖w‖) of the starting W; the bias is free)."""
    C = W.shape[0]
    cw = np_cb_weights(np.bincount(y, minlength=C), beta)
    norms0 = np.linalg.norm(W, axis=1)
    r = norms0.min() + thresh * (norms0.max() - norms0.min())
    opt, over = NumpySGD(momentum, wd), False
    for epoch, perm in enumerate(permutations(len(y), epochs)):
        lr_e = 0.5 * lr * (1 + math.cos(math.pi * (epoch + 1) / epochs))
        for start in range(0, len(y), B):
            idx = perm[start:start + B]
            G = np_cb_bce_grad(X[idx] @ W.T + b, y[idx], cw)
            W, b = opt.step([W, b], [G.T @ X[idx], G.sum(0)], lr_e)
            over |= bool((np.linalg.norm(W, axis=1) > r * (1 + 1e-3)).any())
        norms = np.linalg.norm(W, axis=1)
        W = np.where((norms > r)[:, None], W * (r / norms)[:, None], W)
    return W, b, r, over


@pytest.mark.parametrize("N,B,epochs", [(10, 4, 3), (9, 3, 2)])
def test_wb_authors_protocol_step_for_step(N, B, epochs):
    X, y, rng = data([N - 4, 3, 1], seed=2)
    W0 = (rng.normal(size=(3, 4)) * np.array([[2.0], [1.0], [0.3]])).astype(np.float32)
    b0 = rng.normal(size=3).astype(np.float32)
    lr, wd, thresh = 2.0, 0.1, 0.1
    head = WeightBalancing(W0, b0, protocol="authors", epochs=epochs, lr=lr, batch_size=B, weight_decay=wd,
                           thresh=thresh, keep_best=False, device="cpu").fit(X, y)
    W, b, r, over = numpy_wb_authors(X.astype(np.float64), y, W0.astype(np.float64), b0.astype(np.float64),
                                     epochs, B, lr, wd, thresh)
    assert over  # rows left the ball between projections: per-step projection would give another result
    assert head.schedule_.steps == epochs * -(-N // B)  # the partial batch is a step
    np.testing.assert_allclose(head.weight_.numpy(), W, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head.bias_.numpy(), b, rtol=1e-4, atol=1e-6)
    assert head.radius_ == pytest.approx(r, rel=1e-6)
    p = head.protocol_params_
    assert (p["projection"], p["schedule"], p["epoch_batches"]) == ("epoch", "cosine-reference", "partial")
    paper = WeightBalancing(W0, b0, epochs=epochs, lr=lr, batch_size=B, weight_decay=wd, thresh=thresh,
                            keep_best=False, device="cpu").fit(X, y)
    assert paper.protocol_params_["projection"] == "step" and paper.schedule_.steps == epochs * (N // B)
    assert not np.allclose(paper.weight_.numpy(), W, atol=1e-3)


def test_wb_implied_prior_is_the_sampler_times_the_cb_weights():
    X, y, rng = data([30, 8, 2], seed=3)
    head = WeightBalancing(rng.normal(size=(3, 4)), epochs=1, device="cpu").fit(X, y)
    n = np.array([30.0, 8, 2])
    p = n * np_cb_weights(n, 0.9999)  # instance-balanced batches, weights (1 - b) / (1 - b^n)
    torch.testing.assert_close(head.implied_prior(n), torch.from_numpy(p / p.sum()))
