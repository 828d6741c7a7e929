"""Label-aware smoothing (MiSLAS stage 2) as a loss of cRT and LWS: one SGD step against numpy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lt_rebalance.heads import CRT, LWS
from lt_rebalance.heads.crt import default_linear_init

pytestmark = [pytest.mark.usefixtures("torch_one_thread"),
              pytest.mark.filterwarnings("ignore::lt_rebalance.heads.training.FewStepsWarning")]


def np_eps(counts, head, tail):
    """MiSLAS LabelAwareSmoothing, shape 'concave'."""
    n = np.asarray(counts, np.float64)
    return tail + (head - tail) * np.sin((n - n.min()) * np.pi / (2 * (n.max() - n.min())))


def np_las_grad(Z, y, eps):
    """d/dZ of mean_i [(1 - e_yi) (-log p_iy) + e_yi mean_j (-log p_ij)] = (p - q) / B."""
    B, C = Z.shape
    p = np.exp(Z - Z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e = eps[y]
    q = (1 - e)[:, None] * np.eye(C)[y] + e[:, None] / C
    loss = np.mean((1 - e) * -np.log(p[np.arange(B), y]) + e * -np.log(p).mean(1))
    return loss, (p - q) / B


def problem(seed=0):
    rng = np.random.default_rng(seed)
    counts = [40, 15, 6, 2]
    y = np.repeat(np.arange(4), counts)
    X = (rng.normal(size=(4, 5))[y] + rng.normal(size=(len(y), 5))).astype(np.float32)
    return X, y, counts, rng


def test_crt_las_step_matches_numpy():
    X, y, counts, _ = problem()
    lr, wd, head_eps, tail_eps = 0.4, 5e-4, 0.4, 0.1
    crt = CRT(loss="las", smooth_head=head_eps, smooth_tail=tail_eps, epochs=1, batch_size=len(y), lr=lr,
              weight_decay=wd, sampler="ib", schedule="constant", keep_best=False, device="cpu").fit(X, y)
    W0, b0 = (t.double().numpy() for t in default_linear_init(4, 5, torch.Generator().manual_seed(0)))
    loss, G = np_las_grad(X @ W0.T + b0, y, np_eps(counts, head_eps, tail_eps))
    np.testing.assert_allclose(crt.weight_.numpy(), W0 - lr * (G.T @ X + wd * W0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(crt.bias_.numpy(), b0 - lr * (G.sum(0) + wd * b0), rtol=1e-5, atol=1e-6)
    assert crt.history_.loss[0] == pytest.approx(loss, rel=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        CRT(loss="las", label_smoothing=0.1).fit(X, y)


@pytest.mark.parametrize("cache_dtype", ["float32", None])
def test_lws_las_step_matches_numpy(cache_dtype):
    X, y, counts, rng = problem(1)
    W, b = rng.normal(size=(4, 5)), rng.normal(size=4)
    lr, wd = 0.3, 5e-4
    head = LWS(W, b, loss="las", smooth_head=0.3, smooth_tail=0.0, epochs=1, batch_size=len(y), lr=lr,
               weight_decay=wd, sampler="ib", schedule="constant", keep_best=False, device="cpu",
               cache_dtype="float32", max_cache_gb=0.0 if cache_dtype is None else None).fit(X, y)
    assert head.cache_dtype_ == cache_dtype  # cached logits, or recomputed per batch
    Z = X.astype(np.float64) @ W.T + b
    loss, G = np_las_grad(Z, y, np_eps(counts, 0.3, 0.0))
    np.testing.assert_allclose(head.scales_.numpy(), 1 - lr * ((G * Z).sum(0) + wd), rtol=1e-5)
    assert head.history_.loss[0] == pytest.approx(loss, rel=1e-5)
    p = head.protocol_params_
    assert (p["loss"], p["smooth_head"], p["smooth_tail"], p["smooth_shape"]) == ("las", 0.3, 0.0, "concave")


def test_las_parameters_are_checked():
    X, y, _, rng = problem()
    with pytest.raises(ValueError, match="smooth_head"):
        CRT(loss="las", smooth_head=1.0).fit(X, y)
    with pytest.raises(ValueError, match="smooth_tail"):
        LWS(rng.normal(size=(4, 5)), loss="las", smooth_tail=-0.1).fit(X, y)
    with pytest.raises(ValueError, match="smooth_shape"):
        LWS(rng.normal(size=(4, 5)), loss="las", smooth_shape="exp").fit(X, y)
