"""The L-BFGS linear probe (lt_rebalance.heads.linear_probe) against scikit-learn's objective
and scikit-learn itself."""
from __future__ import annotations

import numpy as np
import pytest
from head_refs import gaussians, np_softmax

from lt_rebalance.heads import LinearProbe

try:
    import sklearn.linear_model as sklm
except ImportError:  # pragma: no cover
    sklm = None

needs_sklearn = pytest.mark.skipif(sklm is None, reason="scikit-learn is not installed")
pytestmark = pytest.mark.usefixtures("torch_one_thread")


def np_probe_objective(X, y, W, b, C_, balanced):
    """scikit-learn's lbfgs objective (1/S) Σ s ℓ + ‖W‖² / (2 C S) and its gradient in W, b."""
    K = W.shape[0]
    n = np.bincount(y, minlength=K)
    s = len(y) / ((n > 0).sum() * n[y]) if balanced else np.ones(len(y))
    S = s.sum()
    Z = X @ W.T + b
    P = np_softmax(Z)
    f = (s * (np.log(np.exp(Z - Z.max(1, keepdims=True)).sum(1)) + Z.max(1) - Z[np.arange(len(y)), y])).sum() / S
    f += (W**2).sum() / (2 * C_ * S)
    G = (P - np.eye(K)[y]) * s[:, None] / S
    return f, G.T @ X + W / (C_ * S), G.sum(0)


@pytest.mark.parametrize("balanced,C_", [(True, 0.05), (False, 50.0)])
def test_probe_minimises_sklearn_objective(balanced, C_):
    X, y, _ = gaussians([50, 25, 12, 6])
    head = LinearProbe(C_, class_weight="balanced" if balanced else "none", tol=1e-9, max_iter=500,
                       precision="float64", device="cpu").fit(X, y)
    W, b = head.weight_.double().numpy(), head.bias_.double().numpy()
    f, gW, gb = np_probe_objective(X, y, W, b, C_, balanced)
    assert head.converged_ and head.objective_ == pytest.approx(f, rel=1e-6)
    assert max(np.abs(gW).max(), np.abs(gb).max()) < 1e-5  # a stationary point of the numpy objective


@needs_sklearn
@pytest.mark.parametrize("K,class_weight,C_", [(2, "balanced", 1.0), (2, None, 0.01), (4, "balanced", 0.01),
                                              (4, "balanced", 100.0), (4, None, 1.0),
                                              (4, {0: 3.0, 3: 0.5}, 1.0)])
def test_probe_agrees_with_sklearn(K, class_weight, C_):
    X, y, rng = gaussians([50, 25, 12, 6][:K])
    Xq = 2 * rng.normal(size=(300, X.shape[1]))
    sk = sklm.LogisticRegression(C=C_, class_weight=class_weight).fit(X, y)  # defaults: lbfgs, tol 1e-4
    ours = LinearProbe(C_, class_weight=class_weight or "none", precision="float64", device="cpu").fit(X, y)
    assert (ours.predict(Xq) == sk.predict(Xq)).mean() >= 0.99
    if K > 2:
        assert ours.n_iter_ == sk.n_iter_[0]  # the same optimiser on the same objective
    # at a tight tolerance both reach the same optimum (binary: w = w_1 - w_0, b = b_1 - b_0)
    sk = sklm.LogisticRegression(C=C_, class_weight=class_weight, tol=1e-9, max_iter=1000).fit(X, y)
    ours = LinearProbe(C_, class_weight=class_weight or "none", tol=1e-9, max_iter=1000, precision="float64",
                       device="cpu").fit(X, y)
    W, b = ours.weight_.double().numpy(), ours.bias_.double().numpy()
    coef, icpt = (W[1:] - W[:1], b[1:] - b[:1]) if K == 2 else (W, b - b.mean())
    scale = max(1, np.abs(sk.coef_).max())
    np.testing.assert_allclose(coef, sk.coef_, atol=1e-5 * scale)
    np.testing.assert_allclose(icpt, sk.intercept_ - (0 if K == 2 else sk.intercept_.mean()), atol=1e-5 * scale)
    # float32 arithmetic: the same predictions
    ours32 = LinearProbe(C_, class_weight=class_weight or "none", device="cpu").fit(X.astype(np.float32), y)
    assert (ours32.predict(Xq) == sk.predict(Xq)).mean() >= 0.99


def test_probe_refuses_one_class_and_reports_max_iter():
    X, y, _ = gaussians([10, 10])
    with pytest.raises(ValueError, match="at least 2 classes"):
        LinearProbe(device="cpu").fit(X[:10], y[:10])
    head = LinearProbe(100.0, max_iter=1, device="cpu").fit(X, y)
    assert head.n_iter_ == 1 and not head.converged_
