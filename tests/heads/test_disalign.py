"""DisAlign (Zhang et al., CVPR 2021) against a numpy re-implementation of the paper's formulas."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from lt_rebalance.heads import CRT, DisAlign, JointHead
from lt_rebalance.heads.training import FewStepsWarning
from lt_rebalance.metrics import evaluate

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def sigmoid(t):
    return 1 / (1 + np.exp(-t))


def np_forward(X, W, b, scale, shift, v, c):
    """Paper: s = σ(x)(α z + β) + (1 − σ(x)) z, σ(x) = sigmoid(v·x + c), α = 1 + scale."""
    z = X @ W.T + b
    g = sigmoid(X @ v + c)
    return z, g, g[:, None] * ((1 + scale) * z + shift) + (1 - g[:, None]) * z


def np_loss_grads(X, y, W, b, params, w):
    """GRW cross-entropy (weighted mean) and its gradients in (α − 1, β, v, c), written out by hand."""
    scale, shift, v, c = params
    z, g, s = np_forward(X, W, b, scale, shift, v, c)
    B = len(y)
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    wy = w[y]
    loss = -(wy * np.log(p[np.arange(B), y])).sum() / wy.sum()
    G = wy[:, None] * (p - np.eye(W.shape[0])[y]) / wy.sum()  # dL/ds
    u = scale * z + shift  # s = z + g u
    h = (G * u).sum(1) * g * (1 - g)  # dL/d(v·x + c)
    return loss, [(G * g[:, None] * z).sum(0), (G * g[:, None]).sum(0), X.T @ h, np.array([h.sum()])]


def np_sgd(X, y, W, b, w, steps, lr, wd, momentum):
    """torch.optim.SGD (momentum, weight decay) on full batches from the zero start."""
    C, D = W.shape
    params = [np.zeros(C), np.zeros(C), np.zeros(D), np.zeros(1)]
    bufs, losses = None, []
    for _ in range(steps):
        loss, grads = np_loss_grads(X, y, W, b, params, w)
        losses.append(loss)
        d = [gr + wd * p for gr, p in zip(grads, params)]
        bufs = d if bufs is None else [momentum * bf + di for bf, di in zip(bufs, d)]
        params = [p - lr * bf for p, bf in zip(params, bufs)]
    return params, losses


def long_tailed(seed=0, C=10, D=16, n_max=200, imbalance=50, spread=1.2, n_test=100):
    rng = np.random.default_rng(seed)
    counts = (n_max * (1 / imbalance) ** (np.arange(C) / (C - 1))).astype(int)
    mu = rng.normal(size=(C, D)) * spread
    y = np.repeat(np.arange(C), counts)
    yt = np.repeat(np.arange(C), n_test)
    X = (mu[y] + rng.normal(size=(len(y), D))).astype(np.float32)
    Xt = (mu[yt] + rng.normal(size=(len(yt), D))).astype(np.float32)
    return X, y, Xt, yt, counts


def test_two_steps_match_numpy():
    rng = np.random.default_rng(3)
    C, D, N = 5, 6, 40
    X = rng.normal(size=(N, D)).astype(np.float32)
    y = np.concatenate([np.zeros(20, int), np.ones(10, int), [2] * 6, [3] * 3, [4]])
    W, b = rng.normal(size=(C, D)).astype(np.float32), rng.normal(size=C).astype(np.float32)
    lr, wd, m = 0.5, 1e-2, 0.9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewStepsWarning)
        head = DisAlign(W, b, epochs=2, batch_size=N, lr=lr, weight_decay=wd, momentum=m, schedule="constant",
                        cache_dtype="float32", keep_best=False, device="cpu").fit(X, y)
    counts = np.bincount(y, minlength=C)
    w = 1 / (counts / counts.sum()) ** 1.2
    w = w / w.sum() * C  # the authors' GRW weights (the normalisation cancels)
    (scale, shift, v, c), losses = np_sgd(X.astype(np.float64), y, W.astype(np.float64), b.astype(np.float64),
                                          w, 2, lr, wd, m)
    assert np.abs(v).max() > 1e-3  # the gate moved in the second step (its gradient is 0 at the start)
    np.testing.assert_allclose(head.alpha_.numpy(), 1 + scale, rtol=1e-5)
    np.testing.assert_allclose(head.beta_.numpy(), shift, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head.gate_weight_.numpy(), v, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head.gate_bias_.numpy(), c, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(head.history_.loss, losses, rtol=1e-5)
    # the fitted head's scores are the paper's formula
    Xq = rng.normal(size=(7, D)).astype(np.float32)
    _, _, s = np_forward(Xq.astype(np.float64), W, b, scale, shift, v, c)
    np.testing.assert_allclose(head.scores(Xq), s, rtol=1e-4, atol=1e-5)
    assert head.protocol_params_["loss"] == "grw" and head.protocol_params_["rho"] == 1.2


def test_improves_few_shot_accuracy_over_the_joint_head():
    X, y, Xt, yt, counts = long_tailed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewStepsWarning)
        joint = CRT(sampler="ib", epochs=30, device="cpu").fit(X, y)  # the instance-balanced stage-1 head
    W, b = joint.weight_.numpy(), joint.bias_.numpy()
    base = evaluate(JointHead(W, b).fit().scores(Xt), yt, counts)
    head = DisAlign(W, b, device="cpu").fit(X, y)
    out = evaluate(head.scores(Xt), yt, counts)
    assert out["few"] > base["few"] + 0.04 and out["mean_class"] > base["mean_class"] + 0.01
    assert out["worst_class"] > base["worst_class"]


@pytest.mark.filterwarnings("ignore::lt_rebalance.heads.training.FewStepsWarning")
def test_numpy_in_numpy_out_and_clone():
    X, y, Xt, _, _ = long_tailed(C=4, D=5, n_max=60, imbalance=6)
    W = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    head = DisAlign(W, epochs=3, device="cpu").fit(X, y)
    s = head.scores(Xt[:9])
    assert isinstance(s, np.ndarray) and s.dtype == np.float32 and s.shape == (9, 4)
    np.testing.assert_array_equal(head.predict(Xt[:9]), s.argmax(1))
    st = head.scores(torch.from_numpy(Xt[:9]))
    assert isinstance(st, torch.Tensor)
    np.testing.assert_allclose(st.numpy(), s, rtol=1e-6)
    assert head.n_features_in_ == 5 and list(head.classes_) == [0, 1, 2, 3]
    assert head.logit_affine() is None  # no per-class affine map of X Wᵀ
    sklearn = pytest.importorskip("sklearn.base")
    c = sklearn.clone(head)
    assert not hasattr(c, "alpha_") and c.get_params()["rho"] == 1.2
    np.testing.assert_array_equal(c.fit(X, y).predict(Xt), head.predict(Xt))


@pytest.mark.parametrize("sampler,loss,rho,power", [("ib", "grw", 1.2, -0.2), ("ib", "grw", 1.0, 0.0),
                                                    ("cb", "grw", 0.5, -0.5), ("ib", "ce", 1.2, 1.0),
                                                    ("sqrt", "las", 1.2, 0.5)])
def test_implied_prior(sampler, loss, rho, power):
    counts = np.array([300, 40, 7, 0, 2])
    X, y, _, _, _ = long_tailed(C=4, D=3, n_max=40, imbalance=8)
    W = np.ones((5, 3), np.float32)
    head = DisAlign(W, epochs=1, batch_size=8, sampler=sampler, loss=loss, rho=rho, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FewStepsWarning)
        head.fit(X, y)
    p = np.maximum(counts, 1).astype(float) ** power  # (re-weighting by n^-rho of n^q sampling): n^(q - rho)
    torch.testing.assert_close(head.implied_prior(counts), torch.from_numpy(p / p.sum()))


def test_bad_parameters():
    W = np.ones((3, 2), np.float32)
    X, y = np.zeros((6, 2), np.float32), np.array([0, 1, 2, 0, 1, 2])
    with pytest.raises(ValueError, match="rho"):
        DisAlign(W, rho=-0.5).fit(X, y)
    with pytest.raises(ValueError, match="loss"):
        DisAlign(W, loss="focal").fit(X, y)
