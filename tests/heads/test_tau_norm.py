"""τ-normalisation and its sweep (lt_rebalance.heads.tau_norm) against direct numpy computations."""
from __future__ import annotations

import numpy as np
import pytest
from head_refs import joint_like_weight, min_top2_margin, np_group_summary, np_tau_logits

from lt_rebalance.heads import DEFAULT_TAUS, JointHead, TauNorm, tau_normalize, tau_sweep

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def test_tau_zero_is_joint_head_without_bias(tau_data):
    d = tau_data
    W = joint_like_weight(d)
    b = np.linspace(-1, 1, 12).astype(np.float32)
    tau0 = TauNorm(W, tau=0.0).fit().decision_function(d["X_test"])
    joint_nobias = JointHead(W, None).fit().decision_function(d["X_test"])
    joint_bias = JointHead(W, b).fit().decision_function(d["X_test"])
    np.testing.assert_allclose(tau0, d["X_test"].astype(np.float64) @ W.T, rtol=1e-5, atol=1e-5)
    assert np.allclose(tau0, joint_nobias, rtol=0, atol=1e-6)
    assert not np.allclose(tau0, joint_bias, atol=1e-3)  # the bias is dropped


def test_tau_normalize_formula():
    rng = np.random.default_rng(0)
    W = rng.normal(size=(5, 7)) * np.array([[0.1], [1], [3], [10], [0.5]])
    for tau in (0.0, 0.3, 1.0, 1.7, 2.0):
        expected = W / np.linalg.norm(W, axis=1, keepdims=True) ** tau
        np.testing.assert_allclose(tau_normalize(W.astype(np.float32), tau).numpy(), expected, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(tau_normalize(W, 1.0).numpy(), axis=1), 1.0, rtol=1e-6)


def test_default_tau_grid():
    np.testing.assert_allclose(DEFAULT_TAUS, np.linspace(0, 2, 21), atol=1e-12)


@pytest.mark.parametrize("split", ["val", "test"])
def test_tau_sweep_equals_naive_loop(tau_data, split):
    d = tau_data
    W = joint_like_weight(d)
    X, y = d[f"X_{split}"], d[f"y_{split}"]
    taus = list(np.linspace(0, 2, 21))
    got = tau_sweep(X, y, W, d["counts"], taus, chunk=50)  # several row chunks
    curves = {k: [] for k in ("all", "mean_class", "many", "medium", "few")}
    for tau in taus:
        logits = np_tau_logits(X, W, tau)
        assert min_top2_margin(logits) > 1e-5  # no near-ties: float32 and float64 agree on the argmax
        s = np_group_summary(logits.argmax(1), y, d["counts"])
        for k in curves:
            curves[k].append(s[k])
    for k, v in curves.items():
        assert got[k].shape == (21,)
        np.testing.assert_allclose(got[k].numpy(), v, rtol=0, atol=1e-12, err_msg=k)
    # the curve is not flat: τ matters on this data
    assert got["few"].max() > got["few"][0] + 0.05


def test_tau_sweep_thresholds(tau_data):
    d = tau_data
    W = joint_like_weight(d)
    taus = [0.0, 1.0]
    got = tau_sweep(d["X_test"], d["y_test"], W, d["counts"], taus, many=50, few=10)
    for i, tau in enumerate(taus):
        s = np_group_summary(np_tau_logits(d["X_test"], W, tau).argmax(1), d["y_test"], d["counts"], 50, 10)
        for k in ("many", "medium", "few"):
            assert got[k][i].item() == pytest.approx(s[k], abs=1e-12)


@pytest.mark.parametrize("metric,key", [("top1", "all"), ("mean_class", "mean_class"), ("few", "few")])
def test_taunorm_selects_argmax_on_val(tau_data, metric, key):
    d = tau_data
    W = joint_like_weight(d)
    head = TauNorm(W, metric=metric).fit(d["X_val"], d["y_val"], d["counts"])
    taus = list(DEFAULT_TAUS)
    val = np.array([np_group_summary(np_tau_logits(d["X_val"], W, t).argmax(1), d["y_val"], d["counts"])[key]
                    for t in taus])
    best = taus[int(np.flatnonzero(val == val.max())[0])]  # first maximum = smallest τ on the sorted grid
    assert head.tau_ == pytest.approx(best)
    np.testing.assert_allclose(head.curve_[key].numpy(), val, atol=1e-12)
    # test logits at the selected τ
    np.testing.assert_allclose(head.decision_function(d["X_test"]), np_tau_logits(d["X_test"], W, best),
                               rtol=1e-4, atol=1e-5)


def test_taunorm_ties_go_to_smaller_tau():
    # equal row norms: every τ rescales all logits alike, so every τ ties on every metric
    rng = np.random.default_rng(0)
    W = rng.normal(size=(3, 4))
    W = (W / np.linalg.norm(W, axis=1, keepdims=True) * 2.0).astype(np.float32)
    X = rng.normal(size=(30, 4)).astype(np.float32)
    y = rng.integers(0, 3, size=30)
    for taus in ([0.0, 0.5, 1.0], [2.0, 1.0, 0.5], [1.5, 0.25, 0.75]):
        head = TauNorm(W, taus=taus).fit(X, y, [50, 50, 50])
        assert head.tau_ == min(taus), taus


def test_taunorm_fixed_tau_and_errors(tau_data):
    d = tau_data
    W = joint_like_weight(d)
    head = TauNorm(W, tau=1.3).fit()
    assert head.tau_ == 1.3 and head.curve_ is None
    np.testing.assert_allclose(head.predict(d["X_test"]), np_tau_logits(d["X_test"], W, 1.3).argmax(1))
    with pytest.raises(ValueError, match="pass X, y and counts"):
        TauNorm(W).fit()
    # no few-shot class in counts -> selecting on "few" is undefined
    with pytest.raises(ValueError, match="undefined"):
        TauNorm(W, metric="few").fit(d["X_val"], d["y_val"], np.full(12, 500))
    with pytest.raises(ValueError, match=r"TauNorm: metric must be one of .*'top1'.*got 'f1'"):
        TauNorm(W, metric="f1").fit(d["X_val"], d["y_val"], d["counts"])
