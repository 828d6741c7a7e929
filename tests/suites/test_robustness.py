"""Numerical robustness: extreme feature norms, single-image classes, absent classes, C = 2, D = 1."""
import numpy as np
import pytest
import torch

from lt_rebalance.heads import CRT, LWS, NCM, TauNorm
from lt_rebalance.metrics import evaluate


def _data(C, D, counts, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(C, D)) * 3
    y = np.repeat(np.arange(C), counts)
    return (means[y] + rng.normal(size=(len(y), D))).astype(np.float32), y


@pytest.mark.parametrize("scale", [1e-6, 1e6])
def test_scale_invariant_heads_keep_their_predictions(scale):
    X, y = _data(4, 6, [40, 10, 2, 1])
    W = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    for head in (lambda: NCM("cl2n"), lambda: NCM("l2n")):
        ref = head().fit(X, y).predict(X)
        assert np.array_equal(head().fit(X * scale, y).predict(X * scale), ref)
    # tau-norm without bias: argmax of (sX) w~ equals argmax of X w~ for s > 0
    ref = TauNorm(W, 1.0).fit().predict(X)
    assert np.array_equal(TauNorm(W, 1.0).fit().predict(X * scale), ref)


def test_huge_features_give_a_clear_error_not_nan():
    X, y = _data(3, 4, [20, 5, 2])
    with pytest.raises(ValueError, match="NaN/Inf scores"):
        NCM("un").fit(X * 1e20, y).evaluate(X * 1e20, y, np.bincount(y))
    with pytest.raises(ValueError, match="training diverged"):
        CRT(epochs=2, batch_size=8, device="cpu").fit(X * 1e20, y)


def test_tiny_features_give_finite_metrics():
    X, y = _data(3, 4, [20, 5, 2])
    for head in (CRT(epochs=2, batch_size=8, device="cpu"), NCM("un")):
        m = head.fit(X * 1e-20, y).evaluate(X * 1e-20, y, np.bincount(y))
        assert all(np.isfinite(m[k]) for k in ("all", "nll", "ece"))


def test_single_image_class_centroid_is_that_image():
    X, y = _data(3, 5, [10, 4, 1])
    ncm = NCM("un").fit(X, y)
    np.testing.assert_allclose(ncm.centroids_[2].numpy(), X[y == 2][0], rtol=1e-6)
    lws = LWS(np.eye(3, 5, dtype=np.float32), None, epochs=1, batch_size=5, device="cpu").fit(X, y)
    assert torch.isfinite(lws.scales_).all()


def test_classes_absent_from_the_eval_split_are_skipped_and_empty_groups_are_nan():
    counts = [200, 50, 5]  # one class per group
    scores = np.array([[3.0, 1, 0], [0, 2, 1], [2.0, 1, 0]])
    y = np.array([0, 1, 1])  # the few-shot class has no eval images
    m = evaluate(scores, y, counts)
    assert m["many"] == 1.0 and m["medium"] == 0.5
    assert np.isnan(m["few"])
    assert m["mean_class"] == pytest.approx(0.75)  # mean over the two classes present
    assert m["all"] == pytest.approx(2 / 3)


def test_two_classes_one_dimension():
    X, y = _data(2, 1, [30, 3], seed=3)
    m0, m1 = X[y == 0].mean(), X[y == 1].mean()
    expected = (np.abs(X[:, 0] - m1) < np.abs(X[:, 0] - m0)).astype(int)
    assert np.array_equal(NCM("un").fit(X, y).predict(X), expected)
    crt = CRT(epochs=5, batch_size=8, device="cpu").fit(X, y)
    assert crt.weight_.shape == (2, 1) and np.isfinite(crt.evaluate(X, y, [30, 3])["all"])
