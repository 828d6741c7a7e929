"""Weight balancing (lt_rebalance.heads.wb): one projected SGD step against numpy on the authors' loss."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from head_refs import gaussians

from lt_rebalance.heads import WeightBalancing

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def np_cb_weights(counts, beta):
    w = (1 - beta) / (1 - beta ** counts.astype(np.float64))
    return w / w.sum() * len(counts)


def np_wb_loss(W, b, X, y, cw):
    """The authors' CB_loss(..., 'softmax'): BCE of softmax(z) vs one-hot, weight w_y, mean over n x C;
    1 - p_j written as Σ_{k≠j} p_k so that float64 keeps its digits when p_j is near 1."""
    Z = X @ W.T + b
    K = W.shape[0]
    lse = np.logaddexp.reduce(Z, axis=1)
    log_p = Z - lse[:, None]
    log_1mp = np.stack([np.logaddexp.reduce(np.delete(Z, j, axis=1), axis=1) for j in range(K)], 1) - lse[:, None]
    Y = np.eye(K)[y]
    return (cw[y][:, None] * -(Y * log_p + (1 - Y) * log_1mp)).mean()


def _num_grad(f, x, eps=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        d = np.zeros_like(x)
        d[i] = eps
        g[i] = (f(x + d) - f(x - d)) / (2 * eps)
    return g


@pytest.mark.parametrize("scale", [1.0, 6.0])  # 6: a float32 softmax saturates (p of a wrong class is 1)
def test_wb_step_is_projected_sgd_on_the_authors_loss(scale):
    X, y, rng = gaussians([30, 12, 5], dim=4)
    W0 = rng.normal(size=(3, 4)) * np.array([[1.0], [0.5], [0.2]]) * scale  # norms grow with the class size
    b0 = rng.normal(size=3)
    lr, wd, thresh = 0.5 / scale, 0.1, 0.2
    if scale > 1:
        wrong = np.eye(3)[y] == 0
        assert (torch.from_numpy(X @ W0.T + b0).float().softmax(1).numpy()[wrong] == 1).any()
    head = WeightBalancing(W0, b0, epochs=1, lr=lr, batch_size=len(y), weight_decay=wd, thresh=thresh,
                           schedule="constant", keep_best=False, device="cpu").fit(X, y)
    cw = np_cb_weights(np.bincount(y), 0.9999)
    gW = _num_grad(lambda W: np_wb_loss(W, b0, X, y, cw), W0)
    gb = _num_grad(lambda b: np_wb_loss(W0, b, X, y, cw), b0)
    norms0 = np.linalg.norm(W0, axis=1)
    r = norms0.min() + thresh * (norms0.max() - norms0.min())
    W1 = W0 - lr * (gW + wd * W0)  # first SGD step: momentum buffer = gradient
    n1 = np.linalg.norm(W1, axis=1, keepdims=True)
    W1 = np.where(n1 > r, W1 * r / n1, W1)
    np.testing.assert_allclose(head.weight_.numpy(), W1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(head.bias_.numpy(), b0 - lr * (gb + wd * b0), rtol=1e-4, atol=1e-5)
    assert head.radius_ == pytest.approx(r, rel=1e-6)
    np.testing.assert_allclose(head.norms_.numpy(), np.linalg.norm(W1, axis=1), rtol=1e-4)
